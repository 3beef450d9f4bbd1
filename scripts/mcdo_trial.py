"""One MC-dropout trial: T_max stochastic passes per image, trace snapshots at every T."""

import torch

from vlmrel.logs import setup_job_log
from vlmrel.mcdo import run_trial, save_trial
from vlmrel.models import load_encoder
from vlmrel.pixels import iter_batches, read_pixel_meta

log = setup_job_log(snakemake.log[0])
torch.set_num_threads(snakemake.threads)
p, w = snakemake.params, snakemake.wildcards
n_total = read_pixel_meta(snakemake.input.pixels)["n_images"]
n = n_total if p.num_images is None else min(p.num_images, n_total)
if p.num_images is not None and n < p.num_images:
    log.warning("num_images=%d asked, only %d accepted images in %s", p.num_images, n, snakemake.input.pixels)

encoder = load_encoder(w.model, device=p.device, precision=p.precision)
result = run_trial(
    encoder,
    iter_batches(snakemake.input.pixels, p.batch_size, indices=range(n)),
    p=float(w.p),
    seed=p.seed,
    trial=int(w.k),
    T_list=sorted(p.T),
    kind=p.kind,
)
meta = {"experiment": "exp0", "model": w.model, "p": float(w.p), "seed": p.seed, "trial": int(w.k)}
save_trial(snakemake.output[0], result, meta)
log.info("trial %s of %s: %d images, T=%s", w.k, w.model, len(result.image_id), result.T)
