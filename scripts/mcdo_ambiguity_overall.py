"""exp5's overall summary over models (skipped models keep their reason)."""

from vlmrel.ambiguity import exp5_overall_summary
from vlmrel.io import read_json, write_json
from vlmrel.logs import setup_job_log

setup_job_log(snakemake.log[0])
per_model = {s["model"]: s for s in map(read_json, snakemake.input)}
summary = exp5_overall_summary(per_model, snakemake.params.settings)
summary["experiment"] = snakemake.wildcards.exp
write_json(snakemake.output[0], summary)
