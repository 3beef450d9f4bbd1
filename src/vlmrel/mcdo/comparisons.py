"""Phase 2 analyses on per-image uncertainty scores (seed 002, section 8), and exp4 of Phase 1.

Every function takes scores as arrays [K trials, N images] (a single trial may be given as [N])
for the same N images in the same order, and returns a JSON-ready dict.

- exp1 :func:`rank_stability`: the same images under several dropout rates p; Spearman across
  images of the per-image score (mean over trials) between every pair of rates.
- exp2 :func:`synthetic_separation`: natural images against each synthetic kind; AUROC of the
  score for telling them apart, natural as the positive class, so ``auroc`` = P(score of a
  natural image > score of a synthetic one) (+1/2 for ties): 0.5 = no separation, < 0.5 = the
  synthetic images are the more uncertain.
- exp3 :func:`dropout_types`: reliability (ICC, SNR, Spearman) of each dropout type and the
  Spearman of the per-image scores between every pair of types.
- exp4 :func:`recipe_agreement`: reliability of each recipe (e.g. ``trace_pre``, ``trace_post``,
  ``angular_variance``) and, for every pair of recipes, the Spearman across images per trial (same
  trial's passes), its median, the Spearman pooled over all K x N (trial, image) values, and the
  Spearman of the per-image trial means.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from vlmrel.mcdo.reliability import reliability


def _as_kn(scores: Any, what: str) -> np.ndarray:
    a = np.asarray(scores, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"{what}: scores must be [K, N] or [N], got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{what}: scores contain NaN or infinite values")
    return a


def _rho(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(spearmanr(a, b).statistic)


def _same_n(arrays: Mapping[str, np.ndarray], what: str) -> int:
    ns = {k: v.shape[1] for k, v in arrays.items()}
    if len(set(ns.values())) != 1:
        raise ValueError(f"{what}: the score arrays cover different numbers of images: {ns}")
    return next(iter(ns.values()))


def _reliability_or_none(a: np.ndarray) -> dict | None:
    return reliability(a) if a.shape[0] >= 2 else None


def _matrix(names: Sequence[str], means: Mapping[str, np.ndarray]) -> tuple[list[list[float]], list[dict]]:
    n = len(names)
    mat = np.eye(n)
    pairs = []
    for i, j in itertools.combinations(range(n), 2):
        r = _rho(means[names[i]], means[names[j]])
        mat[i, j] = mat[j, i] = r
        pairs.append({"a": names[i], "b": names[j], "spearman": r})
    return mat.tolist(), pairs


def _offdiag(pairs: list[dict]) -> dict[str, float]:
    r = np.array([p["spearman"] for p in pairs], dtype=np.float64)
    r = r[np.isfinite(r)]
    if r.size == 0:
        return {"median": math.nan, "min": math.nan}
    return {"median": float(np.median(r)), "min": float(r.min())}


# --------------------------------------------------------------------------- exp1


def rank_stability(scores_by_p: Mapping[float, Any] | Sequence[tuple[float, Any]]) -> dict[str, Any]:
    """exp1: Spearman of per-image scores (trial means) between every pair of dropout-rate arms.

    ``scores_by_p`` maps p to scores [K, N], or lists (p, scores) arms in config order; a rate may be
    listed twice (a replicate arm: the trial seeds do not depend on p, so it must give Spearman 1).
    """
    arms = list(scores_by_p.items()) if isinstance(scores_by_p, Mapping) else list(scores_by_p)
    if len(arms) < 2:
        raise ValueError(f"exp1 needs at least 2 dropout-rate arms, got {[p for p, _ in arms]}")
    arms.sort(key=lambda arm: float(arm[0]))
    rates = [float(p) for p, _ in arms]
    names = [str(p) if rates.count(p) == 1 else f"{p}#{rates[: i + 1].count(p)}" for i, p in enumerate(rates)]
    arrays = {name: _as_kn(v, f"exp1 p={p}") for name, (p, v) in zip(names, arms, strict=True)}
    n = _same_n(arrays, "exp1")
    means = {k: v.mean(axis=0) for k, v in arrays.items()}
    mat, pairs = _matrix(names, means)
    for pr in pairs:
        pr["arm_a"], pr["arm_b"] = pr.pop("a"), pr.pop("b")
        pr["p_a"], pr["p_b"] = float(pr["arm_a"].split("#")[0]), float(pr["arm_b"].split("#")[0])
    return {
        "experiment": "exp1",
        "p": rates,
        "arms": names,
        "n_images": n,
        "n_trials": {k: int(v.shape[0]) for k, v in arrays.items()},
        "spearman_matrix": mat,
        "pairs": pairs,
        "spearman_offdiag": _offdiag(pairs),
        "reliability_by_p": {k: _reliability_or_none(v) for k, v in arrays.items()},
        "score_median_by_p": {k: float(np.median(m)) for k, m in means.items()},
    }


# --------------------------------------------------------------------------- exp2


def synthetic_separation(natural: Any, synthetic: Mapping[str, Any]) -> dict[str, Any]:
    """exp2: AUROC (natural = positive) of the per-image score (trial mean), per synthetic kind.

    When a kind has as many images as the natural set (one synthetic image per natural image, same
    order), ``paired_fraction_natural_higher`` gives the share of images whose natural score exceeds
    its own synthetic version's.
    """
    from sklearn.metrics import roc_auc_score

    nat = _as_kn(natural, "exp2 natural").mean(axis=0)
    out: dict[str, Any] = {
        "experiment": "exp2",
        "natural": {"n_images": int(nat.size), "median": float(np.median(nat)), "mean": float(nat.mean())},
        "kinds": {},
    }
    for kind, scores in synthetic.items():
        syn = _as_kn(scores, f"exp2 {kind}").mean(axis=0)
        y = np.r_[np.ones(nat.size), np.zeros(syn.size)]
        s = np.r_[nat, syn]
        auroc = float(roc_auc_score(y, s)) if nat.size and syn.size else math.nan
        entry = {
            "n_images": int(syn.size),
            "median": float(np.median(syn)),
            "mean": float(syn.mean()),
            "auroc": auroc,
            "separation": max(auroc, 1.0 - auroc) if math.isfinite(auroc) else math.nan,
            "median_ratio_natural_over_synthetic": float(np.median(nat) / np.median(syn))
            if np.median(syn) != 0
            else math.nan,
            "paired_fraction_natural_higher": float(np.mean(nat > syn)) if syn.size == nat.size else None,
        }
        out["kinds"][kind] = entry
    return out


# --------------------------------------------------------------------------- exp3


def dropout_types(scores_by_type: Mapping[str, Any]) -> dict[str, Any]:
    """exp3: reliability per dropout type and Spearman of per-image scores between types."""
    if not scores_by_type:
        raise ValueError("exp3: no dropout types given")
    arrays = {str(k): _as_kn(v, f"exp3 {k}") for k, v in scores_by_type.items()}
    names = list(arrays)
    n = _same_n(arrays, "exp3")
    means = {k: v.mean(axis=0) for k, v in arrays.items()}
    mat, pairs = _matrix(names, means)
    return {
        "experiment": "exp3",
        "types": names,
        "n_images": n,
        "reliability": {k: _reliability_or_none(v) for k, v in arrays.items()},
        "spearman_matrix": mat,
        "pairs": pairs,
        "spearman_offdiag": _offdiag(pairs),
        "score_median": {k: float(np.median(m)) for k, m in means.items()},
    }


# --------------------------------------------------------------------------- exp4


def recipe_agreement(recipes: Mapping[str, Any]) -> dict[str, Any]:
    """exp4: reliability of each recipe and per-trial / pooled / trial-mean Spearman between recipes.

    All recipes must come from the same K trials (row k of each array from the same passes).
    """
    if len(recipes) < 2:
        raise ValueError(f"exp4 needs at least 2 recipes, got {list(recipes)}")
    arrays = {str(k): _as_kn(v, f"exp4 {k}") for k, v in recipes.items()}
    ks = {k: v.shape[0] for k, v in arrays.items()}
    if len(set(ks.values())) != 1:
        raise ValueError(f"exp4: recipes come from different numbers of trials: {ks}")
    n = _same_n(arrays, "exp4")
    names = list(arrays)
    pairs = []
    for a, b in itertools.combinations(names, 2):
        xa, xb = arrays[a], arrays[b]
        per_trial = [_rho(xa[k], xb[k]) for k in range(xa.shape[0])]
        finite = [r for r in per_trial if math.isfinite(r)]
        pairs.append(
            {
                "a": a,
                "b": b,
                "spearman_per_trial": per_trial,
                "spearman_trial_median": float(np.median(finite)) if finite else math.nan,
                "spearman_pooled": _rho(xa.ravel(), xb.ravel()),
                "spearman_of_means": _rho(xa.mean(axis=0), xb.mean(axis=0)),
            }
        )
    return {
        "experiment": "exp4",
        "recipes": names,
        "n_trials": next(iter(ks.values())),
        "n_images": n,
        "reliability": {k: _reliability_or_none(v) for k, v in arrays.items()},
        "pairs": pairs,
    }


# --------------------------------------------------------------------------- exp4_full: the model matrix


#: the per-image scores exp4_full compares between models (trial means)
MATRIX_RECIPES = ("trace_pre", "angular_variance")


def model_matrix(
    scores: Mapping[str, tuple[Sequence[str], Mapping[str, Any]]], recipes: Sequence[str] = MATRIX_RECIPES
) -> dict[str, Any]:
    """exp4_full over models: Spearman between every pair of models' per-image trial-mean score.

    ``scores``: model -> (image ids, {recipe: [K, N]}). Models are compared on the images they share
    (in the first model's order). Per recipe: a symmetric matrix with a unit diagonal, the pairs and
    the off-diagonal median and minimum.
    """
    models = list(scores)
    if len(models) < 2:
        raise ValueError(f"exp4_full's model matrix needs at least 2 models, got {models}")
    shared = [str(i) for i in scores[models[0]][0]]
    for m in models[1:]:
        have = {str(i) for i in scores[m][0]}
        shared = [i for i in shared if i in have]
    if len(shared) < 3:
        raise ValueError(f"exp4_full: the models share only {len(shared)} images")
    out: dict[str, Any] = {"models": models, "n_images": len(shared), "recipes": {}}
    for recipe in recipes:
        means = {}
        for m in models:
            ids, stacks = scores[m]
            pos = {str(i): j for j, i in enumerate(ids)}
            means[m] = _as_kn(stacks[recipe], f"exp4_full {m} {recipe}").mean(axis=0)[
                [pos[i] for i in shared]
            ]
        mat, pairs = _matrix(models, means)
        out["recipes"][recipe] = {"spearman_matrix": mat, "pairs": pairs, "offdiagonal": _offdiag(pairs)}
    return out
