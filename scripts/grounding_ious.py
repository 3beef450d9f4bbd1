"""IoU of every prediction against the true box (failures NaN, never 0) -> ious.parquet."""

from vlmrel.grounding.pipeline import compute_ious, read_grid
from vlmrel.io import read_json
from vlmrel.logs import setup_job_log

log = setup_job_log(snakemake.log[0])
compute_ious(
    snakemake.input.predictions,
    read_json(snakemake.input.subset),
    read_grid(snakemake.input.grid),
    snakemake.output[0],
)
