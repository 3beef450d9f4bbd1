"""exp10: MC dropout in the text encoder. Do general prompts get a higher variance? (seed 002, section 10a)

- **Prompt bank**: 7 generic prompts (:data:`GENERIC_PROMPTS`) and, per class, 4 styles
  (:data:`STYLES`: simple, photo, specific, ambiguous); N prompts are sampled from the bank with a
  seeded generator (all of them when N is at least the bank's size). A user file instead gives one
  ``style<TAB>prompt`` line per prompt, used as is.
- **Dropout** goes on every linear map of the *text* tower only (``Encoder.text``): the image tower
  is never patched, so image features stay bit-identical (the seed fell back to the whole model for
  SigLIP2). The kind (output, input, ...) is the run's ``dropout_kind``.
- **Score**: trace / D of the covariance of the T pre-normalisation text features (the image score
  of exp0, on prompts); its reliability across the K trials (ICC, SNR, pairwise Spearman).
- **Specificity**: the seed's handcrafted rule, ``raw = 0.6 * min(tokens, 20) / 20 + 0.08 * positive
  - 0.10 * negative`` over word tokens, rescaled as ``(raw + 0.25) / 1.25`` and clipped to [0, 1].
  The seed's tokenizer split on every non-letter, so "close-up" became "close" and "up" and never
  matched its cue; :func:`words` keeps hyphenated words whole. The runbook does not list the seed's
  cue words; :data:`POSITIVE_WORDS` and :data:`NEGATIVE_WORDS` are vlmrel's, built from the bank's
  own vocabulary (the specific style's cues are positive, the generic and ambiguous ones negative).
- **Statistics**: ρ(score, −specificity) (Spearman; positive = general prompts vary more), the
  partial Spearman controlling for the token count (the seed's confound: specificity grows with
  length, and so may the variance), AUROC of the score for the bottom 20 % of specificity, and
  per-style statistics.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vlmrel.stats import spearman

GENERIC_PROMPTS = (
    "an object",
    "a thing",
    "something",
    "an unknown item",
    "a blurry object",
    "a scene",
    "a visual concept",
)
STYLES = {
    "simple": "a {}",
    "photo": "a photo of a {}",
    "specific": "a detailed close-up photo of a {} in natural lighting",
    "ambiguous": "something that might be a {}",
}
#: specificity cues (+0.08 each) and vagueness cues (-0.10 each)
POSITIVE_WORDS = frozenset(
    {"detailed", "close-up", "photo", "natural", "lighting", "high-resolution", "sharp"}
)
NEGATIVE_WORDS = frozenset(
    {
        "something",
        "thing",
        "object",
        "unknown",
        "item",
        "blurry",
        "scene",
        "visual",
        "concept",
        "might",
        "maybe",
    }
)
_WORD = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


def words(prompt: str) -> list[str]:
    """Lower-case word tokens; a hyphenated word ("close-up") is one token."""
    return _WORD.findall(prompt.lower())


def specificity(prompt: str) -> float:
    """The seed's handcrafted specificity of a prompt in [0, 1] (module docstring)."""
    toks = words(prompt)
    raw = 0.6 * min(len(toks), 20) / 20
    raw += 0.08 * sum(t in POSITIVE_WORDS for t in toks)
    raw -= 0.10 * sum(t in NEGATIVE_WORDS for t in toks)
    return float(np.clip((raw + 0.25) / 1.25, 0.0, 1.0))


def prompt_bank(class_names: Sequence[str]) -> list[tuple[str, str]]:
    """Every (style, prompt): the generic prompts, then each class in each style."""
    bank = [("generic", p) for p in GENERIC_PROMPTS]
    bank += [(style, t.replace("{}", c)) for c in class_names for style, t in STYLES.items()]
    return bank


