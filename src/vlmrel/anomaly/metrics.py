"""Exact AUROC, AUPR and FPR@95%TPR over every pixel, in bounded memory.

Scores are counted into a histogram over the 65,536 bit patterns of float16: one count
per (float16 value, label). The bit patterns are mapped to a key whose integer order is the
numeric order of the values (``-0.0`` shares the key of ``+0.0``), so the histogram *is* the
sorted score list with its ties. Every metric scikit-learn computes by sorting can then be
computed from the 65,536 bins, exactly and for any number of pixels:

* AUROC is the Mann-Whitney statistic with ties counted one half (what the trapezoidal ROC
  area of ``roc_auc_score`` equals), summed in integers.
* AUPR is ``average_precision_score``: ``sum_k (pos_k / P) * precision_k`` over the distinct
  score values in descending order.
* FPR95 is the smallest false-positive rate among the thresholds whose TPR is at least
  ``tpr_level`` (``roc_curve(..., drop_intermediate=False)`` then ``fpr[argmax(tpr >= 0.95)]``,
  the OpenOOD convention without its dropped points).

Anomalies are the positive class and higher scores mean more anomalous. A pixel is
predicted anomalous at threshold ``t`` when ``score >= t``.

``exact_metrics`` and ``PerImageAccumulator`` are exact for float32 scores too: scores that
float16 does not hold exactly go to ``vlmrel.anomaly.exact32`` (a coarse pass and refinement
passes over the same array; float64 scores are taken as float32). The streaming
``ExactAccumulator`` stays the float16 fast path: one pass, 1 MB of state.

In ``ExactAccumulator``, scores at higher precision (float32/64) are rounded to float16 first. The result then carries
the exact interval each metric of the unrounded scores must lie in (``quantization``): only
pairs that fall in the same float16 bin can change order, so AUROC moves by at most half of the
tied positive-negative pairs, AP lies between "negatives first" and "positives first" inside
every bin, and FPR95 between the bin's lower and upper false-positive count. When every update
was float16, or the rounding changed no value, ``quantization["exact"]`` is true.

Memory does not grow with the pixel count: an accumulator holds two int64 arrays of 65,536
counts, and updates are processed in slices of ``CHUNK`` elements (a few MB of temporaries).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

NBINS = 1 << 16
CHUNK = 1 << 20
_NEG_ZERO_KEY = 0x7FFF
_POS_ZERO_KEY = 0x8000
# keys of NaN bit patterns: negative NaNs sort below -inf, positive NaNs above +inf
_NAN_LOW = slice(0x0000, 0x03FF)
_NAN_HIGH = slice(0xFC01, 0x10000)


def _key_values() -> np.ndarray:
    keys = np.arange(NBINS, dtype=np.uint32)
    bits = np.where(keys & 0x8000, keys ^ 0x8000, ~keys & 0xFFFF).astype(np.uint16)
    return bits.view(np.float16)


KEY_VALUES = _key_values()
"""float16 value of every histogram key (NaN for the NaN keys)."""


def float16_keys(scores: np.ndarray) -> tuple[np.ndarray, bool]:
    """Order-preserving uint16 keys of ``scores`` rounded to float16; also whether rounding was lossless."""
    s = np.asarray(scores)
    if s.dtype == np.float16:
        s16, lossless = s, True
    else:
        if not np.issubdtype(s.dtype, np.floating) and not np.issubdtype(s.dtype, np.integer):
            raise TypeError(f"scores must be a float array, got dtype {s.dtype}")
        with np.errstate(over="ignore", invalid="ignore"):
            s16 = s.astype(np.float16)
            lossless = bool(np.array_equal(s16.astype(s.dtype), s, equal_nan=True))
    u = np.ascontiguousarray(s16).view(np.uint16)
    flip = ((u >> 15) * np.uint16(0x7FFF)) | np.uint16(0x8000)
    keys = u ^ flip
    keys[keys == _NEG_ZERO_KEY] = _POS_ZERO_KEY  # -0.0 ties with +0.0
    return keys, lossless


def key_of_threshold(threshold: float) -> int:
    """Smallest key whose float16 value is >= ``threshold`` (so ``score >= t`` <=> ``key >= k``)."""
    t = float(threshold)
    if math.isnan(t):
        raise ValueError("threshold is NaN")
    t16 = np.float16(t)
    if math.isinf(float(t16)) and not math.isinf(t):
        t16 = np.float16(np.inf) if t > 0 else np.float16(np.finfo(np.float16).min)
    if float(t16) < t:
        t16 = np.nextafter(t16, np.float16(np.inf))
    key, _ = float16_keys(np.array([t16], dtype=np.float16))
    return int(key[0])


@dataclass(frozen=True)
class Curve:
    """Cumulative counts over the distinct score values, highest value first."""

    keys: np.ndarray  # histogram key of each distinct value (descending)
    values: np.ndarray  # float16 score of each distinct value (descending)
    pos: np.ndarray  # anomalies with exactly that value
    neg: np.ndarray  # normal pixels with exactly that value
    tp: np.ndarray  # anomalies with score >= value
    fp: np.ndarray  # normal pixels with score >= value

    @property
    def P(self) -> int:
        return int(self.tp[-1]) if self.tp.size else 0

    @property
    def N(self) -> int:
        return int(self.fp[-1]) if self.fp.size else 0

    @classmethod
    def from_counts(cls, counts: np.ndarray) -> Curve:
        """``counts``: [65536, 2] (normal, anomaly) per key in ascending key order."""
        counts = np.asarray(counts, dtype=np.int64)
        nz = np.flatnonzero(counts.sum(axis=1))[::-1]
        neg, pos = counts[nz, 0], counts[nz, 1]
        return cls(nz, KEY_VALUES[nz], pos, neg, np.cumsum(pos), np.cumsum(neg))

    # ---- metrics -------------------------------------------------------------------------------

    def auroc(self) -> float:
        P, N = self.P, self.N
        if P == 0 or N == 0:
            return math.nan
        tp_before = self.tp - self.pos
        if 2 * P * N < 2**62:
            twice = 2 * int(np.dot(self.neg, tp_before)) + int(np.dot(self.neg, self.pos))
        else:  # beyond int64: exact Python integers
            twice = sum(
                2 * int(n) * int(t) + int(n) * int(p)
                for n, t, p in zip(self.neg, tp_before, self.pos, strict=True)
            )
        return twice / (2 * P * N)

    def aupr(self) -> float:
        P = self.P
        if P == 0:
            return math.nan
        precision = self.tp / (self.tp + self.fp)
        return float(np.dot(self.pos, precision) / P)

    def fpr_at_tpr(self, level: float = 0.95) -> float:
        P, N = self.P, self.N
        if P == 0 or N == 0:
            return math.nan
        idx = int(np.argmax(self.tp / P >= level))
        return float(self.fp[idx] / N)

    def best_f1(self) -> dict:
        """Threshold (a float16 score value) with the highest F1, and precision/recall/F1 there."""
        P = self.P
        if P == 0:
            return {"threshold": math.nan, "precision": math.nan, "recall": math.nan, "f1": math.nan}
        f1 = 2 * self.tp / (self.tp + self.fp + P)
        i = int(np.argmax(f1))
        return {
            "threshold": float(self.values[i]),
            "precision": float(self.tp[i] / (self.tp[i] + self.fp[i])),
            "recall": float(self.tp[i] / P),
            "f1": float(f1[i]),
        }

    def at_threshold(self, threshold: float) -> dict:
        """Precision, recall and F1 of ``score >= threshold``, exact for float16 scores."""
        P = self.P
        key = key_of_threshold(threshold)
        above = self.keys >= key
        tp = int(self.pos[above].sum())
        fp = int(self.neg[above].sum())
        precision = tp / (tp + fp) if tp + fp else math.nan
        recall = tp / P if P else math.nan
        f1 = 2 * tp / (tp + fp + P) if P else math.nan
        return {
            "threshold": float(threshold),
            "tp": tp,
            "fp": fp,
            "precision": precision,
            "recall": recall,
            "f1": f1,
        }

    def roc(self) -> tuple[np.ndarray, np.ndarray]:
        """(fpr, tpr) at every distinct value, starting at (0, 0)."""
        P, N = max(self.P, 1), max(self.N, 1)
        return np.r_[0.0, self.fp / N], np.r_[0.0, self.tp / P]

    def pr(self) -> tuple[np.ndarray, np.ndarray]:
        """(recall, precision) at every distinct value."""
        P = max(self.P, 1)
        return self.tp / P, self.tp / np.maximum(self.tp + self.fp, 1)

    def metrics(self, tpr_level: float = 0.95) -> dict:
        return {
            "auroc": self.auroc(),
            "aupr": self.aupr(),
            "fpr95": self.fpr_at_tpr(tpr_level),
            "n_anomaly": self.P,
            "n_normal": self.N,
        }

    # ---- what rounding to float16 can have changed -------------------------------------------

    def quantization_bounds(self, tpr_level: float = 0.95) -> dict:
        """Intervals that contain each metric of the unrounded scores (see the module docstring)."""
        P, N = self.P, self.N
        if P == 0 or N == 0:
            return {
                "auroc_max_error": math.nan,
                "aupr_interval": [math.nan] * 2,
                "fpr95_interval": [math.nan] * 2,
            }
        auroc_err = 0.5 * float(np.dot(self.pos, self.neg)) / (float(P) * float(N))
        t0 = (self.tp - self.pos).astype(np.float64)
        f0 = (self.fp - self.neg).astype(np.float64)
        p = self.pos.astype(np.float64)
        n = self.neg.astype(np.float64)
        best = _sum_ratio(t0, t0 + f0, p)  # positives first inside each bin
        worst = _sum_ratio(t0, t0 + f0 + n, p)  # negatives first
        idx = int(np.argmax(self.tp / P >= tpr_level))
        return {
            "auroc_max_error": auroc_err,
            "aupr_interval": [float(worst.sum() / P), float(best.sum() / P)],
            "fpr95_interval": [float((self.fp[idx] - self.neg[idx]) / N), float(self.fp[idx] / N)],
        }


def _digamma_diff(x1: np.ndarray, x2: np.ndarray) -> np.ndarray:
    """psi(x2) - psi(x1) for x2 >= x1 >= 1, accurate also when both are large and close."""
    x1 = np.asarray(x1, dtype=np.float64).copy()
    x2 = np.asarray(x2, dtype=np.float64).copy()
    out = np.zeros_like(x1)
    # recurrence psi(x) = psi(x + 1) - 1/x until both arguments reach the asymptotic range
    for _ in range(16):
        small1, small2 = x1 < 16, x2 < 16
        out += np.where(small1, 1.0 / np.where(small1, x1, 1.0), 0.0)
        out -= np.where(small2, 1.0 / np.where(small2, x2, 1.0), 0.0)
        x1 = np.where(small1, x1 + 1, x1)
        x2 = np.where(small2, x2 + 1, x2)
    d = x2 - x1
    # psi(x) ~ ln x - 1/(2x) - 1/(12 x^2) + 1/(120 x^4) - 1/(252 x^6) + 1/(240 x^8); next term < 1e-14 at x >= 16
    out += np.log1p(d / x1)
    out += d / (2 * x1 * x2)
    out += (d * (x1 + x2)) / (12 * x1**2 * x2**2)
    out -= (1 / x1**4 - 1 / x2**4) / 120
    out += (1 / x1**6 - 1 / x2**6) / 252
    out -= (1 / x1**8 - 1 / x2**8) / 240
    return out


def _sum_ratio(a: np.ndarray, b: np.ndarray, p: np.ndarray) -> np.ndarray:
    """sum_{i=1..p} (a + i) / (b + i) element-wise (b >= a >= 0) = p - (b - a) * (psi(b+p+1) - psi(b+1))."""
    return p - (b - a) * _digamma_diff(b + 1, b + p + 1)


# ---- accumulators -------------------------------------------------------------------------------


class ExactAccumulator:
    """Streaming exact metrics: ``update`` with any number of score/label arrays, then ``result``.

    The state is ``counts`` [65536, 2] (normal, anomaly) per float16 key. Accumulators can be
    merged (``+=``), saved as the ``counts`` array and rebuilt with ``from_counts``.
    """

    def __init__(self, tpr_level: float = 0.95) -> None:
        self.tpr_level = float(tpr_level)
        self.counts = np.zeros((NBINS, 2), dtype=np.int64)
        self.exact = True

    @classmethod
    def from_counts(cls, counts: np.ndarray, tpr_level: float = 0.95, exact: bool = True) -> ExactAccumulator:
        acc = cls(tpr_level)
        counts = np.asarray(counts, dtype=np.int64)
        if counts.shape != (NBINS, 2):
            raise ValueError(f"counts must have shape ({NBINS}, 2), got {counts.shape}")
        acc.counts[...] = counts
        acc.exact = bool(exact)
        return acc

    def update(self, scores: np.ndarray, is_anomaly: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Add pixels: ``scores`` (float), ``is_anomaly`` (bool), optional ``valid`` mask (same shape)."""
        counts, lossless = histogram(scores, is_anomaly, valid)
        self.counts += counts
        self.exact &= lossless

    def __iadd__(self, other: ExactAccumulator) -> ExactAccumulator:
        self.counts += other.counts
        self.exact &= other.exact
        return self

    def curve(self) -> Curve:
        return Curve.from_counts(self.counts)

    def result(self) -> dict:
        """``auroc``, ``aupr``, ``fpr95`` (NaN when a class is missing), counts, and ``quantization``."""
        curve = self.curve()
        out = curve.metrics(self.tpr_level)
        out["tpr_level"] = self.tpr_level
        if self.exact:
            q = {
                "auroc_max_error": 0.0,
                "aupr_interval": [out["aupr"]] * 2,
                "fpr95_interval": [out["fpr95"]] * 2,
            }
        else:
            q = curve.quantization_bounds(self.tpr_level)
        out["quantization"] = {"exact": self.exact, "score_precision": "float16", **q}
        return out


