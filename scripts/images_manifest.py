"""Scan the image source and write the manifest (bad files are rejected with a reason, not fatal)."""

from vlmrel.images import build_manifest, list_images
from vlmrel.logs import setup_job_log

log = setup_job_log(snakemake.log[0])
p = snakemake.params
if p.source == "demo":
    paths = list_images(p.root)
else:
    paths = list_images(p.root, p.glob, p.limit, p.subset_seed)
manifest = build_manifest(p.root, paths, snakemake.output[0], max_pixels=p.max_pixels)
rejected = manifest[manifest["status"] != "ok"]
log.info(
    "manifest: %d images, %d accepted, %d rejected",
    len(manifest),
    len(manifest) - len(rejected),
    len(rejected),
)
for row in rejected.itertuples():
    log.warning("rejected %s: %s", row.rel_path, row.reason)
