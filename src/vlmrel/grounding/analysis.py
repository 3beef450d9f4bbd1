"""From ``predictions.parquet`` to IoUs, ``thresholds.json`` and ``boundary.json``.

``predictions.parquet`` has one row per request (the original image has perturbation id
``original``): :data:`PREDICTION_COLUMNS`. A failed request (client error, timeout, parse
failure) has ``status = "failed"``, a ``failure_kind`` and no box; its IoU is NaN, never 0.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from vlmrel.grounding.iou import (
    BOUNDARY_DEFINITIONS,
    accuracy_at,
    boundary_000,
    boundary_001,
    box_iou,
    failure_rates,
    iou_classes,
    severity,
)
from vlmrel.grounding.perturb import ORIGINAL_ID
from vlmrel.grounding.thresholds import BASELINE_THRESHOLDS, threshold_comparison
from vlmrel.stats import spearman

PREDICTION_COLUMNS = (
    "sample_id",  # str
    "perturbation_id",  # str; "original" for the unperturbed image
    "parameters",  # str: JSON of the perturbation's parameters ("{}" for the original)
    "raw_answer",  # str or null (null when the request itself failed)
    "box",  # list of 4 floats, x1 y1 x2 y2 normalised to [0, 1] of the original image; null on failure
    "status",  # "ok" or "failed"
    "failure_kind",  # null, a parse failure kind (vlmrel.grounding.parse.FAILURE_KINDS) or a client one
    "latency_s",  # float seconds (0 or the cached request's time for a cache hit)
    "cache_hit",  # bool
)
SIGNALS = ("perturbation_magnitude", "semantic_drift", "iou_drop")
OBJECTIVE = (
    "I(C_t(IoU); S) in nats: k sorted thresholds give k+1 classes #{j: IoU >= t_j}; S is the signal "
    "binned into n_bins bins; pairs with a failure (NaN) are left out"
)


def prediction_row(
    sample_id: str,
    perturbation_id: str,
    parameters: Mapping,
    raw_answer: str | None,
    box: Sequence[float] | None,
    failure_kind: str | None,
    latency_s: float,
    cache_hit: bool,
) -> dict:
    """One row of ``predictions.parquet`` (status follows from ``failure_kind``)."""
    if (box is None) == (failure_kind is None):
        raise ValueError(f"{sample_id}/{perturbation_id}: a row has either a box or a failure kind")
    return {
        "sample_id": str(sample_id),
        "perturbation_id": str(perturbation_id),
        "parameters": json.dumps(dict(parameters), sort_keys=True),
        "raw_answer": raw_answer,
        "box": None if box is None else [float(v) for v in box],
        "status": "ok" if failure_kind is None else "failed",
        "failure_kind": failure_kind,
        "latency_s": float(latency_s),
        "cache_hit": bool(cache_hit),
    }


def read_predictions(path: str | os.PathLike[str]):
    """``predictions.parquet`` as a DataFrame, checked against :data:`PREDICTION_COLUMNS`."""
    import pandas as pd

    df = pd.read_parquet(path)
    missing = [c for c in PREDICTION_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}")
    dup = df.duplicated(["sample_id", "perturbation_id"])
    if dup.any():
        first = df.loc[dup, ["sample_id", "perturbation_id"]].iloc[0].tolist()
        raise ValueError(f"{path}: duplicate (sample_id, perturbation_id) rows, e.g. {first}")
    return df


@dataclass
class Matrices:
    """Predictions arranged per sample (rows) and perturbation (columns)."""

    sample_ids: list[str]
    perturbation_ids: list[str]
    iou_original: np.ndarray  # [N]
    iou_perturbed: np.ndarray  # [N, P]
    answer_original: list[str | None]
    answer_perturbed: list[list[str | None]]
    failure_original: list[str | None]
    failure_perturbed: list[list[str | None]]


def arrange(df, gt_boxes: Mapping[str, Sequence[float]], perturbation_ids: Sequence[str]) -> Matrices:
    """IoUs and answers as ``[N]`` / ``[N, P]`` arrays for the samples of ``gt_boxes`` (normalised boxes).

    A missing row is an error naming the sample and perturbation (the prediction step must have
    written every request, failed or not).
    """
    sample_ids = list(gt_boxes)
    cols = [ORIGINAL_ID, *perturbation_ids]
    index = {(s, p): i for i, (s, p) in enumerate(zip(df["sample_id"], df["perturbation_id"], strict=True))}
    boxes = df["box"].tolist()
    answers = df["raw_answer"].tolist()
    kinds = df["failure_kind"].tolist()
    n, m = len(sample_ids), len(cols)
    pred = np.full((n, m, 4), np.nan)
    ans: list[list[str | None]] = [[None] * m for _ in range(n)]
    fk: list[list[str | None]] = [[None] * m for _ in range(n)]
    for i, s in enumerate(sample_ids):
        for j, p in enumerate(cols):
            r = index.get((s, p))
            if r is None:
                raise ValueError(f"predictions: no row for sample {s!r}, perturbation {p!r}")
            b = boxes[r]
            if b is not None and len(b) == 4:
                pred[i, j] = np.asarray(b, dtype=float)
            a = answers[r]
            ans[i][j] = None if a is None or (isinstance(a, float) and np.isnan(a)) else str(a)
            k = kinds[r]
            fk[i][j] = None if k is None or (isinstance(k, float) and np.isnan(k)) else str(k)
    gt = np.asarray([list(gt_boxes[s]) for s in sample_ids], dtype=float).reshape(n, 1, 4)
    ious = box_iou(pred, gt)
    return Matrices(
        sample_ids=sample_ids,
        perturbation_ids=list(perturbation_ids),
        iou_original=ious[:, 0],
        iou_perturbed=ious[:, 1:],
        answer_original=[row[0] for row in ans],
        answer_perturbed=[row[1:] for row in ans],
        failure_original=[row[0] for row in fk],
        failure_perturbed=[row[1:] for row in fk],
    )


def signals(mat: Matrices, magnitudes: Sequence[float], drift: np.ndarray | None) -> dict[str, np.ndarray]:
    """The ``[N, P]`` signals: perturbation magnitude, semantic drift (if given), IoU drop (NaN-aware)."""
    n, p = mat.iou_perturbed.shape
    out = {
        "perturbation_magnitude": np.broadcast_to(np.asarray(magnitudes, float)[None, :], (n, p)).copy(),
        "iou_drop": mat.iou_original[:, None] - mat.iou_perturbed,
    }
    if drift is not None:
        out["semantic_drift"] = np.asarray(drift, float)
    return out


def thresholds_report(
    iou_perturbed: np.ndarray,
    signal_arrays: Mapping[str, np.ndarray],
    *,
    k: int = 3,
    n_bins: int = 20,
    binning: str = "width",
    lbfgsb_restarts: int = 10,
    seed: int = 42,
) -> dict:
    """``thresholds.json``: per signal, the exact optimum beside the seed's L-BFGS-B and the baseline."""
    return {
        "objective": OBJECTIVE,
        "k": k,
        "n_bins": n_bins,
        "binning": binning,
        "signals": {
            name: threshold_comparison(
                iou_perturbed,
                sig,
                k=k,
                n_bins=n_bins,
                binning=binning,
                lbfgsb_restarts=lbfgsb_restarts,
                seed=seed,
            )
            for name, sig in signal_arrays.items()
        },
    }


