"""One function per workflow step of the anomaly chain: plain paths and values in, files out.

The workflow's scripts only unpack ``snakemake.input/params/output`` and call these, so every
step can also be run from a notebook. Every output is written atomically.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
import pandas as pd

from vlmrel.anomaly import evaluate as ev
from vlmrel.anomaly import figures, studies, synthetic
from vlmrel.anomaly.io import LabelSpec, write_seg_data
from vlmrel.anomaly.scores import SMLStats
from vlmrel.io import atomic_path, read_json, write_json

log = logging.getLogger("vlmrel.anomaly")
PathLike = str | os.PathLike[str]


def write_table(path: PathLike, rows: list[dict], sep: str = "\t") -> None:
    """TSV/CSV atomically; NaN written as empty."""
    with atomic_path(path) as tmp:
        pd.DataFrame(rows).to_csv(tmp, sep=sep, index=False, float_format="%.10g")


def spec_of(num_classes: int, anomaly_ids: Sequence[int], ignore_ids: Sequence[int]) -> LabelSpec:
    return LabelSpec(int(num_classes), tuple(anomaly_ids), tuple(ignore_ids))


def demo_data(
    outputs: dict[str, PathLike],
    *,
    seed: int,
    image_size: int,
    sizes: dict[str, int],
    anomaly_fraction: float,
) -> None:
    """Synthetic scenes for each split in ``outputs`` (train/val/test)."""
    for split, path in outputs.items():
        images, labels = synthetic.make_split(split, int(sizes[split]), seed, image_size, anomaly_fraction)
        write_seg_data(
            path,
            images,
            labels,
            synthetic="vlmrel.anomaly.synthetic (SYNTHETIC demo data)",
            classes=",".join(synthetic.CLASS_NAMES),
            anomaly_id=synthetic.ANOMALY_ID,
            ignore_id=synthetic.IGNORE_ID,
            seed=seed,
        )
        log.info(
            "%s: %d synthetic scenes, %d anomaly pixels",
            split,
            len(images),
            int((labels == synthetic.ANOMALY_ID).sum()),
        )


def import_streethazards(
    root: PathLike,
    data_out: PathLike,
    summary_out: PathLike,
    *,
    split: str,
    folders: dict[str, str],
    image_size: Sequence[int],
    resize: Sequence[int] | None,
    label_offset: int,
    spec: LabelSpec,
) -> None:
    """One split of StreetHazards from its published layout into the chain's data file."""
    from vlmrel.anomaly.streethazards import import_split

    summary = import_split(
        root,
        data_out,
        images=folders["images"],
        annotations=folders["annotations"],
        image_size=image_size,
        spec=spec,
        resize=resize,
        label_offset=label_offset,
        split=split,
    )
    write_json(summary_out, summary)


def train(
    train_path: PathLike, val_path: PathLike, model_out: PathLike, record_out: PathLike, **kwargs: object
) -> None:
    from vlmrel.anomaly.segnet import train_segnet

    record = train_segnet(train_path, val_path, model_out, **kwargs)  # type: ignore[arg-type]
    write_json(record_out, record)


def logits(
    data_path: PathLike,
    checkpoint: PathLike,
    out_path: PathLike,
    *,
    arch: str,
    num_classes: int,
    batch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    dtype: str,
    device: str,
    threads: int,
    heat_stats: PathLike | None = None,
) -> None:
    """Logits of a split; with ``heat_stats`` also each image's Mahalanobis map for HEAT."""
    from vlmrel.anomaly.heat import FeatureStats
    from vlmrel.anomaly.segnet import file_sha256, load_model, produce_logits

    model = load_model(arch, num_classes, checkpoint)
    produce_logits(
        model,
        data_path,
        out_path,
        num_classes=num_classes,
        batch_size=batch_size,
        mean=mean,
        std=std,
        device=device,
        dtype=dtype,
        threads=threads,
        arch=arch,
        heat_stats=FeatureStats.load(heat_stats) if heat_stats else None,
        checkpoint_sha256=file_sha256(checkpoint),
    )


def heat_stats(
    data_path: PathLike,
    checkpoint: PathLike,
    out: PathLike,
    *,
    arch: str,
    num_classes: int,
    ignore_ids: Sequence[int],
    batch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: str,
    threads: int,
    ridge: float = 1e-6,
) -> None:
    """HEAT's class means and tied covariance of the feature layer over a labelled split (safetensors)."""
    from vlmrel.anomaly.segnet import file_sha256, heat_feature_stats, load_model

    model = load_model(arch, num_classes, checkpoint)
    stats = heat_feature_stats(
        model,
        data_path,
        arch=arch,
        num_classes=num_classes,
        ignore_ids=ignore_ids,
        batch_size=batch_size,
        mean=mean,
        std=std,
        device=device,
        threads=threads,
        ridge=ridge,
    )
    stats.save(out, arch=arch, data=os.fspath(data_path), checkpoint_sha256=file_sha256(checkpoint))


def sml_stats(val_logits: PathLike, out_json: PathLike, spec: LabelSpec, max_block_mb: float = 256.0) -> None:
    stats = ev.sml_stats(val_logits, spec, max_block_mb=max_block_mb)
    write_json(out_json, {"num_classes": spec.num_classes, **stats.to_dict()})


def _load_sml(path: PathLike | None, spec: LabelSpec) -> SMLStats | None:
    return SMLStats.from_dict(read_json(path), spec.num_classes) if path else None


