"""Reliability of a per-image uncertainty score across K independent trials (seed 002, section 6),
and the exp0 summaries built on it: per model, for every T, pre and post, and over models.

``scores`` is an array [K, N]: K trials (raters) of the same score on N images (targets).

- ICC(1,1): one-way random effects, single measurement (pingouin's ``ICC(1,1)``, formerly ``ICC1``):
  (MSB - MSW) / (MSB + (K - 1) MSW), with MSB the between-image mean square and MSW the
  within-image mean square.
- SNR: the variance across images of the per-image trial means over the mean, across images,
  of the within-image variance across trials (both with ddof=1).
- Spearman: the median over all K(K-1)/2 trial pairs of the rank correlation across images.

Status (section 6): ``usable`` when Spearman >= 0.8, SNR >= 2 and ICC >= 0.75; ``marginal`` when
not usable but Spearman >= 0.6 and SNR >= 1; ``failed`` otherwise; ``insufficient_trials`` when
K < 2 or any metric is NaN (constant scores, a single image, ...).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

THRESHOLDS: Mapping[str, float] = {
    "spearman_usable": 0.8,
    "spearman_marginal": 0.6,
    "snr_usable": 2.0,
    "snr_marginal": 1.0,
    "icc_usable": 0.75,
}

#: Statuses from best to worst; ``best_status`` picks the first one present.
STATUS_ORDER = ("usable", "marginal", "failed", "insufficient_trials")


def _as_scores(scores: np.ndarray) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"scores must be a [K trials, N images] array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("scores contain NaN or infinite values")
    return arr


def icc1(scores: np.ndarray) -> float:
    """ICC(1,1) with images as targets and trials as raters; NaN when undefined."""
    x = _as_scores(scores)
    k, n = x.shape
    if k < 2 or n < 2:
        return math.nan
    image_means = x.mean(axis=0)
    grand = image_means.mean()
    msb = k * np.sum((image_means - grand) ** 2) / (n - 1)
    msw = np.sum((x - image_means) ** 2) / (n * (k - 1))
    denom = msb + (k - 1) * msw
    return float((msb - msw) / denom) if denom > 0 else math.nan


def snr(scores: np.ndarray) -> float:
    """Between-image variance of trial means over mean within-image variance; NaN when undefined."""
    x = _as_scores(scores)
    k, n = x.shape
    if k < 2 or n < 2:
        return math.nan
    between = np.var(x.mean(axis=0), ddof=1)
    within = np.mean(np.var(x, axis=0, ddof=1))
    if within > 0:
        return float(between / within)
    return math.inf if between > 0 else math.nan


def pairwise_spearman(scores: np.ndarray) -> np.ndarray:
    """Spearman correlation across images for every trial pair, as a flat array (pairs i < j)."""
    x = _as_scores(scores)
    k, n = x.shape
    if k < 2 or n < 2:
        return np.empty(0)
    ranks = rankdata(x, axis=1)
    out = []
    for i, j in itertools.combinations(range(k), 2):
        a, b = ranks[i] - ranks[i].mean(), ranks[j] - ranks[j].mean()
        denom = math.sqrt(float(a @ a) * float(b @ b))
        out.append(float(a @ b) / denom if denom > 0 else math.nan)
    return np.asarray(out)


def status(icc: float, snr_value: float, spearman_median: float, k: int) -> str:
    """The seed's status for one set of metrics."""
    if k < 2 or any(math.isnan(v) for v in (icc, snr_value, spearman_median)):
        return "insufficient_trials"
    t = THRESHOLDS
    if spearman_median >= t["spearman_usable"] and snr_value >= t["snr_usable"] and icc >= t["icc_usable"]:
        return "usable"
    if spearman_median >= t["spearman_marginal"] and snr_value >= t["snr_marginal"]:
        return "marginal"
    return "failed"


def reliability(scores: np.ndarray) -> dict:
    """ICC(1,1), SNR, median pairwise Spearman and the status for scores [K, N]."""
    x = _as_scores(scores)
    k, n = x.shape
    rho = pairwise_spearman(x)
    spearman_median = float(np.median(rho)) if rho.size and not np.any(np.isnan(rho)) else math.nan
    icc_value, snr_value = icc1(x), snr(x)
    return {
        "icc": icc_value,
        "snr": snr_value,
        "spearman_median": spearman_median,
        "spearman_min": float(np.min(rho)) if rho.size and not np.any(np.isnan(rho)) else math.nan,
        "n_trials": k,
        "n_images": n,
        "status": status(icc_value, snr_value, spearman_median, k),
    }


