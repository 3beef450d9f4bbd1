"""The go/no-go gate (seed 002, section 6): after Phase 1, or after the sweep it asked for; and the
negative-result note written instead of the later phases when it says stop."""

from vlmrel.logs import setup_job_log
from vlmrel.mcdo import pipeline

setup_job_log(snakemake.log[0])
inputs = snakemake.input
if snakemake.rule == "mcdo_phase2_note":
    pipeline.phase_note(inputs[0], snakemake.output[0])
elif snakemake.rule == "mcdo_phase3_note":
    pipeline.phase3_note(inputs[0], snakemake.output[0])
else:
    sweep = inputs.sweep if "sweep" in inputs.keys() else None
    pipeline.gate(
        inputs.overall,
        snakemake.output[0],
        force=snakemake.params.force,
        sweep_path=sweep,
        check_paths=list(inputs.checks),
    )
