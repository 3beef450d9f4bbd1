"""One MC-dropout trial of the semantic-space experiment: per-image semantic metrics of its passes."""

import torch

from vlmrel.logs import setup_job_log
from vlmrel.mcdo.semantic import semantic_trial
from vlmrel.mcdo.spec import TrialSpec

setup_job_log(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
p = snakemake.params
semantic_trial(
    snakemake.input.pixels,
    snakemake.output[0],
    TrialSpec.from_job(snakemake.wildcards, p),
    prompts=p.prompts,
    class_names=p.class_names,
    prompt_template=p.prompt_template,
)
