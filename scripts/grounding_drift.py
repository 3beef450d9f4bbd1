"""Semantic drift: embedding distance between the model's original and perturbed answers
(and, optionally, between image embeddings of the predicted regions)."""

from vlmrel.grounding.pipeline import compute_drift, load_samples, read_grid
from vlmrel.io import read_json
from vlmrel.logs import setup_job_log
from vlmrel.vlm.config import runtime_section

log = setup_job_log(snakemake.log[0])
p = snakemake.params
subset = read_json(snakemake.input.subset)
dataset = None
if p.region["enabled"]:
    demo = snakemake.input.dataset[0] if p.data["source"] == "demo" else None
    dataset = load_samples(p.data, demo, indices=[r["index"] for r in subset["sample_records"]])
compute_drift(
    snakemake.input.predictions,
    subset,
    read_grid(snakemake.input.grid),
    snakemake.output.drift,
    snakemake.output.summary,
    embedder_cfg=p.embedder,
    text=p.text,
    vlm_cfg=runtime_section(p.vlm, snakemake.config.get("vlm")),  # params hold no secret
    region=p.region,
    dataset=dataset,
    seed=p.seed,
)
