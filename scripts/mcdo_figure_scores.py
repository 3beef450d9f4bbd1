"""Distribution of per-image uncertainty scores for every exp0 model."""

from vlmrel.logs import setup_job_log
from vlmrel.plots import score_distributions
from vlmrel.summary import load_trials

setup_job_log(snakemake.log[0])
trials = [(model, load_trials(snakemake.input[model])) for model in snakemake.params.models]
score_distributions(trials, snakemake.output[0], dpi=snakemake.params.dpi)
