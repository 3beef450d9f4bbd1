"""Image-level OOD: a classifier's logits on the real photos (in-distribution), textures and generated images."""

import torch

from vlmrel.anomaly.image_ood import write_logits
from vlmrel.logs import setup_job_log

setup_job_log(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
p = snakemake.params
write_logits(
    snakemake.input.manifest,
    p.root,
    snakemake.output[0],
    model=snakemake.wildcards.model,
    textures=p.textures,
    kinds=p.kinds,
    n=p.n,
    seed=p.seed,
    precision=p.precision,
    batch_size=p.batch_size,
    device=p.device,
)
