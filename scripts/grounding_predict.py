"""Boxes for every (sample, original + perturbation) through the VLM client layer -> predictions.parquet."""

import os

from vlmrel.grounding.pipeline import load_samples, predict, read_grid
from vlmrel.io import read_json
from vlmrel.logs import setup_job_log
from vlmrel.vlm.config import runtime_section

log = setup_job_log(snakemake.log[0])
p = snakemake.params
subset = read_json(snakemake.input.subset)
demo = snakemake.input.dataset[0] if p.data["source"] == "demo" else None
predict(
    dataset=load_samples(p.data, demo, indices=[r["index"] for r in subset["sample_records"]]),
    subset=subset,
    grid=read_grid(snakemake.input.grid),
    vlm_cfg=runtime_section(p.vlm, snakemake.config.get("vlm")),  # params hold no secret
    prompt=p.prompt,
    coords=p.coords,
    use_schema=p.schema,
    seed=p.seed,
    out_path=snakemake.output.predictions,
    stats_path=snakemake.output.stats,
    sim_metadata=[os.path.join(d, "metadata.json") for d in snakemake.input.sim],
    chunk_samples=p.chunk_samples,
    smart_resize=p.smart_resize,
)
