"""Phase 3's ambiguity targets and the statistics every Phase 3 score is judged by.

The targets are exp5's (:mod:`vlmrel.mcdo.ambiguity`): from the deterministic (dropout off) image
features and the model's own text tower, the zero-shot class probabilities give per image

- ``margin``: top-1 minus top-2 probability (low = ambiguous);
- ``entropy``: Shannon entropy of the class distribution (nats; high = ambiguous);
- ``prompt_sensitivity``: the variance (ddof 1) of the top-1 probability across the prompt
  templates of :data:`vlmrel.mcdo.ambiguity.SENSITIVITY_TEMPLATES` (high = the answer depends on
  the phrasing).

A score (an uncertainty: high = uncertain) is judged by :func:`score_vs_targets`: its Spearman
correlation with ``-margin``, ``entropy`` and ``prompt_sensitivity`` (all oriented so that a good
score correlates positively), and its AUROC as a detector of the low-margin images (margin at or
below the ``quantile`` quantile, the bottom 10 % by default) and of the high-entropy images
(entropy at or above the ``1 - quantile`` quantile, the top 10 %).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vlmrel.stats import spearman

PathLike = str | os.PathLike[str]
TARGETS = ("margin", "entropy", "prompt_sensitivity")


class TextTowerSkipped(Exception):
    """The model's text tower is unusable: the experiment records the model as skipped."""


def auroc(positive: np.ndarray, score: np.ndarray) -> float:
    """AUROC of ``score`` as a detector of ``positive``; NaN when a class is empty."""
    from sklearn.metrics import roc_auc_score

    pos = np.asarray(positive, dtype=bool)
    s = np.asarray(score, dtype=np.float64)
    ok = np.isfinite(s)
    pos, s = pos[ok], s[ok]
    if pos.all() or not pos.any():
        return math.nan
    return float(roc_auc_score(pos, s))


def score_vs_targets(
    score: np.ndarray, targets: Mapping[str, np.ndarray], quantile: float = 0.1
) -> dict[str, Any]:
    """Spearman rho (and p) against -margin, entropy and prompt sensitivity; AUROC for low margin
    (bottom ``quantile``) and high entropy (top ``quantile``)."""
    if not 0 < quantile < 0.5:
        raise ValueError(f"target quantile must be in (0, 0.5), got {quantile}")
    s = np.asarray(score, dtype=np.float64)
    out: dict[str, Any] = {"n_images": int(s.size)}
    oriented = {"neg_margin": -np.asarray(targets["margin"]), "entropy": targets["entropy"]}
    if targets.get("prompt_sensitivity") is not None:
        oriented["prompt_sensitivity"] = targets["prompt_sensitivity"]
    for name, t in oriented.items():
        rho, p, _ = spearman(s, t)
        out[f"rho_{name}"] = rho
        out[f"p_{name}"] = p
    m = np.asarray(targets["margin"], dtype=np.float64)
    h = np.asarray(targets["entropy"], dtype=np.float64)
    out["auroc_low_margin"] = auroc(m <= np.quantile(m, quantile), s)
    out["auroc_high_entropy"] = auroc(h >= np.quantile(h, 1.0 - quantile), s)
    out["quantile"] = quantile
    return out


def pairwise_rho(scores: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Spearman rho between every pair of scores ('a_vs_b')."""
    names = list(scores)
    return {
        f"{a}_vs_{b}": spearman(scores[a], scores[b])[0] for i, a in enumerate(names) for b in names[i + 1 :]
    }


def zscore(x: np.ndarray) -> np.ndarray:
    """(x - mean) / std (ddof 1); zeros for a constant array."""
    x = np.asarray(x, dtype=np.float64)
    sd = x.std(ddof=1) if x.size > 1 else 0.0
    return (x - x.mean()) / sd if sd > 0 else np.zeros_like(x)


# ---- features from a model ---------------------------------------------------------------------


def deterministic_features(
    encoder: Any, pixels_h5: PathLike, batch_size: int, n: int | None = None
) -> tuple[list[str], np.ndarray]:
    """Image ids and features [N, D] (float64, before normalisation) with dropout off."""
    import torch

    from vlmrel.pixels import images_to_use, prefetch_batches

    n = images_to_use(pixels_h5, n)
    ids: list[str] = []
    feats = []
    with torch.inference_mode():
        for batch_ids, pixels in prefetch_batches(pixels_h5, batch_size, range(n), device=encoder.device):
            feats.append(encoder.encode_image(pixels).double().cpu().numpy())
            ids.extend(str(i) for i in batch_ids)
    return ids, np.concatenate(feats)


def text_features(encoder: Any, class_names: Sequence[str], template: str) -> np.ndarray:
    """The model's text features [C, D] of one prompt per class; :class:`TextTowerSkipped` if unusable."""
    from vlmrel.mcdo import ambiguity as amb

    txt, reason = amb.text_features_or_reason(encoder.encode_text, amb.make_prompts(class_names, template))
    if txt is None:
        raise TextTowerSkipped(f"{encoder.name}: {reason}")
    return txt


def zero_shot_targets(
    encoder: Any,
    image_features: np.ndarray,
    class_names: Sequence[str],
    template: str,
    templates: Sequence[str] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(probabilities [N, C], targets) from exp5's zero-shot classifier, prompt sensitivity included."""
    from vlmrel.mcdo import ambiguity as amb

    txt = text_features(encoder, class_names, template)
    kind = "sigmoid" if encoder.logit_bias is not None else "softmax"
    probs = amb.zero_shot_probs(image_features, txt, encoder.logit_scale, encoder.logit_bias, kind=kind)
    try:
        tmax = amb.template_max_probs(
            image_features,
            encoder.encode_text,
            class_names,
            encoder.logit_scale,
            encoder.logit_bias,
            templates=tuple(templates or amb.SENSITIVITY_TEMPLATES),
        )
    except ValueError as exc:
        raise TextTowerSkipped(f"{encoder.name}: {exc}") from exc
    targets = {
        "margin": amb.margin(probs),
        "entropy": amb.entropy(probs),
        "prompt_sensitivity": amb.prompt_sensitivity(tmax),
    }
    return probs, targets
