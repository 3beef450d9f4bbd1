"""Copy the demo photos out of the installed scikit-image, scikit-learn and matplotlib wheels."""

from vlmrel.images import materialize_demo
from vlmrel.logs import setup_job_log

log = setup_job_log(snakemake.log[0])
paths = materialize_demo(snakemake.output[0])
log.info("demo set: %d images in %s", len(paths), snakemake.output[0])
