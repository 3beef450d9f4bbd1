"""Teacher figures: the scene confusion matrix and per-attribute precision/recall/F1 bars."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from vlmrel.figures import plt, save_figure


def _title(ev: dict[str, Any]) -> str:
    return f"{ev.get('model')}: against the {'audited human' if ev['truth'] == 'human_audited' else 'auto (VLM)'} truth, n={ev['n']}"


def confusion_figure(ev: dict[str, Any], path: str | os.PathLike[str], dpi: int = 120) -> None:
    labels = ev["scene"]["labels"]
    cm = np.asarray(ev["scene"]["confusion_matrix"], dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    size = 1.2 + 0.55 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1.5, size), constrained_layout=True)
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(labels)):
        for j in range(len(labels)):
            if cm[i, j]:
                ax.text(
                    j,
                    i,
                    f"{int(cm[i, j])}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if frac[i, j] > 0.5 else "black",
                )
    short = [lab.removeprefix("scene.") for lab in labels]
    ax.set_xticks(range(len(labels)), short, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), short)
    ax.set_xlabel("predicted scene (head)")
    ax.set_ylabel("true scene")
    fig.colorbar(im, ax=ax, label="share of the true scene's images")
    acc = ev["scene"]["accuracy"]
    ax.set_title(f"{_title(ev)}\nscene accuracy {acc:.2f}" if acc is not None else _title(ev), fontsize=9)
    save_figure(fig, path, dpi)


def attribute_figure(ev: dict[str, Any], path: str | os.PathLike[str], dpi: int = 120) -> None:
    attrs = ev["attributes"]
    keys = list(attrs)
    derived = set(ev.get("derived_attributes", {}))
    fig, ax = plt.subplots(figsize=(2 + 1.3 * max(1, len(keys)), 3.8), constrained_layout=True)
    width = 0.26
    x = np.arange(len(keys))
    for k, metric in enumerate(("precision", "recall", "f1")):
        ax.bar(x + (k - 1) * width, [attrs[a][metric] for a in keys], width, label=metric)
    names = [
        a.removeprefix("attr.") + (" *" if a in derived else "") + f"\n(n+={attrs[a]['support']})"
        for a in keys
    ]
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("score")
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    obj = ev["objects"]
    extra = ""
    if obj["top1_hit_rate"] is not None:
        extra = f"; objects top-1 {obj['top1_hit_rate']:.2f}, top-3 {obj['top3_hit_rate']:.2f}"
    ax.set_title(f"{_title(ev)}{extra}\n* derived from the predicted scene", fontsize=9)
    save_figure(fig, path, dpi)
