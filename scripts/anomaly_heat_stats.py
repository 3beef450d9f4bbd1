"""HEAT: class means and tied covariance of the producer's feature layer over a labelled split (safetensors)."""

from vlmrel.anomaly import pipeline
from vlmrel.logs import setup_job_log

setup_job_log(snakemake.log[0])
p = snakemake.params
pipeline.heat_stats(
    snakemake.input.data,
    snakemake.input.checkpoint,
    snakemake.output[0],
    arch=p.arch,
    num_classes=p.num_classes,
    ignore_ids=p.ignore_ids,
    batch_size=p.batch_size,
    mean=p.mean,
    std=p.std,
    device=p.device,
    threads=snakemake.threads,
    ridge=p.ridge,
)
