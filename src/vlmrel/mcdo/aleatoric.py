"""exp7: aleatoric against epistemic uncertainty, and the degradation ablation (seed 002, section 9b).

**Degraded versions.** Every degradation is applied to the image *after* it has been resized and
cropped (or squashed) to the model's input size (:func:`vlmrel.pixels.resize_to_spec`), so the
crop cannot cut an occluder away (the seed occluded before the crop). A version is named:

- ``clean``: the image itself;
- ``jpeg<q>``: JPEG re-encoding at quality q (Pillow);
- ``blur<r>``: Gaussian blur of radius r pixels (Pillow's ``GaussianBlur``);
- ``occlude<a>``: a black square covering a % of the area, its position drawn from a generator
  seeded by (seed, image id);
- ``down<f>``: bilinear down-sampling by f, then bilinear up-sampling back.

**Scores** (the trace "pre", before L2 normalisation, as the other experiments):

- aleatoric = the per-dimension sample variance (ddof 1) of the deterministic (dropout off)
  embeddings of the versions listed in ``versions`` (clean included), averaged over the dimensions;
- epistemic = the MC-dropout trace/D of the clean image, averaged over the K trials;
- combined = z(aleatoric) + z(epistemic) (z-scores over the images, ddof 1). The seed's product of
  z-scores is dropped: it is high when both scores are low.

Each is judged against exp5's ambiguity targets (:mod:`vlmrel.mcdo.targets`) of the clean
images: for a CLIP / SigLIP model its zero-shot classifier's margin, entropy and prompt
sensitivity; for a classifier (``effnet_lite0``) the margin and entropy of its own head's softmax,
as exp5 (no prompt, so no prompt sensitivity). The summary's ``target_source`` says which.

**Degradation ablation** (the seed author's protocol): the MC-dropout trace of each image degraded by
each ``ablation`` version (blur radius 5 and 15, down-up x4 and x8 by default) against the trace of
the clean image (both averaged over the K trials): the % of images whose uncertainty rose, the mean
relative change ``(u_deg - u_clean) / u_clean``, and the one-sided Wilcoxon signed-rank p-value
(scipy; alternative: the degraded trace is larger).
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

PathLike = str | os.PathLike[str]
log = logging.getLogger(__name__)

_VERSION = re.compile(r"^(clean|jpeg(\d+)|blur(\d+(?:\.\d+)?)|occlude(\d+(?:\.\d+)?)|down(\d+))$")
#: degradation families of the ablation figure, with the severity of the clean image
FAMILIES = {"blur": 0.0, "down": 1.0, "jpeg": 100.0, "occlude": 0.0}
#: Where the ambiguity targets come from: a CLIP / SigLIP model's zero-shot classifier over
#: ``class_names`` (prompt sensitivity included), or a classifier's own head (exp5's choice).
ZERO_SHOT_TARGETS = "zero-shot"
HEAD_TARGETS = "classifier head"


def parse_version(name: str) -> tuple[str, float]:
    """('jpeg', 80.0) from 'jpeg80'; ('clean', 0.0); a ValueError naming the version otherwise."""
    m = _VERSION.match(str(name))
    if not m:
        raise ValueError(
            f"degradation {name!r}: expected clean, jpeg<quality>, blur<radius>, occlude<percent> or down<factor>"
        )
    if name == "clean":
        return "clean", 0.0
    family = re.match(r"[a-z]+", name).group(0)
    value = float(name[len(family) :])
    if family == "jpeg" and not 1 <= value <= 100:
        raise ValueError(f"degradation {name!r}: JPEG quality must be in 1..100")
    if family == "occlude" and not 0 < value < 100:
        raise ValueError(f"degradation {name!r}: occluded area must be in (0, 100) %")
    if family == "down" and value < 2:
        raise ValueError(f"degradation {name!r}: down-sampling factor must be >= 2")
    return family, value


def _image_seed(seed: int, image_id: str) -> np.random.Generator:
    h = int.from_bytes(hashlib.sha256(str(image_id).encode()).digest()[:8], "big")
    return np.random.default_rng([int(seed), h])


def degrade(img: Image.Image, version: str, *, seed: int, image_id: str) -> Image.Image:
    """One degraded version of an RGB image already at the model's input size (module docstring)."""
    family, value = parse_version(version)
    img = img.convert("RGB")
    if family == "clean":
        return img.copy()
    if family == "jpeg":
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(value))
        buf.seek(0)
        with Image.open(buf) as out:
            return out.convert("RGB")
    if family == "blur":
        return img.filter(ImageFilter.GaussianBlur(radius=value))
    if family == "down":
        w, h = img.size
        small = img.resize((max(1, round(w / value)), max(1, round(h / value))), Image.Resampling.BILINEAR)
        return small.resize((w, h), Image.Resampling.BILINEAR)
    # occlude: a black square of value % of the area, placed by the (seed, image id) generator
    w, h = img.size
    side = max(1, min(w, h, round(math.sqrt(value / 100.0 * w * h))))
    u, v = _image_seed(seed, image_id).random(2)
    left, top = int(u * (w - side + 1)), int(v * (h - side + 1))
    out = img.copy()
    out.paste((0, 0, 0), (left, top, left + side, top + side))
    return out


