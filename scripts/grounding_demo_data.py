"""Generated grounding scenes (SYNTHETIC) as RefCOCO-layout parquet, plus the simulator's metadata."""

from vlmrel.grounding.pipeline import prepare_demo
from vlmrel.logs import setup_job_log

log = setup_job_log(snakemake.log[0])
p = snakemake.params
prepare_demo(snakemake.output.parquet, snakemake.output.sim, p.n, p.seed, p.size)
