"""The one figure helper every chain uses: the Agg backend and an atomic PNG save.

Import ``plt`` from here (``from vlmrel.figures import plt, save_figure``) so that the
non-interactive backend is selected before pyplot is first imported, in every job.
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from vlmrel.io import atomic_path  # noqa: E402

__all__ = ["plt", "save_figure"]


def save_figure(fig: plt.Figure, path: str | os.PathLike[str], dpi: int = 120) -> None:
    """Save ``fig`` as PNG at ``path`` atomically (tight bounding box), then close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(fig)
