"""Job-level steps of the mcdo chain beyond exp0: each function reads its input files, calls the
analysis modules (geometry, phase2, ambiguity, gate) and writes its outputs atomically.
Scripts call these with the paths and settings Snakemake gives them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vlmrel.io import read_json, write_json
from vlmrel.summary import load_trials

PathLike = str | os.PathLike[str]

#: The per-image score Phase 2 compares: the trace before L2 normalisation at the largest T.
SCORE_SPACE = "pre"
RECIPES = ("trace_pre", "trace_post", "angular_variance")


def trial_scores(paths: Sequence[PathLike], space: str = SCORE_SPACE) -> tuple[list[str], np.ndarray]:
    """Image ids and scores [K, N] at the largest T of a set of trial files."""
    trials = load_trials(list(paths))
    return trials.image_id, trials.scores(space, max(trials.T))


def experiment_summary(exp: str, model: str, groups: Mapping[str, Sequence[PathLike]]) -> dict[str, Any]:
    """The summary of one (experiment, model) from its trial/geometry files, grouped as the rules do:
    by dropout rate ('p0.01') for exp1, by dropout kind for exp3, one group 'trials' otherwise."""
    from vlmrel import geometry, phase2

    if exp == "exp0b":
        _, stacks, metas = geometry.load_geometry(list(groups["trials"]))
        out = geometry.geometry_summary(stacks)
    elif exp.startswith("exp4"):
        _, stacks, metas = geometry.load_geometry(list(groups["trials"]))
        out = phase2.recipe_agreement({r: stacks[r] for r in RECIPES})
    elif exp == "exp1":
        # groups 'p0.01', and 'p0.01_rep2' for a rate listed twice (a replicate arm)
        arms = [(float(g[1:].split("_rep")[0]), trial_scores(paths)[1]) for g, paths in groups.items()]
        out = phase2.rank_stability(arms)
    elif exp == "exp3":
        out = phase2.dropout_types({g: trial_scores(paths)[1] for g, paths in groups.items()})
    elif exp == "exp2":
        ids, scores = trial_scores(groups["trials"])
        natural, synthetic = _split_synthetic(ids, scores)
        out = phase2.synthetic_separation(natural, synthetic)
    else:
        raise ValueError(f"no summary defined for experiment {exp!r}")
    return {**out, "experiment": exp, "model": model, "score": f"trace_{SCORE_SPACE} at max T"}


def _split_synthetic(ids: Sequence[str], scores: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Columns of natural images and of each synthetic kind (ids '<image_id>__<kind>')."""
    kinds = [i.rsplit("__", 1)[1] if "__" in i else "" for i in ids]
    kinds_arr = np.asarray(kinds)
    natural = scores[:, kinds_arr == ""]
    synthetic = {k: scores[:, kinds_arr == k] for k in dict.fromkeys(kinds) if k}
    return natural, synthetic


def write_synthetic_pixels(
    manifest_tsv: PathLike,
    root: PathLike,
    spec: Mapping[str, Any],
    out_h5: PathLike,
    *,
    kinds: Sequence[str],
    seed: int,
    blur_frac: float,
    shuffle_grid: int,
    num_images: int | None,
) -> None:
    """exp2's pixel file: each of the first ``num_images`` natural images followed by its synthetic
    versions (ids '<image_id>__<kind>'), decoded once, streamed in chunks."""
    from itertools import islice

    from vlmrel.pixels import iter_manifest_images, write_pixel_images
    from vlmrel.synthetic import make_synthetic, synthetic_id

    ids, natural = iter_manifest_images(manifest_tsv, root)
    n = len(ids) if num_images is None else min(num_images, len(ids))
    all_ids = [j for i in ids[:n] for j in (i, *(synthetic_id(i, k) for k in kinds))]

    def images():
        for image_id, img in zip(ids[:n], islice(natural, n), strict=True):
            yield img
            for kind in kinds:
                yield make_synthetic(
                    img, kind, image_id, seed, blur_frac=blur_frac, shuffle_grid=shuffle_grid
                )

    write_pixel_images(all_ids, images(), spec, out_h5)


