"""The MOT association experiment: the generated demo cost JSON, the association study, or its figure."""

from vlmrel.logs import setup_job_log
from vlmrel.mcdo import mot

setup_job_log(snakemake.log[0])
p = snakemake.params
if snakemake.rule == "mcdo_mot_demo":
    mot.write_demo(snakemake.output[0], seed=p.seed, **p.demo)
elif snakemake.rule == "mcdo_mot":
    out = snakemake.output
    mot.mot_job(
        snakemake.input.costs, out.summary, out.arrays, alpha=p.alpha, beta=p.beta, gate_cost=p.gate_cost
    )
else:
    from vlmrel.io import read_json

    mot.mot_figure(read_json(snakemake.input.summary), snakemake.input.arrays, snakemake.output[0], p.dpi)
