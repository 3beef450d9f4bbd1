"""Annotate every accepted image with the VLM (cached, concurrent, failures recorded): raw.jsonl."""

from vlmrel.logs import setup_job_log
from vlmrel.teacher.annotate import annotate
from vlmrel.vlm.config import runtime_section

log = setup_job_log(snakemake.log[0])
annotate(
    snakemake.input.manifest,
    snakemake.params.root,
    runtime_section(snakemake.params.vlm, snakemake.config.get("vlm")),  # params hold no secret
    snakemake.output.raw,
    stats_path=snakemake.output.stats,
)
