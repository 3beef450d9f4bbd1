"""Anomaly scores from logits. Convention everywhere: higher score = more anomalous.

For logits ``z`` over C classes (``axis`` is the class axis: 0 for one image [C, H, W],
1 for per-image logits [N, C]):

* ``msp``      = -max_c softmax(z)_c                       (Hendrycks & Gimpel)
* ``maxlogit`` = -max_c z_c                                (Hendrycks et al., StreetHazards)
* ``energy``   = -T * logsumexp(z / T)                      (Liu et al.; temperature T)
* ``entropy``  = -sum_c p_c log p_c,  p = softmax(z)
* ``sml``      = -(max_c z_c - mu_k) / sigma_k,  k = argmax_c z_c   (Jung et al.)
* ``heat``     = hybrid energy-adaptive thresholding, stateful across images (``vlmrel.anomaly.heat``)

``mu_k``, ``sigma_k`` are the mean and standard deviation of the max logit over the pixels
predicted as class k in a validation split (``SMLStats``, accumulated with Chan's parallel
update in float64). Scores are computed in float32 (float64 if the logits are float64).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

METHODS = ("msp", "maxlogit", "energy", "entropy", "sml", "heat")
STATELESS = ("msp", "maxlogit", "energy", "entropy", "sml")  # computed here; heat is stateful (heat.py)
LABELS = {
    "msp": "MSP",
    "maxlogit": "Max logit",
    "energy": "Energy",
    "entropy": "Entropy",
    "sml": "Standardized max logit",
    "heat": "HEAT",
}


@dataclass
class SMLStats:
    """Per-class mean/std of the max logit over pixels predicted as that class (validation split)."""

    mean: np.ndarray
    std: np.ndarray
    count: np.ndarray
    fallback: list[int] = field(default_factory=list)  # classes that use the pooled statistics

    def to_dict(self) -> dict:
        return {
            "mean": self.mean.tolist(),
            "std": self.std.tolist(),
            "count": self.count.tolist(),
            "fallback_classes": list(self.fallback),
        }

    @classmethod
    def from_dict(cls, d: dict, num_classes: int | None = None) -> SMLStats:
        stats = cls(
            np.asarray(d["mean"], dtype=np.float64),
            np.asarray(d["std"], dtype=np.float64),
            np.asarray(d["count"], dtype=np.int64),
            list(d.get("fallback_classes", [])),
        )
        if num_classes is not None and stats.mean.shape != (num_classes,):
            raise ValueError(
                f"SML statistics are for {stats.mean.shape[0]} classes but the logits have {num_classes}"
            )
        return stats


class SMLStatsAccumulator:
    """Streaming per-class (count, mean, M2) of the max logit, merged stably (Chan et al.)."""

    def __init__(self, num_classes: int, min_count: int = 2) -> None:
        self.C = int(num_classes)
        self.min_count = int(min_count)
        self.n = np.zeros(self.C, dtype=np.int64)
        self.mean = np.zeros(self.C, dtype=np.float64)
        self.m2 = np.zeros(self.C, dtype=np.float64)

    def update(self, logits: np.ndarray, axis: int = 0, valid: np.ndarray | None = None) -> None:
        z = np.asarray(logits)
        ml = z.max(axis=axis).astype(np.float64).reshape(-1)
        pred = z.argmax(axis=axis).reshape(-1)
        if valid is not None:
            v = np.asarray(valid, dtype=bool).reshape(-1)
            ml, pred = ml[v], pred[v]
        nb = np.bincount(pred, minlength=self.C).astype(np.int64)
        sb = np.bincount(pred, weights=ml, minlength=self.C)
        mb = np.divide(sb, nb, out=np.zeros(self.C), where=nb > 0)
        m2b = np.bincount(pred, weights=(ml - mb[pred]) ** 2, minlength=self.C)
        n = self.n + nb
        delta = mb - self.mean
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = np.where(n > 0, nb / np.maximum(n, 1), 0.0)
        self.mean = self.mean + delta * frac
        self.m2 = self.m2 + m2b + delta**2 * self.n * frac
        self.n = n

    def result(self) -> SMLStats:
        """Classes with fewer than ``min_count`` pixels or zero spread use the pooled statistics."""
        total = int(self.n.sum())
        if total < 2:
            raise ValueError("SML statistics need at least two validation pixels")
        pooled_mean = float(np.dot(self.n, self.mean) / total)
        pooled_m2 = float(self.m2.sum() + np.dot(self.n, (self.mean - pooled_mean) ** 2))
        pooled_std = math.sqrt(pooled_m2 / (total - 1))
        std = np.sqrt(self.m2 / np.maximum(self.n - 1, 1))
        bad = (self.n < self.min_count) | ~(std > 0)
        mean = np.where(bad, pooled_mean, self.mean)
        std = np.where(bad, pooled_std if pooled_std > 0 else 1.0, std)
        return SMLStats(mean, std, self.n.copy(), [int(c) for c in np.flatnonzero(bad)])


def _work_dtype(z: np.ndarray) -> type:
    return np.float64 if z.dtype == np.float64 else np.float32


def compute_scores(
    logits: np.ndarray,
    methods: Sequence[str] = STATELESS,
    *,
    axis: int = 0,
    temperature: float = 1.0,
    sml: SMLStats | None = None,
) -> dict[str, np.ndarray]:
    """All requested scores for one block of logits, sharing max/argmax/logsumexp."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown anomaly score(s) {unknown}; choose from {list(METHODS)}")
    if "heat" in methods:
        raise ValueError("the 'heat' score carries state across images: use vlmrel.anomaly.heat.HeatScorer")
    if "sml" in methods and sml is None:
        raise ValueError("the 'sml' score needs per-class statistics from a validation split (SMLStats)")
    if not temperature > 0:
        raise ValueError(f"energy temperature must be > 0, got {temperature}")
    z = np.asarray(logits)
    z = z.astype(_work_dtype(z), copy=False)
    m = z.max(axis=axis, keepdims=True)
    out: dict[str, np.ndarray] = {}
    if {"msp", "entropy"} & set(methods):
        e = np.exp(z - m)
        s = e.sum(axis=axis)
        if "msp" in methods:
            out["msp"] = -1.0 / s  # max softmax = exp(0) / sum
        if "entropy" in methods:
            # H = log s - sum_c p_c (z_c - m)
            out["entropy"] = np.log(s) - (e * (z - m)).sum(axis=axis) / s
    ml = np.squeeze(m, axis=axis)
    if "maxlogit" in methods:
        out["maxlogit"] = -ml
    if "energy" in methods:
        t = float(temperature)
        zt = z / t
        mt = zt.max(axis=axis, keepdims=True)
        lse = np.squeeze(mt, axis=axis) + np.log(np.exp(zt - mt).sum(axis=axis))
        out["energy"] = -t * lse
    if "sml" in methods:
        pred = z.argmax(axis=axis)
        C = z.shape[axis]
        if sml.mean.shape != (C,):
            raise ValueError(f"SML statistics are for {sml.mean.shape[0]} classes, the logits have {C}")
        mu = sml.mean.astype(z.dtype)[pred]
        sd = sml.std.astype(z.dtype)[pred]
        out["sml"] = -(ml - mu) / sd
    return {k: out[k].astype(z.dtype, copy=False) for k in methods}
