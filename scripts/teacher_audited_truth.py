"""Import the audited human truth (a Label Studio export or a ground-truth file)."""

from vlmrel.logs import setup_job_log
from vlmrel.teacher.labelstudio import load_audited
from vlmrel.teacher.truth import TruthMapping

log = setup_job_log(snakemake.log[0])
load_audited(snakemake.input[0], snakemake.output[0], TruthMapping.from_dict(snakemake.params.mapping))
