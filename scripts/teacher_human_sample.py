"""The seeded human-review sample and its Label Studio tasks (pre-annotated) and labelling config."""

from vlmrel.logs import setup_job_log
from vlmrel.teacher import pipeline

log = setup_job_log(snakemake.log[0])
p = snakemake.params
pipeline.human_sample(
    snakemake.input.truth,
    snakemake.input.manifest,
    snakemake.output.sample,
    snakemake.output.tasks,
    snakemake.output.label_config,
    size=p.size,
    seed=p.seed,
    image_url_prefix=p.image_url_prefix,
    mapping=p.mapping,
)
