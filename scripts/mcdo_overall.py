"""exp0's overall summary over models: the input of the go/no-go gate."""

from vlmrel.io import read_json, write_json
from vlmrel.logs import setup_job_log
from vlmrel.summary import overall_summary

log = setup_job_log(snakemake.log[0])
overall = overall_summary([read_json(path) for path in snakemake.input])
write_json(snakemake.output[0], overall)
log.info("exp0 overall best status: %s", overall["best_status"])
