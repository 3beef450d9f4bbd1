"""exp0 summaries: reliability of the MC-dropout trace across K trials, for every T, pre and post.

Reads trial ``.npz`` files by their contract (``T``, ``trace_pre``, ``trace_post``, ``image_id``,
``meta``) without importing torch, so summaries and figures run in light jobs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from vlmrel.reliability import best_status, reliability

SPACES = ("pre", "post")


@dataclass(frozen=True)
class Trials:
    """K trials of one (experiment, model, p): traces [K, len(T), N]."""

    T: list[int]
    image_id: list[str]
    trace_pre: np.ndarray
    trace_post: np.ndarray
    metas: list[dict]

    def scores(self, space: str, t: int) -> np.ndarray:
        """Scores [K, N] at one snapshot T in one space ("pre" or "post")."""
        arr = self.trace_pre if space == "pre" else self.trace_post
        return arr[:, self.T.index(t), :]


def load_trials(paths: Sequence[str | os.PathLike[str]]) -> Trials:
    """Stack trial files; they must share T and image ids (else the error names the file)."""
    if not paths:
        raise ValueError("no trial files given")
    T: list[int] | None = None
    ids: list[str] | None = None
    pre, post, metas = [], [], []
    for path in paths:
        try:
            with np.load(path, allow_pickle=False) as z:
                t_i = [int(v) for v in z["T"]]
                ids_i = [str(v) for v in z["image_id"]]
                pre.append(np.asarray(z["trace_pre"], dtype=np.float64))
                post.append(np.asarray(z["trace_post"], dtype=np.float64))
                metas.append(json.loads(str(z["meta"])))
        except (OSError, KeyError, ValueError) as exc:
            raise ValueError(f"{path}: not a valid MC trial file ({exc})") from exc
        if T is None:
            T, ids = t_i, ids_i
        elif t_i != T or ids_i != ids:
            raise ValueError(f"{path}: T list or image ids differ from {paths[0]}")
    assert T is not None and ids is not None
    return Trials(T=T, image_id=ids, trace_pre=np.stack(pre), trace_post=np.stack(post), metas=metas)


def model_summary(trials: Trials, model: str, p: float) -> dict:
    """Per-model exp0 summary: reliability for every T and space, and the best result."""
    rel: dict[str, dict[str, dict]] = {space: {} for space in SPACES}
    for space in SPACES:
        for t in trials.T:
            scores = trials.scores(space, t)
            r = reliability(scores)
            mean_scores = scores.mean(axis=0)
            r["score_mean"] = float(mean_scores.mean())
            r["score_median"] = float(np.median(mean_scores))
            rel[space][str(t)] = r
    statuses = [rel[s][str(t)]["status"] for s in SPACES for t in trials.T]
    best = best_status(statuses)
    best_at = next(
        ({"space": s, "T": t} for t in trials.T for s in SPACES if rel[s][str(t)]["status"] == best), None
    )
    t_max = max(trials.T)
    return {
        "model": model,
        "p": p,
        "T": trials.T,
        "n_trials": trials.trace_pre.shape[0],
        "n_images": len(trials.image_id),
        "reliability": rel,
        "best_status": best,
        "best_at": best_at,
        "status_at_T_max": {s: rel[s][str(t_max)]["status"] for s in SPACES},
        "trial_meta": trials.metas[0],
    }


def overall_summary(summaries: Sequence[dict]) -> dict:
    """The go/no-go input: every model's best status and the overall best."""
    models = {
        s["model"]: {
            "best_status": s["best_status"],
            "best_at": s["best_at"],
            "status_at_T_max": s["status_at_T_max"],
            "T": s["T"],
            "p": s["p"],
            "n_trials": s["n_trials"],
            "n_images": s["n_images"],
        }
        for s in summaries
    }
    best = best_status([m["best_status"] for m in models.values()])
    return {
        "experiment": "exp0",
        "models": models,
        "best_status": best,
        "any_usable": best == "usable",
        "all_failed_at_T_max": all(
            all(v == "failed" for v in m["status_at_T_max"].values()) for m in models.values()
        ),
    }
