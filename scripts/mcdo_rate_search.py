"""A rate-search job: the layer-wise dropout-rate search (every candidate's K trials) of one model."""

import torch

from vlmrel.logs import setup_job_log
from vlmrel.mcdo.pipeline import rate_search

setup_job_log(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
p, w = snakemake.params, snakemake.wildcards
rate_search(
    snakemake.input.pixels,
    snakemake.output[0],
    exp=w.exp,
    model=w.model,
    kind=w.kind,
    p=float(w.p),
    seed=p.seed,
    T=p.T,
    trials=p.trials,
    precision=p.precision,
    batch_size=p.batch_size,
    num_images=p.num_images,
    device=p.device,
    class_names=p.class_names,
    groups=p.groups,
    candidates=p.candidates,
    rate_range=p.rate_range,
    search_fraction=p.search_fraction,
)
