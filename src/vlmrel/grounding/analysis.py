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
    "binned into n_bins bins (binning seed: notebook 02's np.digitize, n_bins + 1 labels); pairs with a "
    "failure (NaN) are left out"
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
        return {
            "rho": None,
            "p": None,
            "n": n,
            "note": "undefined: fewer than 3 pairs or a constant variable",
        }
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


SEMANTIC_DEFINITION = (
    "the sample's normalised answer similarities 1 - d / max(d) over its perturbations (d: semantic "
    "drift; a sample whose distances are all 0 has similarity 1) fall in more than one class of "
    "beta_sem (notebook 03's semantic boundary samples)"
)


def semantic_boundary(
    mat: Matrices, difficulties: Sequence[str], drift: np.ndarray, thresholds: Sequence[float], source: str
) -> dict:
    """Notebook 03's semantic boundary samples: ``beta_sem`` applied to the normalised similarity.

    Per sample, ``sim = 1 - d / max(d)`` over its perturbations
    (:func:`~vlmrel.grounding.drift.normalized_similarity`: all distances 0 give similarity 1, never
    NaN; a failed request's NaN stays out); the sample is a semantic boundary sample when its valid
    similarities span more than one class of ``thresholds`` (as :func:`boundary_000` on IoUs).
    """
    from vlmrel.grounding.drift import normalized_similarity

    sim = normalized_similarity(np.asarray(drift, float))
    flags = boundary_000(sim, thresholds).astype(float)
    return {
        "definition": SEMANTIC_DEFINITION,
        "thresholds": [float(t) for t in thresholds],
        "thresholds_source": source,
        "samples": [s for s, f in zip(mat.sample_ids, flags, strict=True) if f == 1],
        "rate": float(flags.mean()) if flags.size else None,
        "by_difficulty": _rates_by(flags, difficulties),
        "n_all_zero_distance_samples": int(
            np.sum(
                np.isfinite(drift).any(axis=1) & np.all(np.where(np.isfinite(drift), drift, 0.0) == 0, axis=1)
            )
        ),
        "similarity_nan": int(np.isnan(sim).sum()),
    }


def boundary_overlap(sample_ids: Sequence[str], geometric: Sequence[str], semantic: Sequence[str]) -> dict:
    """How the geometric (boundary_000 under the chosen thresholds) and semantic samples overlap."""
    g, m = set(geometric), set(semantic)
    n = len(sample_ids)
    both, either = g & m, g | m
    order = {s: i for i, s in enumerate(sample_ids)}

    def listed(x):
        return sorted(x, key=order.get)

    return {
        "n_samples": n,
        "n_geometric": len(g),
        "n_semantic": len(m),
        "n_both": len(both),
        "n_either": len(either),
        "rate_geometric": len(g) / n if n else None,
        "rate_semantic": len(m) / n if n else None,
        "rate_both": len(both) / n if n else None,
        "jaccard": len(both) / len(either) if either else None,
        "both": listed(both),
        "geometric_only": listed(g - m),
        "semantic_only": listed(m - g),
    }


# The seeds' checks, as recorded pass/fail flags (None: undefined, e.g. no drift or too few pairs)
SPREAD_MIN = 0.1  # notebook 02: mean per-sample IoU std across perturbations > 0.1
BOUNDARY_RATE_RANGE = (0.2, 0.4)  # notebook 03's checklist
RHO_RANGE = (0.3, 0.7)  # notebook 03's checklist
MI_GAIN_MIN_PCT = 5.0  # notebook 02's summary: optimised thresholds beat the baseline by > 5 %


def iou_spread(iou_perturbed: np.ndarray) -> np.ndarray:
    """Per sample, the std (ddof 0, as ``np.std``) of its valid perturbed IoUs; NaN if none is valid."""
    x = np.atleast_2d(np.asarray(iou_perturbed, float))
    ok = np.isfinite(x)
    cnt = ok.sum(1)
    mean = np.where(ok, x, 0.0).sum(1) / np.maximum(cnt, 1)
    var = np.where(ok, (x - mean[:, None]) ** 2, 0.0).sum(1) / np.maximum(cnt, 1)
    return np.where(cnt > 0, np.sqrt(var), np.nan)


def _in(v, lo, hi):
    return None if v is None else bool(lo <= v <= hi)


def seed_checks(
    mat: Matrices,
    *,
    boundary_rate: float | None,
    rho: float | None,
    mi_gain_pct: float | None,
    mi_gain_detail: Mapping | None = None,
) -> dict:
    """The seeds' checks with their values: notebook 02's data-quality check (per-sample IoU spread
    across perturbations; share of samples above 0.1) and notebook 03's checklist (boundary rate in
    20-40 %, geometric-semantic Spearman rho in 0.3-0.7, MI gain over the baseline above 5 %)."""
    spread = iou_spread(mat.iou_perturbed)
    valid = spread[np.isfinite(spread)]
    mean_spread = float(valid.mean()) if valid.size else None
    share = float((valid > SPREAD_MIN).mean()) if valid.size else None
    items = [
        {
            "check": "iou_spread",
            "seed": "001 (notebook 02, data quality)",
            "what": "mean over samples of the per-sample std of perturbed IoUs (failures left out)",
            "value": mean_spread,
            "criterion": f"> {SPREAD_MIN}",
            "pass": None if mean_spread is None else bool(mean_spread > SPREAD_MIN),
        },
        {
            "check": "share_sensitive",
            "seed": "001 (notebook 02, data quality)",
            "what": f"share of samples whose perturbed-IoU std exceeds {SPREAD_MIN}",
            "value": share,
            "criterion": "> 0 (reported with the spread; the seed printed the mean only)",
            "pass": None if share is None else bool(share > 0),
        },
        {
            "check": "boundary_rate",
            "seed": "000 (notebook 03, checklist)",
            "what": "boundary_000 rate under the chosen thresholds",
            "value": boundary_rate,
            "criterion": f"within [{BOUNDARY_RATE_RANGE[0]}, {BOUNDARY_RATE_RANGE[1]}]",
            "pass": _in(boundary_rate, *BOUNDARY_RATE_RANGE),
        },
        {
            "check": "geo_sem_rho",
            "seed": "000 (notebook 03, checklist)",
            "what": "Spearman rho between IoU drop and semantic drift over (sample, perturbation) pairs",
            "value": rho,
            "criterion": f"within [{RHO_RANGE[0]}, {RHO_RANGE[1]}]",
            "pass": _in(rho, *RHO_RANGE),
        },
        {
            "check": "mi_gain",
            "seed": "000 / 001 (optimal thresholds improve over the baseline)",
            "what": "100 (MI(chosen) - MI(baseline [0.3, 0.5, 0.7])) / MI(baseline), on this subset's pairs",
            "value": mi_gain_pct,
            "criterion": f"> {MI_GAIN_MIN_PCT} %",
            "pass": None
            if mi_gain_pct is None or not math.isfinite(mi_gain_pct)
            else bool(mi_gain_pct > MI_GAIN_MIN_PCT),
            **({"detail": dict(mi_gain_detail)} if mi_gain_detail else {}),
        },
    ]
    return {
        "items": items,
        "n_pass": sum(1 for c in items if c["pass"] is True),
        "n_fail": sum(1 for c in items if c["pass"] is False),
        "n_undefined": sum(1 for c in items if c["pass"] is None),
        "per_sample_iou_spread": {
            s: (None if np.isnan(v) else float(v)) for s, v in zip(mat.sample_ids, spread, strict=True)
        },
    }


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
