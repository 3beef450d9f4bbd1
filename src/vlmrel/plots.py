"""mcdo figures: reliability against T, and the distribution of uncertainty scores."""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib.ticker as mticker
import numpy as np

from vlmrel.figures import plt, save_figure
from vlmrel.reliability import THRESHOLDS
from vlmrel.summary import SPACES, Trials

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
