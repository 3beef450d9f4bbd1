"""Per-image logits [N, C] (mean of the valid pixels' logits) and OOD flags from segmentation logits."""

from vlmrel.anomaly import pipeline
from vlmrel.logs import setup_job_log

setup_job_log(snakemake.log[0])
p = snakemake.params
pipeline.image_logits(
    snakemake.input[0],
    snakemake.output[0],
    pipeline.spec_of(p.num_classes, p.anomaly_ids, p.ignore_ids),
    p.max_block_mb,
)
