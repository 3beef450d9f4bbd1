"""Streaming evaluation: logits file -> per-image scores -> exact pooled and per-image metrics.

Scores exist for one image at a time (``iter_scored``); the metrics live in accumulators whose
size does not depend on the number of pixels.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from vlmrel.anomaly.exact32 import Float32Exact
from vlmrel.anomaly.heat import HeatScorer
from vlmrel.anomaly.io import LabelSpec, SegLogitsReader, iter_image_logits, progress, write_image_logits
from vlmrel.anomaly.metrics import ExactAccumulator, PerImageAccumulator, with_exact_quantization
from vlmrel.anomaly.scores import STATELESS, SMLStats, SMLStatsAccumulator, compute_scores
from vlmrel.io import atomic_path


@dataclass
class HeatConfig:
    """HEAT's settings (``vlmrel.anomaly.heat``); the temperature is the energy score's."""

    alpha: float = 0.9
    spatial_weight: float = 0.5


def heat_record(reader: SegLogitsReader) -> dict:
    """What HEAT ran as on this logits file: full, or the energy fallback and why."""
    if reader.has_features:
        return {"fallback": None, "components": ["energy", "mahalanobis", "spatial", "entropy weighting"]}
    return {
        "fallback": "energy",
        "reason": f"{reader.path} has no `mahalanobis` maps (the producer model exposes no features, "
        "or the logits were computed elsewhere): HEAT = energy",
    }


@dataclass
class ScoredImage:
    index: int
    scores: dict[str, np.ndarray]  # method -> scores of the image's valid pixels (1-D)
    is_anomaly: np.ndarray  # bool, aligned with the scores
    labels: np.ndarray | None = None  # labels of the valid pixels
    prediction: np.ndarray | None = None  # argmax class of the valid pixels


def iter_scored(
    reader: SegLogitsReader,
    methods: Sequence[str],
    *,
    temperature: float = 1.0,
    sml: SMLStats | None = None,
    heat: HeatConfig | None = None,
    desc: str = "scores",
    with_prediction: bool = False,
) -> Iterator[ScoredImage]:
    """One image at a time, in file order: the scores of its valid (non-ignored) pixels and their flags.

    HEAT starts from a fresh state at every call, so every pass over a file gives the same scores.
    """
    stateless = [m for m in methods if m in STATELESS]
    scorer = None
    if "heat" in methods:
        h = heat or HeatConfig()
        scorer = HeatScorer(temperature=temperature, alpha=h.alpha, spatial_weight=h.spatial_weight)
    for i, logits, labels, valid, anomalous, maha in progress(
        reader.iter_with_features(), total=len(reader), desc=desc
    ):
        if not np.isfinite(logits).all():
            raise ValueError(f"{reader.path}: image {i} has non-finite logits")
        scores = compute_scores(logits, stateless, axis=0, temperature=temperature, sml=sml)
        if scorer is not None:
            scores["heat"] = scorer.score(logits, maha)
        yield ScoredImage(
            i,
            {m: scores[m][valid] for m in methods},
            anomalous[valid],
            labels[valid] if with_prediction else None,
            logits.argmax(axis=0)[valid] if with_prediction else None,
        )


def sml_stats(path: str | os.PathLike[str], spec: LabelSpec, *, max_block_mb: float = 256.0) -> SMLStats:
    """Per-class max-logit statistics over a validation logits file (valid, non-anomalous pixels)."""
    acc = SMLStatsAccumulator(spec.num_classes)
    with SegLogitsReader(path, spec, max_block_mb=max_block_mb) as reader:
        for _i, logits, _labels, valid, anomalous in progress(reader, total=len(reader), desc="sml stats"):
            acc.update(logits, axis=0, valid=valid & ~anomalous)
    return acc.result()


class SegmentationAccumulator:
    """Confusion matrix of the producer's argmax over the pixels labelled with a trained class."""

    def __init__(self, num_classes: int) -> None:
        self.C = int(num_classes)
        self.confusion = np.zeros((self.C, self.C), dtype=np.int64)

    def update(self, labels: np.ndarray, prediction: np.ndarray) -> None:
        lab = np.asarray(labels).astype(np.int64).reshape(-1)
        pred = np.asarray(prediction).astype(np.int64).reshape(-1)
        known = (lab >= 0) & (lab < self.C)
        self.confusion += np.bincount(lab[known] * self.C + pred[known], minlength=self.C * self.C).reshape(
            self.C, self.C
        )

    def result(self) -> dict:
        cm = self.confusion
        inter = np.diag(cm).astype(np.float64)
        union = cm.sum(0) + cm.sum(1) - np.diag(cm)
        iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
        total = int(cm.sum())
        return {
            "miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else math.nan,
            "iou": [None if math.isnan(v) else float(v) for v in iou],
            "pixel_accuracy": float(inter.sum() / total) if total else math.nan,
            "n_pixels": total,
            "classes_present": int(np.isfinite(iou).sum()),
            "convention": "argmax of the logits vs labels, over valid pixels labelled with a trained class "
            "(anomaly and ignore ids left out); IoU per class = TP / (TP + FP + FN), mean over classes "
            "that occur in the labels or the predictions",
        }