def read_prompt_file(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """A user's prompts: one ``style<TAB>prompt`` per line (blank lines and '#' comments skipped)."""
    out = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            raise ValueError(f"{path}:{i}: expected 'style<TAB>prompt', got {line!r}")
        out.append((parts[0].strip(), parts[1].strip()))
    if len(out) < 3:
        raise ValueError(f"{path}: need at least 3 prompts, got {len(out)}")
    return out


def sample_prompts(
    class_names: Sequence[str], n: int, seed: int, prompt_file: str | os.PathLike[str] | None = None
) -> list[tuple[str, str]]:
    """The prompts of exp10: the user's file as is, or ``n`` draws without replacement from the bank
    (a seeded generator; the bank's order is kept among the drawn ones)."""
    if prompt_file:
        return read_prompt_file(prompt_file)
    bank = prompt_bank(class_names)
    if n >= len(bank):
        return bank
    rng = np.random.default_rng([int(seed), 10])
    keep = np.sort(rng.choice(len(bank), size=int(n), replace=False))
    return [bank[i] for i in keep]


# ---- the MC-dropout passes ------------------------------------------------------------------------


def text_trial(
    encoder: Any,
    prompts: Sequence[str],
    *,
    p: float,
    seed: int,
    trial: int,
    T: int,
    kind: str,
    batch_size: int,
    progress: bool = True,
) -> np.ndarray:
    """One trial: T passes of the text tower with dropout on its linear maps; trace / D per prompt."""
    import torch
    from tqdm.auto import tqdm

    from vlmrel.mcdo.dropout import MomentAccumulator, inject_dropout, pass_seed

    if encoder.text is None:
        raise ValueError(f"model {encoder.name!r} has no text tower module for exp10")
    generator = torch.Generator()  # CPU: masks are device-independent (vlmrel.mcdo.dropout)
    out = []
    batches = [list(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
    bar = tqdm(
        total=len(batches) * T, disable=not progress, unit="pass", desc=f"{encoder.name} text trial {trial}"
    )
    with inject_dropout(encoder.text, p, generator, kind):
        for b, batch in enumerate(batches):
            acc = MomentAccumulator()
            for t in range(T):
                generator.manual_seed(pass_seed(seed, trial, b, t))
                acc.add(encoder.encode_text(batch).to(torch.float64))
                bar.update(1)
            out.append(acc.trace().cpu().numpy())
    bar.close()
    return np.concatenate(out)


def save_text_trial(
    path: str | os.PathLike[str], styles: Sequence[str], prompts: Sequence[str], trace: np.ndarray, meta: dict
) -> None:
    """A text trial's arrays: prompt, style, trace [N], specificity, tokens and a JSON ``meta``."""
    from vlmrel.io import write_npz

    arrays = {
        "prompt": np.asarray(prompts, dtype=np.str_),
        "style": np.asarray(styles, dtype=np.str_),
        "trace": np.asarray(trace, dtype=np.float64),
        "specificity": np.array([specificity(p) for p in prompts], dtype=np.float64),
        "tokens": np.array([len(words(p)) for p in prompts], dtype=np.int64),
    }
    write_npz(path, arrays, meta)


def load_text_trials(paths: Sequence[str | os.PathLike[str]]) -> tuple[list[str], list[str], np.ndarray]:
    """(styles, prompts, scores [K, N]) of K text trial files, which must hold the same prompts."""
    styles: list[str] | None = None
    prompts: list[str] | None = None
    rows = []
    for path in paths:
        with np.load(path, allow_pickle=False) as z:
            s, pr, tr = (
                [str(v) for v in z["style"]],
                [str(v) for v in z["prompt"]],
                z["trace"].astype(np.float64),
            )
        if prompts is None:
            styles, prompts = s, pr
        elif pr != prompts or s != styles:
            raise ValueError(f"{path}: prompts differ from {paths[0]}")
        rows.append(tr)
    if prompts is None or styles is None:
        raise ValueError("no text trial files given")
    return styles, prompts, np.stack(rows)


# ---- statistics -----------------------------------------------------------------------------------


def partial_spearman(x: np.ndarray, y: np.ndarray, covar: np.ndarray) -> float:
    """Spearman of x and y controlling for ``covar``: the Pearson partial correlation of the ranks
    (as ``pingouin.partial_corr(method="spearman")``)."""
    from scipy.stats import rankdata

    rx, ry, rz = (rankdata(np.asarray(v, dtype=np.float64)) for v in (x, y, covar))
    r = np.corrcoef(np.stack([rx, ry, rz]))
    r_xy, r_xz, r_yz = r[0, 1], r[0, 2], r[1, 2]
    den = math.sqrt(max((1 - r_xz**2) * (1 - r_yz**2), 0.0))
    if den == 0 or not np.isfinite(den):
        return math.nan
    return float((r_xy - r_xz * r_yz) / den)


def text_summary(
    styles: Sequence[str], prompts: Sequence[str], scores: np.ndarray, low_quantile: float = 0.2
) -> dict[str, Any]:
    """exp10's statistics from the K trials' scores [K, N] (module docstring)."""
    from sklearn.metrics import roc_auc_score

    from vlmrel.mcdo.reliability import reliability

    s = np.asarray(scores, dtype=np.float64)
    u = s.mean(axis=0)
    spec = np.array([specificity(p) for p in prompts])
    ntok = np.array([len(words(p)) for p in prompts], dtype=np.float64)
    rho, pval, _ = spearman(u, -spec)
    low = spec <= np.quantile(spec, low_quantile)
    auroc = float(roc_auc_score(low, u)) if 0 < low.sum() < low.size else math.nan
    by_style = {}
    style_arr = np.asarray(styles)
    for style in dict.fromkeys(styles):
        m = style_arr == style
        by_style[style] = {
            "n": int(m.sum()),
            "score_mean": float(u[m].mean()),
            "score_median": float(np.median(u[m])),
            "specificity_mean": float(spec[m].mean()),
            "tokens_mean": float(ntok[m].mean()),
        }
    return {
        "n_prompts": int(u.size),
        "n_trials": int(s.shape[0]),
        "score": "trace / D of the pre-normalisation text features, mean over trials",
        "reliability": reliability(s) if s.shape[0] >= 2 else None,
        "rho_score_vs_neg_specificity": rho,
        "p_score_vs_neg_specificity": pval,
        "partial_rho_controlling_tokens": partial_spearman(u, -spec, ntok),
        "rho_score_vs_tokens": spearman(u, ntok)[0],
        "auroc_low_specificity": auroc,
        "low_specificity_quantile": low_quantile,
        "by_style": by_style,
    }
