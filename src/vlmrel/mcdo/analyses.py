"""The per-experiment analysis and figure functions that registry entries name.

An analysis takes the experiment's arms of one model, each an ``(arm, files)`` pair (the arm's
record as in :meth:`vlmrel.mcdo.registry.Arm.record`, and its K trial or geometry files), and
returns the model's summary. A figure function takes that summary, the same arms, the output
path, the model and the dpi. An entry with a ``scores`` job (exp6, exp7) also receives its
per-model scores file as ``scores=``. Heavy modules are imported inside the functions, so that the
registry (read when the workflow is parsed) stays light.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

PathLike = str | os.PathLike[str]
ArmRuns = tuple[Mapping[str, Any], Sequence[PathLike]]

#: The per-image score Phase 2 compares: the trace before L2 normalisation at the largest T.
SCORE_SPACE = "pre"
RECIPES = ("trace_pre", "trace_post", "angular_variance")


def trial_scores(paths: Sequence[PathLike], space: str = SCORE_SPACE) -> tuple[list[str], np.ndarray]:
    """Image ids and scores [K, N] at the largest T of a set of trial files."""
    from vlmrel.mcdo.reliability import load_trials

    trials = load_trials(list(paths))
    return trials.image_id, trials.scores(space, max(trials.T))


def _only(arms: Sequence[ArmRuns]) -> list[PathLike]:
    if len(arms) != 1:
        raise ValueError(f"expected one arm, got {[a['name'] for a, _ in arms]}")
    return list(arms[0][1])


def _recipe_stacks(arms: Sequence[ArmRuns]) -> dict[str, np.ndarray]:
    from vlmrel.mcdo.geometry import load_geometry

    _, stacks, _ = load_geometry(_only(arms))
    return {r: stacks[r] for r in RECIPES}


def split_synthetic(ids: Sequence[str], scores: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Columns of natural images and of each synthetic kind (ids '<image_id>__<kind>')."""
    kinds = [i.rsplit("__", 1)[1] if "__" in i else "" for i in ids]
    kinds_arr = np.asarray(kinds)
    natural = scores[:, kinds_arr == ""]
    synthetic = {k: scores[:, kinds_arr == k] for k in dict.fromkeys(kinds) if k}
    return natural, synthetic


# ---- summaries -------------------------------------------------------------------------------------


def geometry_summary(arms: Sequence[ArmRuns]) -> dict[str, Any]:
    """exp0b: distributions and reliability of the per-image covariance geometry."""
    from vlmrel.mcdo import geometry

    _, stacks, _ = geometry.load_geometry(_only(arms))
    return geometry.geometry_summary(stacks)


def recipe_summary(arms: Sequence[ArmRuns]) -> dict[str, Any]:
    """exp4: agreement of the trace (pre, post) and the angular variance as uncertainty recipes."""
    from vlmrel.mcdo.comparisons import recipe_agreement

    return recipe_agreement(_recipe_stacks(arms))


def rates_summary(arms: Sequence[ArmRuns]) -> dict[str, Any]:
    """exp1: rank stability of the scores across dropout rates (replicate arms included)."""
    from vlmrel.mcdo.comparisons import rank_stability

    return rank_stability([(float(arm["p"]), trial_scores(files)[1]) for arm, files in arms])


def kinds_summary(arms: Sequence[ArmRuns]) -> dict[str, Any]:
    """exp3: reliability of each dropout kind and their rank agreement."""
    from vlmrel.mcdo.comparisons import dropout_types

    return dropout_types({arm["name"]: trial_scores(files)[1] for arm, files in arms})


def synthetic_summary(arms: Sequence[ArmRuns]) -> dict[str, Any]:
    """exp2: uncertainty on natural images against their synthetic versions."""
    from vlmrel.mcdo.comparisons import synthetic_separation

    ids, scores = trial_scores(_only(arms))
    natural, synthetic = split_synthetic(ids, scores)
    return synthetic_separation(natural, synthetic)


def laplace_summary(arms: Sequence[ArmRuns], scores: PathLike) -> dict[str, Any]:
    """exp6: MC dropout, ridge leverage and a last-layer Laplace against the ambiguity targets."""
    from vlmrel.mcdo.laplace import laplace_summary as summary

    return summary(_only(arms), scores)


def aleatoric_summary(arms: Sequence[ArmRuns], scores: PathLike) -> dict[str, Any]:
    """exp7: aleatoric (degraded versions) against epistemic (MC dropout), and the degradation ablation."""
    from vlmrel.mcdo.aleatoric import aleatoric_summary as summary

    return summary(_only(arms), scores)


