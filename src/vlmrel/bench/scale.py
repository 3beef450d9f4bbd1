"""Benchmark: how manifest -> pixels -> one MC trial scale with the number of images.

Generates N seeded JPEG photos of ImageNet-like sizes (500x375, 375x500, 500x333, 500x500,
640x480, ... with varied aspect ratios), then times, for each N, the functions the rules call:

- ``manifest``: :func:`vlmrel.images.list_images` + :func:`vlmrel.images.build_manifest`
  (``rules/images.smk``'s manifest job);
- ``pixels``: :func:`vlmrel.pixels.write_pixels` at the model's preprocessing (the pixels job);
- ``read``: one pass of :func:`vlmrel.pixels.prefetch_batches` over the pixel file (what a trial
  reads, without the model);
- ``trial``: :func:`vlmrel.mcdo.pipeline.trial`, one MC-dropout trial of T passes (the
  ``mcdo_trial`` job).

It prints seconds per image for each stage, the pixel file's bytes per image, and the fitted
exponent b of t = a * N^b for each stage (least squares of log t on log N): a stage that scales
linearly has b close to 1. Goals: every exponent <= 1.05, <= 0.16 MB per image at 224 px.
Wall time is what the goals judge; on a shared machine other processes' load moves it, so the
process's CPU time and its exponent are given too, and ``--repeats`` keeps the least of R runs.

The default model is ``tiny_clip`` rebuilt at 224 px (open_clip's tiny ViT config with
``image_size`` 224 and patch 32, seeded random weights, CLIP preprocessing: the pixel file is the one a
CLIP-224 model such as ``clip_b32`` would read), registered for the run only as
``scale_tiny_clip224``; ``--model`` picks any registry model instead.

    python -m vlmrel.bench scale --json [--n 250 1000 4000] [--model NAME] [--T 2] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from vlmrel.bench import loadavg

#: ImageNet-like (width, height) sizes: most ImageNet val photos are 500 px on the long side.
PHOTO_SIZES = ((500, 375), (375, 500), (500, 333), (500, 500), (640, 480), (333, 500), (500, 281), (400, 300))
BENCH_MODEL = "scale_tiny_clip224"


def generate_photos(folder: str | os.PathLike[str], n: int, seed: int = 0, quality: int = 90) -> list[Path]:
    """``n`` seeded JPEG photos in ``folder`` (``photo00000.jpg``, ...): smooth colour fields with
    edges and sensor-like noise, at the sizes of :data:`PHOTO_SIZES`; photo i depends on (seed, i) only."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        w, h = PHOTO_SIZES[int(rng.integers(len(PHOTO_SIZES)))]
        coarse = rng.uniform(0, 255, (int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3)).astype(np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
        yy, xx = np.ogrid[0:h, 0:w]
        freq = np.float32(2 * np.pi * rng.uniform(2, 30) / w)
        stripes = np.float32(40 * rng.uniform(0, 1)) * np.sin(
            freq * (xx * np.float32(np.cos(i)) + yy * np.float32(np.sin(i)))
        )
        noise = rng.standard_normal((h, w, 3), dtype=np.float32) * np.float32(rng.uniform(2, 12))
        arr = np.clip(field + stripes[..., None] + noise, 0, 255).astype(np.uint8)
        path = folder / f"photo{i:05d}.jpg"
        Image.fromarray(arr).save(path, quality=quality)
        paths.append(path)
    return paths


@contextlib.contextmanager
def bench_model(size: int) -> Iterator[str]:
    """``tiny_clip`` rebuilt at ``size`` px, registered as :data:`BENCH_MODEL` while the context lasts."""
    from vlmrel import models

    base = models.REGISTRY["tiny_clip"]
    config = json.loads(json.dumps(base.config))
    config["vision_cfg"]["image_size"] = int(size)
    config["vision_cfg"]["patch_size"] = 32 if size % 32 == 0 else 16  # 49 patches at 224 px
    models.REGISTRY[BENCH_MODEL] = dataclasses.replace(
        base,
        name=BENCH_MODEL,
        preprocess=models._clip_preprocess(int(size)),
        config=config,
        description=f"tiny_clip at {size} px, patch {config['vision_cfg']['patch_size']} (benchmark only)",
    )
    try:
        yield BENCH_MODEL
    finally:
        models.REGISTRY.pop(BENCH_MODEL, None)


def fit_exponent(ns: list[int], seconds: list[float]) -> float:
    """The slope of log(seconds) against log(N) (least squares): t ~ N^slope."""
    if len(ns) < 2:
        return float("nan")
    return float(np.polyfit(np.log(np.asarray(ns, float)), np.log(np.maximum(seconds, 1e-9)), 1)[0])


def _best_of(repeats: int, fn: Any) -> tuple[float, float]:
    """(wall, CPU) seconds of ``fn()``, each the least over ``repeats`` runs (CPU time counts every
    thread of the process; it barely moves when other processes load the machine)."""
    wall, cpu = float("inf"), float("inf")
    for _ in range(max(1, int(repeats))):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall, cpu = min(wall, time.perf_counter() - w0), min(cpu, time.process_time() - c0)
    return wall, cpu


def run_one(
    src: Path, work: Path, n: int, model: str, T: int, batch_size: int, p: float, repeats: int = 1
) -> dict[str, Any]:
    """The four stages on the first ``n`` photos of ``src`` in a fresh folder under ``work``, each
    the best of ``repeats`` runs."""
    from vlmrel.images import build_manifest, list_images
    from vlmrel.mcdo.pipeline import trial
    from vlmrel.mcdo.spec import TrialSpec
    from vlmrel.models import preprocess_spec
    from vlmrel.pixels import prefetch_batches, preproc_key, write_pixels

    root = work / f"n{n}" / "images"
    root.mkdir(parents=True)
    for path in sorted(src.iterdir())[:n]:
        os.link(path, root / path.name)
    manifest = work / f"n{n}" / "manifest.tsv"
    spec = preprocess_spec(model)
    pixels_h5 = work / f"n{n}" / "pixels" / f"{preproc_key(spec)}.h5"
    timed: dict[str, tuple[float, float]] = {}

    timed["manifest"] = _best_of(repeats, lambda: build_manifest(root, list_images(root), manifest))
    timed["pixels"] = _best_of(repeats, lambda: write_pixels(manifest, root, spec, pixels_h5, progress=False))

    def read() -> None:
        rows = sum(len(ids) for ids, _ in prefetch_batches(pixels_h5, batch_size))
        if rows != n:
            raise RuntimeError(f"read {rows} rows of {pixels_h5}, expected {n}")

    timed["read"] = _best_of(repeats, read)
    timed["trial"] = _best_of(
        repeats,
        lambda: trial(
            pixels_h5,
            work / f"n{n}" / "trial0.npz",
            TrialSpec(
                exp="scale",
                model=model,
                kind="input",
                p=p,
                k=0,
                seed=0,
                T=[T],
                precision="fp32",
                batch_size=batch_size,
                device="cpu",
            ),
        ),
    )
    seconds = {k: v[0] for k, v in timed.items()}
    cpu_seconds = {k: v[1] for k, v in timed.items()}
    size = pixels_h5.stat().st_size
    shutil.rmtree(root)  # the links; the next N gets its own
    return {"n": n, "seconds": seconds, "cpu_seconds": cpu_seconds, "pixel_file_bytes": size}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlmrel.bench scale", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--n", type=int, nargs="+", default=[250, 1000, 4000], help="image counts")
    parser.add_argument("--model", default=None, help=f"registry model (default: {BENCH_MODEL})")
    parser.add_argument("--size", type=int, default=224, help="image size of the default model")
    parser.add_argument("--T", type=int, default=2, help="passes of the trial")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--p", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0, help="photo generation seed")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each stage; the least time counts")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)
    ns = sorted({int(n) for n in args.n})
    if ns[0] < 1:
        parser.error("--n: image counts must be positive")

    import torch

    from vlmrel.models import get_spec, preprocess_spec

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        model = args.model or stack.enter_context(bench_model(args.size))
        spec = preprocess_spec(model)
        description = get_spec(model).description
        work = Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="vlmrel-scale-", dir=args.workdir))
        )
        t0 = time.perf_counter()
        generate_photos(work / "photos", ns[-1], args.seed)
        gen_s = time.perf_counter() - t0
        runs = [
            run_one(work / "photos", work, n, model, args.T, args.batch_size, args.p, args.repeats)
            for n in ns
        ]
    stages = {}
    for stage in ("manifest", "pixels", "read", "trial"):
        secs = [r["seconds"][stage] for r in runs]
        cpu = [r["cpu_seconds"][stage] for r in runs]
        stages[stage] = {
            "seconds": [round(s, 3) for s in secs],
            "seconds_per_image": [round(s / r["n"], 6) for s, r in zip(secs, runs, strict=True)],
            "exponent": round(fit_exponent(ns, secs), 3),
            "cpu_seconds": [round(s, 3) for s in cpu],
            "cpu_exponent": round(fit_exponent(ns, cpu), 3),
        }
    bytes_per_image = [r["pixel_file_bytes"] / r["n"] for r in runs]
    mb = bytes_per_image[-1] / 1e6
    mb_224 = mb * (224 / spec["size"]) ** 2
    out = {
        "benchmark": "scale",
        "model": model,
        "model_description": description,
        "image_size": spec["size"],
        "T": args.T,
        "batch_size": args.batch_size,
        "p": args.p,
        "threads": args.threads,
        "n": ns,
        "photo_sizes": [f"{w}x{h}" for w, h in PHOTO_SIZES],
        "generate_seconds": round(gen_s, 2),
        "stages": stages,
        "pixel_bytes_per_image": [round(b, 1) for b in bytes_per_image],
        "pixel_mb_per_image_at_224": round(mb_224, 4),
        "goals": {"max_exponent": 1.05, "max_mb_per_image_at_224": 0.16},
        "goals_met": bool(all(s["exponent"] <= 1.05 for s in stages.values()) and mb_224 <= 0.16),
        "goals_met_cpu_time": bool(
            all(s["cpu_exponent"] <= 1.05 for s in stages.values()) and mb_224 <= 0.16
        ),
        "repeats": args.repeats,
        "total_seconds": round(time.perf_counter() - started, 1),
        "load_average": loadavg(),
    }
    if args.json:
        print(json.dumps(out))
    else:
        for stage, s in stages.items():
            print(
                f"{stage:9s} s/image {s['seconds_per_image']}  exponent {s['exponent']} (CPU {s['cpu_exponent']})"
            )
        print(f"pixel file: {bytes_per_image[-1]:.0f} bytes/image ({mb_224:.4f} MB at 224 px)")
        print(f"goals met: {out['goals_met']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
