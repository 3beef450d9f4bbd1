"""eval.json: the heads against the audited human truth, or the auto truth (and it says which)."""

from vlmrel.logs import setup_job_log
from vlmrel.teacher import pipeline

log = setup_job_log(snakemake.log[0])
pipeline.evaluate(
    snakemake.input.predictions,
    snakemake.input.truth,
    snakemake.params.truth_kind,
    snakemake.input.card,
    snakemake.output[0],
)
