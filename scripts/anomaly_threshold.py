"""Threshold sensitivity around the F1-optimal threshold, from the exact histograms."""

from vlmrel.anomaly import pipeline
from vlmrel.logs import setup_job_log

setup_job_log(snakemake.log[0])
pipeline.threshold(
    snakemake.input[0], snakemake.output.tsv, snakemake.output.json, offsets=snakemake.params.offsets
)
