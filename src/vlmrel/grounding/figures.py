"""grounding figures: notebook 03's six-panel validation figure, the threshold comparison, timing.

Every figure says which boundary definition it uses (seed defect 6) and that failures are left
out of the IoU panels (seed defect 1).
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Mapping, Sequence

import numpy as np

from vlmrel.figures import plt, save_figure
from vlmrel.grounding.analysis import Matrices, _row_nanmean
from vlmrel.grounding.iou import BOUNDARY_DEFINITIONS

_DIFF_COLORS = {"easy": "tab:green", "medium": "tab:orange", "hard": "tab:red"}
_METHOD_STYLE = {"baseline": "tab:gray", "lbfgsb": "tab:blue", "exact": "tab:red"}
_METHOD_LABEL = {"baseline": "baseline [0.3, 0.5, 0.7]", "lbfgsb": "L-BFGS-B (seed)", "exact": "exact (DP)"}


def _check(boundary: Mapping, name: str) -> Mapping | None:
    for c in (boundary.get("checks") or {}).get("items", []):
        if c["check"] == name:
            return c
    return None


def _flag(c: Mapping | None) -> str:
    return "n/a" if c is None else {True: "pass", False: "FAIL", None: "undefined"}[c["pass"]]


def _finite(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, float).ravel()
    return x[np.isfinite(x)]


def validation_figure(
    mat: Matrices,
    boundary: Mapping,
    thresholds_json: Mapping | None,
    path: str | os.PathLike[str],
    *,
    drift: np.ndarray | None = None,
    definition: str = "boundary_000",
    dpi: int = 120,
) -> None:
    """Notebook 03's six panels from ``boundary.json`` (and ``thresholds.json`` when given)."""
    if definition not in BOUNDARY_DEFINITIONS:
        raise ValueError(f"definition must be one of {list(BOUNDARY_DEFINITIONS)}")
    io, ip = mat.iou_original, mat.iou_perturbed
    chosen = boundary["thresholds"]
    fig, axes = plt.subplots(2, 3, figsize=(18, 11))

    ax = axes[0, 0]
    bins = np.linspace(0, 1, 31)
    ax.hist(_finite(io), bins=bins, alpha=0.7, label="original", edgecolor="black")
    ax.hist(_finite(ip), bins=bins, alpha=0.5, label="perturbed", edgecolor="black")
    for t in chosen["thresholds"]:
        ax.axvline(t, color="red", ls="--", lw=1)
    ax.set_xlabel("IoU (failures left out)")
    ax.set_ylabel("count")
    ax.set_title("IoU distribution (red: thresholds)")
    ax.legend()

    ax = axes[0, 1]
    levels = ["easy", "medium", "hard"]
    by = chosen[definition]["by_difficulty"]
    rates = [100 * (by[d]["rate"] or 0.0) for d in levels]
    ax.bar(levels, rates, color=[_DIFF_COLORS[d] for d in levels], alpha=0.75)
    for i, d in enumerate(levels):
        ax.annotate(
            f"{by[d]['n_boundary']}/{by[d]['n']}", (i, rates[i]), ha="center", va="bottom", fontsize=9
        )
    # notebook 03's checklist range (20-40 %) and the overall rate, as reference lines
    from vlmrel.grounding.analysis import BOUNDARY_RATE_RANGE

    lo, hi = (100 * v for v in BOUNDARY_RATE_RANGE)
    ax.axhline(lo, color="tab:blue", ls="--", alpha=0.6, label=f"expected min ({lo:g} %)")
    ax.axhline(hi, color="tab:blue", ls="--", alpha=0.6, label=f"expected max ({hi:g} %)")
    overall = chosen[definition]["rate"]
    if overall is not None:
        ax.axhline(100 * overall, color="black", ls=":", label=f"overall {100 * overall:.1f} %")
    sem_rate = (boundary.get("semantic") or {}).get("rate")
    if sem_rate is not None:
        ax.axhline(100 * sem_rate, color="tab:purple", ls="-.", label=f"semantic {100 * sem_rate:.1f} %")
    ax.legend(fontsize=8)
    ax.set_ylabel("boundary rate (%)")
    where = "out-of-sample" if boundary.get("out_of_sample") else "in-sample"
    ax.set_title(f"Boundary rate by difficulty ({definition}, {where})")

    ax = axes[0, 2]
    drop = io[:, None] - ip
    if drift is not None:
        mdrop, mdrift = _row_nanmean(drop), _row_nanmean(drift)
        ax.scatter(mdrop, mdrift, s=12, alpha=0.6)
        rho = boundary.get("spearman_iou_drop_vs_semantic_drift", {}).get("pairs", {}).get("rho")
        flag = _flag(_check(boundary, "geo_sem_rho"))
        ax.set_title(
            f"Geometric vs semantic drift (pairs Spearman rho={rho:.3f};\nexpected 0.3-0.7: {flag})"
            if rho is not None
            else "Geometric vs semantic drift (rho undefined)"
        )
    else:
        ax.text(0.5, 0.5, "no semantic drift computed", ha="center", va="center", transform=ax.transAxes)
        ax.set_title("Geometric vs semantic drift")
    ax.set_xlabel("mean IoU drop per sample")
    ax.set_ylabel("mean answer-embedding distance per sample")
    ax.grid(alpha=0.3)

    ax = axes[1, 0]
    series = [("baseline", boundary["baseline"]["thresholds"])]
    if thresholds_json:
        for sig, entry in thresholds_json["signals"].items():
            if entry.get("exact"):
                series.append((f"exact: {sig}", entry["exact"]["thresholds"]))
    else:
        series.append(("used", chosen["thresholds"]))
    k = len(series[0][1])
    width = 0.8 / len(series)
    for i, (label, ts) in enumerate(series):
        ax.bar(np.arange(k) + i * width, ts, width, label=label, alpha=0.75)
    ax.set_xticks(np.arange(k) + width * (len(series) - 1) / 2, [f"t{j + 1}" for j in range(k)])
    ax.set_ylabel("threshold (IoU)")
    ax.set_title("Threshold comparison")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")

    ax = axes[1, 1]
    with np.errstate(invalid="ignore"):
        counts = np.isfinite(ip).sum(0)
        mean = np.where(
            counts > 0, np.nansum(np.where(np.isfinite(ip), ip, 0), 0) / np.maximum(counts, 1), np.nan
        )
        sq = np.nansum(np.where(np.isfinite(ip), (ip - mean) ** 2, 0), 0)
        std = np.sqrt(np.where(counts > 0, sq / np.maximum(counts, 1), np.nan))
    x = np.arange(ip.shape[1])
    ax.plot(x, mean, lw=2, label="mean IoU")
    ax.fill_between(x, mean - std, mean + std, alpha=0.3)
    spread = _check(boundary, "iou_spread")
    if spread is not None and spread["value"] is not None and np.isfinite(io).any():
        # notebook 02's data-quality reference: a per-sample IoU spread of 0.1 around the original mean
        m0 = float(np.nanmean(io))
        ax.axhspan(m0 - 0.1, m0 + 0.1, color="tab:green", alpha=0.08, label="original mean +/- 0.1")
        ax.text(
            0.01,
            0.02,
            f"mean per-sample IoU spread {spread['value']:.3f} (> 0.1: {_flag(spread)})",
            transform=ax.transAxes,
            fontsize=8,
        )
    if np.isfinite(io).any():
        ax.axhline(np.nanmean(io), color="red", ls="--", label="original mean")
    ax.set_xlabel("perturbation index")
    ax.set_ylabel("IoU")
    ax.set_title("IoU across perturbations (failures left out)")
    ax.legend()
    ax.grid(alpha=0.3)

    ax = axes[1, 2]
    acc = boundary["accuracy"]

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    rows = [
        ["Metric", "Value"],
        ["Samples x perturbations", f"{boundary['n_samples']} x {boundary['n_perturbations']}"],
        ["Mean IoU original", _fmt(boundary["iou"]["original_mean"])],
        ["Mean IoU perturbed", _fmt(boundary["iou"]["perturbed_mean"])],
        [
            "Acc@0.5 original / perturbed",
            f"{pct(acc['original']['acc@0.5']['acc'])} / {pct(acc['perturbed']['acc@0.5']['acc'])}",
        ],
        [
            "Acc@0.7 original / perturbed",
            f"{pct(acc['original']['acc@0.7']['acc'])} / {pct(acc['perturbed']['acc@0.7']['acc'])}",
        ],
        ["Failure rate (excluded)", pct(boundary["failure_rate"]["overall"])],
        [f"Boundary rate {definition}", pct(chosen[definition]["rate"])],
        [f"Boundary rate {definition} (baseline)", pct(boundary["baseline"][definition]["rate"])],
        ["Thresholds from", str(boundary["thresholds_source"])],
    ]
    sem = boundary.get("semantic") or {}
    if "rate" in sem:
        ov = boundary.get("overlap") or {}
        rows.append(["Semantic boundary rate", pct(sem["rate"])])
        if ov:
            rows.append(
                ["Geometric / semantic / both", f"{ov['n_geometric']} / {ov['n_semantic']} / {ov['n_both']}"]
            )
    checks = (boundary.get("checks") or {}).get("items", [])
    if checks:
        rows.append(["Checks (pass/fail/undef.)", " ".join(f"{c['check']}:{_flag(c)}" for c in checks)])
    ax.axis("off")
    rows = [[textwrap.fill(cell, 30) for cell in row] for row in rows]  # long values wrap in the cell
    table = ax.table(cellText=rows, cellLoc="left", loc="center", colWidths=[0.5, 0.5])
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1, 1.8)
    for (i, _), cell in table.get_celld().items():
        cell.set_height(cell.get_height() * max(r.count("\n") + 1 for r in rows[i]))
    ax.set_title("Summary")
    fig.suptitle(
        f"Grounding validation; boundary definition: {definition} ({BOUNDARY_DEFINITIONS[definition]})",
        fontsize=11,
    )
    fig.tight_layout()
    save_figure(fig, path, dpi)


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def threshold_figure(thresholds_json: Mapping, path: str | os.PathLike[str], dpi: int = 120) -> None:
    """Threshold positions and MI per signal for the baseline, the seed's L-BFGS-B and the exact optimum."""
    signals = [s for s, e in thresholds_json["signals"].items() if e.get("exact")]
    fig, axes = plt.subplots(1, 2, figsize=(14, 2.0 + 1.3 * max(2, len(signals))))
    ax = axes[0]
    methods = ("baseline", "lbfgsb", "exact")
    for i, sig in enumerate(signals):
        entry = thresholds_json["signals"][sig]
        for j, m in enumerate(methods):
            y = i * (len(methods) + 1) + j
            ts = entry[m]["thresholds"]
            ax.scatter(
                ts,
                [y] * len(ts),
                marker="|",
                s=300,
                color=_METHOD_STYLE[m],
                label=_METHOD_LABEL[m] if i == 0 else None,
            )
            ax.hlines(y, 0, 1, color="0.9", lw=0.5, zorder=0)
    ax.set_yticks(
        [i * (len(methods) + 1) + 1 for i in range(len(signals))],
        [s.replace("_", "\n") for s in signals],
    )
    ax.set_xlim(0, 1)
    ax.set_xlabel("IoU threshold")
    ax.set_title("Thresholds by signal and method")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3)
    ax = axes[1]
    x = np.arange(len(signals))
    w = 0.27
    for j, m in enumerate(methods):
        vals = [thresholds_json["signals"][s][m]["mi"] for s in signals]
        ax.bar(x + (j - 1) * w, vals, w, color=_METHOD_STYLE[m], alpha=0.8, label=_METHOD_LABEL[m])
    ax.set_xticks(x, [s.replace("_", "\n") for s in signals], fontsize=8)
    ax.set_ylabel("mutual information (nats)")
    ax.set_title(
        f"I(C_t(IoU); S), k={thresholds_json['k']}, {thresholds_json['n_bins']} {thresholds_json['binning']} bins"
    )
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, dpi)


