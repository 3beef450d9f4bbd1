"""The ablation pixel file: natural images and their degraded versions, degraded after the crop."""

from vlmrel.logs import setup_job_log
from vlmrel.mcdo.aleatoric import write_ablation_pixels

setup_job_log(snakemake.log[0])
p = snakemake.params
write_ablation_pixels(
    snakemake.input.manifest,
    p.root,
    p.spec,
    snakemake.output[0],
    ablation=p.ablation,
    seed=p.seed,
    num_images=p.num_images,
)
