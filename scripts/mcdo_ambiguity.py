"""Ambiguity for one model: MC-dropout uncertainty against zero-shot ambiguity (entropy, margin)."""

import torch

from vlmrel.logs import setup_job_log
from vlmrel.mcdo.pipeline import ambiguity

log = setup_job_log(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
p = snakemake.params
summary = ambiguity(
    list(snakemake.input.trials),
    snakemake.input.pixels,
    snakemake.wildcards.model,
    class_names=p.class_names,
    prompt_template=p.prompt_template,
    high_entropy_quantile=p.high_entropy_quantile,
    precision=p.precision,
    batch_size=p.batch_size,
    device=p.device,
    summary_path=snakemake.output.summary,
    per_image_path=snakemake.output.per_image,
    manifest=snakemake.input.manifest,
    class_map=p.class_map,
)
log.info("%s: %s", snakemake.wildcards.model, summary.get("reason") or "evaluated")