def timing_figure(
    latency_s: Sequence[float],
    cache_hit: Sequence[bool],
    status: Sequence[str],
    path: str | os.PathLike[str],
    dpi: int = 120,
    stats: Mapping | None = None,
) -> None:
    """Request latency (histogram, over request order) and cache hits / failures, from the client stats.

    ``stats`` (the client's stats JSON, ``vlm_stats.json``) adds HTTP requests, retries and the
    errors of failed attempts (429, 5xx, ...) to the last panel.
    """
    lat = np.asarray(latency_s, float)
    hit = np.asarray(cache_hit, bool)
    failed = np.asarray(status) != "ok"
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    ax = axes[0]
    miss = lat[~hit & np.isfinite(lat)]
    if miss.size:
        ax.hist(miss, bins=30, alpha=0.8, edgecolor="black")
        ax.axvline(np.mean(miss), color="red", ls="--", label=f"mean {np.mean(miss):.2f}s")
        ax.axvline(np.median(miss), color="orange", ls="--", label=f"median {np.median(miss):.2f}s")
        ax.legend()
    ax.set_xlabel("latency of sent requests (s)")
    ax.set_ylabel("count")
    ax.set_title("Latency (cache misses)")
    ax = axes[1]
    order = np.arange(lat.size)
    ax.scatter(order[~hit], lat[~hit], s=4, alpha=0.5, label="sent")
    ax.scatter(order[hit], lat[hit], s=4, alpha=0.5, label="cache hit")
    ax.set_xlabel("request")
    ax.set_ylabel("latency (s)")
    ax.set_title("Latency over requests")
    ax.legend()
    ax = axes[2]
    labels = ["cache hit", "sent, ok", "sent, failed"]
    vals = [int(hit.sum()), int((~hit & ~failed).sum()), int((~hit & failed).sum())]
    ax.bar(labels, vals, color=["tab:green", "tab:blue", "tab:red"], alpha=0.8)
    for i, v in enumerate(vals):
        ax.annotate(str(v), (i, v), ha="center", va="bottom")
    ax.set_title(f"{lat.size} requests; total sent time {np.nansum(lat[~hit]) / 60:.1f} min")
    if stats:
        ax.set_ylim(0, 1.5 * max(1, *vals))  # room for the box above the bars
        errors = ", ".join(f"{k} {v}" for k, v in (stats.get("attempt_errors_by_kind") or {}).items())
        failed = ", ".join(f"{k} {v}" for k, v in (stats.get("failed_predictions_by_kind") or {}).items())
        ax.text(
            0.02,
            0.98,
            f"HTTP requests: {stats.get('requests', 'n/a')}, retries: {stats.get('retries', 'n/a')}\n"
            f"failed attempts (retried): {errors or 'none'}\n"
            f"recorded failures: {failed or 'none'}",
            transform=ax.transAxes,
            va="top",
            fontsize=8,
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "0.8"},
        )
    fig.tight_layout()
    save_figure(fig, path, dpi)
