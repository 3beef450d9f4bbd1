"""Per-class max-logit statistics of the validation split (for the standardized max logit)."""

from vlmrel.anomaly import pipeline
from vlmrel.logs import setup_job_log

setup_job_log(snakemake.log[0])
p = snakemake.params
pipeline.sml_stats(
    snakemake.input[0],
    snakemake.output[0],
    pipeline.spec_of(p.num_classes, p.anomaly_ids, p.ignore_ids),
    p.max_block_mb,
)
