"""An experiment's overall summary over models: reliability (the gate reads one), ambiguity, or the
registry entry's own analysis over models."""

from vlmrel.logs import setup_job_log
from vlmrel.mcdo import pipeline

setup_job_log(snakemake.log[0])
if snakemake.rule == "mcdo_overall":
    pipeline.reliability_overall(list(snakemake.input), snakemake.output[0])
elif snakemake.rule == "mcdo_experiment_overall":
    runs = {m: list(snakemake.input[m]) for m in snakemake.params.models}
    pipeline.experiment_overall(snakemake.wildcards.exp, runs, snakemake.output[0])
else:
    pipeline.ambiguity_overall(
        list(snakemake.input),
        snakemake.output[0],
        exp=snakemake.wildcards.exp,
        settings=snakemake.params.settings,
    )
