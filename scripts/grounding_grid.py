"""The perturbation grid from config: id, family, params, magnitude."""

from vlmrel.grounding.pipeline import write_grid
from vlmrel.logs import setup_job_log

log = setup_job_log(snakemake.log[0])
write_grid(snakemake.params.perturbations, snakemake.output[0])
