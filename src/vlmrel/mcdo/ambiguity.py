"""exp5: does MC-dropout uncertainty predict zero-shot ambiguity? (seed 002, sections 5 and 8d)

The model's own text tower embeds one prompt per class (``template.format(name)``); the
deterministic (dropout off) image features give zero-shot class probabilities:

- CLIP (``kind="softmax"``): ``p = softmax(s * cos(f_img, f_txt))`` over the classes, with ``s``
  the model's logit scale (already exponentiated, e.g. 100 for OpenAI CLIP).
- SigLIP (``kind="sigmoid"``): the model scores each class independently,
  ``sigma(s * cos + b)``, so the values do not sum to one and have no margin or entropy as a
  class distribution. We use ``softmax(s * cos + b)`` over the classes, which equals the
  per-class sigmoid *odds* ``sigma / (1 - sigma) = exp(s * cos + b)`` renormalised to sum to one;
  the bias ``b`` cancels. (``sigmoid_mode="normalize"`` instead divides the sigmoids by their sum.)

Per image: ``margin = p_(1) - p_(2)`` (top-1 minus top-2 probability) and
``entropy = -sum_c p_c ln p_c`` (nats). The exp5 statistics, against a per-image uncertainty:

- ``rho_uncertainty_vs_entropy``: Spearman correlation of uncertainty and entropy (expected > 0);
- ``rho_uncertainty_vs_margin``: Spearman correlation of uncertainty and margin (expected < 0);
- ``auroc_high_entropy``: AUROC of uncertainty as a detector of the high-entropy images, those with
  entropy >= the ``high_entropy_quantile`` quantile of entropy (0.9: the top 10 %).

The seed's sanity check (section 6) is ``rho_uncertainty_vs_entropy > 0.3`` and
``auroc_high_entropy > 0.6``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlmrel.stats import softmax, spearman

#: Class names for the demo images (the photos shipped in scikit-image and scikit-learn).
DEMO_CLASS_NAMES = (
    "astronaut",
    "brick wall",
    "cameraman",
    "cell under a microscope",
    "cat",
    "clock",
    "cup of coffee",
    "coins",
    "grass",
    "gravel",
    "galaxy",
    "stained tissue sample",
    "retina",
    "moon",
    "motorcycle",
    "page of text",
    "rocket",
    "text",
    "chinese temple",
    "flower",
    "horse",
)

DEFAULT_TEMPLATE = "a photo of a {}."

#: The templates of exp5's prompt sensitivity (seed 002, section 8d).
SENSITIVITY_TEMPLATES = ("a photo of a {}", "a {}", "an image of a {}")

#: The seed's exp5 sanity thresholds (section 6).
SANITY = {"rho_uncertainty_vs_entropy": 0.3, "auroc_high_entropy": 0.6}


def load_class_names(spec: str | Sequence[str]) -> list[str]:
    """Class names from config: a list, ``"demo"``, ``"imagenet"`` (open_clip's 1000 names) or a .txt file."""
    builtin_imagenet = spec == "imagenet"
    if isinstance(spec, str):
        if spec == "demo":
            names = list(DEMO_CLASS_NAMES)
        elif spec == "imagenet":
            from open_clip import IMAGENET_CLASSNAMES

            names = list(IMAGENET_CLASSNAMES)
        else:
            path = Path(spec)
            if not path.is_file():
                raise ValueError(f"class_names: {spec!r} is neither 'demo', 'imagenet' nor an existing file")
            names = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
            names = [n for n in names if n and not n.startswith("#")]
    else:
        names = [str(n) for n in spec]
    if len(names) < 2:
        raise ValueError(f"class_names: need at least 2 classes, got {len(names)}")
    # open_clip's cleaned ImageNet list names two pairs of classes alike ("missile": 657 and 744,
    # "sunglasses": 836 and 837); they stay, so that index i is ImageNet class i
    if len(set(names)) != len(names) and not builtin_imagenet:
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"class_names: duplicate names {dup[:5]}")
    return names


def make_prompts(class_names: Sequence[str], template: str = DEFAULT_TEMPLATE) -> list[str]:
    """One prompt per class; the template must contain exactly one ``{}``."""
    if template.count("{}") != 1:
        raise ValueError(f"prompt_template {template!r} must contain exactly one '{{}}' placeholder")
    return [template.replace("{}", name) for name in class_names]


