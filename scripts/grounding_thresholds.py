"""thresholds.json: exact MI optimum per signal vs the seed's L-BFGS-B vs the baseline."""

from vlmrel.grounding.pipeline import compute_thresholds
from vlmrel.logs import setup_job_log

log = setup_job_log(snakemake.log[0])
p = snakemake.params
compute_thresholds(
    snakemake.input.ious,
    snakemake.input.drift[0] if snakemake.input.drift else None,
    snakemake.output[0],
    signal_names=p.signals,
    k=p.k,
    n_bins=p.n_bins,
    binning=p.binning,
    lbfgsb_restarts=p.lbfgsb_restarts,
    seed=p.seed,
)
