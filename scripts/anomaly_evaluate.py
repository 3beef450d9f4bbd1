"""Exact pooled and per-image metrics of every score over every test pixel (streamed), and the mIoU."""

from vlmrel.anomaly import pipeline
from vlmrel.logs import setup_job_log

setup_job_log(snakemake.log[0])
p = snakemake.params
pipeline.evaluate(
    snakemake.input.logits,
    snakemake.input.get("sml"),
    snakemake.output.metrics,
    snakemake.output.per_image,
    snakemake.output.histograms,
    spec=pipeline.spec_of(p.num_classes, p.anomaly_ids, p.ignore_ids),
    methods=p.methods,
    temperature=p.temperature,
    tpr_level=p.tpr_level,
    max_block_mb=p.max_block_mb,
    max_refine_mb=p.max_refine_mb,
    heat=p.heat,
)
