"""The negative-result note written instead of Phase 2 when the gate says stop."""

from vlmrel.gate import negative_result_note
from vlmrel.io import atomic_path, read_json
from vlmrel.logs import setup_job_log

setup_job_log(snakemake.log[0])
with atomic_path(snakemake.output[0]) as tmp:
    tmp.write_text(negative_result_note(read_json(snakemake.input[0])), encoding="utf-8")
