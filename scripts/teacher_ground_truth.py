"""Map the successful annotations of raw.jsonl to ground_truth_auto.jsonl (seed 004's rules)."""

from vlmrel.logs import setup_job_log
from vlmrel.teacher import pipeline

log = setup_job_log(snakemake.log[0])
pipeline.ground_truth(
    snakemake.input[0], snakemake.output.truth, snakemake.output.stats, snakemake.params.mapping
)