def text_features_or_reason(
    encode_text: Callable[[list[str]], Any] | None, prompts: list[str]
) -> tuple[np.ndarray | None, str | None]:
    """Run a model's text tower on the prompts; (features [C, D], None) or (None, reason) if unusable.

    A missing tower (``encode_text`` is None), a missing tokenizer or a tower that raises
    NotImplementedError/ImportError/OSError/ValueError/AttributeError gives a reason instead of a crash,
    so exp5 can record the model as skipped.
    """
    if encode_text is None:
        return None, "model has no text tower"
    try:
        feats = encode_text(prompts)
    except (NotImplementedError, ImportError, OSError, ValueError, AttributeError, RuntimeError) as exc:
        return None, f"text tower unusable: {type(exc).__name__}: {exc}"
    if hasattr(feats, "detach"):
        feats = feats.detach().float().cpu().numpy()
    arr = np.asarray(feats, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != len(prompts):
        return None, f"text tower returned shape {arr.shape} for {len(prompts)} prompts"
    if not np.all(np.isfinite(arr)) or np.any(np.linalg.norm(arr, axis=1) == 0):
        return None, "text tower returned NaN, infinite or zero features"
    return arr, None


def _l2(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    n = np.linalg.norm(a, axis=-1, keepdims=True)
    if np.any(n == 0):
        raise ValueError("zero feature vector cannot be normalised")
    return a / n


def zero_shot_probs(
    image_features: Any,
    text_features: Any,
    logit_scale: float,
    logit_bias: float | None = None,
    kind: str = "softmax",
    sigmoid_mode: str = "softmax",
) -> np.ndarray:
    """Class probabilities [N, C] from image [N, D] and text [C, D] features (see module docstring).

    ``logit_scale`` is the multiplier itself (exp of the stored log scale). ``kind`` is
    ``"softmax"`` (CLIP) or ``"sigmoid"`` (SigLIP, with ``logit_bias``).
    """
    img, txt = _l2(image_features), _l2(text_features)
    if img.ndim != 2 or txt.ndim != 2 or img.shape[1] != txt.shape[1]:
        raise ValueError(f"image features {img.shape} and text features {txt.shape} do not match")
    logits = float(logit_scale) * img @ txt.T
    if kind == "softmax":
        return softmax(logits)
    if kind == "sigmoid":
        z = logits + (0.0 if logit_bias is None else float(logit_bias))
        if sigmoid_mode == "softmax":
            return softmax(z)
        if sigmoid_mode == "normalize":
            s = 1.0 / (1.0 + np.exp(-z))
            return s / s.sum(axis=1, keepdims=True)
        raise ValueError(f"sigmoid_mode must be 'softmax' or 'normalize', got {sigmoid_mode!r}")
    raise ValueError(f"kind must be 'softmax' or 'sigmoid', got {kind!r}")


def margin(probs: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability per row."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"probs must be [N, C >= 2], got shape {p.shape}")
    top2 = np.partition(p, -2, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def prompt_sensitivity(max_probs: np.ndarray) -> np.ndarray:
    """Per image, the sample variance (ddof 1) of its maximum class probability across templates.

    ``max_probs`` is [N, n_templates]: column j holds each image's top-1 zero-shot probability under
    template j (:data:`SENSITIVITY_TEMPLATES` by default). High values: the answer's confidence
    depends on how the question is phrased.
    """
    m = np.asarray(max_probs, dtype=np.float64)
    if m.ndim != 2 or m.shape[1] < 2:
        raise ValueError(f"max_probs must be [N, n_templates >= 2], got shape {m.shape}")
    return m.var(axis=1, ddof=1)


def template_max_probs(
    image_features: Any,
    encode_text: Callable[[list[str]], Any],
    class_names: Sequence[str],
    logit_scale: float,
    logit_bias: float | None = None,
    templates: Sequence[str] = SENSITIVITY_TEMPLATES,
) -> np.ndarray:
    """[N, len(templates)]: each image's top-1 zero-shot probability under each template."""
    kind = "sigmoid" if logit_bias is not None else "softmax"
    cols = []
    for template in templates:
        txt, reason = text_features_or_reason(encode_text, make_prompts(class_names, template))
        if txt is None:
            raise ValueError(f"prompt sensitivity: {reason}")
        probs = zero_shot_probs(image_features, txt, logit_scale, logit_bias, kind=kind)
        cols.append(probs.max(axis=1))
    return np.stack(cols, axis=1)


def entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy per row in nats (0 ln 0 = 0)."""
    p = np.asarray(probs, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    return -terms.sum(axis=1)


def ambiguity_stats(
    uncertainty: np.ndarray, probs: np.ndarray, high_entropy_quantile: float = 0.9
) -> dict[str, Any]:
    """The exp5 statistics for one model: uncertainty [N] against zero-shot probabilities [N, C]."""
    from sklearn.metrics import roc_auc_score

    u = np.asarray(uncertainty, dtype=np.float64)
    p = np.asarray(probs, dtype=np.float64)
    if u.ndim != 1 or p.ndim != 2 or p.shape[0] != u.size:
        raise ValueError(f"uncertainty {u.shape} and probs {p.shape} do not describe the same images")
    if not np.all(np.isfinite(u)):
        raise ValueError("uncertainty contains NaN or infinite values")
    if not 0 < high_entropy_quantile < 1:
        raise ValueError(f"high_entropy_quantile must be in (0, 1), got {high_entropy_quantile}")
    h, mg = entropy(p), margin(p)
    threshold = float(np.quantile(h, high_entropy_quantile))
    positive = h >= threshold
    n_pos = int(positive.sum())
    auroc = float(roc_auc_score(positive, u)) if 0 < n_pos < u.size else math.nan
    rho_h, p_h, _ = spearman(u, h)
    rho_m, p_m, _ = spearman(u, mg)
    stats = {
        "n_images": int(u.size),
        "n_classes": int(p.shape[1]),
        "rho_uncertainty_vs_entropy": rho_h,
        "p_uncertainty_vs_entropy": p_h,
        "rho_uncertainty_vs_margin": rho_m,
        "p_uncertainty_vs_margin": p_m,
        "auroc_high_entropy": auroc,
        "high_entropy_quantile": high_entropy_quantile,
        "high_entropy_threshold": threshold,
        "n_high_entropy": n_pos,
        "entropy_mean": float(h.mean()),
        "margin_mean": float(mg.mean()),
    }
    stats["sanity_ok"] = bool(
        rho_h > SANITY["rho_uncertainty_vs_entropy"] and auroc > SANITY["auroc_high_entropy"]
    )
    return stats


def skipped(reason: str) -> dict[str, Any]:
    """The exp5 entry of a model that cannot be evaluated (no text tower, no tokenizer, ...)."""
    return {"skipped": True, "reason": reason}


def exp5_overall_summary(per_model: Mapping[str, Mapping[str, Any]], config: Mapping[str, Any]) -> dict:
    """``exp5_subset_overall_summary.json``: every model's stats or skip reason, and the sanity verdict."""
    models = {m: dict(v) for m, v in per_model.items()}
    evaluated = [m for m, v in models.items() if not v.get("skipped")]
    return {
        "experiment": "exp5",
        "config": dict(config),
        "models": models,
        "evaluated": evaluated,
        "skipped": {m: v.get("reason", "") for m, v in models.items() if v.get("skipped")},
        "sanity_thresholds": dict(SANITY),
        "any_sanity_ok": any(models[m].get("sanity_ok") for m in evaluated),
    }


def sensitivity_stats(uncertainty: np.ndarray, sensitivity: np.ndarray) -> dict[str, Any]:
    """ρ(uncertainty, prompt sensitivity) (Spearman) and the sensitivity's mean."""
    rho, pval, _ = spearman(
        np.asarray(uncertainty, dtype=np.float64), np.asarray(sensitivity, dtype=np.float64)
    )
    return {
        "rho_uncertainty_vs_prompt_sensitivity": rho,
        "p_uncertainty_vs_prompt_sensitivity": pval,
        "prompt_sensitivity_mean": float(np.mean(sensitivity)),
        "sensitivity_templates": list(SENSITIVITY_TEMPLATES),
    }


#: The per-image table's columns (an empty table, for a skipped model, has them too).
PER_IMAGE_COLUMNS = (
    "image_id",
    "uncertainty",
    "entropy",
    "margin",
    "top1",
    "p_top1",
    "prompt_sensitivity",
    "true_class",
)


def save_per_image(
    path: str | os.PathLike[str],
    image_id: Sequence[str],
    uncertainty: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    *,
    prompt_sensitivity: np.ndarray | None = None,
    true_class: Sequence[str] | None = None,
) -> None:
    """Per-image TSV: image id, uncertainty, entropy, margin, top-1 class and its probability, the
    prompt sensitivity (NaN when not computed) and the true class from the image's folder ('' when
    unknown)."""
    import pandas as pd

    from vlmrel.io import atomic_path

    p = np.asarray(probs, dtype=np.float64)
    top = p.argmax(axis=1)
    df = pd.DataFrame(
        {
            "image_id": list(image_id),
            "uncertainty": np.asarray(uncertainty, dtype=np.float64),
            "entropy": entropy(p),
            "margin": margin(p),
            "top1": [class_names[i] for i in top],
            "p_top1": p[np.arange(p.shape[0]), top],
            "prompt_sensitivity": (
                np.full(p.shape[0], np.nan)
                if prompt_sensitivity is None
                else np.asarray(prompt_sensitivity, dtype=np.float64)
            ),
            "true_class": [""] * p.shape[0] if true_class is None else list(true_class),
        }
    )
    with atomic_path(path) as tmp:
        df.to_csv(tmp, sep="\t", index=False, float_format="%.10g")
