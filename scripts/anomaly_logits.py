"""Segmentation logits [N, C, H, W] of one split from the configured network and checkpoint.

With HEAT statistics as input, also each image's Mahalanobis map (``mahalanobis`` [N, H, W]).
"""

from vlmrel.anomaly import pipeline
from vlmrel.logs import setup_job_log

setup_job_log(snakemake.log[0])
p = snakemake.params
pipeline.logits(
    snakemake.input.data,
    snakemake.input.checkpoint,
    snakemake.output[0],
    arch=p.arch,
    num_classes=p.num_classes,
    batch_size=p.batch_size,
    mean=p.mean,
    std=p.std,
    dtype=p.dtype,
    device=p.device,
    threads=snakemake.threads,
    heat_stats=snakemake.input.get("heat_stats") or None,
)
