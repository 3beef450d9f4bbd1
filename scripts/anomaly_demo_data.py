"""Synthetic demo scenes (train/val/test) for the anomaly chain."""

from vlmrel.anomaly import pipeline
from vlmrel.logs import setup_job_log

setup_job_log(snakemake.log[0])
p = snakemake.params
pipeline.demo_data(
    {"train": snakemake.output.train, "val": snakemake.output.val, "test": snakemake.output.test},
    seed=p.seed,
    image_size=p.image_size,
    sizes={"train": p.n_train, "val": p.n_val, "test": p.n_test},
    anomaly_fraction=p.anomaly_fraction,
)
