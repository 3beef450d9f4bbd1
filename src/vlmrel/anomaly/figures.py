"""anomaly figures: ROC and PR curves per method, threshold sensitivity, subsampling."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from vlmrel.anomaly.metrics import Curve
from vlmrel.anomaly.scores import LABELS, METHODS
from vlmrel.figures import plt, save_figure


def _colour(method: str) -> str:
    """The same colour for a method in every figure."""
    return f"C{METHODS.index(method)}" if method in METHODS else "k"


def roc_pr_curves(
    methods: Sequence[str], counts: np.ndarray, metrics: dict, path: str | os.PathLike[str], dpi: int = 120
) -> None:
    """Exact pooled ROC (left) and precision-recall (right) curves, one line per method."""
    fig, (ax_roc, ax_pr) = plt.subplots(1, 2, figsize=(11, 4.4), constrained_layout=True)
    base_rate = None
    for m, c in zip(methods, counts, strict=True):
        curve = Curve.from_counts(c)
        p = metrics["pooled"][m]
        fpr, tpr = curve.roc()
        ax_roc.plot(
            fpr,
            tpr,
            lw=1.4,
            color=_colour(m),
            label=f"{LABELS.get(m, m)} (AUROC {100 * (p['auroc'] or 0):.1f}%)",
        )
        recall, precision = curve.pr()
        ax_pr.step(
            recall,
            precision,
            where="post",
            lw=1.4,
            color=_colour(m),
            label=f"{LABELS.get(m, m)} (AUPR {100 * (p['aupr'] or 0):.1f}%)",
        )
        base_rate = curve.P / max(1, curve.P + curve.N)
    ax_roc.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    level = metrics["pooled"][methods[0]]["tpr_level"]
    ax_roc.axhline(level, color="grey", lw=0.8, ls="--")
    ax_roc.annotate(
        f"TPR {100 * level:g}% (FPR95 is read here)",
        (0.02, level),
        textcoords="offset points",
        xytext=(0, 3),
        fontsize=8,
        color="grey",
    )
    ax_roc.set(
        xlabel="false-positive rate",
        ylabel="true-positive rate",
        title="ROC (pooled over all pixels)",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    if base_rate is not None:
        ax_pr.axhline(base_rate, color="grey", lw=0.8, ls=":")
        ax_pr.annotate(
            f"anomaly rate {100 * base_rate:.2g}%",
            (0.6, base_rate),
            textcoords="offset points",
            xytext=(0, 3),
            fontsize=8,
            color="grey",
        )
    ax_pr.set(
        xlabel="recall",
        ylabel="precision",
        title="Precision-recall (anomaly = positive)",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    for ax in (ax_roc, ax_pr):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right" if ax is ax_roc else "upper right")
    save_figure(fig, path, dpi)


def threshold_panels(study: dict, path: str | os.PathLike[str], dpi: int = 120) -> None:
    """Precision, recall and F1 against the threshold offset, one line per method."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    for m in sorted(study, key=lambda k: METHODS.index(k) if k in METHODS else len(METHODS)):
        rows = study[m]["rows"]
        if not rows:
            continue
        off = 100 * np.array([r["offset"] for r in rows])
        for ax, key in zip(axes, ("precision", "recall", "f1"), strict=True):
            ax.plot(
                off,
                [np.nan if r[key] is None else r[key] for r in rows],
                marker="o",
                ms=3,
                color=_colour(m),
                label=LABELS.get(m, m),
            )
    for ax, key in zip(axes, ("precision", "recall", "F1"), strict=True):
        ax.axvline(0, color="grey", lw=0.8, ls=":")
        ax.set(xlabel="threshold offset from the F1-optimal threshold (% of |t*|)", ylabel=key)
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=8)
    fig.suptitle(
        "Threshold sensitivity (exact, all pixels); anomaly predicted when score >= t* + offset x |t*|"
    )
    save_figure(fig, path, dpi)


def subsampling_panels(summary: list[dict], path: str | os.PathLike[str], dpi: int = 120) -> None:
    """Mean +- std over seeded trials of AUROC, AUPR, FPR95 against the pixel ratio; exact values dashed."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    methods = list(dict.fromkeys(r["method"] for r in summary))
    for m in methods:
        rows = [r for r in summary if r["method"] == m]
        ratio = np.array([r["ratio"] for r in rows]) * 100
        colour = _colour(m)
        for ax, key in zip(axes, ("auroc", "aupr", "fpr95"), strict=True):
            mean = np.array(
                [np.nan if r[f"{key}_mean"] is None else r[f"{key}_mean"] for r in rows], dtype=float
            )
            std = np.array(
                [np.nan if r[f"{key}_std"] is None else r[f"{key}_std"] for r in rows], dtype=float
            )
            ax.errorbar(
                ratio, mean, yerr=std, marker="o", ms=3, capsize=2, color=colour, label=LABELS.get(m, m)
            )
            ax.axhline(rows[0][f"{key}_exact"], color=colour, lw=0.8, ls="--")
    for ax, key in zip(axes, ("AUROC", "AUPR", "FPR95"), strict=True):
        ax.set_xscale("log")
        ax.set(xlabel="pixels sampled (%)", ylabel=key)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Subsampling: mean +- std over seeded trials; dashed = exact value over every pixel")
    save_figure(fig, path, dpi)