def version_id(image_id: str, version: str) -> str:
    return image_id if version == "clean" else f"{image_id}__{version}"


def degraded_images(
    ids: Sequence[str],
    images: Iterator[Image.Image],
    spec: Mapping[str, Any],
    versions: Sequence[str],
    seed: int,
) -> Iterator[tuple[str, Image.Image]]:
    """(id, image at input size) for every image and version, image-major."""
    from vlmrel.pixels import resize_to_spec

    for image_id, img in zip(ids, images, strict=False):
        base = resize_to_spec(img, spec)
        for version in versions:
            yield version_id(image_id, version), degrade(base, version, seed=seed, image_id=image_id)


def write_ablation_pixels(
    manifest_tsv: PathLike,
    root: PathLike,
    spec: Mapping[str, Any],
    out_h5: PathLike,
    *,
    ablation: Sequence[str],
    seed: int,
    num_images: int | None,
) -> None:
    """exp7's ablation pixel file: each of the first ``num_images`` images, then its ablation versions."""
    from itertools import islice

    from vlmrel.pixels import iter_manifest_images, write_pixel_images

    for v in ablation:
        parse_version(v)
    ids, images = iter_manifest_images(manifest_tsv, root)
    n = len(ids) if num_images is None else min(num_images, len(ids))
    versions = ["clean", *[v for v in ablation if v != "clean"]]
    pairs = list(degraded_images(ids[:n], islice(images, n), spec, versions, seed))
    write_pixel_images([i for i, _ in pairs], (img for _, img in pairs), spec, out_h5)


# ---- the aleatoric scores job --------------------------------------------------------------------


