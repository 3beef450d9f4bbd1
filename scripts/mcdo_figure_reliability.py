"""Reliability (Spearman, ICC, SNR) against T for one model."""

from vlmrel.io import read_json
from vlmrel.logs import setup_job_log
from vlmrel.plots import reliability_vs_T

setup_job_log(snakemake.log[0])
reliability_vs_T(read_json(snakemake.input[0]), snakemake.output[0], dpi=snakemake.params.dpi)
