"""Summaries of one (experiment, model): reliability across trials, or the experiment's analysis."""

from vlmrel.logs import setup_job_log
from vlmrel.mcdo import pipeline

setup_job_log(snakemake.log[0])
p, w = snakemake.params, snakemake.wildcards
if snakemake.rule == "mcdo_summary":
    pipeline.reliability_summary(
        list(snakemake.input), snakemake.output[0], model=w.model, p=p.p, knee_tol=p.tol
    )
else:
    scores = list(snakemake.input.scores)
    pipeline.experiment_summary(
        w.exp, w.model, pipeline.arms_with_files(p.arms), snakemake.output[0], scores[0] if scores else None
    )