def aleatoric_variance(features: np.ndarray) -> np.ndarray:
    """[N]: the per-dimension variance (ddof 1) across versions of features [N, V, D], mean over D."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 3 or f.shape[1] < 2:
        raise ValueError(f"features must be [N, V >= 2 versions, D], got shape {f.shape}")
    return f.var(axis=1, ddof=1).mean(axis=1)


def score_job(
    manifest_tsv: PathLike,
    root: PathLike,
    out: PathLike,
    *,
    model: str,
    versions: Sequence[str],
    num_images: int | None,
    class_names: str | Sequence[str],
    prompt_template: str,
    seed: int,
    precision: str,
    batch_size: int,
    device: str,
) -> None:
    """exp7's per-model scores: aleatoric variance across the degraded versions and the ambiguity
    targets of the clean images, as ``aleatoric.npz``."""
    from itertools import islice

    import torch
    from tqdm.auto import tqdm

    from vlmrel.mcdo import ambiguity as amb
    from vlmrel.mcdo import targets as tg
    from vlmrel.mcdo.laplace import save_scores
    from vlmrel.models import load_encoder, preprocess_spec
    from vlmrel.pixels import image_array, iter_manifest_images
    from vlmrel.stats import softmax

    versions = ["clean", *[v for v in versions if v != "clean"]]
    for v in versions:
        parse_version(v)
    spec = preprocess_spec(model)
    ids, images = iter_manifest_images(manifest_tsv, root)
    n = len(ids) if num_images is None else min(num_images, len(ids))
    ids = ids[:n]
    encoder = load_encoder(model, device=device, precision=precision)
    chunks = []
    batch: list[np.ndarray] = []

    def flush() -> None:
        if batch:
            with torch.inference_mode():
                chunks.append(encoder.encode_image(np.stack(batch)).double().cpu().numpy())
            batch.clear()

    for _, img in tqdm(
        degraded_images(ids, islice(images, n), spec, versions, seed),
        total=n * len(versions),
        desc=f"{model} degraded versions",
        mininterval=1.0,
    ):
        batch.append(image_array(img))  # uint8; the encoder normalises on its device
        if len(batch) == batch_size:
            flush()
    flush()
    feats = np.concatenate(chunks).reshape(n, len(versions), -1)
    unit = feats / np.linalg.norm(feats, axis=2, keepdims=True)
    arrays: dict[str, np.ndarray] = {
        "aleatoric_pre": aleatoric_variance(feats),
        "aleatoric_post": aleatoric_variance(unit),
        "cosine_to_clean": np.einsum("nvd,nd->nv", unit, unit[:, 0]),
    }
    meta: dict[str, Any] = {"model": model, "versions": versions, "seed": seed}
    if encoder.has_classifier:  # its own head on the clean features, as exp5 (prompt-free)
        probs = softmax(encoder.head_logits(feats[:, 0]).double().cpu().numpy())
        arrays.update(margin=amb.margin(probs), entropy=amb.entropy(probs))
        meta.update(targets=True, target_source=HEAD_TARGETS)
    else:
        names = amb.load_class_names(class_names)
        try:
            _, targets = tg.zero_shot_targets(encoder, feats[:, 0], names, prompt_template)
            arrays.update({k: np.asarray(v, dtype=np.float64) for k, v in targets.items()})
            meta.update(targets=True, target_source=ZERO_SHOT_TARGETS)
        except tg.TextTowerSkipped as exc:
            meta.update(targets=False, reason=str(exc))
    save_scores(out, ids, arrays, meta)


# ---- the summary -------------------------------------------------------------------------------


def ablation_stats(clean: np.ndarray, degraded: np.ndarray) -> dict[str, Any]:
    """The ablation of one degradation: per-image uncertainty degraded against clean (module docstring)."""
    from scipy.stats import wilcoxon

    c = np.asarray(clean, dtype=np.float64)
    d = np.asarray(degraded, dtype=np.float64)
    if c.shape != d.shape or c.ndim != 1:
        raise ValueError(f"clean {c.shape} and degraded {d.shape} must be the same images [N]")
    diff = d - c
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(c > 0, diff / c, np.nan)
    p = math.nan
    if c.size >= 2 and np.any(diff != 0):
        p = float(wilcoxon(d, c, alternative="greater").pvalue)
    return {
        "n_images": int(c.size),
        "pct_rose": float(100.0 * np.mean(diff > 0)) if c.size else math.nan,
        "mean_relative_change": float(np.nanmean(rel)) if np.isfinite(rel).any() else math.nan,
        "median_relative_change": float(np.nanmedian(rel)) if np.isfinite(rel).any() else math.nan,
        "wilcoxon_p_greater": p,
        "mean_clean": float(c.mean()) if c.size else math.nan,
        "mean_degraded": float(d.mean()) if d.size else math.nan,
    }


def _split(trial_paths: Sequence[PathLike]) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    from vlmrel.mcdo.analyses import split_synthetic, trial_scores

    ids, scores = trial_scores(trial_paths)
    natural_ids = [i for i in ids if "__" not in i]
    natural, versions = split_synthetic(ids, scores)
    return natural_ids, natural, versions


def aleatoric_summary(
    trial_paths: Sequence[PathLike], scores_path: PathLike, quantile: float = 0.1
) -> dict[str, Any]:
    """exp7's summary of one model (module docstring)."""
    from vlmrel.mcdo.laplace import load_scores
    from vlmrel.mcdo.targets import score_vs_targets, zscore
    from vlmrel.stats import spearman

    ids, arrays, meta = load_scores(scores_path)
    natural_ids, natural, versions = _split(trial_paths)
    if natural_ids != ids:
        raise ValueError(f"{scores_path}: image ids differ from the clean images of the MC-dropout trials")
    epistemic = natural.mean(axis=0)
    aleatoric = arrays["aleatoric_pre"]
    combined = zscore(aleatoric) + zscore(epistemic)
    rho, p, _ = spearman(aleatoric, epistemic)
    out: dict[str, Any] = {
        "n_images": len(ids),
        "n_trials": int(natural.shape[0]),
        "versions": meta["versions"],
        "rho_aleatoric_vs_epistemic": rho,
        "p_aleatoric_vs_epistemic": p,
        "rho_aleatoric_post_vs_epistemic": spearman(arrays["aleatoric_post"], epistemic)[0],
        "combined": "z(aleatoric) + z(epistemic); the seed's product of z-scores is dropped (high when both are low)",
        "ablation": {v: ablation_stats(epistemic, s.mean(axis=0)) for v, s in versions.items()},
    }
    if meta.get("targets"):
        targets = {t: arrays[t] for t in ("margin", "entropy", "prompt_sensitivity") if t in arrays}
        out["target_source"] = meta.get("target_source", ZERO_SHOT_TARGETS)
        out["vs_targets"] = {
            name: score_vs_targets(s, targets, quantile)
            for name, s in (("aleatoric", aleatoric), ("epistemic", epistemic), ("combined", combined))
        }
    else:
        out["vs_targets"] = None
        out["targets_skipped"] = meta.get("reason")
    return out