def histogram(
    scores: np.ndarray, is_anomaly: np.ndarray, valid: np.ndarray | None = None
) -> tuple[np.ndarray, bool]:
    """[65536, 2] counts (normal, anomaly) per float16 key, and whether float16 rounding was lossless."""
    s = np.asarray(scores).reshape(-1)
    y = np.asarray(is_anomaly).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(
            f"scores and is_anomaly differ in size: {np.shape(scores)} vs {np.shape(is_anomaly)}"
        )
    if valid is not None:
        v = np.asarray(valid, dtype=bool).reshape(-1)
        if v.shape != s.shape:
            raise ValueError(f"valid mask has shape {np.shape(valid)}, scores {np.shape(scores)}")
        if not v.all():
            s, y = s[v], y[v]
    counts = np.zeros(2 * NBINS, dtype=np.int64)
    lossless = True
    for start in range(0, s.size, CHUNK):
        keys, ok = float16_keys(s[start : start + CHUNK])
        lossless &= ok
        code = keys.astype(np.intp)  # bincount's own index type: no hidden copy
        code <<= 1
        code |= y[start : start + CHUNK].astype(bool, copy=False)
        counts += np.bincount(code, minlength=2 * NBINS)
    counts = counts.reshape(NBINS, 2)
    if counts[_NAN_LOW].any() or counts[_NAN_HIGH].any():
        raise ValueError(f"scores contain {int(counts[_NAN_LOW].sum() + counts[_NAN_HIGH].sum())} NaN values")
    return counts, lossless


