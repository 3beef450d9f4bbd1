"""An experiment's overall summary over models: reliability (the gate reads one) or ambiguity."""

from vlmrel.logs import setup_job_log
from vlmrel.mcdo import pipeline

setup_job_log(snakemake.log[0])
if snakemake.rule == "mcdo_overall":
    pipeline.reliability_overall(list(snakemake.input), snakemake.output[0])
else:
    pipeline.ambiguity_overall(
        list(snakemake.input),
        snakemake.output[0],
        exp=snakemake.wildcards.exp,
        settings=snakemake.params.settings,
    )
