"""Pixels of natural images and their synthetic versions (noise, flat colour, blur, shuffled patches)."""

from vlmrel.logs import setup_job_log
from vlmrel.mcdo.pipeline import write_synthetic_pixels

setup_job_log(snakemake.log[0])
p = snakemake.params
write_synthetic_pixels(
    snakemake.input.manifest,
    p.root,
    p.spec,
    snakemake.output[0],
    kinds=p.kinds,
    seed=p.seed,
    blur_frac=p.blur_frac,
    shuffle_grid=p.shuffle_grid,
    num_images=p.num_images,
)