def exact_metrics(scores: np.ndarray, is_anomaly: np.ndarray, *, tpr_level: float = 0.95) -> dict:
    """Pooled AUROC, AUPR (anomaly positive) and FPR at ``tpr_level`` TPR, exact over every element.

    Higher score = more anomalous. Exact for float16 and float32 scores, ties included (float64
    scores are taken as float32; ``quantization["exact"]`` says whether that lost anything).
    """
    s = np.asarray(scores)
    if s.dtype != np.float16:
        _, lossless = float16_keys(s)
        if not lossless:
            return exact_float32_result(s, is_anomaly, tpr_level=tpr_level)
    acc = ExactAccumulator(tpr_level)
    acc.update(scores, is_anomaly)
    return acc.result()


def exact_float32_result(
    scores: np.ndarray, is_anomaly: np.ndarray, valid: np.ndarray | None = None, *, tpr_level: float = 0.95
) -> dict:
    """``exact_metrics``'s result for scores float16 cannot hold (``exact32``, in memory)."""
    from vlmrel.anomaly.exact32 import exact_metrics_float32

    r = exact_metrics_float32(scores, is_anomaly, valid, tpr_level=tpr_level)
    return with_exact_quantization(r, r.pop("exact"), "float32")


def with_exact_quantization(r: dict, exact: bool, precision: str) -> dict:
    """Attach the ``quantization`` record of a result computed on the scores themselves."""
    r["quantization"] = {
        "exact": bool(exact),
        "score_precision": precision,
        "auroc_max_error": 0.0 if exact else math.nan,
        "aupr_interval": [r["aupr"]] * 2 if exact else [math.nan] * 2,
        "fpr95_interval": [r["fpr95"]] * 2 if exact else [math.nan] * 2,
    }
    return r


