"""A seeded subset stratified by difficulty (or a reused one), saved as indices."""

from vlmrel.grounding.pipeline import load_samples, make_subset
from vlmrel.logs import setup_job_log

log = setup_job_log(snakemake.log[0])
p = snakemake.params
demo = snakemake.input.dataset[0] if p.data["source"] == "demo" else None
samples = load_samples(p.data, demo, keep_images=False)
make_subset(
    samples,
    snakemake.output[0],
    name=snakemake.wildcards.subset,
    n=p.n,
    seed=p.seed,
    allocation=p.allocation,
    thresholds=p.difficulty,
    expression_index=p.data["expression_index"],
    indices_file=snakemake.input.indices[0] if snakemake.input.indices else None,
    exclude_file=snakemake.input.exclude[0] if snakemake.input.exclude else None,
)
