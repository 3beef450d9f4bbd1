"""exp9: uncertainty-adaptive association for multi-object tracking (seed 002, section 9d).

**Input**: a cost JSON, either a list of frames or ``{"frames": [...]}``. Each frame is an object:

- ``tracks``: ``[{"id", "gt_id"}]``, the existing tracks (``gt_id`` the ground-truth object the
  track follows, or null);
- ``detections``: ``[{"id", "gt_id", "uncertainty", "oracle_uncertainty"?, "laplace_uncertainty"?}]``
  (``gt_id`` null for a false positive; uncertainties positive numbers);
- ``motion_cost`` and ``appearance_cost``: ``n_tracks x n_detections`` matrices of numbers (null
  for a pair that cannot match);
- optionally ``frame``: the frame's name in messages (default: its position).

A malformed frame stops the run with an error naming the frame and the field (the seed dropped such
frames silently).

**Cost** of assigning detection j to track i::

    C_ij = alpha * M_ij + beta * A_ij / s_j

with ``s_j`` the detection's uncertainty divided by the median of that uncertainty over every
detection of the sequence, so a typical detection has ``s_j = 1`` and the appearance term keeps its
scale whatever the units of the score (the seed divided by the raw trace, ~0.01, which multiplied
appearance costs 50-125 times). Modes: ``baseline`` (``s_j = 1``), ``adaptive`` (``uncertainty``:
the MC-dropout trace), ``oracle`` (``oracle_uncertainty``) and ``laplace`` (``laplace_uncertainty``);
a mode is skipped when its key is absent from every detection (present in some only is an error).

**Association**: the Hungarian algorithm (``scipy.optimize.linear_sum_assignment``) on C, with pairs
whose cost exceeds ``gate_cost`` (or is undefined) left unmatched. A matched detection takes its
track's id; an unmatched one starts a new track (a fresh id).

**Metrics** (``motmetrics``): per frame, the ground-truth objects are the ``gt_id`` of the
detections, the hypotheses the ids the association gave them, and a detection's own (object,
hypothesis) pair is the only match (distance 0). MOTA, IDF1, ID switches and fragmentations over
the sequence, per mode, and each mode's improvement over the baseline.

**Demo** (:func:`demo_sequence`): objects at random positions; the motion cost is the noisy distance
between a track's predicted and a detection's observed position; the appearance cost is low for
the right pair and high for the others. A seeded fraction of the detections is *ambiguous*: their
appearance costs are uniform noise and their uncertainty is ``ambiguous_uncertainty`` times higher.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vlmrel.io import write_json, write_npz

PathLike = str | os.PathLike[str]
log = logging.getLogger(__name__)

MODES = {
    "baseline": None,
    "adaptive": "uncertainty",
    "oracle": "oracle_uncertainty",
    "laplace": "laplace_uncertainty",
}
METRICS = ("mota", "idf1", "num_switches", "num_fragmentations")


class CostFileError(ValueError):
    """A malformed cost JSON; the message names the file, the frame and the field."""


# ---- reading and validating ---------------------------------------------------------------------


def _matrix(value: Any, shape: tuple[int, int], where: str) -> np.ndarray:
    if shape[0] == 0 or shape[1] == 0:
        if value in ([], None) or np.asarray(value, dtype=object).size == 0:
            return np.zeros(shape)
    if (
        not isinstance(value, list)
        or len(value) != shape[0]
        or any(not isinstance(row, list) or len(row) != shape[1] for row in value)
    ):
        raise CostFileError(f"{where}: expected a {shape[0]} x {shape[1]} matrix (tracks x detections)")
    try:
        arr = np.array([[math.nan if v is None else float(v) for v in row] for row in value])
    except (TypeError, ValueError):
        raise CostFileError(f"{where}: entries must be numbers or null") from None
    if np.isinf(arr).any() and (arr == -np.inf).any():
        raise CostFileError(f"{where}: -inf is not a cost")
    return arr


def _records(value: Any, keys: Sequence[str], where: str) -> list[dict]:
    if not isinstance(value, list):
        raise CostFileError(f"{where}: expected a list of objects")
    for j, rec in enumerate(value):
        if not isinstance(rec, dict):
            raise CostFileError(f"{where}[{j}]: expected an object")
        missing = [k for k in keys if k not in rec]
        if missing:
            raise CostFileError(f"{where}[{j}]: missing {missing}")
    return value


def parse_frames(data: Any, source: str = "cost JSON") -> list[dict[str, Any]]:
    """Validated frames: dicts with tracks, detections, motion [T, D] and appearance [T, D] arrays."""
    frames = data.get("frames") if isinstance(data, dict) else data
    if not isinstance(frames, list) or not frames:
        raise CostFileError(f"{source}: expected a non-empty list of frames (or {{'frames': [...]}})")
    out = []
    for i, frame in enumerate(frames):
        name = frame.get("frame", i) if isinstance(frame, dict) else i
        where = f"{source}: frame {name}"
        if not isinstance(frame, dict):
            raise CostFileError(
                f"{where}: expected an object with tracks, detections, motion_cost, appearance_cost"
            )
        for field in ("tracks", "detections", "motion_cost", "appearance_cost"):
            if field not in frame:
                raise CostFileError(f"{where}: missing field '{field}'")
        tracks = _records(frame["tracks"], ("id", "gt_id"), f"{where}: field 'tracks'")
        dets = _records(frame["detections"], ("id", "gt_id", "uncertainty"), f"{where}: field 'detections'")
        for j, d in enumerate(dets):
            for key in MODES.values():
                if key is None or key not in d:
                    continue
                v = d[key]
                if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
                    raise CostFileError(
                        f"{where}: field 'detections'[{j}].{key}: expected a positive number, got {v!r}"
                    )
        shape = (len(tracks), len(dets))
        motion = _matrix(frame["motion_cost"], shape, f"{where}: field 'motion_cost'")
        appearance = _matrix(frame["appearance_cost"], shape, f"{where}: field 'appearance_cost'")
        out.append(
            {"name": name, "tracks": tracks, "detections": dets, "motion": motion, "appearance": appearance}
        )
    return out


def read_cost_json(path: PathLike) -> list[dict[str, Any]]:
    try:
        data = json.loads(open(path, encoding="utf-8").read())
    except (OSError, json.JSONDecodeError) as exc:
        raise CostFileError(f"{path}: cannot read the cost JSON: {exc}") from exc
    return parse_frames(data, str(path))


def available_modes(frames: Sequence[Mapping[str, Any]]) -> list[str]:
    """The modes whose uncertainty key every detection has (a key in some detections only: error)."""
    modes = ["baseline"]
    for mode, key in MODES.items():
        if key is None:
            continue
        has = [(f["name"], j, key in d) for f in frames for j, d in enumerate(f["detections"])]
        if has and all(h for *_, h in has):
            modes.append(mode)
        elif any(h for *_, h in has):
            name, j, _ = next(x for x in has if not x[2])
            raise CostFileError(
                f"frame {name}: field 'detections'[{j}].{key} is missing (other detections have it)"
            )
    return modes


def normalisers(frames: Sequence[Mapping[str, Any]], mode: str) -> list[np.ndarray]:
    """Per frame, s_j for every detection: the mode's uncertainty over its sequence median."""
    key = MODES[mode]
    if key is None:
        return [np.ones(len(f["detections"])) for f in frames]
    values = [np.array([float(d[key]) for d in f["detections"]]) for f in frames]
    median = float(np.median(np.concatenate(values))) if any(v.size for v in values) else 1.0
    return [v / median for v in values]