def severity_curves(trial_paths: Sequence[PathLike]) -> dict[str, list[tuple[float, float, float]]]:
    """Per degradation family: (severity, mean, standard error) of the trace, clean included."""
    _, natural, versions = _split(trial_paths)
    clean = natural.mean(axis=0)
    curves: dict[str, list[tuple[float, float, float]]] = {}
    for v, s in versions.items():
        family, value = parse_version(v)
        curves.setdefault(family, [(FAMILIES.get(family, 0.0), *_mean_se(clean))]).append(
            (value, *_mean_se(s.mean(axis=0)))
        )
    return {f: sorted(c) for f, c in curves.items()}


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    return float(np.mean(x)), float(np.std(x, ddof=1) / math.sqrt(x.size)) if x.size > 1 else 0.0


def aleatoric_figure(
    summary: Mapping[str, Any],
    trial_paths: Sequence[PathLike],
    scores_path: PathLike,
    out: PathLike,
    model: str,
    dpi: int,
) -> None:
    """Aleatoric against epistemic; each score against the targets; uncertainty against severity."""
    from vlmrel.figures import plt, save_figure
    from vlmrel.mcdo.laplace import load_scores

    _, arrays, _ = load_scores(scores_path)
    _, natural, _ = _split(trial_paths)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), layout="constrained")
    axes[0].scatter(natural.mean(axis=0), arrays["aleatoric_pre"], s=10)
    axes[0].set_xlabel("epistemic: MC trace/D (clean)")
    axes[0].set_ylabel("aleatoric: variance across versions")
    axes[0].set_title(f"ρ = {summary['rho_aleatoric_vs_epistemic']:.2f}")
    axes[0].ticklabel_format(axis="both", style="sci", scilimits=(0, 0))
    vt = summary.get("vs_targets")
    if vt:
        keys = [
            (key, label)
            for key, label in (
                ("rho_neg_margin", "−margin"),
                ("rho_entropy", "entropy"),
                ("rho_prompt_sensitivity", "prompt sens."),
            )
            if key in vt["epistemic"]  # a classifier's own head has no prompt sensitivity
        ]
        x = np.arange(len(keys))
        for j, name in enumerate(("aleatoric", "epistemic", "combined")):
            vals = np.nan_to_num(np.asarray([vt[name].get(k, np.nan) for k, _ in keys], dtype=float))
            axes[1].bar(x + (j - 1) * 0.27, vals, 0.27, label=name)
        axes[1].set_xticks(x, [lbl for _, lbl in keys])
        axes[1].axhline(0, color="k", lw=0.5)
        axes[1].legend(fontsize=8)
        axes[1].set_title(f"Spearman ρ against ambiguity ({summary.get('target_source', ZERO_SHOT_TARGETS)})")
    else:
        axes[1].text(0.5, 0.5, "no text tower: no ambiguity targets", ha="center")
    curves = severity_curves(trial_paths)
    for family, pts in curves.items():
        sev, mean, se = map(np.asarray, zip(*pts, strict=True))
        axes[2].errorbar(sev, mean, yerr=se, marker="o", capsize=3, label=family)
    axes[2].set_xlabel("severity (blur radius px / down-sampling factor)")
    axes[2].set_ylabel("MC trace/D (mean ± s.e.)")
    if curves:
        axes[2].legend()
    abl = summary["ablation"]
    axes[2].text(
        0.02,
        0.98,
        "\n".join(
            f"{v}: {a['pct_rose']:.0f}% rose, Wilcoxon p={a['wilcoxon_p_greater']:.2g}"
            for v, a in abl.items()
        ),
        transform=axes[2].transAxes,
        va="top",
        fontsize=7,
    )
    axes[2].set_title("degradation ablation")
    fig.suptitle(f"exp7 {model}: aleatoric vs epistemic (n={summary['n_images']}, K={summary['n_trials']})")
    save_figure(fig, out, dpi=dpi)
