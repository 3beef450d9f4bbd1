"""The mcdo chain's job-level steps: one entry per stage, called by ``scripts/mcdo_*.py``.

Each function reads its input files, calls the analysis modules of :mod:`vlmrel.mcdo` and writes
its outputs atomically. What varies between experiments comes from the registry
(:mod:`vlmrel.mcdo.registry`): the analysis and figure of an experiment are looked up by its name.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vlmrel.io import read_json, write_json
from vlmrel.mcdo.analyses import SCORE_SPACE, ArmRuns, trial_scores
from vlmrel.mcdo.registry import EXPERIMENTS
from vlmrel.mcdo.spec import TrialSpec

PathLike = str | os.PathLike[str]
log = logging.getLogger(__name__)


# ---- MC-dropout trials ---------------------------------------------------------------------------


def trial(
    pixels_h5: PathLike, out: PathLike, spec: TrialSpec, *, geometry: bool = False, depthwise: bool = False
) -> None:
    """One MC-dropout trial: max(T) stochastic passes per image, trace snapshots at every T; with
    ``geometry`` (a geometry experiment), the per-image covariance geometry of the same passes instead.
    ``depthwise``: depthwise convolutions are injection sites too (CNNs; Linear and 1x1 convs always are)."""
    from vlmrel.mcdo.dropout import run_trial, save_trial
    from vlmrel.models import load_encoder
    from vlmrel.pixels import images_to_use, prefetch_batches

    n = images_to_use(pixels_h5, spec.num_images)
    collector = None
    if geometry:
        from vlmrel.mcdo.geometry import GeometryCollector

        collector = GeometryCollector(n, spec.passes)
    encoder = load_encoder(spec.model, device=spec.device, precision=spec.precision)
    started = time.perf_counter()
    result = run_trial(
        encoder,
        prefetch_batches(pixels_h5, spec.batch_size, indices=range(n), device=encoder.device),
        p=spec.p,
        seed=spec.seed,
        trial=spec.k,
        T_list=list(spec.T),
        kind=spec.kind,
        on_pass=collector.on_pass if collector else None,
        depthwise=depthwise,
    )
    meta = spec.meta()
    meta["wall_seconds"] = time.perf_counter() - started  # the passes' wall time (exp6's runtime per image)
    if collector:
        from vlmrel.mcdo.geometry import save_geometry

        save_geometry(out, collector.result(), result.image_id, {**result.meta, **meta})
    else:
        save_trial(out, result, meta)
    log.info(
        "%s trial %s of %s: %d images, T=%s", spec.exp, spec.k, spec.model, len(result.image_id), result.T
    )


# ---- Phase 4: exp10's text trials and exp11's rate search ------------------------------------------


def text_trial(
    out: PathLike,
    spec: TrialSpec,
    *,
    num_prompts: int,
    class_names: str | Sequence[str],
    prompt_file: PathLike | None,
) -> None:
    """exp10, one trial: max(T) passes of the text tower (dropout on its linear maps only) over the
    seeded prompt sample; per prompt the trace / D of the pre-normalisation text features."""
    from vlmrel.mcdo import text
    from vlmrel.mcdo.ambiguity import load_class_names
    from vlmrel.mcdo.dropout import versions
    from vlmrel.models import load_encoder

    pairs = text.sample_prompts(load_class_names(class_names), int(num_prompts), spec.seed, prompt_file)
    styles, prompts = [s for s, _ in pairs], [q for _, q in pairs]
    encoder = load_encoder(spec.model, device=spec.device, precision=spec.precision)
    trace = text.text_trial(
        encoder, prompts, p=spec.p, seed=spec.seed, trial=spec.k, T=spec.passes, kind=spec.kind,
        batch_size=spec.batch_size,
    )  # fmt: skip
    meta = {
        **spec.meta(),
        "T": spec.passes,
        "precision": spec.precision,
        "tower": "text",
        "versions": versions(),
    }
    text.save_text_trial(out, styles, prompts, trace, meta)
    log.info(
        "%s text trial %s of %s: %d prompts, T=%d", spec.exp, spec.k, spec.model, len(prompts), spec.passes
    )


def zero_shot_quantities(
    encoder: Any, pixels_h5: PathLike, n: int, class_names: str | Sequence[str], batch_size: int
) -> tuple[list[str], dict[str, np.ndarray]]:
    """Deterministic (dropout off) zero-shot margin, entropy and prompt sensitivity of the first n images."""
    import torch

    from vlmrel.mcdo import ambiguity as amb
    from vlmrel.pixels import prefetch_batches

    names = amb.load_class_names(class_names)
    txt, reason = amb.text_features_or_reason(
        encoder.encode_text, amb.make_prompts(names, amb.DEFAULT_TEMPLATE)
    )
    if txt is None:
        raise ValueError(f"model {encoder.name!r}: {reason}")
    feats, ids = [], []
    with torch.inference_mode():
        for batch_ids, pixels in prefetch_batches(pixels_h5, batch_size, range(n), device=encoder.device):
            feats.append(encoder.encode_image(pixels).float().cpu().numpy())
            ids.extend(batch_ids)
    img = np.concatenate(feats)
    kind = "sigmoid" if encoder.logit_bias is not None else "softmax"
    probs = amb.zero_shot_probs(img, txt, encoder.logit_scale, encoder.logit_bias, kind=kind)
    sens = amb.prompt_sensitivity(
        amb.template_max_probs(img, encoder.encode_text, names, encoder.logit_scale, encoder.logit_bias)
    )
    return ids, {"margin": amb.margin(probs), "entropy": amb.entropy(probs), "prompt_sensitivity": sens}


def rate_search(
    pixels_h5: PathLike,
    out: PathLike,
    spec: TrialSpec,
    *,
    trials: int,
    class_names: str | Sequence[str],
    groups: int,
    candidates: int,
    rate_range: Sequence[float],
    search_fraction: float,
) -> None:
    """exp11: every candidate rate vector's K trials of max(T) passes, and the zero-shot quantities of
    the objective, in one .npz (the summary chooses on the search split, reports on the held-out one)."""
    from vlmrel.mcdo import concrete
    from vlmrel.mcdo.dropout import versions
    from vlmrel.models import load_encoder
    from vlmrel.pixels import images_to_use, prefetch_batches

    n = images_to_use(pixels_h5, spec.num_images)
    encoder = load_encoder(spec.model, device=spec.device, precision=spec.precision)
    ids, zero_shot = zero_shot_quantities(encoder, pixels_h5, n, class_names, spec.batch_size)
    arrays = concrete.run_search(
        encoder,
        lambda: prefetch_batches(pixels_h5, spec.batch_size, indices=range(n), device=encoder.device),
        zero_shot=zero_shot,
        p=spec.p,
        seed=spec.seed,
        trials=int(trials),
        T=spec.passes,
        kind=spec.kind,
        n_groups=int(groups),
        n_candidates=int(candidates),
        rate_range=rate_range,
        search_fraction=float(search_fraction),
    )
    if [str(i) for i in arrays["image_id"]] != ids:
        raise ValueError(f"{pixels_h5}: image order differs between the zero-shot pass and the trials")
    # the search spans all K trials: the index of its file (search0) is no trial of the meta
    meta = {**dataclasses.replace(spec, k=None).meta(), "T": spec.passes, "trials": int(trials),
            "precision": spec.precision, "versions": versions()}  # fmt: skip
    concrete.save_arrays(out, arrays, meta)
    log.info(
        "%s %s: %d candidates x %d trials on %d images",
        spec.exp,
        spec.model,
        arrays["rates"].shape[0],
        trials,
        n,
    )


# ---- summaries -----------------------------------------------------------------------------------


def reliability_summary(
    trial_paths: Sequence[PathLike], out: PathLike, *, model: str, p: float, knee_tol: float | None = None
) -> dict[str, Any]:
    """Reliability of one model's trace across its K trials, for every T, pre and post; with
    ``knee_tol`` (the convergence sweep) also the knee where Spearman saturates."""
    from vlmrel.mcdo.gate import convergence_summary
    from vlmrel.mcdo.reliability import load_trials, model_summary

    summary = model_summary(load_trials(list(trial_paths)), model, p)
    if knee_tol is not None:
        summary["convergence"] = convergence_summary(summary, tol=knee_tol)
    write_json(out, summary)
    log.info("%s: best status %s at %s", summary["model"], summary["best_status"], summary["best_at"])
    return summary


def reliability_overall(summary_paths: Sequence[PathLike], out: PathLike) -> dict[str, Any]:
    """The overall summary over models (exp0's is the gate's input)."""
    from vlmrel.mcdo.reliability import overall_summary

    overall = overall_summary([read_json(path) for path in summary_paths])
    write_json(out, overall)
    log.info("overall best status: %s", overall["best_status"])
    return overall


def experiment_summary(
    exp: str, model: str, arms: Sequence[ArmRuns], out: PathLike, scores: PathLike | None = None
) -> dict[str, Any]:
    """The summary of one (experiment, model): the registry entry's analysis on its arms (and on its
    per-model scores file, for an entry with a ``scores`` job)."""
    result = EXPERIMENTS[exp].analysis(arms, **_scores_kw(exp, scores))
    summary = {"score": f"trace_{SCORE_SPACE} at max T", **result, "experiment": exp, "model": model}
    write_json(out, summary)
    return summary


def experiment_overall(
    exp: str, runs_by_model: Mapping[str, Sequence[PathLike]], out: PathLike
) -> dict[str, Any]:
    """The summary over models of one experiment: the registry entry's ``overall`` analysis."""
    result = EXPERIMENTS[exp].overall(runs_by_model)
    summary = {**result, "experiment": exp}
    write_json(out, summary)
    return summary


