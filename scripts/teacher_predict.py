"""Predictions of the heads for every embedded image."""

from vlmrel.logs import setup_job_log
from vlmrel.teacher.heads import write_predictions

log = setup_job_log(snakemake.log[0])
n = write_predictions(
    snakemake.input.embeddings, snakemake.input.heads, snakemake.input.card, snakemake.output[0]
)
log.info("predictions for %d images", n)
