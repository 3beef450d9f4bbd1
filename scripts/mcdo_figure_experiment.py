"""Figures of the Phase 1/2 experiments (convergence, geometry, recipes, rates, synthetic, kinds, ambiguity)."""

from vlmrel.logs import setup_job_log
from vlmrel.phases import experiment_figure

setup_job_log(snakemake.log[0])
w, inputs = snakemake.wildcards, snakemake.input
named = set(inputs.keys())
exp = w.get("exp", "convergence")
if snakemake.rule == "mcdo_figure_geometry":
    experiment_figure(
        exp, None, snakemake.output[0], runs_by_model={m: inputs[m] for m in named}, dpi=snakemake.params.dpi
    )
else:
    experiment_figure(
        exp,
        w.model,
        snakemake.output[0],
        summary=inputs.summary if "summary" in named else inputs[0],
        runs=list(inputs.runs) if "runs" in named else [],
        per_image=inputs.per_image if "per_image" in named else None,
        dpi=snakemake.params.dpi,
    )
