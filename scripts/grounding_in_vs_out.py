"""In-sample vs out-of-sample boundary rates side by side (the subsets checked disjoint)."""

from vlmrel.grounding.tables import write_in_vs_out
from vlmrel.logs import setup_job_log

log = setup_job_log(snakemake.log[0])
write_in_vs_out(
    snakemake.input.validation,
    snakemake.input.threshold[0] if snakemake.input.threshold else None,
    list(snakemake.input.subsets),
    snakemake.output.json,
    snakemake.output.html,
)
