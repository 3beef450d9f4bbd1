"""Seed 003's studies, done exactly: threshold sensitivity, pixel subsampling, method comparison.

* Threshold sensitivity: precision/recall/F1 at the F1-optimal threshold ``t*`` and at
  ``t* + o * |t*|`` for offsets ``o`` (seed 003's percentages: -100% of ``t* = -1.92`` is -3.85).
  When ``t* = 0`` the offset scale is the score's standard deviation instead (recorded).
* Subsampling: for every trial, each valid pixel draws ``u ~ U[0, 1)`` from a generator seeded
  with ``(seed, trial, image index)``; the sample at ratio ``r`` is the pixels with ``u < r``
  (Bernoulli sampling, nested across ratios within a trial). Metrics of each sample against
  the exact value over every pixel.
* Comparison: every method x metric, pooled and per-image, as CSV and Markdown.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

from vlmrel.anomaly.evaluate import HeatConfig, iter_scored
from vlmrel.anomaly.io import LabelSpec, SegLogitsReader
from vlmrel.anomaly.metrics import KEY_VALUES, NBINS, Curve, float16_keys
from vlmrel.anomaly.scores import LABELS, SMLStats

DEFAULT_OFFSETS = (-1.0, -0.75, -0.5, -0.25, -0.1, 0.0, 0.1, 0.25, 0.5, 0.75, 1.0)
DEFAULT_RATIOS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0)
METRICS = ("auroc", "aupr", "fpr95", "f1")


def _hist_std(counts: np.ndarray) -> float:
    w = counts.sum(axis=1).astype(np.float64)
    v = KEY_VALUES.astype(np.float64)
    ok = (w > 0) & np.isfinite(v)
    if not ok.any():
        return math.nan
    mean = np.average(v[ok], weights=w[ok])
    return float(np.sqrt(np.average((v[ok] - mean) ** 2, weights=w[ok])))


def threshold_sensitivity(counts: np.ndarray, offsets: Sequence[float] = DEFAULT_OFFSETS) -> dict:
    """F1-optimal threshold and precision/recall/F1 at each offset, from a [65536, 2] histogram."""
    curve = Curve.from_counts(counts)
    best = curve.best_f1()
    t_star = best["threshold"]
    if math.isnan(t_star):
        return {"best": best, "scale": math.nan, "scale_kind": "undefined", "rows": []}
    scale, kind = (
        (abs(t_star), "|t*|") if t_star != 0 and math.isfinite(t_star) else (_hist_std(counts), "score std")
    )
    rows = []
    for o in offsets:
        r = curve.at_threshold(t_star + o * scale)
        rows.append({"offset": float(o), **r, "delta_f1": r["f1"] - best["f1"]})
    return {"best": best, "scale": scale, "scale_kind": kind, "rows": rows}


def subsampling_study(
    path: str | os.PathLike[str],
    spec: LabelSpec,
    methods: Sequence[str],
    *,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    trials: int = 5,
    seed: int = 0,
    temperature: float = 1.0,
    sml: SMLStats | None = None,
    heat: HeatConfig | None = None,
    tpr_level: float = 0.95,
    max_block_mb: float = 256.0,
) -> tuple[list[dict], list[dict]]:
    """(rows per method/ratio/trial, summary rows per method/ratio with mean, std and exact value)."""
    methods = list(methods)
    ratios = sorted(float(r) for r in ratios)
    if not ratios or ratios[0] <= 0 or ratios[-1] > 1:
        raise ValueError(f"subsampling ratios must lie in (0, 1], got {ratios}")
    R = len(ratios)
    r_arr = np.array(ratios, dtype=np.float32)
    # counts[m][t]: [65536, 2, R + 1] by the first ratio that includes the pixel (R = none)
    counts = {m: [np.zeros(2 * NBINS * (R + 1), dtype=np.int64) for _ in range(trials)] for m in methods}
    exact = {m: np.zeros(2 * NBINS, dtype=np.int64) for m in methods}
    with SegLogitsReader(path, spec, max_block_mb=max_block_mb) as reader:
        for item in iter_scored(
            reader, methods, temperature=temperature, sml=sml, heat=heat, desc="subsampling"
        ):
            n = item.is_anomaly.size
            ridx = [
                np.searchsorted(
                    r_arr,
                    np.random.default_rng([seed, t, item.index]).random(n, dtype=np.float32),
                    side="right",
                )
                for t in range(trials)
            ]
            for m in methods:
                keys, _ = float16_keys(item.scores[m])
                base = keys.astype(np.int32) * 2 + item.is_anomaly
                exact[m] += np.bincount(base, minlength=2 * NBINS)
                base *= R + 1
                for t in range(trials):
                    counts[m][t] += np.bincount(base + ridx[t], minlength=2 * NBINS * (R + 1))
    rows, summary = [], []
    for m in methods:
        ex = _row_metrics(exact[m].reshape(NBINS, 2), tpr_level)
        per_ratio: dict[float, list[dict]] = {r: [] for r in ratios}
        for t in range(trials):
            c = np.cumsum(counts[m][t].reshape(NBINS, 2, R + 1)[:, :, :R], axis=2)
            for j, r in enumerate(ratios):
                row = {"method": m, "ratio": r, "trial": t, **_row_metrics(c[:, :, j], tpr_level)}
                rows.append(row)
                per_ratio[r].append(row)
        for r in ratios:
            s = {"method": m, "ratio": r, "trials": trials}
            s["n_pixels_mean"] = float(np.mean([x["n_pixels"] for x in per_ratio[r]]))
            for k in METRICS:
                vals = np.array([x[k] for x in per_ratio[r]], dtype=np.float64)
                ok = vals[~np.isnan(vals)]
                s[f"{k}_mean"] = float(ok.mean()) if ok.size else math.nan
                s[f"{k}_std"] = float(ok.std(ddof=1)) if ok.size > 1 else (0.0 if ok.size == 1 else math.nan)
                s[f"{k}_exact"] = ex[k]
                s[f"{k}_bias"] = s[f"{k}_mean"] - ex[k]
                s[f"{k}_undefined_trials"] = int(vals.size - ok.size)
            summary.append(s)
    return rows, summary


def _row_metrics(counts: np.ndarray, tpr_level: float) -> dict:
    curve = Curve.from_counts(counts)
    m = curve.metrics(tpr_level)
    return {
        "n_pixels": m["n_anomaly"] + m["n_normal"],
        "n_anomaly": m["n_anomaly"],
        "auroc": m["auroc"],
        "aupr": m["aupr"],
        "fpr95": m["fpr95"],
        "f1": curve.best_f1()["f1"],
    }


# ---- method comparison table ------------------------------------------------------------------------

COLUMNS = (
    ("method", "method"),
    ("pooled_auroc", "AUROC"),
    ("pooled_aupr", "AUPR"),
    ("pooled_fpr95", "FPR95"),
    ("image_auroc", "AUROC (per image)"),
    ("image_aupr", "AUPR (per image)"),
    ("image_fpr95", "FPR95 (per image)"),
    ("best_f1", "best F1"),
    ("threshold", "F1-optimal threshold"),
    ("producer_miou", "producer mIoU"),
)


def comparison_rows(metrics: dict, thresholds: dict | None = None) -> list[dict]:
    """One row per method from metrics.json (and threshold_sensitivity.json).

    ``producer_miou`` is the segmentation model's mIoU on the evaluated split (the same on every
    row: the scores are all computed from that model's logits). A HEAT that fell back to the
    energy score is named so in the ``note`` column.
    """
    rows = []
    miou = (metrics.get("segmentation") or {}).get("miou", math.nan)
    heat_fallback = (metrics.get("heat") or {}).get("fallback")
    for m in metrics["methods"]:
        p, q = metrics["pooled"][m], metrics["per_image"][m]
        best = (thresholds or {}).get(m, {}).get("best", {})
        rows.append(
            {
                "method": m,
                "pooled_auroc": p["auroc"],
                "pooled_aupr": p["aupr"],
                "pooled_fpr95": p["fpr95"],
                "image_auroc": q["auroc"],
                "image_aupr": q["aupr"],
                "image_fpr95": q["fpr95"],
                "best_f1": best.get("f1", math.nan),
                "threshold": best.get("threshold", math.nan),
                "producer_miou": miou,
                "note": f"{heat_fallback} fallback (no features)" if m == "heat" and heat_fallback else "",
            }
        )
    return rows


def _fmt(v: object, pct: bool) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float):
        return f"{100 * v:.2f}%" if pct else f"{v:.4g}"
    return LABELS.get(str(v), str(v))


def comparison_markdown(rows: list[dict], metrics: dict) -> str:
    """Markdown table (percentages), with the counts behind it."""
    head = "| " + " | ".join(label for _, label in COLUMNS) + " |"
    sep = "|" + "|".join("---" if k == "method" else "---:" for k, _ in COLUMNS) + "|"
    lines = [head, sep]
    for r in rows:
        cells = [_fmt(r[k], k not in ("method", "threshold")) for k, _ in COLUMNS]
        if r.get("note"):
            cells[0] += f" ({r['note']})"
        lines.append("| " + " | ".join(cells) + " |")
    m0 = metrics["methods"][0]
    p, q = metrics["pooled"][m0], metrics["per_image"][m0]
    lines += [
        "",
        f"Pooled over {p['n_anomaly'] + p['n_normal']:,} valid pixels ({p['n_anomaly']:,} anomalous), exact. "
        f"Per image: mean over {q['n_images_used']} of {q['n_images']} images; "
        f"{q['n_images_no_anomaly']} without anomaly pixels and {q['n_images_no_normal']} without normal pixels left out. "
        f"FPR95 = false-positive rate at {100 * p['tpr_level']:g}% TPR.",
    ]
    seg = metrics.get("segmentation")
    if seg:
        lines.append(
            f"Producer model: mIoU {_fmt(seg['miou'], True)} over {seg['classes_present']} classes, "
            f"pixel accuracy {_fmt(seg['pixel_accuracy'], True)} on the evaluated split "
            f"({seg['n_pixels']:,} pixels labelled with a trained class)."
        )
    return "\n".join(lines) + "\n"
