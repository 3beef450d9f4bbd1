"""Train the scene, attribute and object heads on the embeddings and the auto truth."""

import torch

from vlmrel.logs import setup_job_log
from vlmrel.teacher.heads import train_heads_files

log = setup_job_log(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
p = snakemake.params
train_heads_files(
    snakemake.input.embeddings,
    snakemake.input.truth,
    snakemake.output.heads,
    snakemake.output.card,
    p.mapping,
    {**p.heads, "seed": p.seed},
    model=snakemake.wildcards.model,
)
