"""mcdo figures: exp0 (reliability against T, score distributions), exp0b, exp4, exp5, the
convergence sweep and Phase 2 (exp1, exp2, exp3).

Matplotlib with the Agg backend; every figure is saved atomically through
:func:`vlmrel.figures.save_figure`. Inputs are the arrays and result dicts of the analyses in
:mod:`vlmrel.mcdo` (reliability, geometry, ambiguity, gate, comparisons).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.ticker as mticker
import numpy as np
from matplotlib.ticker import NullFormatter

from vlmrel.figures import plt, save_figure
from vlmrel.mcdo.reliability import SPACES, THRESHOLDS, Trials

_PathLike = str | os.PathLike[str]

# --------------------------------------------------------------------------- exp0: reliability and scores

_METRICS = (
    (
        "spearman_median",
        "median pairwise Spearman",
        (THRESHOLDS["spearman_marginal"], THRESHOLDS["spearman_usable"]),
    ),
    ("icc", "ICC(1,1)", (THRESHOLDS["icc_usable"],)),
    ("snr", "SNR", (THRESHOLDS["snr_marginal"], THRESHOLDS["snr_usable"])),
)
_SPACE_STYLE = {"pre": dict(marker="o", ls="-"), "post": dict(marker="s", ls="--")}


def reliability_vs_T(summary: dict, path: str | os.PathLike[str], dpi: int = 120) -> None:
    """Three panels (Spearman, ICC, SNR) against T, pre and post normalisation, thresholds drawn."""
    ts = summary["T"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    for ax, (key, label, lines) in zip(axes, _METRICS, strict=True):
        for space in SPACES:
            vals = [summary["reliability"][space][str(t)][key] for t in ts]
            vals = [np.nan if v is None else v for v in vals]
            ax.plot(ts, vals, label=f"{space}-normalisation", **_SPACE_STYLE[space])
        for y, name in zip(lines, ("marginal", "usable") if len(lines) == 2 else ("usable",), strict=True):
            ax.axhline(y, color="grey", lw=0.8, ls=":")
            ax.annotate(name, (ts[0], y), textcoords="offset points", xytext=(2, 2), fontsize=8, color="grey")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ts, [str(t) for t in ts])
        ax.set_xlabel("T (MC passes)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if key == "snr":
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(mticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(mticker.FormatStrFormatter("%g"))
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(
        f"{summary['model']}: reliability of the MC-dropout trace across {summary['n_trials']} trials "
        f"(N={summary['n_images']}, p={summary['p']:g}); best status: {summary['best_status']}"
    )
    save_figure(fig, path, dpi)


def score_distributions(
    trials_by_model: Sequence[tuple[str, Trials]], path: str | os.PathLike[str], dpi: int = 120
) -> None:
    """Per-image uncertainty (trial mean of the trace at T_max) per model, pre and post, log scale."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), constrained_layout=True)
    for ax, space in zip(axes, SPACES, strict=True):
        data, labels = [], []
        for model, trials in trials_by_model:
            t_max = max(trials.T)
            per_image = trials.scores(space, t_max).mean(axis=0)
            data.append(np.log10(np.clip(per_image, 1e-30, None)))
            labels.append(f"{model}\n(T={t_max})")
        ax.violinplot(data, showmedians=True)
        for i, d in enumerate(data, start=1):
            ax.scatter(np.full(d.shape, i) + np.linspace(-0.08, 0.08, d.size), d, s=6, alpha=0.6, color="k")
        ax.set_xticks(range(1, len(labels) + 1), labels)
        ax.set_ylabel("log10 trace / D")
        ax.set_title(f"uncertainty {space}-normalisation")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("Distribution of per-image MC-dropout uncertainty (mean over trials)")
    save_figure(fig, path, dpi)


def _means(a: Any) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    return arr.mean(axis=0) if arr.ndim == 2 else arr


