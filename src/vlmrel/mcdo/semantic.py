"""exp8: does the MC-dropout variance have a semantic direction? (seed 002, section 9c)

**Basis.** The model's text tower embeds the ``prompts`` (20 defaults, :data:`DEFAULT_PROMPTS`); the
unit text embeddings, centred over the prompts, have right singular vectors; those with a singular
value above 1e-8 form ``B`` [D, r] (r <= P - 1), an orthonormal basis of the directions along which
the prompts differ.

**Per image**, from its T MC-dropout pass features ``f_t`` (before normalisation, the "pre" space)
and ``c_t = f_t - mean_t f``:

- ``parallel = mean_t ||B^T c_t||^2 / D`` and ``orthogonal = mean_t ||c_t - B B^T c_t||^2 / D``; their
  sum is ``trace``, the trace of the pass covariance with divisor T over D (the trial files' trace);
- ``parallel_fraction = parallel / trace``; by chance (isotropic noise) it is about r / D;
- ``anisotropy = lambda_max / trace`` of the pass covariance;
- ``similarity_variance`` = the mean over prompts of the variance (ddof 1) over passes of the cosine
  ``<f_t / ||f_t||, t_p>``.

From the deterministic (dropout off) features, with the model's *scaled* logits over the prompts
(``logit_scale * cos (+ bias)``, the seed forgot the scale, so its entropy was near uniform):
``prompt_gap`` (top-1 minus top-2 probability) and ``prompt_entropy`` (nats); and the exp5-style
entropy over ``class_names`` with ``prompt_template`` (``exp5_entropy``).

**Summary**: the Spearman correlation of the trace (mean over K) with every metric; the AUROC of the
trace for the low-gap (bottom 10 %) and high-prompt-entropy (top 10 %) images; each metric's
reliability across the K trials (ICC, SNR, Spearman; :func:`vlmrel.mcdo.reliability.reliability`);
the 20 most uncertain images; and the comparison the seed's outline promised: a two-sided
Mann-Whitney U test of the parallel fraction between the exp5 high-entropy images (entropy at or
above the ``high_entropy_quantile`` quantile) and the others.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vlmrel.io import write_npz
from vlmrel.mcdo.spec import TrialSpec

PathLike = str | os.PathLike[str]
log = logging.getLogger(__name__)

DEFAULT_PROMPTS = (
    "a dog", "a cat", "a person", "a car", "a truck", "a bicycle", "a motorcycle", "an airplane",
    "a boat", "a bird", "a tree", "a flower", "a building", "a street scene", "an indoor room",
    "a plate of food", "a laptop computer", "a phone", "a sports ball", "a backpack",
)  # fmt: skip
PASS_KEYS = ("trace", "parallel", "orthogonal", "parallel_fraction", "anisotropy", "similarity_variance")
DETERMINISTIC_KEYS = ("prompt_gap", "prompt_entropy", "exp5_entropy")
TOP_N = 20


def text_basis(text_features: np.ndarray, tol: float = 1e-8) -> np.ndarray:
    """B [D, r]: right singular vectors (singular value > tol) of the centred unit text embeddings."""
    t = np.asarray(text_features, dtype=np.float64)
    t = t / np.linalg.norm(t, axis=1, keepdims=True)
    _, s, vt = np.linalg.svd(t - t.mean(axis=0), full_matrices=False)
    return vt[s > tol].T


def pass_metrics(passes: np.ndarray, basis: np.ndarray, text_unit: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image metrics [B] from pass features [T, B, D] (module docstring)."""
    f = np.asarray(passes, dtype=np.float64).transpose(1, 0, 2)  # [B, T, D]
    _, t, d = f.shape
    if t < 2:
        raise ValueError(f"exp8 needs at least 2 passes, got {t}")
    c = f - f.mean(axis=1, keepdims=True)
    proj = c @ basis  # [B, T, r]
    par = np.einsum("btr,btr->b", proj, proj) / (t * d)
    total = np.einsum("btd,btd->b", c, c) / (t * d)
    resid = c - proj @ basis.T
    orth = np.einsum("btd,btd->b", resid, resid) / (t * d)
    gram = np.matmul(c, c.transpose(0, 2, 1)) if t <= d else np.matmul(c.transpose(0, 2, 1), c)
    lam = np.linalg.eigvalsh(gram)[:, -1] / t
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(total > 0, par / total, np.nan)
        aniso = np.where(total > 0, lam / (total * d), np.nan)
    u = f / np.linalg.norm(f, axis=2, keepdims=True)
    sims = u @ np.asarray(text_unit, dtype=np.float64).T  # [B, T, P]
    return {
        "trace": total,
        "parallel": par,
        "orthogonal": orth,
        "parallel_fraction": frac,
        "anisotropy": aniso,
        "similarity_variance": sims.var(axis=1, ddof=1).mean(axis=1),
    }


