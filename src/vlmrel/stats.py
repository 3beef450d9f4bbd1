"""Small numerical helpers shared by the chains: a stable softmax and a guarded Spearman."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["softmax", "spearman"]


def softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    """Softmax along ``axis``, shifted by the maximum for stability."""
    z = np.asarray(z)
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def spearman(a: np.ndarray, b: np.ndarray) -> tuple[float, float, int]:
    """Spearman (rho, p, n) over the pairs where both values are finite.

    Undefined (NaN, NaN) when fewer than 3 pairs remain or either variable is constant,
    instead of scipy's warning and NaN.
    """
    from scipy.stats import spearmanr

    a = np.asarray(a, dtype=float).ravel()
    b = np.asarray(b, dtype=float).ravel()
    ok = np.isfinite(a) & np.isfinite(b)
    n = int(ok.sum())
    if n < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return math.nan, math.nan, n
    r = spearmanr(a[ok], b[ok])
    return float(r.statistic), float(r.pvalue), n