def _log10(v: np.ndarray) -> np.ndarray:
    return np.log10(np.clip(v, 1e-300, None))


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "n/a" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, spec)


def _violins(ax: plt.Axes, data: list[np.ndarray], labels: list[str]) -> None:
    data = [d[np.isfinite(d)] for d in data]
    keep = [i for i, d in enumerate(data) if d.size]
    if keep:
        ax.violinplot([data[i] for i in keep], positions=[i + 1 for i in keep], showmedians=True)
    for i, d in enumerate(data, start=1):
        if d.size:
            ax.scatter(np.full(d.shape, i) + np.linspace(-0.08, 0.08, d.size), d, s=5, alpha=0.5, color="k")
    ax.set_xticks(range(1, len(labels) + 1), labels, fontsize=8)
    ax.grid(alpha=0.3, axis="y")


# --------------------------------------------------------------------------- exp0b


def geometry_distributions(
    stacks_by_model: Mapping[str, Mapping[str, np.ndarray]], path: _PathLike, dpi: int = 120
) -> None:
    """exp0b: per-image (trial-mean) diagonality, top-eigenvalue share and angular variance per model."""
    panels = (
        (
            "diagonality",
            ("diagonality_pre", "diagonality_post"),
            False,
            "diagonal share of covariance energy",
        ),
        ("top-eigenvalue share", ("top_eig_share_pre", "top_eig_share_post"), False, "lambda_max / trace"),
        ("angular variance", ("angular_variance",), True, "log10 mean squared angle [rad^2]"),
    )
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    for ax, (title, keys, log, ylabel) in zip(axes, panels, strict=True):
        data, labels = [], []
        for model, stacks in stacks_by_model.items():
            for k in keys:
                v = _means(stacks[k])
                data.append(_log10(v) if log else v)
                labels.append(f"{model}\n{k.rsplit('_', 1)[-1]}" if len(keys) > 1 else model)
        _violins(ax, data, labels)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
    fig.suptitle("exp0b: covariance geometry of the MC-dropout pass features (per image, mean over trials)")
    save_figure(fig, path, dpi)


# --------------------------------------------------------------------------- exp4


def recipe_agreement_scatter(
    recipes: Mapping[str, np.ndarray],
    path: _PathLike,
    model: str,
    agreement: Mapping[str, Any] | None = None,
    dpi: int = 120,
) -> None:
    """exp4: log-log scatter of per-image trial means for every pair of recipes, Spearman annotated."""
    names = list(recipes)
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    lookup = {(p["a"], p["b"]): p for p in (agreement or {}).get("pairs", [])}
    fig, axes = plt.subplots(
        1, len(pairs), figsize=(4.6 * len(pairs), 4.2), constrained_layout=True, squeeze=False
    )
    for ax, (a, b) in zip(axes[0], pairs, strict=True):
        x, y = _means(recipes[a]), _means(recipes[b])
        ax.scatter(x, y, s=8, alpha=0.6)
        if np.all(x > 0) and np.all(y > 0):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(a)
        ax.set_ylabel(b)
        p = lookup.get((a, b))
        if p:
            ax.set_title(
                f"rho means {_fmt(p['spearman_of_means'])}, per trial (median) "
                f"{_fmt(p['spearman_trial_median'])}, pooled {_fmt(p['spearman_pooled'])}",
                fontsize=8,
            )
        ax.grid(alpha=0.3)
    fig.suptitle(f"exp4 {model}: agreement of uncertainty recipes (per image, mean over trials)")
    save_figure(fig, path, dpi)


# --------------------------------------------------------------------------- exp5