def best_status(statuses: list[str]) -> str:
    """The best status present (usable > marginal > failed > insufficient_trials)."""
    for s in STATUS_ORDER:
        if s in statuses:
            return s
    return "insufficient_trials"


# ---- exp0 summaries: trial files -> per-model and overall reliability ------------------------
#
# Trial .npz files are read by their contract (T, trace_pre, trace_post, image_id, meta) without
# importing torch, so summaries and figures run in light jobs.

SPACES = ("pre", "post")


@dataclass(frozen=True)
class Trials:
    """K trials of one (experiment, model, p): traces [K, len(T), N]."""

    T: list[int]
    image_id: list[str]
    trace_pre: np.ndarray
    trace_post: np.ndarray
    metas: list[dict]

    def scores(self, space: str, t: int) -> np.ndarray:
        """Scores [K, N] at one snapshot T in one space ("pre" or "post")."""
        arr = self.trace_pre if space == "pre" else self.trace_post
        return arr[:, self.T.index(t), :]


def load_trials(paths: Sequence[str | os.PathLike[str]]) -> Trials:
    """Stack trial files; they must share T and image ids (else the error names the file)."""
    if not paths:
        raise ValueError("no trial files given")
    T: list[int] | None = None
    ids: list[str] | None = None
    pre, post, metas = [], [], []
    for path in paths:
        try:
            with np.load(path, allow_pickle=False) as z:
                t_i = [int(v) for v in z["T"]]
                ids_i = [str(v) for v in z["image_id"]]
                pre.append(np.asarray(z["trace_pre"], dtype=np.float64))
                post.append(np.asarray(z["trace_post"], dtype=np.float64))
                metas.append(json.loads(str(z["meta"])))
        except (OSError, KeyError, ValueError) as exc:
            raise ValueError(f"{path}: not a valid MC trial file ({exc})") from exc
        if T is None:
            T, ids = t_i, ids_i
        elif t_i != T or ids_i != ids:
            raise ValueError(f"{path}: T list or image ids differ from {paths[0]}")
    assert T is not None and ids is not None
    return Trials(T=T, image_id=ids, trace_pre=np.stack(pre), trace_post=np.stack(post), metas=metas)


def model_summary(trials: Trials, model: str, p: float) -> dict:
    """Per-model exp0 summary: reliability for every T and space, and the best result."""
    rel: dict[str, dict[str, dict]] = {space: {} for space in SPACES}
    for space in SPACES:
        for t in trials.T:
            scores = trials.scores(space, t)
            r = reliability(scores)
            mean_scores = scores.mean(axis=0)
            r["score_mean"] = float(mean_scores.mean())
            r["score_median"] = float(np.median(mean_scores))
            rel[space][str(t)] = r
    statuses = [rel[s][str(t)]["status"] for s in SPACES for t in trials.T]
    best = best_status(statuses)
    best_at = next(
        ({"space": s, "T": t} for t in trials.T for s in SPACES if rel[s][str(t)]["status"] == best), None
    )
    t_max = max(trials.T)
    return {
        "model": model,
        "p": p,
        "T": trials.T,
        "n_trials": trials.trace_pre.shape[0],
        "n_images": len(trials.image_id),
        "reliability": rel,
        "best_status": best,
        "best_at": best_at,
        "status_at_T_max": {s: rel[s][str(t_max)]["status"] for s in SPACES},
        "trial_meta": trials.metas[0],
    }


def overall_summary(summaries: Sequence[dict]) -> dict:
    """The go/no-go input: every model's best status and the overall best."""
    models = {
        s["model"]: {
            "best_status": s["best_status"],
            "best_at": s["best_at"],
            "status_at_T_max": s["status_at_T_max"],
            "T": s["T"],
            "p": s["p"],
            "n_trials": s["n_trials"],
            "n_images": s["n_images"],
        }
        for s in summaries
    }
    best = best_status([m["best_status"] for m in models.values()])
    return {
        "experiment": "exp0",
        "models": models,
        "best_status": best,
        "any_usable": best == "usable",
        "all_failed_at_T_max": all(
            all(v == "failed" for v in m["status_at_T_max"].values()) for m in models.values()
        ),
    }
