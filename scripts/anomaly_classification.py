"""Classification OOD: exact pooled metrics over images from per-image logits."""

from vlmrel.anomaly import pipeline
from vlmrel.logs import setup_job_log

setup_job_log(snakemake.log[0])
p = snakemake.params
pipeline.classification(
    snakemake.input.test,
    snakemake.input.get("val"),
    snakemake.output[0],
    num_classes=p.num_classes,
    methods=p.methods,
    temperature=p.temperature,
    tpr_level=p.tpr_level,
)