class PerImageAccumulator:
    """The anomaly-segmentation convention: metrics per image, then their mean.

    Images without anomaly pixels (or without normal pixels) have no AUROC/AUPR/FPR95; they are
    left out of the mean and counted.
    """

    def __init__(self, tpr_level: float = 0.95) -> None:
        self.tpr_level = float(tpr_level)
        self.rows: list[dict] = []
        self.n_no_anomaly = 0
        self.n_no_normal = 0

    def update(self, scores: np.ndarray, is_anomaly: np.ndarray, valid: np.ndarray | None = None) -> dict:
        """Add one image; returns its metrics (NaN when undefined), exact for float16/float32 scores."""
        counts, lossless = histogram(scores, is_anomaly, valid)
        if lossless:
            m = Curve.from_counts(counts).metrics(self.tpr_level)
        else:
            from vlmrel.anomaly.exact32 import exact_metrics_float32

            r = exact_metrics_float32(scores, is_anomaly, valid, tpr_level=self.tpr_level)
            m = {k: r[k] for k in ("auroc", "aupr", "fpr95", "n_anomaly", "n_normal")}
        if m["n_anomaly"] == 0:
            self.n_no_anomaly += 1
        elif m["n_normal"] == 0:
            self.n_no_normal += 1
        self.rows.append(m)
        return m

    def result(self) -> dict:
        used = [r for r in self.rows if r["n_anomaly"] > 0 and r["n_normal"] > 0]
        out: dict = {
            "n_images": len(self.rows),
            "n_images_used": len(used),
            "n_images_no_anomaly": self.n_no_anomaly,
            "n_images_no_normal": self.n_no_normal,
        }
        for key in ("auroc", "aupr", "fpr95"):
            vals = np.array([r[key] for r in used], dtype=np.float64)
            out[key] = float(vals.mean()) if vals.size else math.nan
            out[f"{key}_std"] = float(vals.std(ddof=1)) if vals.size > 1 else math.nan
        return out


def per_image_metrics(images: Iterable[tuple[np.ndarray, np.ndarray]], *, tpr_level: float = 0.95) -> dict:
    """Mean of per-image metrics over ``(scores, is_anomaly)`` pairs (see ``PerImageAccumulator``)."""
    acc = PerImageAccumulator(tpr_level)
    for scores, labels in images:
        acc.update(scores, labels)
    return acc.result()


def metrics_at_thresholds(counts: np.ndarray, thresholds: Sequence[float]) -> list[dict]:
    """Precision/recall/F1 of ``score >= t`` for each ``t``, from a [65536, 2] histogram."""
    curve = Curve.from_counts(counts)
    return [curve.at_threshold(t) for t in thresholds]
