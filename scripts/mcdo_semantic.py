"""One MC-dropout trial of the semantic-space experiment: per-image semantic metrics of its passes."""

import torch

from vlmrel.logs import setup_job_log
from vlmrel.mcdo.semantic import semantic_trial

setup_job_log(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
p, w = snakemake.params, snakemake.wildcards
semantic_trial(
    snakemake.input.pixels,
    snakemake.output[0],
    exp=w.exp,
    model=w.model,
    kind=w.kind,
    p=float(w.p),
    k=int(w.k),
    seed=p.seed,
    T=p.T,
    precision=p.precision,
    batch_size=p.batch_size,
    num_images=p.num_images,
    device=p.device,
    prompts=p.prompts,
    class_names=p.class_names,
    prompt_template=p.prompt_template,
)