def _scores_kw(exp: str, scores: PathLike | None) -> dict[str, Any]:
    if EXPERIMENTS[exp].scores is None:
        return {}
    if scores is None:
        raise ValueError(f"experiment {exp!r} needs its {EXPERIMENTS[exp].scores} scores file")
    return {"scores": scores}


def arms_with_files(records: Sequence[Mapping[str, Any]]) -> list[ArmRuns]:
    """``(arm, files)`` pairs from the records the rules pass (each record carries its ``files``)."""
    return [({k: v for k, v in r.items() if k != "files"}, list(r["files"])) for r in records]


# ---- exp2's pixels and exp5's ambiguity -----------------------------------------------------------


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

    from vlmrel.mcdo.synthetic import make_synthetic, synthetic_id
    from vlmrel.pixels import iter_manifest_images, write_pixel_images

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
    manifest: PathLike | None = None,
    class_map: PathLike | None = None,
) -> dict[str, Any]:
    """exp5 for one model: class probabilities (deterministic, no dropout) against the MC-dropout
    uncertainty of its trials. A classifier (``effnet_lite0``) uses its own head: softmax of its
    ImageNet logits, prompt-free (``class_names``, ``prompt_template`` and the prompt sensitivity do
    not apply). A CLIP / SigLIP model uses zero-shot probabilities from its own text tower, and the
    prompt sensitivity (variance of the top-1 probability across :data:`SENSITIVITY_TEMPLATES`).
    With the ``manifest``, images in class folders (ImageNet WordNet ids mapped to names) get their
    true class and the summary a top-1 accuracy. A model without either is recorded as skipped with
    the reason, and its per-image table is left empty."""
    import pandas as pd
    import torch

    from vlmrel.io import atomic_path
    from vlmrel.mcdo import ambiguity as amb
    from vlmrel.models import load_encoder
    from vlmrel.pixels import prefetch_batches

    ids, scores = {}, {}
    for space in ("pre", "post"):
        ids[space], scores[space] = trial_scores(trial_paths, space)
    image_id = ids["pre"]
    encoder = load_encoder(model, device=device, precision=precision)
    if encoder.has_classifier:
        return _head_ambiguity(
            encoder,
            pixels_h5,
            image_id,
            scores,
            high_entropy_quantile,
            batch_size,
            summary_path,
            per_image_path,
        )
    names = amb.load_class_names(class_names)
    txt, reason = amb.text_features_or_reason(encoder.encode_text, amb.make_prompts(names, prompt_template))
    if txt is None:
        summary = {"model": model, **amb.skipped(reason)}
        with atomic_path(per_image_path) as tmp:
            pd.DataFrame(columns=list(amb.PER_IMAGE_COLUMNS)).to_csv(tmp, sep="\t", index=False)
        write_json(summary_path, summary)
        return summary
    feats, seen = [], []
    with torch.inference_mode():
        for batch_ids, pixels in prefetch_batches(
            pixels_h5, batch_size, range(len(image_id)), device=encoder.device
        ):
            feats.append(encoder.encode_image(pixels).float().cpu().numpy())
            seen.extend(batch_ids)
    if seen != image_id:
        raise ValueError(f"{pixels_h5}: image order differs from the trials of {model}")
    img = np.concatenate(feats)
    probs = amb.zero_shot_probs(
        img,
        txt,
        encoder.logit_scale,
        encoder.logit_bias,
        kind="sigmoid" if encoder.logit_bias is not None else "softmax",
    )
    sens = amb.prompt_sensitivity(
        amb.template_max_probs(img, encoder.encode_text, names, encoder.logit_scale, encoder.logit_bias)
    )
    u = {space: s.mean(axis=0) for space, s in scores.items()}
    stats = {
        space: {
            **amb.ambiguity_stats(u[space], probs, high_entropy_quantile),
            **amb.sensitivity_stats(u[space], sens),
        }
        for space in u
    }
    true_class = None
    labels: dict[str, Any] = {"n_labelled": 0, "top1_accuracy": None}
    if manifest is not None:
        from vlmrel.images import read_manifest
        from vlmrel.mcdo.imagenet import folder_labels

        rel = dict(zip(*(read_manifest(manifest)[c] for c in ("image_id", "rel_path")), strict=True))
        true_class, label = folder_labels([rel.get(i, "") for i in image_id], names, class_map)
        known = np.asarray(label) >= 0
        if known.any():
            hit = probs.argmax(axis=1)[known] == np.asarray(label)[known]
            labels = {"n_labelled": int(known.sum()), "top1_accuracy": float(hit.mean())}
    summary = {
        "model": model,
        "skipped": False,
        "uncertainty": f"trace_{SCORE_SPACE} at max T, mean over trials",
        "n_trials": int(scores["pre"].shape[0]),
        "classes": names,
        "prompt_template": prompt_template,
        **stats[SCORE_SPACE],
        **labels,
        "by_space": stats,
    }
    amb.save_per_image(
        per_image_path, image_id, u[SCORE_SPACE], probs, names, prompt_sensitivity=sens, true_class=true_class
    )
    write_json(summary_path, summary)
    return summary