# ---- association and metrics --------------------------------------------------------------------


def associate(cost: np.ndarray, gate_cost: float) -> list[tuple[int, int]]:
    """Hungarian assignment; pairs above ``gate_cost`` or undefined stay unmatched."""
    from scipy.optimize import linear_sum_assignment

    if cost.size == 0:
        return []
    c = np.where(np.isfinite(cost), cost, np.inf)
    big = gate_cost + 1.0 + (np.nanmax(c[np.isfinite(c)]) if np.isfinite(c).any() else 0.0)
    rows, cols = linear_sum_assignment(np.where(c > gate_cost, big, c))
    return [(int(i), int(j)) for i, j in zip(rows, cols, strict=True) if c[i, j] <= gate_cost]


def run_mode(
    frames: Sequence[Mapping[str, Any]],
    s: Sequence[np.ndarray],
    *,
    alpha: float,
    beta: float,
    gate_cost: float,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Associate every frame with ``s`` and score the sequence with motmetrics."""
    import motmetrics as mm

    acc = mm.MOTAccumulator(auto_id=True)
    ids: dict[str, int] = {}  # motmetrics wants numeric ids: every object and hypothesis gets one

    def num(key: str) -> int:
        return ids.setdefault(key, len(ids))

    matched, correct, unmatched = [], [], []
    for f, s_f in zip(frames, s, strict=True):
        cost = alpha * f["motion"] + beta * f["appearance"] / s_f[None, :]
        pairs = associate(cost, gate_cost)
        dets = f["detections"]
        hyp = {j: num(f"track:{f['tracks'][i]['id']}") for i, j in pairs}
        for j, d in enumerate(dets):
            if j not in hyp:  # unmatched: a new track
                hyp[j] = num(f"new:{f['name']}:{d['id']}")
        objects = list(dict.fromkeys(num(f"gt:{d['gt_id']}") for d in dets if d["gt_id"] is not None))
        hyps = [hyp[j] for j in range(len(dets))]
        dist = np.full((len(objects), len(hyps)), np.nan)
        for j, d in enumerate(dets):
            if d["gt_id"] is not None:
                dist[objects.index(num(f"gt:{d['gt_id']}")), j] = 0.0
        acc.update(objects, hyps, dist)
        matched.append(len(pairs))
        correct.append(
            sum(
                1
                for i, j in pairs
                if dets[j]["gt_id"] is not None and f["tracks"][i]["gt_id"] == dets[j]["gt_id"]
            )
        )
        unmatched.append(len(dets) - len(pairs))
    mh = mm.metrics.create()
    row = mh.compute(acc, metrics=list(METRICS), name="seq").iloc[0]
    metrics = {k: float(row[k]) for k in METRICS}
    per_frame = {
        "matched": np.asarray(matched, dtype=np.int64),
        "correct": np.asarray(correct, dtype=np.int64),
        "unmatched": np.asarray(unmatched, dtype=np.int64),
    }
    return metrics, per_frame


def evaluate(
    frames: Sequence[Mapping[str, Any]], *, alpha: float, beta: float, gate_cost: float
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Every available mode's metrics, the improvement over baseline, and per-frame arrays."""
    modes = available_modes(frames)
    results, arrays, medians = {}, {}, {}
    for mode in modes:
        s = normalisers(frames, mode)
        if MODES[mode] is not None:
            medians[mode] = float(
                np.median(np.concatenate([[float(d[MODES[mode]]) for d in f["detections"]] for f in frames]))
            )
        results[mode], per_frame = run_mode(frames, s, alpha=alpha, beta=beta, gate_cost=gate_cost)
        for k, v in per_frame.items():
            arrays[f"{mode}_{k}"] = v
    base = results["baseline"]
    improvement = {m: {k: results[m][k] - base[k] for k in METRICS} for m in modes if m != "baseline"}
    summary = {
        "n_frames": len(frames),
        "n_detections": int(sum(len(f["detections"]) for f in frames)),
        "n_tracks": int(sum(len(f["tracks"]) for f in frames)),
        "modes": modes,
        "skipped_modes": [m for m in MODES if m not in modes],
        "metrics": results,
        "improvement_over_baseline": improvement,
        "normalisation": "s_j = uncertainty_j / median of the mode's uncertainty over the sequence",
        "uncertainty_medians": medians,
        "alpha": alpha,
        "beta": beta,
        "gate_cost": gate_cost,
    }
    arrays["frame"] = np.asarray([str(f["name"]) for f in frames], dtype=np.str_)
    arrays["n_detections"] = np.asarray([len(f["detections"]) for f in frames], dtype=np.int64)
    return summary, arrays


# ---- the demo sequence --------------------------------------------------------------------------


def demo_sequence(
    *,
    seed: int,
    n_frames: int = 60,
    n_objects: int = 6,
    ambiguous_fraction: float = 0.3,
    ambiguous_uncertainty: float = 10.0,
    motion_noise: float = 0.35,
    shuffle_uncertainty: bool = False,
) -> dict[str, Any]:
    """A generated cost JSON with planted ambiguity (module docstring). ``shuffle_uncertainty``
    permutes the uncertainties across the sequence's detections (the control: they no longer mark
    the noisy detections)."""
    rng = np.random.default_rng([int(seed), 9])
    frames = []
    all_u = []
    for t in range(n_frames):
        pos = np.sort(rng.uniform(0.0, n_objects, size=n_objects))  # object positions, ~1 apart
        order = rng.permutation(n_objects)  # detection j observes object order[j]
        observed = pos[order] + rng.normal(0.0, motion_noise, size=n_objects)
        motion = np.abs(pos[:, None] - observed[None, :])
        ambiguous = rng.random(n_objects) < ambiguous_fraction
        appearance = np.where(
            order[None, :] == np.arange(n_objects)[:, None],
            rng.normal(0.1, 0.05, size=(n_objects, n_objects)),
            rng.normal(0.9, 0.05, size=(n_objects, n_objects)),
        )
        appearance[:, ambiguous] = rng.uniform(0.0, 1.5, size=(n_objects, int(ambiguous.sum())))
        base_u = 0.01 * np.exp(rng.normal(0.0, 0.1, size=n_objects))
        u = np.where(ambiguous, ambiguous_uncertainty * base_u, base_u)
        oracle = np.where(ambiguous, ambiguous_uncertainty, 1.0)
        all_u.append(u)
        frames.append(
            {
                "frame": t,
                "tracks": [{"id": int(i), "gt_id": int(i)} for i in range(n_objects)],
                "detections": [
                    {
                        "id": int(j),
                        "gt_id": int(order[j]),
                        "uncertainty": float(u[j]),
                        "oracle_uncertainty": float(oracle[j]),
                        "ambiguous": bool(ambiguous[j]),
                    }
                    for j in range(n_objects)
                ],
                "motion_cost": np.clip(motion, 0, None).round(6).tolist(),
                "appearance_cost": np.clip(appearance, 0, None).round(6).tolist(),
            }
        )
    if shuffle_uncertainty:
        flat = rng.permutation(np.concatenate(all_u))
        k = 0
        for f in frames:
            for d in f["detections"]:
                d["uncertainty"] = float(flat[k])
                k += 1
    return {
        "frames": frames,
        "generator": {
            "seed": seed,
            "n_frames": n_frames,
            "n_objects": n_objects,
            "ambiguous_fraction": ambiguous_fraction,
            "ambiguous_uncertainty": ambiguous_uncertainty,
            "motion_noise": motion_noise,
        },
    }


# ---- jobs ----------------------------------------------------------------------------------------


def write_demo(out: PathLike, **kwargs: Any) -> None:
    write_json(out, demo_sequence(**kwargs))


def mot_job(
    cost_json: PathLike,
    summary_out: PathLike,
    arrays_out: PathLike,
    *,
    alpha: float,
    beta: float,
    gate_cost: float,
) -> dict[str, Any]:
    frames = read_cost_json(cost_json)
    summary, arrays = evaluate(frames, alpha=alpha, beta=beta, gate_cost=gate_cost)
    summary["cost_json"] = os.fspath(cost_json)
    write_npz(arrays_out, arrays)
    write_json(summary_out, summary)
    for mode in summary["modes"]:
        log.info("%s: %s", mode, summary["metrics"][mode])
    return summary


def mot_figure(summary: Mapping[str, Any], arrays_path: PathLike, out: PathLike, dpi: int) -> None:
    """MOTA and IDF1 per mode, and the running share of correct associations per mode."""
    from vlmrel.figures import plt, save_figure

    modes = summary["modes"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(modes))
    for k, metric in enumerate(("mota", "idf1")):
        axes[0].bar(
            x + (k - 0.5) * 0.4, [summary["metrics"][m][metric] for m in modes], 0.4, label=metric.upper()
        )
    axes[0].set_xticks(x, modes)
    axes[0].legend()
    axes[0].set_title("MOTA and IDF1 per association mode")
    with np.load(arrays_path, allow_pickle=False) as z:
        n = np.cumsum(z["n_detections"])
        for m in modes:
            axes[1].plot(np.cumsum(z[f"{m}_correct"]) / n, label=m)
    axes[1].set_xlabel("frame")
    axes[1].set_ylabel("correct associations (running share)")
    axes[1].legend()
    sw = {m: int(summary["metrics"][m]["num_switches"]) for m in modes}
    fig.suptitle(
        f"exp9: uncertainty-adaptive association ({summary['n_frames']} frames; ID switches {sw})",
        fontsize=10,
    )
    save_figure(fig, out, dpi=dpi)
