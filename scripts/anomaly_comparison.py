"""Method comparison table (every score x metric) as CSV and Markdown."""

from vlmrel.anomaly import pipeline
from vlmrel.logs import setup_job_log

setup_job_log(snakemake.log[0])
pipeline.comparison(
    snakemake.input.metrics, snakemake.input.threshold, snakemake.output.csv, snakemake.output.md
)
