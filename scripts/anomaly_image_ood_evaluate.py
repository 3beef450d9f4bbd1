"""Image-level OOD: exact metrics of the per-image scores, pooled and per OOD group."""

from vlmrel.anomaly.image_ood import evaluate
from vlmrel.logs import setup_job_log

setup_job_log(snakemake.log[0])
p = snakemake.params
evaluate(
    snakemake.input[0],
    snakemake.output.metrics,
    snakemake.output.per_image,
    methods=p.methods,
    temperature=p.temperature,
    tpr_level=p.tpr_level,
)