def ambiguity_scatter(
    uncertainty: np.ndarray,
    entropies: np.ndarray,
    margins: np.ndarray,
    path: _PathLike,
    model: str,
    stats: Mapping[str, Any] | None = None,
    dpi: int = 120,
) -> None:
    """exp5: uncertainty against zero-shot entropy and margin; the high-entropy images highlighted."""
    u = np.asarray(uncertainty, dtype=np.float64)
    h, mg = np.asarray(entropies, dtype=np.float64), np.asarray(margins, dtype=np.float64)
    hi = h >= stats["high_entropy_threshold"] if stats else np.zeros(u.size, dtype=bool)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, (vals, name, key) in zip(
        axes,
        ((h, "zero-shot entropy [nats]", "entropy"), (mg, "zero-shot margin (top1 - top2)", "margin")),
        strict=True,
    ):
        ax.scatter(vals[~hi], u[~hi], s=8, alpha=0.5, label="other")
        if hi.any():
            ax.scatter(vals[hi], u[hi], s=10, alpha=0.8, color="C3", label="high entropy")
        if np.all(u > 0):
            ax.set_yscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel("MC-dropout uncertainty")
        if stats:
            ax.set_title(f"Spearman {_fmt(stats.get(f'rho_uncertainty_vs_{key}'))}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    sub = f"; AUROC(high entropy) {_fmt(stats.get('auroc_high_entropy'))}" if stats else ""
    fig.suptitle(f"exp5 {model}: uncertainty vs zero-shot ambiguity (N={u.size}){sub}")
    save_figure(fig, path, dpi)


# --------------------------------------------------------------------------- convergence sweep


def convergence_curve(conv: Mapping[str, Any], path: _PathLike, dpi: int = 120) -> None:
    """Convergence sweep: Spearman, ICC and SNR against T per space, thresholds and the knee marked."""
    ts = conv["T"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    for ax, (key, label, lines) in zip(axes, _METRICS, strict=True):
        for i, (space, curves) in enumerate(conv["curves"].items()):
            vals = [np.nan if v is None else v for v in curves.get(key, [None] * len(ts))]
            ax.plot(ts, vals, marker="os"[i % 2], ls=("-", "--")[i % 2], color=f"C{i}", label=space)
            k = conv["knee"].get(space)
            if key == conv.get("knee_metric") and k is None:
                ax.annotate(
                    f"{space}: no knee (still gaining at T={ts[-1]})",
                    (0.02, 0.9 - 0.08 * i),
                    xycoords="axes fraction",
                    fontsize=8,
                    color=f"C{i}",
                )
            elif key == conv.get("knee_metric"):
                ax.axvline(k, color=f"C{i}", lw=1, ls=":")
                ax.annotate(
                    f"knee {space}: T={k}",
                    (k, 0.02 + 0.08 * i),
                    xycoords=("data", "axes fraction"),
                    fontsize=8,
                )
        for y in lines:
            ax.axhline(y, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ts, [str(t) for t in ts])
        ax.set_xlabel("T (MC passes)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if key == "snr":
            ax.set_yscale("symlog", linthresh=1.0)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Convergence sweep {conv['model']}: reliability against T (knee: gain < {conv['tol']:g})")
    save_figure(fig, path, dpi)


# --------------------------------------------------------------------------- exp1, exp3 heatmaps


def _heatmap(ax: plt.Axes, mat: Sequence[Sequence[float]], labels: Sequence[str]) -> None:
    m = np.array([[np.nan if v is None else v for v in row] for row in mat], dtype=np.float64)
    im = ax.imshow(m, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            v = float(m[i, j])
            color = "white" if np.isfinite(v) and abs(v) > 0.6 else "black"
            ax.text(j, i, _fmt(v, ".2f"), ha="center", va="center", fontsize=8, color=color)
    plt.colorbar(im, ax=ax, fraction=0.046, label="Spearman")


def rank_stability_heatmap(result: Mapping[str, Any], path: _PathLike, model: str, dpi: int = 120) -> None:
    """exp1: Spearman of per-image scores between dropout rates."""
    fig, ax = plt.subplots(figsize=(5.5, 4.8), constrained_layout=True)
    _heatmap(ax, result["spearman_matrix"], [f"p={p:g}" for p in result["p"]])
    ax.set_title(f"exp1 {model}: rank stability across dropout rates (N={result['n_images']})", fontsize=10)
    save_figure(fig, path, dpi)


def model_matrix_heatmaps(result: Mapping[str, Any], path: _PathLike, dpi: int = 120) -> None:
    """exp4_full: one heatmap per recipe of the Spearman between models' trial-mean scores."""
    recipes = list(result["recipes"])
    fig, axes = plt.subplots(1, len(recipes), figsize=(5.2 * len(recipes), 4.6), constrained_layout=True)
    for ax, recipe in zip(np.atleast_1d(axes), recipes, strict=True):
        _heatmap(ax, result["recipes"][recipe]["spearman_matrix"], result["models"])
        ax.set_title(f"{recipe} (trial mean)", fontsize=10)
    fig.suptitle(f"model matrix: Spearman between models (N={result['n_images']})", fontsize=10)
    save_figure(fig, path, dpi)


def dropout_types_figure(result: Mapping[str, Any], path: _PathLike, model: str, dpi: int = 120) -> None:
    """exp3: reliability (Spearman, ICC, SNR) per dropout type and rank agreement between types."""
    types = result["types"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    ax = axes[0]
    width = 0.25
    for i, (key, label) in enumerate((("spearman_median", "Spearman"), ("icc", "ICC"), ("snr", "SNR (/10)"))):
        vals = []
        for t in types:
            r = result["reliability"].get(t) or {}
            v = r.get(key)
            v = np.nan if v is None else float(v)
            vals.append(v / 10 if key == "snr" else v)
        ax.bar(np.arange(len(types)) + (i - 1) * width, vals, width, label=label)
    ax.axhline(THRESHOLDS["spearman_usable"], color="grey", lw=0.8, ls=":")
    ax.set_xticks(
        range(len(types)),
        [f"{t}\n({(result['reliability'].get(t) or {}).get('status', 'n/a')})" for t in types],
    )
    ax.set_ylabel("reliability across trials")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    _heatmap(axes[1], result["spearman_matrix"], types)
    axes[1].set_title("rank agreement between types", fontsize=10)
    fig.suptitle(f"exp3 {model}: dropout types (N={result['n_images']})")
    save_figure(fig, path, dpi)


# --------------------------------------------------------------------------- exp2


def synthetic_vs_natural(
    natural: np.ndarray,
    synthetic: Mapping[str, np.ndarray],
    path: _PathLike,
    model: str,
    result: Mapping[str, Any] | None = None,
    dpi: int = 120,
) -> None:
    """exp2: distribution of uncertainty (log10, trial mean) for natural images and each synthetic kind."""
    data = [_log10(_means(natural))] + [_log10(_means(v)) for v in synthetic.values()]
    labels = ["natural"]
    for kind in synthetic:
        auroc = (result or {}).get("kinds", {}).get(kind, {}).get("auroc")
        labels.append(f"{kind}\nAUROC {_fmt(auroc, '.2f')}")
    fig, ax = plt.subplots(figsize=(2.2 * len(labels) + 1, 4), constrained_layout=True)
    _violins(ax, data, labels)
    ax.set_ylabel("log10 uncertainty")
    ax.set_title(f"exp2 {model}: natural vs synthetic images (AUROC: natural as positive)", fontsize=10)
    save_figure(fig, path, dpi)


def skipped_figure(title: str, reason: str, path: _PathLike, dpi: int = 120) -> None:
    """A figure that says why an experiment could not be evaluated for a model (exp5 without a text tower)."""
    import textwrap

    fig, ax = plt.subplots(figsize=(6, 2.2), constrained_layout=True)
    ax.axis("off")
    ax.text(
        0.5, 0.5, f"{title}: skipped\n\n" + textwrap.fill(reason, 70), ha="center", va="center", fontsize=10
    )
    save_figure(fig, path, dpi)


# --------------------------------------------------------------------------- Phase 4: exp10, exp11


def text_dropout_figure(
    styles: Sequence[str],
    score: np.ndarray,
    specificity: np.ndarray,
    summary: Mapping[str, Any],
    path: _PathLike,
    model: str,
    dpi: int = 120,
) -> None:
    """exp10: the text score by prompt style, and against specificity."""
    order = list(dict.fromkeys(styles))
    st = np.asarray(styles)
    s = np.asarray(score, dtype=np.float64)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    data = [_log10(s[st == k]) for k in order]
    ax1.boxplot(data, showfliers=False)
    ax1.set_xticks(range(1, len(order) + 1), [f"{k}\n(n={int((st == k).sum())})" for k in order], fontsize=8)
    ax1.set_ylabel("log10 trace / D (text, pre-norm)")
    ax1.set_title("score by prompt style", fontsize=10)
    for k in order:
        ax2.scatter(specificity[st == k], _log10(s[st == k]), s=10, alpha=0.7, label=k)
    ax2.set_xlabel("specificity (handcrafted)")
    ax2.set_ylabel("log10 trace / D")
    ax2.legend(fontsize=7)
    ax2.set_title(
        f"rho(score, -specificity) = {_fmt(summary.get('rho_score_vs_neg_specificity'))}, "
        f"partial | tokens = {_fmt(summary.get('partial_rho_controlling_tokens'))}",
        fontsize=9,
    )
    fig.suptitle(f"exp10 {model}: text-encoder MC dropout ({summary.get('n_prompts')} prompts)", fontsize=10)
    save_figure(fig, path, dpi)


def rate_search_figure(summary: Mapping[str, Any], path: _PathLike, model: str, dpi: int = 120) -> None:
    """exp11: candidates' search objectives, chosen vs uniform on both splits, the best rates per group."""
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(14, 4.2), constrained_layout=True)
    vals = np.asarray(summary["search_objectives"], dtype=np.float64)
    colors = ["tab:orange" if i == 0 else "tab:blue" for i in range(vals.size)]
    colors[summary["chosen"]["candidate"]] = "tab:green"
    ax1.bar(range(vals.size), vals, color=colors)
    ax1.set_xlabel("candidate (0 = uniform base p)")
    ax1.set_ylabel("objective (search split)")
    ax1.set_title("candidates on the search split (green: chosen)", fontsize=9)
    labels = ["search", "held-out"]
    chosen = [summary["chosen"]["search"]["objective"], summary["chosen"]["heldout"]["objective"]]
    uniform = [summary["uniform"]["search"]["objective"], summary["uniform"]["heldout"]["objective"]]
    x = np.arange(2)
    ax2.bar(x - 0.2, chosen, width=0.4, label="chosen", color="tab:green")
    ax2.bar(x + 0.2, uniform, width=0.4, label="uniform", color="tab:orange")
    ax2.set_xticks(x, labels)
    ax2.set_ylabel("objective")
    ax2.legend(fontsize=8)
    ax2.set_title(f"search n={summary['n_search']}, held-out n={summary['n_heldout']}", fontsize=9)
    groups = summary["groups"]
    ax3.bar(range(len(groups)), [summary["best_rates"][g] for g in groups], color="tab:green", label="chosen")
    ax3.axhline(summary["uniform"]["rates"][groups[0]], color="tab:orange", ls="--", label="uniform p")
    ax3.set_yscale("log")
    ax3.set_xticks(range(len(groups)), groups)
    ax3.set_ylabel("dropout rate")
    ax3.legend(fontsize=8)
    ax3.set_title("chosen rate per layer group", fontsize=9)
    fig.suptitle(f"exp11 {model}: concrete-dropout proxy (layer-wise rate search)", fontsize=10)
    save_figure(fig, path, dpi)