def _head_ambiguity(
    encoder: Any,
    pixels_h5: PathLike,
    image_id: list[str],
    scores: Mapping[str, np.ndarray],
    high_entropy_quantile: float,
    batch_size: int,
    summary_path: PathLike,
    per_image_path: PathLike,
) -> dict[str, Any]:
    """exp5 for a classifier: its own head's softmax against the MC-dropout uncertainty."""
    from vlmrel.mcdo import ambiguity as amb
    from vlmrel.pixels import prefetch_batches
    from vlmrel.stats import softmax

    logits, seen = [], []
    for batch_ids, pixels in prefetch_batches(
        pixels_h5, batch_size, range(len(image_id)), device=encoder.device
    ):
        logits.append(encoder.logits(pixels).double().cpu().numpy())
        seen.extend(batch_ids)
    if seen != image_id:
        raise ValueError(f"{pixels_h5}: image order differs from the trials of {encoder.name}")
    probs = softmax(np.concatenate(logits))
    u = {space: s.mean(axis=0) for space, s in scores.items()}
    stats = {space: amb.ambiguity_stats(u[space], probs, high_entropy_quantile) for space in u}
    summary = {
        "model": encoder.name,
        "skipped": False,
        "probabilities": "softmax of the model's own classifier head (prompt-free)",
        "uncertainty": f"trace_{SCORE_SPACE} at max T, mean over trials",
        "n_trials": int(scores["pre"].shape[0]),
        "classes": f"{len(encoder.class_names)} ImageNet-1k classes (open_clip IMAGENET_CLASSNAMES)",
        "prompt_template": None,
        **stats[SCORE_SPACE],
        "by_space": stats,
    }
    amb.save_per_image(per_image_path, image_id, u[SCORE_SPACE], probs, encoder.class_names)
    write_json(summary_path, summary)
    log.info(
        "%s: classifier head, rho(uncertainty, entropy) = %s",
        encoder.name,
        summary["rho_uncertainty_vs_entropy"],
    )
    return summary