class SemanticCollector:
    """Per-image :func:`pass_metrics` for a whole trial, fed by ``run_trial``'s ``on_pass`` hook
    (one batch's passes held at a time, as :class:`vlmrel.mcdo.geometry.GeometryCollector`)."""

    def __init__(self, n_images: int, n_passes: int, basis: np.ndarray, text_unit: np.ndarray) -> None:
        self.n_images, self.n_passes = n_images, n_passes
        self.basis, self.text_unit = basis, text_unit
        self._out = {k: np.full(n_images, np.nan) for k in PASS_KEYS}
        self._open: dict[int, list[np.ndarray]] = {}

    def on_pass(self, batch_start: int, t: int, features: Any) -> None:
        if t >= self.n_passes:
            return
        f = features.detach().double().cpu().numpy() if hasattr(features, "detach") else np.asarray(features)
        buf = self._open.setdefault(batch_start, [])
        if t != len(buf):
            raise ValueError(f"batch at {batch_start}: pass {t} arrived, expected pass {len(buf)}")
        buf.append(np.asarray(f, dtype=np.float64))
        if len(buf) == self.n_passes:
            stats = pass_metrics(np.stack(buf), self.basis, self.text_unit)
            for k in PASS_KEYS:
                self._out[k][batch_start : batch_start + f.shape[0]] = stats[k]
            del self._open[batch_start]

    def result(self) -> dict[str, np.ndarray]:
        if self._open or np.isnan(self._out["trace"]).any():
            raise ValueError("semantic metrics incomplete: some images lack their passes")
        return {k: v.copy() for k, v in self._out.items()}


# ---- the MC job ---------------------------------------------------------------------------------


def semantic_trial(
    pixels_h5: PathLike,
    out: PathLike,
    spec: TrialSpec,
    *,
    prompts: Sequence[str],
    class_names: str | Sequence[str],
    prompt_template: str,
) -> None:
    """One MC-dropout trial of exp8: per-image semantic metrics of its max(T) passes, and the
    deterministic prompt statistics, as ``semantic{k}.npz``."""
    from vlmrel.mcdo import ambiguity as amb
    from vlmrel.mcdo import targets as tg
    from vlmrel.mcdo.dropout import run_trial, versions
    from vlmrel.models import load_encoder
    from vlmrel.pixels import images_to_use, prefetch_batches

    n = images_to_use(pixels_h5, spec.num_images)
    encoder = load_encoder(spec.model, device=spec.device, precision=spec.precision)
    meta: dict[str, Any] = {**spec.meta(), "T": spec.passes, "prompts": list(prompts), "versions": versions()}
    try:
        txt = tg.text_features(encoder, list(prompts), "{}")
        names = amb.load_class_names(class_names)
        cls_txt = tg.text_features(encoder, names, prompt_template)
    except tg.TextTowerSkipped as exc:
        ids = [str(i) for i in read_pixel_ids(pixels_h5)[:n]]
        save_semantic(out, ids, {}, {**meta, "skipped": True, "reason": str(exc)})
        return
    basis = text_basis(txt)
    unit = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    collector = SemanticCollector(n, spec.passes, basis, unit)
    result = run_trial(
        encoder,
        prefetch_batches(pixels_h5, spec.batch_size, indices=range(n), device=encoder.device),
        p=spec.p,
        seed=spec.seed,
        trial=spec.k,
        T_list=[spec.passes],
        kind=spec.kind,
        on_pass=collector.on_pass,
    )
    arrays = collector.result()
    ids, feats = tg.deterministic_features(encoder, pixels_h5, spec.batch_size, n)
    if ids != result.image_id:
        raise ValueError(f"{pixels_h5}: image order differs between the MC passes and the deterministic pass")
    kind_ = "sigmoid" if encoder.logit_bias is not None else "softmax"
    probs = amb.zero_shot_probs(feats, txt, encoder.logit_scale, encoder.logit_bias, kind=kind_)
    cls = amb.zero_shot_probs(feats, cls_txt, encoder.logit_scale, encoder.logit_bias, kind=kind_)
    arrays.update(
        prompt_gap=amb.margin(probs),
        prompt_entropy=amb.entropy(probs),
        exp5_entropy=amb.entropy(cls),
        top_prompt=probs.argmax(axis=1).astype(np.int64),
    )
    meta.update(
        skipped=False,
        basis_rank=int(basis.shape[1]),
        feature_dim=int(feats.shape[1]),
        logit_scale=float(encoder.logit_scale),
        class_names=names,
        prompt_template=prompt_template,
    )
    save_semantic(out, ids, arrays, meta)
    log.info("%s trial %s: basis rank %d of D=%d", spec.model, spec.k, basis.shape[1], feats.shape[1])


