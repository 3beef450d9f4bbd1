"""Summary of one (experiment, model): exp0b geometry, exp4 recipes, exp1 rates, exp2 synthetic, exp3 kinds."""

from vlmrel.io import write_json
from vlmrel.logs import setup_job_log
from vlmrel.phases import experiment_summary

setup_job_log(snakemake.log[0])
w = snakemake.wildcards
groups = {name: list(files) for name, files in snakemake.input.items()} or {"trials": list(snakemake.input)}
write_json(snakemake.output[0], experiment_summary(w.exp, w.model, groups))
