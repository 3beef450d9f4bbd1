"""Import the audited human truth (a Label Studio export or a ground-truth file)."""

from vlmrel.logs import setup_job_log
from vlmrel.teacher import pipeline

log = setup_job_log(snakemake.log[0])
pipeline.audited_truth(snakemake.input[0], snakemake.output[0], snakemake.params.mapping)
