"""A rate-search job: the layer-wise dropout-rate search (every candidate's K trials) of one model."""

import torch

from vlmrel.logs import setup_job_log
from vlmrel.mcdo.pipeline import rate_search
from vlmrel.mcdo.spec import TrialSpec

setup_job_log(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
p = snakemake.params
rate_search(
    snakemake.input.pixels,
    snakemake.output[0],
    TrialSpec.from_job(snakemake.wildcards, p),
    trials=p.trials,
    class_names=p.class_names,
    groups=p.groups,
    candidates=p.candidates,
    rate_range=p.rate_range,
    search_fraction=p.search_fraction,
)
