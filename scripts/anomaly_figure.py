"""anomaly figures: roc_pr, threshold_sensitivity or subsampling (params.kind)."""

from vlmrel.anomaly import pipeline
from vlmrel.logs import setup_job_log

setup_job_log(snakemake.log[0])
kind, dpi, out = snakemake.params.kind, snakemake.params.dpi, snakemake.output[0]
if kind == "roc_pr":
    pipeline.figure_roc_pr(snakemake.input.histograms, snakemake.input.metrics, out, dpi)
elif kind == "threshold_sensitivity":
    pipeline.figure_threshold(snakemake.input[0], out, dpi)
elif kind == "subsampling":
    pipeline.figure_subsampling(snakemake.input[0], out, dpi)
else:
    raise ValueError(f"unknown anomaly figure {kind!r}")
