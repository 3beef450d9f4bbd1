"""boundary.json: boundary samples under both definitions, severity, rates by difficulty, Spearman."""

from vlmrel.grounding.pipeline import compute_boundary
from vlmrel.logs import setup_job_log

log = setup_job_log(snakemake.log[0])
compute_boundary(
    snakemake.input.ious,
    snakemake.input.drift[0] if snakemake.input.drift else None,
    snakemake.input.thresholds,
    snakemake.output[0],
    source=snakemake.params.source,
)
