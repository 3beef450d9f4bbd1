"""Predictions of the heads for every embedded image."""

from vlmrel.logs import setup_job_log
from vlmrel.teacher import pipeline

log = setup_job_log(snakemake.log[0])
pipeline.predict(snakemake.input.embeddings, snakemake.input.heads, snakemake.input.card, snakemake.output[0])
