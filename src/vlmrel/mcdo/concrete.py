"""exp11: a concrete-dropout *proxy*, a layer-wise dropout-rate search (seed 002, section 10b).

No concrete (relaxed Bernoulli) rate is trained; the rates are searched:

- **Groups**: the vision tower's linear maps are grouped by transformer block index into G groups
  (block b of B goes to group ``b * G // B``). Linear maps outside the blocks (a pooling head, a
  projection) form their own group, ``outside``. (The seed put them in group 0, and parsed the
  "1" of "fc1" as a block index; here the block index is the first purely numeric component of
  the module path, e.g. ``transformer.resblocks.3.mlp.c_fc`` or ``encoder.layers.3.mlp.fc1``.)
- **Candidates**: the uniform base rate p, then C per-group rate vectors drawn log-uniform in
  ``[lo, hi]`` from a generator seeded by ``(seed, 11)``.
- **Objective** on a set of images: ``rho(u, -margin) + rho(u, entropy) + 0.5 * rho(u, prompt
  sensitivity) + 0.1 * ICC``, with u the trial-mean trace before normalisation, rho Spearman, the
  zero-shot margin, entropy and prompt sensitivity from the model's own text tower (as in exp5),
  and ICC(1,1) of the K trials.
- **Selection**: the images are split by a seeded permutation into a *search* split and a
  disjoint *held-out* split; the best candidate is chosen on the search split and reported on
  the held-out split beside the uniform baseline. (The seed chose and scored on the same images.)
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vlmrel.stats import spearman

OUTSIDE = "outside"
WEIGHTS = {"neg_margin": 1.0, "entropy": 1.0, "prompt_sensitivity": 0.5, "icc": 0.1}


def block_index(target: str) -> int | None:
    """The transformer block of a target: the first purely numeric component of its path."""
    for part in target.split("."):
        if part.isdigit():
            return int(part)
    return None


def layer_groups(targets: Sequence[str], n_groups: int) -> tuple[list[str], dict[str, str]]:
    """(group names, target -> group): blocks split into ``n_groups`` contiguous groups; the
    targets outside the blocks in group ``outside`` (listed last, only if there are any)."""
    blocks = sorted({b for t in targets if (b := block_index(t)) is not None})
    if not blocks:
        raise ValueError("exp11: no target sits inside a numbered transformer block")
    g = max(1, min(int(n_groups), len(blocks)))
    pos = {b: i for i, b in enumerate(blocks)}
    names = [f"g{i}" for i in range(g)]
    assign = {}
    for t in targets:
        b = block_index(t)
        assign[t] = OUTSIDE if b is None else names[pos[b] * g // len(blocks)]
    if OUTSIDE in assign.values():
        names.append(OUTSIDE)
    return names, assign


def candidate_rates(
    n_groups: int, base_p: float, n_candidates: int, lo: float, hi: float, seed: int
) -> np.ndarray:
    """[1 + C, n_groups]: the uniform base rate, then C log-uniform per-group rate vectors."""
    if not 0 < lo < hi < 1:
        raise ValueError(f"exp11: rate range must satisfy 0 < lo < hi < 1, got [{lo}, {hi}]")
    rng = np.random.default_rng([int(seed), 11])
    drawn = np.exp(rng.uniform(math.log(lo), math.log(hi), size=(int(n_candidates), int(n_groups))))
    return np.vstack([np.full((1, n_groups), float(base_p)), drawn])


def split_images(n: int, search_fraction: float, seed: int) -> np.ndarray:
    """A boolean mask [n]: True = search split, False = held-out (a seeded permutation)."""
    if not 0 < search_fraction < 1:
        raise ValueError(f"exp11: search_fraction must be in (0, 1), got {search_fraction}")
    n_search = min(max(int(round(n * search_fraction)), 3), n - 3)
    if n_search < 3:
        raise ValueError(f"exp11 needs at least 6 images for two splits of 3, got {n}")
    order = np.random.default_rng([int(seed), 11, 1]).permutation(n)
    mask = np.zeros(n, dtype=bool)
    mask[order[:n_search]] = True
    return mask


def objective(
    scores: np.ndarray, margin: np.ndarray, entropy: np.ndarray, sensitivity: np.ndarray
) -> dict[str, float]:
    """The search objective and its terms for scores [K, n] on one split (module docstring)."""
    from vlmrel.mcdo.reliability import icc1

    s = np.asarray(scores, dtype=np.float64)
    u = s.mean(axis=0)
    terms = {
        "rho_neg_margin": spearman(u, -np.asarray(margin))[0],
        "rho_entropy": spearman(u, entropy)[0],
        "rho_prompt_sensitivity": spearman(u, sensitivity)[0],
        "icc": icc1(s) if s.shape[0] >= 2 else math.nan,
    }
    w = (WEIGHTS["neg_margin"], WEIGHTS["entropy"], WEIGHTS["prompt_sensitivity"], WEIGHTS["icc"])
    vals = [0.0 if not math.isfinite(v) else v for v in terms.values()]  # an undefined term adds nothing
    terms["objective"] = float(sum(wi * v for wi, v in zip(w, vals, strict=True)))
    return terms


def search_summary(arrays: Mapping[str, np.ndarray], top: int = 5) -> dict[str, Any]:
    """exp11's summary from its search arrays: every candidate's objective on the search split, the
    chosen one (best on the search split), and the chosen and the uniform candidate on the held-out
    split."""
    rates = np.asarray(arrays["rates"], dtype=np.float64)
    scores = np.asarray(arrays["scores"], dtype=np.float64)  # [1 + C, K, N]
    mask = np.asarray(arrays["search"], dtype=bool)
    groups = [str(g) for g in arrays["groups"]]
    z = {k: np.asarray(arrays[k], dtype=np.float64) for k in ("margin", "entropy", "prompt_sensitivity")}

    def on(split: np.ndarray, c: int) -> dict[str, float]:
        return objective(
            scores[c][:, split], z["margin"][split], z["entropy"][split], z["prompt_sensitivity"][split]
        )

    search = [on(mask, c) for c in range(rates.shape[0])]
    values = np.array([r["objective"] for r in search])
    best = int(np.argmax(values))
    order = [int(i) for i in np.argsort(-values, kind="stable")]
    held = ~mask

    def entry(c: int) -> dict[str, Any]:
        return {"candidate": c, "uniform": c == 0, "rates": dict(zip(groups, rates[c].tolist(), strict=True))}

    return {
        "proxy": "layer-wise rate search (no concrete relaxation is trained)",
        "groups": groups,
        "n_candidates": int(rates.shape[0]),
        "n_trials": int(scores.shape[1]),
        "n_search": int(mask.sum()),
        "n_heldout": int(held.sum()),
        "weights": dict(WEIGHTS),
        "chosen": {**entry(best), "search": search[best], "heldout": on(held, best)},
        "uniform": {**entry(0), "search": search[0], "heldout": on(held, 0)},
        "objective_search": search[best]["objective"],
        "objective_heldout": on(held, best)["objective"],
        "uniform_objective_heldout": on(held, 0)["objective"],
        "best_rates": dict(zip(groups, rates[best].tolist(), strict=True)),
        "top": [{**entry(c), "search": search[c]} for c in order[: int(top)]],
        "search_objectives": values.tolist(),
    }


# ---- the search job --------------------------------------------------------------------------------


def run_search(
    encoder: Any,
    batches_fn: Any,
    *,
    zero_shot: Mapping[str, np.ndarray],
    p: float,
    seed: int,
    trials: int,
    T: int,
    kind: str,
    n_groups: int,
    n_candidates: int,
    rate_range: Sequence[float],
    search_fraction: float,
) -> dict[str, np.ndarray]:
    """Every candidate's K trials of T passes; returns the arrays of the search file.

    ``batches_fn()`` yields ``(image_ids, pixels)`` batches afresh; trials share the pass seeds of
    :func:`vlmrel.mcdo.dropout.pass_seed` across candidates (common random numbers).
    """
    import torch
    from tqdm.auto import tqdm

    from vlmrel.mcdo.dropout import inject_dropout, run_trial

    with inject_dropout(encoder.vision, 0.0, torch.Generator(), kind) as probe:
        targets = list(probe.targets)
    groups, assign = layer_groups(targets, n_groups)
    rates = candidate_rates(len(groups), p, n_candidates, float(rate_range[0]), float(rate_range[1]), seed)
    scores = []
    ids: list[str] | None = None
    bar = tqdm(total=rates.shape[0] * int(trials), unit="trial", desc=f"{encoder.name} rate search")
    for vec in rates:
        by_group = dict(zip(groups, vec.tolist(), strict=True))
        per_target = {t: by_group[assign[t]] for t in targets}
        rows = []
        for k in range(int(trials)):
            res = run_trial(
                encoder, batches_fn(), p=float(p), seed=seed, trial=k, T_list=[int(T)], kind=kind,
                rates=per_target, progress=False,
            )  # fmt: skip
            ids = res.image_id if ids is None else ids
            rows.append(res.trace_pre[-1])
            bar.update(1)
        scores.append(np.stack(rows))
    bar.close()
    assert ids is not None
    n = len(ids)
    for key, arr in zero_shot.items():
        if len(arr) != n:
            raise ValueError(f"exp11: {key} has {len(arr)} values for {n} images")
    return {
        "image_id": np.asarray(ids, dtype=np.str_),
        "groups": np.asarray(groups, dtype=np.str_),
        "targets": np.asarray(targets, dtype=np.str_),
        "target_group": np.asarray([assign[t] for t in targets], dtype=np.str_),
        "rates": rates,
        "scores": np.stack(scores),
        "search": split_images(n, search_fraction, seed),
        **{k: np.asarray(v, dtype=np.float64) for k, v in zero_shot.items()},
    }


def save_arrays(
    path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]
) -> None:
    """Arrays and a JSON ``meta`` as an .npz (no pickles), atomically."""
    from vlmrel.io import write_npz

    write_npz(path, arrays, meta)


def load_arrays(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
