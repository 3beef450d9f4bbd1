"""mcdo figures: one kind per rule (reliability, scores, sweep knee, geometry, ambiguity) or the
experiment's own figure from the registry."""

from vlmrel.logs import setup_job_log
from vlmrel.mcdo import pipeline

setup_job_log(snakemake.log[0])
w, inputs, out, dpi = snakemake.wildcards, snakemake.input, snakemake.output[0], snakemake.params.dpi
rule = snakemake.rule
if rule == "mcdo_figure_reliability":
    pipeline.reliability_figure(inputs[0], out, dpi=dpi)
elif rule == "mcdo_figure_scores":
    pipeline.scores_figure({m: inputs[m] for m in snakemake.params.models}, out, dpi=dpi)
elif rule == "mcdo_figure_convergence":
    pipeline.convergence_figure(inputs[0], out, dpi=dpi)
elif rule == "mcdo_figure_geometry":
    pipeline.geometry_figure({m: inputs[m] for m in snakemake.params.models}, out, dpi=dpi)
elif rule == "mcdo_figure_overall":
    pipeline.overall_figure(w.exp, inputs[0], out, dpi=dpi)
elif rule == "mcdo_figure_ambiguity":
    pipeline.ambiguity_figure(w.exp, w.model, inputs.summary, inputs.per_image, out, dpi=dpi)
else:
    scores = list(inputs.scores)
    pipeline.experiment_figure(
        w.exp,
        w.model,
        inputs.summary,
        pipeline.arms_with_files(snakemake.params.arms),
        out,
        dpi=dpi,
        scores=scores[0] if scores else None,
    )