def _rates_by(flags: np.ndarray, difficulties: Sequence[str]) -> dict:
    d = np.asarray(difficulties)
    out = {}
    for level in ("easy", "medium", "hard"):
        sel = (d == level) & ~np.isnan(flags)
        out[level] = {
            "n": int(sel.sum()),
            "n_boundary": int(np.nansum(flags[sel])),
            "rate": float(flags[sel].mean()) if sel.any() else None,
        }
    return out


def _spearman(x: np.ndarray, y: np.ndarray) -> dict:
    rho, p, n = spearman(x, y)
    if math.isnan(rho):
        return {"rho": None, "p": None, "n": n, "note": "undefined: fewer than 3 pairs or a constant variable"}
    return {"rho": rho, "p": p, "n": n}


def boundary_report(
    mat: Matrices,
    difficulties: Sequence[str],
    thresholds: Sequence[float],
    *,
    thresholds_source: str,
    drift: np.ndarray | None = None,
    baseline: Sequence[float] = BASELINE_THRESHOLDS,
) -> dict:
    """``boundary.json``: both boundary definitions (named), severity, rates by difficulty,
    failure rates, Acc@0.5/0.7, and Spearman between IoU drop and semantic drift."""
    io, ip = mat.iou_original, mat.iou_perturbed
    fr = failure_rates(io, ip)
    per_def = {}
    for name, ts in (("thresholds", thresholds), ("baseline", baseline)):
        b0 = boundary_000(ip, ts).astype(float)
        b1 = boundary_001(io, ip, ts)
        sev = severity(io, ip, ts)
        per_def[name] = {
            "thresholds": [float(t) for t in ts],
            "boundary_000": {
                "definition": BOUNDARY_DEFINITIONS["boundary_000"],
                "samples": [s for s, f in zip(mat.sample_ids, b0, strict=True) if f == 1],
                "rate": float(np.nanmean(b0)) if b0.size else None,
                "by_difficulty": _rates_by(b0, difficulties),
            },
            "boundary_001": {
                "definition": BOUNDARY_DEFINITIONS["boundary_001"],
                "samples": [s for s, f in zip(mat.sample_ids, b1, strict=True) if f == 1],
                "undefined_samples": [s for s, f in zip(mat.sample_ids, b1, strict=True) if np.isnan(f)],
                "rate": float(np.nanmean(b1)) if np.isfinite(b1).any() else None,
                "by_difficulty": _rates_by(b1, difficulties),
            },
            "severity": {
                "definition": "largest |class(perturbed) - class(original)| over valid perturbations",
                "per_sample": {
                    s: (None if np.isnan(v) else int(v)) for s, v in zip(mat.sample_ids, sev, strict=True)
                },
                "counts": {str(j): int((sev == j).sum()) for j in range(len(ts) + 1)},
            },
            "class_counts_original": np.bincount(
                iou_classes(io[~np.isnan(io)], ts), minlength=len(ts) + 1
            ).tolist(),
            "class_counts_perturbed": np.bincount(
                iou_classes(ip[~np.isnan(ip)], ts), minlength=len(ts) + 1
            ).tolist(),
        }
    drop = io[:, None] - ip
    out = {
        "n_samples": len(mat.sample_ids),
        "n_perturbations": len(mat.perturbation_ids),
        "thresholds_source": thresholds_source,
        "failures_excluded": "failed requests have no IoU; they are left out of every IoU statistic",
        "failure_rate": {
            "overall": fr["overall"],
            "original": fr["original"],
            "perturbed": fr["perturbed"],
            "n_requests": fr["n_requests"],
            "n_failed": fr["n_failed"],
            "per_sample": {s: float(v) for s, v in zip(mat.sample_ids, fr["per_sample"], strict=True)},
            "by_kind": _kind_counts(mat),
        },
        "accuracy": {
            "original": {"acc@0.5": accuracy_at(io, 0.5), "acc@0.7": accuracy_at(io, 0.7)},
            "perturbed": {"acc@0.5": accuracy_at(ip, 0.5), "acc@0.7": accuracy_at(ip, 0.7)},
        },
        "iou": {
            "original_mean": _nanmean(io),
            "perturbed_mean": _nanmean(ip),
            "drop_mean": _nanmean(drop),
        },
        "difficulty_counts": {
            d: int(np.sum(np.asarray(difficulties) == d)) for d in ("easy", "medium", "hard")
        },
        **per_def,
    }
    if drift is not None:
        out["spearman_iou_drop_vs_semantic_drift"] = {
            "pairs": _spearman(drop, drift),
            "sample_means": _spearman(_row_nanmean(drop), _row_nanmean(np.asarray(drift, float))),
        }
    return out


def _nanmean(x: np.ndarray) -> float | None:
    x = np.asarray(x, float)
    return float(np.nanmean(x)) if np.isfinite(x).any() else None


def _row_nanmean(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, float)
    cnt = np.isfinite(x).sum(1)
    s = np.where(np.isfinite(x), x, 0.0).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, s / np.maximum(cnt, 1), np.nan)


def _kind_counts(mat: Matrices) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for k in [*mat.failure_original, *(k for row in mat.failure_perturbed for k in row)]:
        if k is not None:
            kinds[k] = kinds.get(k, 0) + 1
    return dict(sorted(kinds.items()))
