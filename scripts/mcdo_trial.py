"""One MC-dropout trial (or, for geometry experiments, the covariance geometry of its passes)."""

import torch

from vlmrel.logs import setup_job_log
from vlmrel.mcdo.pipeline import trial
from vlmrel.mcdo.spec import TrialSpec

setup_job_log(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
p = snakemake.params
trial(
    snakemake.input.pixels,
    snakemake.output[0],
    TrialSpec.from_job(snakemake.wildcards, p),
    geometry=p.geometry,
    depthwise=p.depthwise,
)
