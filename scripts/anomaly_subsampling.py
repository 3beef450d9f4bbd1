"""Subsampling study: seeded pixel samples at each ratio against the exact metrics."""

from vlmrel.anomaly import pipeline
from vlmrel.logs import setup_job_log

setup_job_log(snakemake.log[0])
p = snakemake.params
pipeline.subsampling(
    snakemake.input.logits,
    snakemake.input.get("sml"),
    snakemake.output.summary,
    snakemake.output.trials,
    spec=pipeline.spec_of(p.num_classes, p.anomaly_ids, p.ignore_ids),
    methods=p.methods,
    ratios=p.ratios,
    trials=p.trials,
    seed=p.seed,
    temperature=p.temperature,
    tpr_level=p.tpr_level,
    max_block_mb=p.max_block_mb,
    heat=p.heat,
)