def read_pixel_ids(pixels_h5: PathLike) -> list[str]:
    from vlmrel.pixels import PixelFile

    with PixelFile(pixels_h5) as f:
        return f.image_ids


def save_semantic(
    path: PathLike, image_id: Sequence[str], arrays: Mapping[str, np.ndarray], meta: Mapping
) -> None:
    write_npz(path, {"image_id": np.asarray(list(image_id), dtype=np.str_), **arrays}, meta)


def load_semantic(paths: Sequence[PathLike]) -> tuple[list[str], dict[str, np.ndarray], list[dict]]:
    """Stack K semantic files: (ids, {key: [K, N]}, metas); they must share image ids."""
    ids, stacks, metas = None, {}, []
    for path in paths:
        with np.load(path, allow_pickle=False) as z:
            ids_i = [str(i) for i in z["image_id"]]
            meta = json.loads(str(z["meta"][()]))
            for key in z.files:
                if key not in ("image_id", "meta"):
                    stacks.setdefault(key, []).append(z[key])
        if ids is None:
            ids = ids_i
        elif ids_i != ids:
            raise ValueError(f"{path}: image ids differ from {paths[0]}")
        metas.append(meta)
    return ids or [], {k: np.stack(v) for k, v in stacks.items()}, metas


# ---- the summary -------------------------------------------------------------------------------


