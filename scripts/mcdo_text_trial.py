"""A text-tower trial: MC dropout in the text tower over the seeded prompt sample."""

import torch

from vlmrel.logs import setup_job_log
from vlmrel.mcdo.pipeline import text_trial
from vlmrel.mcdo.spec import TrialSpec

setup_job_log(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
p = snakemake.params
text_trial(
    snakemake.output[0],
    TrialSpec.from_job(snakemake.wildcards, p),
    num_prompts=p.num_prompts,
    class_names=p.class_names,
    prompt_file=p.prompt_file,
)
