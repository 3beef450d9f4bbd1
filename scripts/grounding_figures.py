"""The six-panel validation figure, the threshold comparison and the request timing figure."""

from vlmrel.grounding.pipeline import make_figures
from vlmrel.logs import setup_job_log

log = setup_job_log(snakemake.log[0])
i, o, p = snakemake.input, snakemake.output, snakemake.params
make_figures(
    ious=i.ious,
    drift=i.drift[0] if i.drift else None,
    thresholds=i.thresholds,
    boundary=i.boundary,
    predictions=i.predictions,
    stats=i.stats,
    validation_png=o.validation,
    thresholds_png=o.thresholds,
    timing_png=o.timing,
    definition=p.definition,
    dpi=p.dpi,
)
