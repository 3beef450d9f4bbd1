"""A text-tower trial: MC dropout in the text tower over the seeded prompt sample."""

import torch

from vlmrel.logs import setup_job_log
from vlmrel.mcdo.pipeline import text_trial

setup_job_log(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
p, w = snakemake.params, snakemake.wildcards
text_trial(
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
    device=p.device,
    num_prompts=p.num_prompts,
    class_names=p.class_names,
    prompt_file=p.prompt_file,
)
