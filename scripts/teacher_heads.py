"""Train the scene, attribute and object heads on the embeddings and the auto truth."""

from vlmrel.logs import setup_job_log
from vlmrel.teacher import pipeline

log = setup_job_log(snakemake.log[0])
p = snakemake.params
pipeline.heads(
    snakemake.input.embeddings,
    snakemake.input.truth,
    snakemake.output.heads,
    snakemake.output.card,
    mapping=p.mapping,
    heads_cfg=p.heads,
    seed=p.seed,
    model=snakemake.wildcards.model,
    threads=snakemake.threads,
)
