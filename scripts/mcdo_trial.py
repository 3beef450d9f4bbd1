"""One MC-dropout trial (or, for geometry experiments, the covariance geometry of its passes)."""

import torch

from vlmrel.logs import setup_job_log
from vlmrel.mcdo.pipeline import trial

setup_job_log(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
p, w = snakemake.params, snakemake.wildcards
trial(
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
    geometry=p.geometry,
    depthwise=p.depthwise,
)