def semantic_summary(
    paths: Sequence[PathLike], quantile: float = 0.1, high_entropy_quantile: float = 0.9
) -> dict[str, Any]:
    """exp8's summary of one model (module docstring)."""
    from scipy.stats import mannwhitneyu

    from vlmrel.mcdo.reliability import reliability
    from vlmrel.mcdo.targets import auroc
    from vlmrel.stats import spearman

    ids, st, metas = load_semantic(paths)
    if metas[0].get("skipped"):
        return {"skipped": True, "reason": metas[0]["reason"]}
    trace = st["trace"].mean(axis=0)
    mean = {k: st[k].mean(axis=0) for k in (*PASS_KEYS, *DETERMINISTIC_KEYS)}
    rho = {k: spearman(trace, mean[k])[0] for k in (*PASS_KEYS[1:], *DETERMINISTIC_KEYS)}
    gap, ent = mean["prompt_gap"], mean["prompt_entropy"]
    rel = {}
    for key in PASS_KEYS:
        arr = st[key]
        ok = np.isfinite(arr).all(axis=0)
        rel[key] = reliability(arr[:, ok]) if arr.shape[0] >= 2 and ok.sum() >= 2 else None
    order = np.argsort(-trace, kind="stable")[:TOP_N]
    prompts = metas[0]["prompts"]
    top = [
        {
            "image_id": ids[i],
            "trace": float(trace[i]),
            "parallel_fraction": float(mean["parallel_fraction"][i]),
            "prompt_entropy": float(ent[i]),
            "top_prompt": prompts[int(st["top_prompt"][0][i])],
        }
        for i in order
    ]
    h5 = mean["exp5_entropy"]
    high = h5 >= np.quantile(h5, high_entropy_quantile)
    pf = mean["parallel_fraction"]
    mw: dict[str, Any] = {
        "n_high": int(high.sum()),
        "n_low": int((~high).sum()),
        "high_entropy_quantile": high_entropy_quantile,
    }
    if high.any() and (~high).any():
        res = mannwhitneyu(pf[high], pf[~high], alternative="two-sided")
        mw.update(
            u=float(res.statistic),
            p=float(res.pvalue),
            median_high=float(np.median(pf[high])),
            median_low=float(np.median(pf[~high])),
        )
    else:
        mw.update(u=math.nan, p=math.nan)
    d = metas[0]["feature_dim"]
    return {
        "skipped": False,
        "n_images": len(ids),
        "n_trials": int(st["trace"].shape[0]),
        "basis_rank": metas[0]["basis_rank"],
        "feature_dim": d,
        "chance_parallel_fraction": metas[0]["basis_rank"] / d,
        "prompts": prompts,
        "means": {k: float(np.nanmean(v)) for k, v in mean.items()},
        "rho_trace_vs": rho,
        "auroc_low_gap": auroc(gap <= np.quantile(gap, quantile), trace),
        "auroc_high_prompt_entropy": auroc(ent >= np.quantile(ent, 1 - quantile), trace),
        "quantile": quantile,
        "reliability": rel,
        "top_uncertain": top,
        "parallel_fraction_high_vs_low_exp5_entropy": mw,
    }


def semantic_figure(
    summary: Mapping[str, Any], paths: Sequence[PathLike], out: PathLike, model: str, dpi: int
) -> None:
    """Trace against the parallel fraction; the trace's rho with every metric; parallel fraction of
    the exp5 high- and low-entropy images."""
    from vlmrel.figures import plt, save_figure

    if summary.get("skipped"):
        from vlmrel.mcdo.figures import skipped_figure

        skipped_figure(f"exp8 {model}", summary["reason"], out, dpi=dpi)
        return
    _, st, _ = load_semantic(paths)
    trace, pf, h5 = st["trace"].mean(0), st["parallel_fraction"].mean(0), st["exp5_entropy"].mean(0)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].scatter(trace, pf, s=10)
    axes[0].axhline(summary["chance_parallel_fraction"], color="k", ls="--", lw=0.8, label="chance r/D")
    axes[0].set_xlabel("MC trace/D")
    axes[0].set_ylabel("parallel fraction")
    axes[0].legend(fontsize=8)
    rho = summary["rho_trace_vs"]
    axes[1].barh(list(rho), np.nan_to_num(np.asarray(list(rho.values()), dtype=float)))
    axes[1].axvline(0, color="k", lw=0.5)
    axes[1].set_title(
        f"Spearman of the trace; AUROC low gap {summary['auroc_low_gap']:.2f}, "
        f"high entropy {summary['auroc_high_prompt_entropy']:.2f}",
        fontsize=8,
    )
    high = h5 >= np.quantile(
        h5, summary["parallel_fraction_high_vs_low_exp5_entropy"]["high_entropy_quantile"]
    )
    axes[2].boxplot([pf[~high], pf[high]], tick_labels=["low exp5 entropy", "high exp5 entropy"])
    axes[2].set_ylabel("parallel fraction")
    mw = summary["parallel_fraction_high_vs_low_exp5_entropy"]
    axes[2].set_title(f"Mann-Whitney p = {mw['p']:.3g}")
    fig.suptitle(
        f"exp8 {model}: semantic direction of the dropout variance (basis rank {summary['basis_rank']}, D={summary['feature_dim']})"
    )
    save_figure(fig, out, dpi=dpi)
