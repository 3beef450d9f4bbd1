"""The seeded human-review sample and its Label Studio tasks (pre-annotated) and labelling config."""

from vlmrel.logs import setup_job_log
from vlmrel.teacher.labelstudio import export_tasks
from vlmrel.teacher.truth import TruthMapping, write_human_sample

log = setup_job_log(snakemake.log[0])
p = snakemake.params
write_human_sample(snakemake.input.truth, snakemake.output.sample, p.size, p.seed)
n = export_tasks(
    snakemake.output.sample,
    snakemake.input.manifest,
    snakemake.output.tasks,
    snakemake.output.label_config,
    TruthMapping.from_dict(p.mapping),
    p.image_url_prefix,
)
log.info("Label Studio: %d tasks", n)
