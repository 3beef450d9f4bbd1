"""Phase 3's per-model scores from deterministic features: ridge leverage and last-layer Laplace,
or the degraded versions' aleatoric variance (the job kind is the registry entry's `scores`)."""

import torch

from vlmrel.logs import setup_job_log
from vlmrel.mcdo import pipeline

setup_job_log(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
pipeline.scores_job(
    snakemake.rule,
    dict(snakemake.input.items()),
    snakemake.output[0],
    model=snakemake.wildcards.model,
    **dict(snakemake.params.items()),
)
