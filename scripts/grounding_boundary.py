"""boundary.json: geometric (both definitions) and semantic boundary samples, overlap, the seeds' checks."""

from vlmrel.grounding.pipeline import compute_boundary
from vlmrel.logs import setup_job_log

log = setup_job_log(snakemake.log[0])
compute_boundary(
    snakemake.input.ious,
    snakemake.input.drift[0] if snakemake.input.drift else None,
    snakemake.input.thresholds,
    snakemake.output[0],
    source=snakemake.params.source,
    semantic_source=snakemake.params.semantic_source,
    own_thresholds=snakemake.input.own_thresholds[0] if snakemake.input.own_thresholds else None,
    thresholds_subset=snakemake.params.thresholds_subset,
    subset=snakemake.wildcards.subset,
)