def ambiguity_overall(
    summary_paths: Sequence[PathLike], out: PathLike, *, exp: str, settings: Mapping[str, Any]
) -> None:
    """exp5's overall summary over models (skipped models keep their reason)."""
    from vlmrel.mcdo.ambiguity import exp5_overall_summary

    per_model = {s["model"]: s for s in map(read_json, summary_paths)}
    summary = exp5_overall_summary(per_model, settings)
    summary["experiment"] = exp
    write_json(out, summary)


# ---- the gate ------------------------------------------------------------------------------------


def gate(
    overall_path: PathLike,
    out_path: PathLike,
    *,
    force: bool,
    sweep_path: PathLike | None = None,
    check_paths: Sequence[PathLike] = (),
) -> dict[str, Any]:
    """gate.json (or gate_after_sweep.json when the sweep's overall summary is given); the ambiguity
    overall summaries in ``check_paths`` are recorded as sanity checks, not blockers."""
    from vlmrel.mcdo.gate import decide_gate

    sweep = read_json(sweep_path) if sweep_path else None
    checks = [read_json(p) for p in check_paths]
    decision = decide_gate(read_json(overall_path), force=force, sweep_summary=sweep, checks=checks)
    write_json(out_path, decision)
    log.info("gate: %s (run Phase 2: %s)", decision["decision"], decision["run_phase2"])
    return decision


