"""Streaming evaluation: logits file -> per-image scores -> exact pooled and per-image metrics.

Scores exist for one image at a time (``iter_scored``); the metrics live in accumulators whose
size does not depend on the number of pixels.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from vlmrel.anomaly.io import LabelSpec, SegLogitsReader, iter_image_logits, progress, write_image_logits
from vlmrel.anomaly.metrics import ExactAccumulator, PerImageAccumulator
from vlmrel.anomaly.scores import SMLStats, SMLStatsAccumulator, compute_scores
from vlmrel.io import atomic_path


@dataclass
class ScoredImage:
    index: int
    scores: dict[str, np.ndarray]  # method -> scores of the image's valid pixels (1-D)
    is_anomaly: np.ndarray  # bool, aligned with the scores


def iter_scored(
    reader: SegLogitsReader,
    methods: Sequence[str],
    *,
    temperature: float = 1.0,
    sml: SMLStats | None = None,
    desc: str = "scores",
) -> Iterator[ScoredImage]:
    """One image at a time: the scores of its valid (non-ignored) pixels and their anomaly flags."""
    for i, logits, _labels, valid, anomalous in progress(reader, total=len(reader), desc=desc):
        if not np.isfinite(logits).all():
            raise ValueError(f"{reader.path}: image {i} has non-finite logits")
        scores = compute_scores(logits, methods, axis=0, temperature=temperature, sml=sml)
        yield ScoredImage(i, {m: s[valid] for m, s in scores.items()}, anomalous[valid])


def sml_stats(path: str | os.PathLike[str], spec: LabelSpec, *, max_block_mb: float = 256.0) -> SMLStats:
    """Per-class max-logit statistics over a validation logits file (valid, non-anomalous pixels)."""
    acc = SMLStatsAccumulator(spec.num_classes)
    with SegLogitsReader(path, spec, max_block_mb=max_block_mb) as reader:
        for _i, logits, _labels, valid, anomalous in progress(reader, total=len(reader), desc="sml stats"):
            acc.update(logits, axis=0, valid=valid & ~anomalous)
    return acc.result()


@dataclass
class Evaluation:
    methods: list[str]
    pooled: dict[str, dict]
    per_image: dict[str, dict]
    counts: np.ndarray  # [M, 65536, 2] histograms (normal, anomaly) per method
    exact: dict[str, bool]
    rows: list[dict]  # per image and method

    def summary(self) -> dict:
        return {"methods": self.methods, "pooled": self.pooled, "per_image": self.per_image}


def evaluate_segmentation(
    path: str | os.PathLike[str],
    spec: LabelSpec,
    methods: Sequence[str],
    *,
    temperature: float = 1.0,
    sml: SMLStats | None = None,
    tpr_level: float = 0.95,
    max_block_mb: float = 256.0,
) -> Evaluation:
    """Pooled (OpenOOD) and per-image-mean (anomaly segmentation) metrics of every method, one pass."""
    methods = list(methods)
    pooled = {m: ExactAccumulator(tpr_level) for m in methods}
    per_image = {m: PerImageAccumulator(tpr_level) for m in methods}
    rows: list[dict] = []
    with SegLogitsReader(path, spec, max_block_mb=max_block_mb) as reader:
        for item in iter_scored(reader, methods, temperature=temperature, sml=sml, desc="evaluate"):
            for m in methods:
                pooled[m].update(item.scores[m], item.is_anomaly)
                r = per_image[m].update(item.scores[m], item.is_anomaly)
                rows.append({"image": item.index, "method": m, **r})
    return Evaluation(
        methods,
        {m: pooled[m].result() for m in methods},
        {m: per_image[m].result() for m in methods},
        np.stack([pooled[m].counts for m in methods]),
        {m: pooled[m].exact for m in methods},
        rows,
    )


def save_histograms(path: str | os.PathLike[str], ev: Evaluation, tpr_level: float) -> None:
    """``counts`` [M, 65536, 2] int64, ``methods``, ``exact`` [M], ``tpr_level``; no pickles."""
    with atomic_path(path) as tmp:
        np.savez_compressed(
            tmp,
            counts=ev.counts,
            methods=np.array(ev.methods),
            exact=np.array([ev.exact[m] for m in ev.methods]),
            tpr_level=np.float64(tpr_level),
        )


def load_histograms(path: str | os.PathLike[str]) -> tuple[list[str], np.ndarray, dict[str, bool], float]:
    with np.load(path, allow_pickle=False) as z:
        methods = [str(m) for m in z["methods"]]
        return (
            methods,
            z["counts"],
            dict(zip(methods, map(bool, z["exact"]), strict=True)),
            float(z["tpr_level"]),
        )


# ---- classification OOD: per-image logits -------------------------------------------------------


def pool_image_logits(
    seg_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    spec: LabelSpec,
    *,
    max_block_mb: float = 256.0,
) -> None:
    """Image-level logits = mean of the valid pixels' logits; OOD = the image has anomaly pixels."""
    logits, ood = [], []
    with SegLogitsReader(seg_path, spec, max_block_mb=max_block_mb) as reader:
        for _i, lg, _lb, valid, anomalous in progress(reader, total=len(reader), desc="pool"):
            z = lg.astype(np.float32)[:, valid]
            logits.append(z.mean(axis=1) if z.shape[1] else np.zeros(lg.shape[0], np.float32))
            ood.append(bool(anomalous.any()))
    write_image_logits(out_path, np.stack(logits), np.array(ood), source=os.fspath(seg_path), pooling="mean")


def evaluate_classification(
    test_path: str | os.PathLike[str],
    num_classes: int,
    methods: Sequence[str],
    *,
    val_path: str | os.PathLike[str] | None = None,
    temperature: float = 1.0,
    tpr_level: float = 0.95,
) -> dict:
    """Pooled exact metrics over images (OOD = positive) from per-image logits [N, C]."""
    methods = list(methods)
    sml = None
    if "sml" in methods:
        if val_path is None:
            raise ValueError("the 'sml' score needs validation per-image logits (anomaly.classification val)")
        acc_stats = SMLStatsAccumulator(num_classes)
        for block, _ in iter_image_logits(val_path, num_classes, need_ood=False):
            acc_stats.update(block, axis=1)
        sml = acc_stats.result()
    accs = {m: ExactAccumulator(tpr_level) for m in methods}
    for block, ood in iter_image_logits(test_path, num_classes):
        if not np.isfinite(block).all():
            raise ValueError(f"{test_path}: non-finite logits")
        scores = compute_scores(block, methods, axis=1, temperature=temperature, sml=sml)
        for m in methods:
            accs[m].update(scores[m], ood)
    out = {"methods": methods, "pooled": {m: accs[m].result() for m in methods}}
    if sml is not None:
        out["sml_stats"] = sml.to_dict()
    n = next(iter(out["pooled"].values()))
    if n["n_anomaly"] == 0 or n["n_normal"] == 0:
        out["warning"] = "metrics undefined: the test set needs both OOD and in-distribution images"
    return out