def ambiguity(
    trial_paths: Sequence[PathLike],
    pixels_h5: PathLike,
    model: str,
    *,
    class_names: str | Sequence[str],
    prompt_template: str,
    high_entropy_quantile: float,
    precision: str,
    batch_size: int,
    device: str,
    summary_path: PathLike,
    per_image_path: PathLike,
) -> dict[str, Any]:
    """exp5 for one model: zero-shot probabilities from the model's own text tower (deterministic
    features, no dropout) against the MC-dropout uncertainty of its trials. A model without a usable
    text tower is recorded as skipped with the reason, and its per-image table is left empty."""
    import pandas as pd
    import torch

    from vlmrel import ambiguity as amb
    from vlmrel.io import atomic_path
    from vlmrel.models import load_encoder
    from vlmrel.pixels import iter_batches

    ids, scores = {}, {}
    for space in ("pre", "post"):
        ids[space], scores[space] = trial_scores(trial_paths, space)
    image_id = ids["pre"]
    names = amb.load_class_names(class_names)
    encoder = load_encoder(model, device=device, precision=precision)
    txt, reason = amb.text_features_or_reason(encoder.encode_text, amb.make_prompts(names, prompt_template))
    if txt is None:
        summary = {"model": model, **amb.skipped(reason)}
        with atomic_path(per_image_path) as tmp:
            pd.DataFrame(columns=["image_id", "uncertainty", "entropy", "margin", "top1", "p_top1"]).to_csv(
                tmp, sep="\t", index=False
            )
        write_json(summary_path, summary)
        return summary
    feats, seen = [], []
    with torch.inference_mode():
        for batch_ids, pixels in iter_batches(pixels_h5, batch_size, indices=range(len(image_id))):
            feats.append(encoder.encode_image(pixels).float().cpu().numpy())
            seen.extend(batch_ids)
    if seen != image_id:
        raise ValueError(f"{pixels_h5}: image order differs from the trials of {model}")
    probs = amb.zero_shot_probs(
        np.concatenate(feats),
        txt,
        encoder.logit_scale,
        encoder.logit_bias,
        kind="sigmoid" if encoder.logit_bias is not None else "softmax",
    )
    u = {space: s.mean(axis=0) for space, s in scores.items()}
    stats = {space: amb.ambiguity_stats(u[space], probs, high_entropy_quantile) for space in u}
    summary = {
        "model": model,
        "skipped": False,
        "uncertainty": f"trace_{SCORE_SPACE} at max T, mean over trials",
        "n_trials": int(scores["pre"].shape[0]),
        "classes": names,
        "prompt_template": prompt_template,
        **stats[SCORE_SPACE],
        "by_space": stats,
    }
    amb.save_per_image(per_image_path, image_id, u[SCORE_SPACE], probs, names)
    write_json(summary_path, summary)
    return summary


def gate(
    overall_path: PathLike, out_path: PathLike, *, force: bool, sweep_path: PathLike | None = None
) -> dict[str, Any]:
    """gate.json (or gate_after_sweep.json when the sweep's overall summary is given)."""
    from vlmrel.gate import decide_gate

    sweep = read_json(sweep_path) if sweep_path else None
    decision = decide_gate(read_json(overall_path), force=force, sweep_summary=sweep)
    write_json(out_path, decision)
    return decision


def experiment_figure(
    exp: str,
    model: str | None,
    out: PathLike,
    *,
    summary: PathLike | None = None,
    runs: Sequence[PathLike] = (),
    runs_by_model: Mapping[str, Sequence[PathLike]] | None = None,
    per_image: PathLike | None = None,
    dpi: int = 120,
) -> None:
    """The figure of one experiment (per model, or over models for exp0b's geometry)."""
    from vlmrel import geometry
    from vlmrel import phase_figures as pf

    s = read_json(summary) if summary else None
    if exp == "convergence":
        pf.convergence_curve(s["convergence"], out, dpi=dpi)
    elif exp == "exp0b":
        stacks = {m: geometry.load_geometry(list(paths))[1] for m, paths in (runs_by_model or {}).items()}
        pf.geometry_distributions(stacks, out, dpi=dpi)
    elif exp.startswith("exp4"):
        _, stacks, _ = geometry.load_geometry(list(runs))
        pf.recipe_agreement_scatter({r: stacks[r] for r in RECIPES}, out, model, s, dpi=dpi)
    elif exp == "exp1":
        pf.rank_stability_heatmap(s, out, model, dpi=dpi)
    elif exp == "exp3":
        pf.dropout_types_figure(s, out, model, dpi=dpi)
    elif exp == "exp2":
        ids, scores = trial_scores(runs)
        natural, synthetic = _split_synthetic(ids, scores)
        pf.synthetic_vs_natural(natural, synthetic, out, model, s, dpi=dpi)
    elif exp.startswith("exp5"):
        import pandas as pd

        if s.get("skipped"):
            pf.skipped_figure(f"{exp} {model}", s["reason"], out, dpi=dpi)
        else:
            table = pd.read_csv(per_image, sep="\t")
            pf.ambiguity_scatter(
                table["uncertainty"].to_numpy(),
                table["entropy"].to_numpy(),
                table["margin"].to_numpy(),
                out,
                model,
                s,
                dpi=dpi,
            )
    else:
        raise ValueError(f"no figure defined for experiment {exp!r}")
