"""Reliability of one model's MC-dropout trace across its K trials, for every T, pre and post
(exp0; the convergence sweep adds the knee where Spearman saturates)."""

from vlmrel.gate import convergence_summary
from vlmrel.io import write_json
from vlmrel.logs import setup_job_log
from vlmrel.summary import load_trials, model_summary

log = setup_job_log(snakemake.log[0])
summary = model_summary(load_trials(list(snakemake.input)), snakemake.wildcards.model, snakemake.params.p)
if snakemake.wildcards.exp == "convergence":
    summary["convergence"] = convergence_summary(summary, tol=snakemake.params.tol)
write_json(snakemake.output[0], summary)
log.info("%s: best status %s at %s", summary["model"], summary["best_status"], summary["best_at"])
