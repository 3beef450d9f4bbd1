"""IoU, Acc@t, IoU classes, boundary samples (both seeds' definitions) and failure accounting.

Failures (timeouts, unparsable answers, invalid boxes) are NaN here, never IoU 0 (seed defect 1):
they are left out of every IoU statistic and counted in the failure rates instead.

Boxes are ``(x1, y1, x2, y2)``; IoU is invariant to scaling each axis, so boxes normalised to
[0, 1] of the original image give the original-image IoU.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vlmrel.grounding.thresholds import iou_to_class

BOUNDARY_DEFINITIONS = {
    "boundary_000": "notebook 03 (seed 000): the sample's perturbed IoUs fall in more than one class",
    "boundary_001": "notebook 02 (seed 001): some perturbed IoU's class differs from the original image's class",
}


def box_iou(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Elementwise IoU of ``[..., 4]`` boxes; a NaN row (a failure) gives NaN, an empty union 0."""
    p = np.asarray(pred, dtype=float)
    g = np.asarray(gt, dtype=float)
    p, g = np.broadcast_arrays(p, g)
    ix = np.clip(np.minimum(p[..., 2], g[..., 2]) - np.maximum(p[..., 0], g[..., 0]), 0, None)
    iy = np.clip(np.minimum(p[..., 3], g[..., 3]) - np.maximum(p[..., 1], g[..., 1]), 0, None)
    inter = ix * iy
    area_p = np.clip(p[..., 2] - p[..., 0], 0, None) * np.clip(p[..., 3] - p[..., 1], 0, None)
    area_g = np.clip(g[..., 2] - g[..., 0], 0, None) * np.clip(g[..., 3] - g[..., 1], 0, None)
    union = area_p + area_g - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    out[np.isnan(p).any(-1) | np.isnan(g).any(-1)] = np.nan
    return out


def iou(a: Sequence[float] | None, b: Sequence[float] | None) -> float:
    """IoU of two boxes; ``None`` (a failure) gives NaN."""
    if a is None or b is None:
        return float("nan")
    return float(box_iou(np.asarray(a, float), np.asarray(b, float)))


def accuracy_at(ious: np.ndarray, t: float = 0.5) -> dict:
    """Acc@t as in RefCOCO evaluation (correct when IoU >= t).

    ``acc`` is over valid predictions only; ``acc_failures_as_miss`` counts failures as wrong
    (the usual leaderboard convention); both are reported with the failure rate.
    """
    v = np.asarray(ious, dtype=float).ravel()
    valid = ~np.isnan(v)
    n, n_valid = v.size, int(valid.sum())
    hits = int((v[valid] >= t).sum())
    return {
        "threshold": float(t),
        "acc": hits / n_valid if n_valid else None,
        "acc_failures_as_miss": hits / n if n else None,
        "n": n,
        "n_valid": n_valid,
        "failure_rate": (n - n_valid) / n if n else None,
    }


def iou_classes(ious: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Class ``#{j : iou >= t_j}`` (notebook 02/03's ``iou_to_class``); NaN (failure) gives -1."""
    return iou_to_class(ious, thresholds)


def boundary_000(iou_perturbed: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Seed 000's boundary samples: valid perturbed IoUs of the sample span more than one class.

    ``iou_perturbed`` is ``[n_samples, n_perturbations]`` with NaN for failures; a sample with
    fewer than two valid perturbed IoUs cannot span two classes and is False.
    """
    c = iou_classes(np.atleast_2d(iou_perturbed), thresholds).astype(float)
    c[c < 0] = np.nan
    with np.errstate(invalid="ignore"):
        lo = np.nanmin(np.where(np.isnan(c), np.inf, c), axis=1)
        hi = np.nanmax(np.where(np.isnan(c), -np.inf, c), axis=1)
    return np.isfinite(lo) & (hi > lo)


def class_jumps(
    iou_original: np.ndarray, iou_perturbed: np.ndarray, thresholds: Sequence[float]
) -> np.ndarray:
    """``|class(perturbed) - class(original)|`` per (sample, perturbation); NaN where either failed."""
    co = iou_classes(np.asarray(iou_original, float), thresholds).astype(float)
    cp = iou_classes(np.atleast_2d(iou_perturbed), thresholds).astype(float)
    co[co < 0] = np.nan
    cp[cp < 0] = np.nan
    return np.abs(cp - co[:, None])


def boundary_001(
    iou_original: np.ndarray, iou_perturbed: np.ndarray, thresholds: Sequence[float]
) -> np.ndarray:
    """Seed 001's boundary samples: some valid perturbed class differs from the original's class.

    Returns a float array: 1.0 / 0.0, or NaN where the original prediction failed (undefined).
    """
    jumps = class_jumps(iou_original, iou_perturbed, thresholds)
    orig_ok = ~np.isnan(np.asarray(iou_original, float))
    out = np.where(np.nan_to_num(jumps, nan=0.0).max(axis=1) > 0, 1.0, 0.0)
    out[~orig_ok] = np.nan
    return out


def severity(iou_original: np.ndarray, iou_perturbed: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Largest class jump from the original over the valid perturbations (seed 001); NaN if undefined."""
    jumps = class_jumps(iou_original, iou_perturbed, thresholds)
    out = np.full(jumps.shape[0], np.nan)
    has = ~np.all(np.isnan(jumps), axis=1)
    out[has] = np.nanmax(jumps[has], axis=1)
    return out


def failure_rates(iou_original: np.ndarray, iou_perturbed: np.ndarray) -> dict:
    """Failure rates: per sample (original + perturbed requests) and overall, plus by part."""
    o = np.isnan(np.asarray(iou_original, float))
    p = np.isnan(np.atleast_2d(iou_perturbed))
    per_sample = (o.astype(float) + p.sum(1)) / (1 + p.shape[1])
    n_req = o.size + p.size
    return {
        "overall": float((o.sum() + p.sum()) / n_req) if n_req else None,
        "original": float(o.mean()) if o.size else None,
        "perturbed": float(p.mean()) if p.size else None,
        "per_sample": per_sample,
        "n_requests": int(n_req),
        "n_failed": int(o.sum() + p.sum()),
    }
