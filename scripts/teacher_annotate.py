"""Annotate every accepted image with the VLM (cached, concurrent, failures recorded): raw.jsonl."""

from vlmrel.logs import setup_job_log
from vlmrel.teacher import pipeline

log = setup_job_log(snakemake.log[0])
pipeline.annotate(
    snakemake.input.manifest,
    snakemake.params.root,
    snakemake.params.vlm,  # redacted: no endpoint secret in .snakemake/metadata
    snakemake.config.get("vlm"),  # the full section, read at run time
    snakemake.output.raw,
    snakemake.output.stats,
)
