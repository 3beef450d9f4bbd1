"""thresholds.json, boundary.json and the seeds' checks as HTML tables for the report."""

from vlmrel.grounding.tables import write_tables
from vlmrel.logs import setup_job_log

log = setup_job_log(snakemake.log[0])
write_tables(
    snakemake.input.thresholds,
    snakemake.input.boundary,
    snakemake.output.thresholds,
    snakemake.output.boundary,
    snakemake.output.checks,
)
