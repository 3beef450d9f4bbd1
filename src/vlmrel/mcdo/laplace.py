"""exp6: MC dropout against two zero-retraining alternatives (seed 002, section 9a).

Three per-image uncertainty scores, each judged against exp5's ambiguity targets
(:mod:`vlmrel.mcdo.targets`):

- **MC dropout**: the trace/D of the other experiments (``trace_pre`` at the largest T, mean over
  the K trials).
- **Ridge leverage** (the seed called it "projection Laplace"; it is the leverage of a ridge
  regression, named for what it is). With ``X`` [N, D] the deterministic image embeddings,
  L2-normalised, ``y`` the pseudo-labels (argmax of the zero-shot logits), ``Y`` their one-hot
  matrix [N, C] and ``A = X^T X + lambda I``::

      W       = A^-1 X^T Y                                  [D, C]
      sigma^2 = mean_i (1 - x_i . w_{y_i})^2                (the residual on the pseudo-label)
      score_i = sigma^2 * x_i^T A^-1 x_i                    (the full quadratic form)

  The seed's code summed ``diag(A^-1) * x_i^2``, i.e. dropped the off-diagonal terms of A^-1;
  that is a bug, not an approximation we keep.
- **Last-layer Laplace** (``laplace-torch``): the zero-shot classifier is a linear layer on the
  L2-normalised image embeddings, with weights ``logit_scale * t_c`` (``t_c`` the unit text
  embedding of class c) and, where the model has one (SigLIP), the logit bias for every class.
  Its posterior is a Laplace approximation around these weights with a GGN Hessian of the softmax
  cross-entropy (``hessian_structure``: ``kron`` = KFAC by default, ``full`` or ``diag``; with
  ``kfac_fisher: type2`` the exact GGN factors, which take C backward passes per batch, or with
  ``mc`` their one-sample Monte Carlo estimate, the Fisher, equal to the GGN in expectation), fitted
  on a *fit split* of images with their pseudo-labels; the prior precision is chosen by
  maximising the marginal likelihood. The score is the predictive entropy of the GLM predictive
  (``link_approx: probit``, the GLM predictive with the probit approximation; laplace-torch builds
  its Jacobians explicitly, [C, C * D] per image, so with 1000 ImageNet classes it does not fit
  in memory) or of the MC predictive (``link_approx: mc``: ``n_samples`` weight samples of the
  Kronecker-factored posterior, the same samples for every image) on the *scored* images, which
  are disjoint from the fit split. The zero-shot weights are not a MAP of the pseudo-labelled likelihood; the
  Laplace approximation is used post hoc around them, as is usual for pretrained heads.

The fit split: the ``ceil(fit_fraction * N)`` images with the smallest uniform draw of a generator
seeded by (seed, image id), so an image's split does not depend on N or the image order. All
statistics (for every method) are over the scored images only.

Runtime per image: MC dropout, the trial's wall time over its images (T passes each); ridge and
Laplace, the deterministic embedding time plus the method's own compute, over the scored images.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vlmrel.io import read_npz, write_npz

PathLike = str | os.PathLike[str]
log = logging.getLogger(__name__)

METHODS = ("mc_dropout", "ridge_leverage", "laplace")


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    if np.any(n == 0):
        raise ValueError("a zero embedding cannot be normalised")
    return x / n


def ridge_leverage(
    X: np.ndarray, labels: np.ndarray, n_classes: int, lam: float = 1.0
) -> tuple[np.ndarray, float]:
    """(score [N], sigma^2): ``sigma^2 * x_i^T A^-1 x_i`` with ``A = X^T X + lam I`` (module
    docstring); ``X`` is L2-normalised here."""
    from scipy.linalg import cho_factor, cho_solve

    if lam <= 0:
        raise ValueError(f"ridge lambda must be > 0, got {lam}")
    x = _unit(X)
    y = np.asarray(labels, dtype=np.int64)
    if y.shape != (x.shape[0],) or y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"labels must be [N] class indices in [0, {n_classes}), got shape {y.shape}")
    a = x.T @ x + lam * np.eye(x.shape[1])
    cho = cho_factor(a)
    onehot = np.zeros((x.shape[0], n_classes))
    onehot[np.arange(x.shape[0]), y] = 1.0
    w = cho_solve(cho, x.T @ onehot)  # [D, C]
    resid = 1.0 - np.einsum("nd,dn->n", x, w[:, y])
    sigma2 = float(np.mean(resid**2))
    ainv_xt = cho_solve(cho, x.T)  # [D, N]
    quad = np.einsum("nd,dn->n", x, ainv_xt)
    return sigma2 * quad, sigma2


def fit_split(image_ids: Sequence[str], seed: int, fraction: float) -> np.ndarray:
    """Boolean mask of the fit split (module docstring); at least one image on each side."""
    if not 0 < fraction < 1:
        raise ValueError(f"fit_fraction must be in (0, 1), got {fraction}")
    n = len(image_ids)
    if n < 4:
        raise ValueError(f"exp6 needs at least 4 images (a fit split and scored images), got {n}")
    u = np.array(
        [
            int.from_bytes(hashlib.sha256(f"{seed}:{i}".encode()).digest()[:8], "big") / 2.0**64
            for i in image_ids
        ]
    )
    k = min(max(1, math.ceil(fraction * n)), n - 3)
    mask = np.zeros(n, dtype=bool)
    mask[np.argsort(u, kind="stable")[:k]] = True
    return mask


def last_layer_laplace(
    weight: np.ndarray,
    bias: np.ndarray | None,
    X_fit: np.ndarray,
    y_fit: np.ndarray,
    X_score: np.ndarray,
    *,
    hessian_structure: str = "kron",
    link_approx: str = "probit",
    n_samples: int = 100,
    kfac_fisher: str = "type2",
    batch_size: int = 256,
    seed: int = 0,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Predictive entropy [N_score] of a Laplace posterior over a linear classifier (module docstring).

    ``weight`` [C, D] and ``bias`` [C] (or None) are the classifier; ``X_*`` are its inputs (here the
    L2-normalised image embeddings) and ``y_fit`` the labels of the fit split.
    """
    import torch
    from laplace import Laplace
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    w = torch.as_tensor(np.asarray(weight), dtype=torch.float64)
    c, d = w.shape
    layer = nn.Linear(d, c, bias=bias is not None).double()
    with torch.no_grad():
        layer.weight.copy_(w)
        if bias is not None:
            layer.bias.copy_(torch.as_tensor(np.asarray(bias), dtype=torch.float64))
    model = nn.Sequential(layer)
    xf = torch.as_tensor(np.asarray(X_fit), dtype=torch.float64)
    yf = torch.as_tensor(np.asarray(y_fit), dtype=torch.int64)
    torch.manual_seed(seed)
    if kfac_fisher not in ("type2", "mc"):
        raise ValueError(f"kfac_fisher must be 'type2' or 'mc', got {kfac_fisher!r}")
    la = Laplace(
        model,
        "classification",
        subset_of_weights="all",
        hessian_structure=hessian_structure,
        backend_kwargs={"stochastic": kfac_fisher == "mc"},
    )
    step = max(1, min(batch_size, 2**25 // (c * c)))  # per-sample [C, C] output Hessians / covariances
    la.fit(DataLoader(TensorDataset(xf, yf), batch_size=step), progress_bar=False)
    la.optimize_prior_precision(method="marglik")
    xs = torch.as_tensor(np.asarray(X_score), dtype=torch.float64)
    n_params = sum(q.numel() for q in model.parameters())
    if link_approx == "probit":  # the GLM predictive: laplace-torch builds Jacobians [B, C, n_params]
        per_image = c * n_params * 8
        if per_image > 2**31:
            raise ValueError(
                f"exp6: the probit GLM predictive needs {per_image / 2**30:.0f} GiB per image for "
                f"{c} classes x {n_params} parameters; use link_approx: mc"
            )
        pred, pred_step = (
            {"pred_type": "glm", "link_approx": "probit"},
            max(1, min(batch_size, 2**29 // per_image)),
        )
    elif link_approx == "mc":  # the MC predictive: n_samples weight samples of the posterior
        # one call: the posterior is sampled once (the costly part) and every image sees the same samples
        pred, pred_step = (
            {"pred_type": "nn", "link_approx": "mc", "n_samples": n_samples},
            max(1, xs.shape[0]),
        )
    else:
        raise ValueError(f"link_approx must be 'probit' or 'mc', got {link_approx!r}")
    gen = torch.Generator().manual_seed(int(seed))
    probs = []
    for s in range(0, xs.shape[0], pred_step):
        gen.manual_seed(int(seed))
        p = la(xs[s : s + pred_step], generator=gen, **pred)
        probs.append(p.detach().double().cpu().numpy())
    p = np.concatenate(probs) if probs else np.empty((0, c))
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    info = {
        "hessian_structure": hessian_structure,
        "link_approx": link_approx,
        "prior_precision": float(torch.as_tensor(la.prior_precision).double().mean()),
        "log_marginal_likelihood": float(la.log_marginal_likelihood().detach()),
        "n_fit": int(xf.shape[0]),
        "n_params": int(n_params),
        "n_samples": n_samples if link_approx == "mc" else None,
        "kfac_fisher": kfac_fisher,
    }
    return ent, info


# ---- the per-model job -------------------------------------------------------------------------


def score_job(
    pixels_h5: PathLike,
    out: PathLike,
    *,
    model: str,
    num_images: int | None,
    class_names: str | Sequence[str],
    prompt_template: str,
    ridge_lambda: float,
    fit_fraction: float,
    hessian_structure: str,
    link_approx: str,
    n_samples: int,
    kfac_fisher: str,
    seed: int,
    precision: str,
    batch_size: int,
    device: str,
) -> None:
    """exp6's scores of one model: the ambiguity targets, ridge leverage and Laplace entropy, with
    their timings, as ``laplace.npz`` (a model without a usable text tower: a file saying so)."""
    from vlmrel.mcdo import ambiguity as amb
    from vlmrel.mcdo import targets as tg
    from vlmrel.models import load_encoder

    encoder = load_encoder(model, device=device, precision=precision)
    t0 = time.perf_counter()
    ids, feats = tg.deterministic_features(encoder, pixels_h5, batch_size, num_images)
    t_embed = time.perf_counter() - t0
    names = amb.load_class_names(class_names)
    meta: dict[str, Any] = {"model": model, "classes": names, "prompt_template": prompt_template}
    try:
        probs, targets = tg.zero_shot_targets(encoder, feats, names, prompt_template)
        txt = tg.text_features(encoder, names, prompt_template)
    except tg.TextTowerSkipped as exc:
        save_scores(out, ids, {}, {**meta, "skipped": True, "reason": str(exc)})
        return
    x = _unit(feats)
    labels = probs.argmax(axis=1)
    fit = fit_split(ids, seed, fit_fraction)
    t0 = time.perf_counter()
    ridge, sigma2 = ridge_leverage(x, labels, len(names), ridge_lambda)
    t_ridge = time.perf_counter() - t0
    weight = float(encoder.logit_scale) * _unit(txt)
    bias = None if encoder.logit_bias is None else np.full(len(names), float(encoder.logit_bias))
    t0 = time.perf_counter()
    ent = np.full(len(ids), np.nan)
    ent[~fit], info = last_layer_laplace(
        weight,
        bias,
        x[fit],
        labels[fit],
        x[~fit],
        hessian_structure=hessian_structure,
        link_approx=link_approx,
        n_samples=n_samples,
        kfac_fisher=kfac_fisher,
        seed=seed,
    )
    t_laplace = time.perf_counter() - t0
    n_scored = int((~fit).sum())
    meta.update(
        skipped=False,
        ridge={"lambda": ridge_lambda, "sigma2": sigma2},
        laplace=info,
        fit_fraction=fit_fraction,
        seconds={"embedding": t_embed, "ridge": t_ridge, "laplace": t_laplace},
        seconds_per_image={
            "embedding": t_embed / len(ids),
            "ridge_leverage": (t_embed + t_ridge) / len(ids),
            "laplace": t_embed / len(ids) + t_laplace / n_scored,
        },
    )
    arrays = {
        "fit": fit,
        "pseudo_label": labels,
        "ridge_leverage": ridge,
        "laplace_entropy": ent,
        **{k: np.asarray(v, dtype=np.float64) for k, v in targets.items()},
    }
    save_scores(out, ids, arrays, meta)
    log.info("%s: ridge sigma2 %.4g, Laplace prior precision %.4g", model, sigma2, info["prior_precision"])


def save_scores(
    path: PathLike, image_id: Sequence[str], arrays: Mapping[str, np.ndarray], meta: Mapping
) -> None:
    """A per-model scores file (.npz, no pickles): ``image_id``, the arrays, a JSON ``meta``."""
    write_npz(path, {"image_id": np.asarray(list(image_id), dtype=np.str_), **arrays}, meta)


def load_scores(path: PathLike) -> tuple[list[str], dict[str, np.ndarray], dict[str, Any]]:
    arrays, meta = read_npz(path)
    return [str(i) for i in arrays.pop("image_id")], arrays, meta


# ---- the summary -------------------------------------------------------------------------------


def laplace_summary(
    trial_paths: Sequence[PathLike], scores_path: PathLike, quantile: float = 0.1
) -> dict[str, Any]:
    """exp6's summary of one model (module docstring)."""
    from vlmrel.mcdo.analyses import trial_scores
    from vlmrel.mcdo.reliability import load_trials
    from vlmrel.mcdo.targets import pairwise_rho, score_vs_targets

    ids, arrays, meta = load_scores(scores_path)
    if meta.get("skipped"):
        return {"skipped": True, "reason": meta["reason"]}
    trial_ids, mc = trial_scores(trial_paths)
    if trial_ids != ids:
        raise ValueError(f"{scores_path}: image ids differ from the MC-dropout trials")
    scored = ~arrays["fit"].astype(bool)
    scores = {
        "mc_dropout": mc.mean(axis=0)[scored],
        "ridge_leverage": arrays["ridge_leverage"][scored],
        "laplace": arrays["laplace_entropy"][scored],
    }
    targets = {t: arrays[t][scored] for t in ("margin", "entropy", "prompt_sensitivity")}
    trials = load_trials(list(trial_paths))
    mc_seconds = [m["wall_seconds"] for m in trials.metas if m.get("wall_seconds") is not None]
    per_image = dict(meta["seconds_per_image"])
    per_image["mc_dropout"] = float(np.mean(mc_seconds)) / len(ids) if mc_seconds else None
    return {
        "skipped": False,
        "n_images": len(ids),
        "n_fit": int((~scored).sum()),
        "n_scored": int(scored.sum()),
        "n_trials": int(mc.shape[0]),
        "methods": {name: score_vs_targets(s, targets, quantile) for name, s in scores.items()},
        "rho_between_methods": pairwise_rho(scores),
        "seconds_per_image": {m: per_image.get(m) for m in ("mc_dropout", "ridge_leverage", "laplace")},
        "embedding_seconds_per_image": per_image["embedding"],
        "ridge": meta["ridge"],
        "laplace": meta["laplace"],
        "fit_fraction": meta["fit_fraction"],
    }


def laplace_figure(
    summary: Mapping[str, Any],
    trial_paths: Sequence[PathLike],
    scores_path: PathLike,
    out: PathLike,
    model: str,
    dpi: int,
) -> None:
    """Three panels: each method's rho against the targets, its AUROCs, and the scores against each other."""
    from vlmrel.figures import plt, save_figure
    from vlmrel.mcdo.analyses import trial_scores

    if summary.get("skipped"):
        from vlmrel.mcdo.figures import skipped_figure

        skipped_figure(f"exp6 {model}", summary["reason"], out, dpi=dpi)
        return
    ids, arrays, _ = load_scores(scores_path)
    _, mc = trial_scores(trial_paths)
    scored = ~arrays["fit"].astype(bool)
    methods = summary["methods"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    keys = [
        ("rho_neg_margin", "−margin"),
        ("rho_entropy", "entropy"),
        ("rho_prompt_sensitivity", "prompt sens."),
    ]
    xs = np.arange(len(keys))
    for j, m in enumerate(METHODS):
        vals = [methods[m].get(k, np.nan) for k, _ in keys]
        axes[0].bar(xs + (j - 1) * 0.27, np.nan_to_num(np.asarray(vals, float)), 0.27, label=m)
        aus = [methods[m]["auroc_low_margin"], methods[m]["auroc_high_entropy"]]
        axes[1].bar(np.arange(2) + (j - 1) * 0.27, np.nan_to_num(np.asarray(aus, float)), 0.27, label=m)
    axes[0].set_xticks(xs, [lbl for _, lbl in keys])
    axes[0].axhline(0, color="k", lw=0.5)
    axes[0].set_title("Spearman against ambiguity")
    axes[0].legend(fontsize=8)
    axes[1].set_xticks(np.arange(2), ["low margin", "high entropy"])
    axes[1].axhline(0.5, color="k", lw=0.5, ls="--")
    axes[1].set_ylim(0, 1)
    axes[1].set_title(f"AUROC (bottom/top {summary['methods']['laplace']['quantile']:.0%})")
    from scipy.stats import rankdata

    mc_rank = rankdata(mc.mean(axis=0)[scored]) / scored.sum()
    axes[2].scatter(
        mc_rank, rankdata(arrays["laplace_entropy"][scored]) / scored.sum(), s=10, label="Laplace entropy"
    )
    axes[2].scatter(
        mc_rank, rankdata(arrays["ridge_leverage"][scored]) / scored.sum(), s=10, label="ridge leverage"
    )
    axes[2].plot([0, 1], [0, 1], color="k", lw=0.5, ls="--")
    axes[2].set_xlabel("rank of the MC-dropout trace/D (fraction)")
    axes[2].set_ylabel("rank of the other score (fraction)")
    axes[2].legend(fontsize=8)
    rb = summary["rho_between_methods"]
    axes[2].set_title(
        f"ρ(MC, Laplace)={rb.get('mc_dropout_vs_laplace', np.nan):.2f}, "
        f"ρ(MC, ridge)={rb.get('mc_dropout_vs_ridge_leverage', np.nan):.2f}",
        fontsize=9,
    )
    fig.suptitle(
        f"exp6 {model}: MC dropout vs ridge leverage vs last-layer Laplace (n={summary['n_scored']} scored)",
        y=1.03,
    )
    save_figure(fig, out, dpi=dpi)
