"""Teacher figures: scene confusion matrix and per-attribute precision/recall/F1."""

from vlmrel.logs import setup_job_log
from vlmrel.teacher import pipeline

log = setup_job_log(snakemake.log[0])
pipeline.figures(
    snakemake.input[0], snakemake.output.confusion, snakemake.output.attributes, snakemake.params.dpi
)
