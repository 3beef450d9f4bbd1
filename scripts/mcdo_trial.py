"""One MC-dropout trial: T_max stochastic passes per image, trace snapshots at every T
(and, for geometry experiments, the per-image covariance geometry of the same passes)."""

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

collector = None
if p.geometry:
    from vlmrel.geometry import GeometryCollector, save_geometry

    collector = GeometryCollector(n, max(p.T))

encoder = load_encoder(w.model, device=p.device, precision=p.precision)
result = run_trial(
    encoder,
    iter_batches(snakemake.input.pixels, p.batch_size, indices=range(n)),
    p=float(w.p),
    seed=p.seed,
    trial=int(w.k),
    T_list=sorted(p.T),
    kind=w.kind,
    on_pass=collector.on_pass if collector else None,
)
meta = {
    "experiment": w.exp,
    "model": w.model,
    "p": float(w.p),
    "seed": p.seed,
    "trial": int(w.k),
    "kind": w.kind,
}
if collector:
    save_geometry(snakemake.output[0], collector.result(), result.image_id, {**result.meta, **meta})
else:
    save_trial(snakemake.output[0], result, meta)
log.info("%s trial %s of %s: %d images, T=%s", w.exp, w.k, w.model, len(result.image_id), result.T)
