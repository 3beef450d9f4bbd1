"""Preprocess every accepted image once into pixels/{preproc}.h5, shared by models with that preprocessing."""

from vlmrel.logs import setup_job_log
from vlmrel.pixels import write_pixels

setup_job_log(snakemake.log[0])
write_pixels(snakemake.input.manifest, snakemake.params.root, snakemake.params.spec, snakemake.output[0])
