"""The go/no-go gate (seed 002, section 6): after exp0, or after the convergence sweep."""

from vlmrel.logs import setup_job_log
from vlmrel.phases import gate

log = setup_job_log(snakemake.log[0])
inputs = snakemake.input
overall = inputs.overall if "overall" in inputs.keys() else inputs[0]
sweep = inputs.sweep if "sweep" in inputs.keys() else None
decision = gate(overall, snakemake.output[0], force=snakemake.params.force, sweep_path=sweep)
log.info("gate: %s (run Phase 2: %s)", decision["decision"], decision["run_phase2"])