@dataclass
class Evaluation:
    methods: list[str]
    pooled: dict[str, dict]
    per_image: dict[str, dict]
    counts: np.ndarray  # [M, 65536, 2] float16 histograms (normal, anomaly) per method
    exact: dict[str, bool]
    rows: list[dict]  # per image and method
    segmentation: dict | None = None
    heat: dict | None = None

    def summary(self) -> dict:
        out = {"methods": self.methods, "pooled": self.pooled, "per_image": self.per_image}
        if self.segmentation is not None:
            out["segmentation"] = self.segmentation
        if self.heat is not None:
            out["heat"] = self.heat
        return out


def evaluate_segmentation(
    path: str | os.PathLike[str],
    spec: LabelSpec,
    methods: Sequence[str],
    *,
    temperature: float = 1.0,
    sml: SMLStats | None = None,
    heat: HeatConfig | None = None,
    tpr_level: float = 0.95,
    max_block_mb: float = 256.0,
    max_refine_mb: float = 1024.0,
) -> Evaluation:
    """Pooled (OpenOOD) and per-image-mean (anomaly segmentation) metrics of every method, and mIoU.

    The first pass fills the float16 histograms (figures, threshold study), the per-image metrics,
    the confusion matrix and the coarse float32 counts. When a method's scores are not all float16
    values, its pooled metrics come from ``exact32``: the file is read again for each refinement
    pass (scores recomputed identically), so they are exact for the float32 scores.
    """
    methods = list(methods)
    pooled16 = {m: ExactAccumulator(tpr_level) for m in methods}
    pooled32 = {m: Float32Exact(tpr_level, max_refine_mb) for m in methods}
    per_image = {m: PerImageAccumulator(tpr_level) for m in methods}
    seg = SegmentationAccumulator(spec.num_classes)
    rows: list[dict] = []
    with SegLogitsReader(path, spec, max_block_mb=max_block_mb) as reader:
        heat_info = heat_record(reader) if "heat" in methods else None
        kw = {"temperature": temperature, "sml": sml, "heat": heat}
        for item in iter_scored(reader, methods, desc="evaluate", with_prediction=True, **kw):
            seg.update(item.labels, item.prediction)
            for m in methods:
                pooled16[m].update(item.scores[m], item.is_anomaly)
                pooled32[m].update(item.scores[m], item.is_anomaly)
                r = per_image[m].update(item.scores[m], item.is_anomaly)
                rows.append({"image": item.index, "method": m, **r})
        refine = [m for m in methods if not pooled16[m].exact]
        passes = max([pooled32[m].plan() for m in refine], default=0)
        for g in range(passes):
            active = [m for m in refine if g < pooled32[m].plan()]
            for m in active:
                pooled32[m].start_group(g)
            # only the methods refined in this pass are scored (HEAT's state depends on HEAT alone)
            for item in iter_scored(reader, active, desc=f"refine {g + 1}/{passes}", **kw):
                for m in active:
                    pooled32[m].refine(item.scores[m], item.is_anomaly)
            for m in active:
                pooled32[m].finish_group()
    pooled = {}
    for m in methods:
        if m in refine:
            r = pooled32[m].result()
            pooled[m] = with_exact_quantization(r, r.pop("exact"), "float32")
        else:
            pooled[m] = pooled16[m].result()
    return Evaluation(
        methods,
        pooled,
        {m: per_image[m].result() for m in methods},
        np.stack([pooled16[m].counts for m in methods]),
        {m: pooled[m]["quantization"]["exact"] for m in methods},
        rows,
        seg.result(),
        heat_info,
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
    """Pooled exact metrics over images (OOD = positive) from per-image logits [N, C].

    HEAT is a pixel-map score (spatial and feature terms); it has no per-image form and is left out.
    """
    skipped = [m for m in methods if m not in STATELESS]
    methods = [m for m in methods if m in STATELESS]
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
    out: dict = {"methods": methods, "pooled": {m: accs[m].result() for m in methods}}
    if skipped:
        out["skipped"] = {m: "a pixel-map score: not defined for per-image logits" for m in skipped}
    if sml is not None:
        out["sml_stats"] = sml.to_dict()
    n = next(iter(out["pooled"].values()))
    if n["n_anomaly"] == 0 or n["n_normal"] == 0:
        out["warning"] = "metrics undefined: the test set needs both OOD and in-distribution images"
    return out