def evaluate(
    test_logits: PathLike,
    sml_json: PathLike | None,
    metrics_out: PathLike,
    per_image_out: PathLike,
    histograms_out: PathLike,
    *,
    spec: LabelSpec,
    methods: Sequence[str],
    temperature: float,
    tpr_level: float,
    max_block_mb: float = 256.0,
    max_refine_mb: float = 1024.0,
    heat: dict | None = None,
) -> None:
    result = ev.evaluate_segmentation(
        test_logits,
        spec,
        methods,
        temperature=temperature,
        sml=_load_sml(sml_json, spec),
        heat=_heat_config(heat),
        tpr_level=tpr_level,
        max_block_mb=max_block_mb,
        max_refine_mb=max_refine_mb,
    )
    ev.save_histograms(histograms_out, result, tpr_level)
    write_table(per_image_out, result.rows)
    summary = result.summary()
    summary.update(
        num_classes=spec.num_classes,
        anomaly_ids=list(spec.anomaly_ids),
        ignore_ids=list(spec.ignore_ids),
        temperature=temperature,
        conventions={
            "pooled": "every valid pixel of every image in one ranking (OpenOOD)",
            "per_image": "metrics per image, mean over images with both anomaly and normal pixels",
            "positive": "anomaly",
            "score": "higher = more anomalous",
            "fpr95": f"smallest FPR among thresholds with TPR >= {tpr_level}",
            "exactness": "pooled and per-image metrics are exact for the float32 scores over every pixel "
            "(quantization.score_precision says which path: float16 histogram when every score is a "
            "float16 value, else coarse + refinement passes); figures and the threshold study use the "
            "float16 histograms",
        },
    )
    write_json(metrics_out, summary)
    for m in result.methods:
        p = result.pooled[m]
        log.info("%-8s AUROC %.4f AUPR %.4f FPR95 %.4f", m, p["auroc"], p["aupr"], p["fpr95"])
    if result.segmentation is not None:
        log.info("producer mIoU %.4f", result.segmentation["miou"])
    if result.heat and result.heat.get("fallback"):
        log.warning("HEAT fell back to %s: %s", result.heat["fallback"], result.heat["reason"])


def _heat_config(heat: dict | None) -> ev.HeatConfig:
    h = heat or {}
    return ev.HeatConfig(alpha=float(h.get("alpha", 0.9)), spatial_weight=float(h.get("spatial_weight", 0.5)))


def threshold(
    histograms: PathLike, tsv_out: PathLike, json_out: PathLike, *, offsets: Sequence[float]
) -> None:
    methods, counts, _exact, _level = ev.load_histograms(histograms)
    study = {m: studies.threshold_sensitivity(c, offsets) for m, c in zip(methods, counts, strict=True)}
    write_json(json_out, study)
    write_table(tsv_out, [{"method": m, **r} for m, s in study.items() for r in s["rows"]])


def subsampling(
    test_logits: PathLike,
    sml_json: PathLike | None,
    summary_out: PathLike,
    trials_out: PathLike,
    *,
    spec: LabelSpec,
    methods: Sequence[str],
    ratios: Sequence[float],
    trials: int,
    seed: int,
    temperature: float,
    tpr_level: float,
    max_block_mb: float = 256.0,
    heat: dict | None = None,
) -> None:
    rows, summary = studies.subsampling_study(
        test_logits,
        spec,
        methods,
        ratios=ratios,
        trials=trials,
        seed=seed,
        temperature=temperature,
        sml=_load_sml(sml_json, spec),
        heat=_heat_config(heat),
        tpr_level=tpr_level,
        max_block_mb=max_block_mb,
    )
    write_table(trials_out, rows)
    write_table(summary_out, summary)


def comparison(metrics_json: PathLike, threshold_json: PathLike, csv_out: PathLike, md_out: PathLike) -> None:
    metrics = read_json(metrics_json)
    rows = studies.comparison_rows(metrics, read_json(threshold_json))
    write_table(csv_out, rows, sep=",")
    with atomic_path(md_out) as tmp:
        tmp.write_text(studies.comparison_markdown(rows, metrics))


def figure_roc_pr(histograms: PathLike, metrics_json: PathLike, out: PathLike, dpi: int) -> None:
    methods, counts, _exact, _level = ev.load_histograms(histograms)
    figures.roc_pr_curves(methods, counts, read_json(metrics_json), out, dpi)


def figure_threshold(threshold_json: PathLike, out: PathLike, dpi: int) -> None:
    figures.threshold_panels(read_json(threshold_json), out, dpi)


def figure_subsampling(summary_tsv: PathLike, out: PathLike, dpi: int) -> None:
    df = pd.read_csv(summary_tsv, sep="\t")
    rows = [
        {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in r.items()}
        for r in df.to_dict("records")
    ]
    figures.subsampling_panels(rows, out, dpi)


def image_logits(seg_logits: PathLike, out: PathLike, spec: LabelSpec, max_block_mb: float = 256.0) -> None:
    ev.pool_image_logits(seg_logits, out, spec, max_block_mb=max_block_mb)


def classification(
    test: PathLike,
    val: PathLike | None,
    out: PathLike,
    *,
    num_classes: int,
    methods: Sequence[str],
    temperature: float,
    tpr_level: float,
) -> None:
    result = ev.evaluate_classification(
        test, num_classes, methods, val_path=val, temperature=temperature, tpr_level=tpr_level
    )
    write_json(out, result)