def semantic_summary(arms: Sequence[ArmRuns]) -> dict[str, Any]:
    """exp8: the semantic decomposition of the MC-dropout variance."""
    from vlmrel.mcdo.semantic import semantic_summary as summary

    return summary(_only(arms))


def text_summary(arms: Sequence[ArmRuns]) -> dict[str, Any]:
    """exp10: text-encoder MC dropout against the prompts' specificity, by style."""
    from vlmrel.mcdo import text

    styles, prompts, scores = text.load_text_trials(_only(arms))
    return text.text_summary(styles, prompts, scores)


def search_summary(arms: Sequence[ArmRuns]) -> dict[str, Any]:
    """exp11: the rate search, chosen on the search split, reported on the held-out split."""
    from vlmrel.mcdo import concrete

    return concrete.search_summary(concrete.load_arrays(_only(arms)[0]))


# ---- over models (an entry's ``overall``) -----------------------------------------------------------


def model_matrix_summary(runs_by_model: Mapping[str, Sequence[PathLike]]) -> dict[str, Any]:
    """exp4_full: Spearman between every pair of models' trial-mean trace and angular variance."""
    from vlmrel.mcdo.comparisons import model_matrix
    from vlmrel.mcdo.geometry import load_geometry

    scores = {}
    for model, files in runs_by_model.items():
        ids, stacks, _ = load_geometry(list(files))
        scores[model] = (ids, stacks)
    return model_matrix(scores)


def model_matrix_figure(summary: Mapping[str, Any], out: PathLike, dpi: int) -> None:
    from vlmrel.mcdo import figures

    figures.model_matrix_heatmaps(summary, out, dpi=dpi)


# ---- figures ---------------------------------------------------------------------------------------


def text_figure(
    summary: Mapping[str, Any], arms: Sequence[ArmRuns], out: PathLike, model: str, dpi: int
) -> None:
    from vlmrel.mcdo import figures, text

    styles, prompts, scores = text.load_text_trials(_only(arms))
    spec = np.array([text.specificity(p) for p in prompts])
    figures.text_dropout_figure(styles, scores.mean(axis=0), spec, summary, out, model, dpi=dpi)


def search_figure(
    summary: Mapping[str, Any], arms: Sequence[ArmRuns], out: PathLike, model: str, dpi: int
) -> None:
    from vlmrel.mcdo import figures

    figures.rate_search_figure(summary, out, model, dpi=dpi)


def recipe_figure(
    summary: Mapping[str, Any], arms: Sequence[ArmRuns], out: PathLike, model: str, dpi: int
) -> None:
    from vlmrel.mcdo import figures

    figures.recipe_agreement_scatter(_recipe_stacks(arms), out, model, summary, dpi=dpi)


def rates_figure(
    summary: Mapping[str, Any], arms: Sequence[ArmRuns], out: PathLike, model: str, dpi: int
) -> None:
    from vlmrel.mcdo import figures

    figures.rank_stability_heatmap(summary, out, model, dpi=dpi)


def kinds_figure(
    summary: Mapping[str, Any], arms: Sequence[ArmRuns], out: PathLike, model: str, dpi: int
) -> None:
    from vlmrel.mcdo import figures

    figures.dropout_types_figure(summary, out, model, dpi=dpi)


def synthetic_figure(
    summary: Mapping[str, Any], arms: Sequence[ArmRuns], out: PathLike, model: str, dpi: int
) -> None:
    from vlmrel.mcdo import figures

    ids, scores = trial_scores(_only(arms))
    natural, synthetic = split_synthetic(ids, scores)
    figures.synthetic_vs_natural(natural, synthetic, out, model, summary, dpi=dpi)


def laplace_figure(
    summary: Mapping[str, Any], arms: Sequence[ArmRuns], out: PathLike, model: str, dpi: int, scores: PathLike
) -> None:
    from vlmrel.mcdo.laplace import laplace_figure as figure

    figure(summary, _only(arms), scores, out, model, dpi)


def aleatoric_figure(
    summary: Mapping[str, Any], arms: Sequence[ArmRuns], out: PathLike, model: str, dpi: int, scores: PathLike
) -> None:
    from vlmrel.mcdo.aleatoric import aleatoric_figure as figure

    figure(summary, _only(arms), scores, out, model, dpi)


def semantic_figure(
    summary: Mapping[str, Any], arms: Sequence[ArmRuns], out: PathLike, model: str, dpi: int
) -> None:
    from vlmrel.mcdo.semantic import semantic_figure as figure

    figure(summary, _only(arms), out, model, dpi)
