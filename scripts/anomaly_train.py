"""Train the demo's tiny segmentation network on the known classes."""

from vlmrel.anomaly import pipeline
from vlmrel.logs import setup_job_log

setup_job_log(snakemake.log[0])
p = snakemake.params
pipeline.train(
    snakemake.input.train,
    snakemake.input.val,
    snakemake.output.model,
    snakemake.output.record,
    arch=p.arch,
    num_classes=p.num_classes,
    ignore_ids=p.ignore_ids,
    epochs=p.epochs,
    batch_size=p.batch_size,
    lr=p.lr,
    seed=p.seed,
    threads=snakemake.threads,
    mean=p.mean,
    std=p.std,
)