def phase_note(gate_path: PathLike, out: PathLike) -> None:
    """The negative-result note written instead of the later phases when the gate says stop."""
    from vlmrel.io import atomic_path
    from vlmrel.mcdo.gate import negative_result_note

    with atomic_path(out) as tmp:
        tmp.write_text(negative_result_note(read_json(gate_path)), encoding="utf-8")


def phase3_note(gate_path: PathLike, out: PathLike) -> None:
    """The note written instead of Phase 3 when the gate did not say proceed and nothing forced it."""
    from vlmrel.io import atomic_path

    gate = read_json(gate_path)
    text = (
        "# Phase 3 is not run\n\n"
        f"- gate decision: **{gate['decision']}** (Phase 3 runs only on `proceed`)\n"
        "- force it with `mcdo.gate.force_phase3: true` (the decision and its reasons stay recorded)\n"
        + "".join(f"- {r}\n" for r in gate.get("reasons", []))
    )
    with atomic_path(out) as tmp:
        tmp.write_text(text, encoding="utf-8")


# ---- Phase 3's per-model scores jobs -------------------------------------------------------------


def scores_job(rule: str, inputs: Mapping[str, Any], out: PathLike, *, model: str, **params: Any) -> None:
    """A Phase 3 scores job (the rule names its kind): exp6's ``laplace.npz`` or exp7's ``aleatoric.npz``."""
    if rule == "mcdo_laplace":
        from vlmrel.mcdo.laplace import score_job

        score_job(inputs["pixels"], out, model=model, **params)
    elif rule == "mcdo_aleatoric":
        from vlmrel.mcdo.aleatoric import score_job as aleatoric_job

        aleatoric_job(inputs["manifest"], params.pop("root"), out, model=model, **params)
    else:
        raise ValueError(f"no scores job for rule {rule!r}")


# ---- figures -------------------------------------------------------------------------------------


def reliability_figure(summary: PathLike, out: PathLike, *, dpi: int) -> None:
    from vlmrel.mcdo.figures import reliability_vs_T

    reliability_vs_T(read_json(summary), out, dpi=dpi)


def scores_figure(runs_by_model: Mapping[str, Sequence[PathLike]], out: PathLike, *, dpi: int) -> None:
    from vlmrel.mcdo.figures import score_distributions
    from vlmrel.mcdo.reliability import load_trials

    score_distributions([(m, load_trials(list(p))) for m, p in runs_by_model.items()], out, dpi=dpi)


def convergence_figure(summary: PathLike, out: PathLike, *, dpi: int) -> None:
    from vlmrel.mcdo.figures import convergence_curve

    convergence_curve(read_json(summary)["convergence"], out, dpi=dpi)


def geometry_figure(runs_by_model: Mapping[str, Sequence[PathLike]], out: PathLike, *, dpi: int) -> None:
    from vlmrel.mcdo.figures import geometry_distributions
    from vlmrel.mcdo.geometry import load_geometry

    stacks = {m: load_geometry(list(paths))[1] for m, paths in runs_by_model.items()}
    geometry_distributions(stacks, out, dpi=dpi)


def experiment_figure(
    exp: str,
    model: str,
    summary: PathLike,
    arms: Sequence[ArmRuns],
    out: PathLike,
    *,
    dpi: int,
    scores: PathLike | None = None,
) -> None:
    """The figure of one (experiment, model): the registry entry's plot function."""
    EXPERIMENTS[exp].plot(read_json(summary), arms, out, model, dpi, **_scores_kw(exp, scores))


def overall_figure(exp: str, summary: PathLike, out: PathLike, *, dpi: int) -> None:
    """The figure over models of one experiment: the registry entry's ``overall_plot``."""
    EXPERIMENTS[exp].overall_plot(read_json(summary), out, dpi)


def ambiguity_figure(
    exp: str, model: str, summary: PathLike, per_image: PathLike, out: PathLike, *, dpi: int
) -> None:
    import pandas as pd

    from vlmrel.mcdo import figures as pf

    s = read_json(summary)
    if s.get("skipped"):
        pf.skipped_figure(f"{exp} {model}", s["reason"], out, dpi=dpi)
        return
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
