"""Benchmark: MC-dropout trial throughput on ViT-B/32 at 224 px (seeded random weights).

Compares, in one process, on the same images and the same dropout masks, for the workflow's
default dropout kind (``output``; ``--kind`` picks another):

(a) seed 002's reference loop: fp32 model, features moved to CPU float64 after every pass,
    variance as sumsq/T - mean^2;
(b) vlmrel's default path: :func:`vlmrel.mcdo.run_trial` on a bf16 model.

Also measures the device's fp32 and bf16 matmul peak (best of several n x n products, measured
before and after the timed runs; the larger is used, so a quiet moment during either raises the
peak, never the fraction), the per-image ranking agreement of (b) with a float64 computation
under identical masks, and (``--also-kinds``, default ``input``) vlmrel's throughput for other
kinds (no reference loop for those).

``--device cuda`` runs everything on the GPU (``torch.cuda.synchronize`` around every timing,
the matmul peak at n = 8192) and reports the same keys plus ``device_name``; without a visible
CUDA device it exits with an error. The load average (``loadavg``) is recorded: on a shared
machine the timed runs and the peak can see different contention (``fraction_of_peak`` is
vlmrel's sustained rate against the best burst, so contention lowers it).

    python -m vlmrel.bench mcdo --json [--images 48] [--passes 8] [--batch-size 32] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from typing import Any

import numpy as np

from vlmrel.bench import loadavg


def vit_flops_per_image(
    image_size: int, patch: int, width: int, layers: int, mlp_ratio: float, out_dim: int
) -> float:
    """Forward FLOPs (2 x multiply-adds) of an open_clip ViT image tower for one image."""
    grid = (image_size // patch) ** 2
    tokens = grid + 1
    mlp = int(width * mlp_ratio)
    patch_embed = 2 * grid * (3 * patch * patch) * width
    linear = 2 * tokens * (3 * width * width + width * width + 2 * width * mlp)
    attention = 2 * 2 * tokens * tokens * width  # QK^T and AV
    return float(patch_embed + layers * (linear + attention) + 2 * width * out_dim)


def synchronize(device: Any) -> None:
    """Wait for ``device``'s queued work (a no-op on the CPU): call around every timing."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def matmul_peak(dtype_name: str, n: int = 2048, repeats: int = 8, device: Any = "cpu") -> float:
    """Best-of-``repeats`` GFLOP/s of an n x n matmul in ``dtype_name`` on ``device``."""
    import torch

    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    a @ b
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e9


def device_name(device: Any) -> str:
    """The GPU's name (``torch.cuda.get_device_name``), or the CPU's model name."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return str(torch.cuda.get_device_name(dev))
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def check_device(device: str) -> str | None:
    """Why ``device`` cannot run this benchmark (None when it can)."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        return f"--device {device!r}: {exc}"
    if dev.type == "cpu":
        return None
    if dev.type != "cuda":
        return f"--device {device!r}: only cpu and cuda are supported"
    if not torch.cuda.is_available():
        built = torch.version.cuda or "none"
        return (
            f"--device {device}: no CUDA device is available (torch {torch.__version__}, "
            f"built with CUDA {built}, torch.cuda.device_count() = {torch.cuda.device_count()})"
        )
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        return f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)"
    return None


def synthetic_images(n: int, size: int, seed: int) -> np.ndarray:
    """Varied normalised images: smooth fields, edges and noise of image-dependent strength."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, size, size), dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for i in range(n):
        coarse = rng.standard_normal((3, 8, 8)).astype(np.float32)
        smooth = np.kron(coarse, np.ones((size // 8, size // 8), dtype=np.float32))
        freq = rng.uniform(1, 20)
        stripes = np.sin(2 * np.pi * freq * (xx * np.cos(i) + yy * np.sin(i)))[None]
        noise = rng.standard_normal((3, size, size)).astype(np.float32)
        w = rng.dirichlet([1.0, 1.0, 1.0])
        img = w[0] * smooth + w[1] * stripes + w[2] * noise * rng.uniform(0.1, 2.0)
        out[i] = img * rng.uniform(0.3, 1.5)
    return out


def reference_loop(
    encoder: Any,
    batches: list[tuple[list[str], np.ndarray]],
    p: float,
    seed: int,
    T: int,
    kind: str = "output",
) -> np.ndarray:
    """Seed 002's pattern: fp32 passes, per-pass .cpu().double(), sum/sumsq accumulation.

    The masks are run_trial's (same generator seeding per batch and pass) at the dropout site
    ``kind``.
    """
    import torch

    from vlmrel.mcdo.dropout import inject_dropout, pass_seed

    generator = torch.Generator().manual_seed(seed)
    traces = []
    with inject_dropout(encoder.vision, p, generator, kind):
        for b, (_ids, pixels) in enumerate(batches):
            x = encoder.prepare(pixels)
            s = sq = None
            for t in range(T):
                generator.manual_seed(pass_seed(seed, 0, b, t))
                f = encoder.encode_image(x).cpu().to(torch.float64)
                s = f.clone() if s is None else s + f
                sq = f * f if sq is None else sq + f * f
            assert s is not None and sq is not None
            var = sq / T - (s / T) ** 2
            traces.append((var.sum(1) / var.shape[1]).numpy())
    return np.concatenate(traces)


def main(argv: list[str] | None = None) -> int:
    from vlmrel.mcdo.dropout import KINDS

    parser = argparse.ArgumentParser(prog="python -m vlmrel.bench mcdo", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--passes", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--p", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--kind", default="output", choices=KINDS, help="dropout site (default: the workflow's, output)"
    )
    parser.add_argument(
        "--also-kinds",
        default="input",
        help="comma-separated kinds whose vlmrel throughput is also measured (no reference loop); '' for none",
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--peak-n",
        type=int,
        default=None,
        help="matmul size of the peak measurement (default 2048 cpu, 8192 cuda)",
    )
    parser.add_argument(
        "--fp64-passes",
        type=int,
        default=4,
        help="passes of the float64 check (a nested snapshot of the bf16 run)",
    )
    parser.add_argument("--no-fp64", action="store_true", help="skip the float64 ranking check")
    args = parser.parse_args(argv)
    also = [k for k in (x.strip() for x in args.also_kinds.split(",")) if k and k != args.kind]
    unknown = sorted(set(also) - set(KINDS))
    if unknown:
        parser.error(f"--also-kinds: unknown kinds {unknown}; choose from {KINDS}")
    why = check_device(args.device)
    if why:
        parser.error(why)  # exits with status 2

    import torch
    from scipy.stats import spearmanr

    from vlmrel.mcdo.dropout import run_trial
    from vlmrel.models import ModelSpec, _clip_preprocess, load_encoder

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    peak_n = args.peak_n or (8192 if torch.device(device).type == "cuda" else 2048)
    started = time.perf_counter()
    load_before = loadavg()
    spec = ModelSpec(
        name="vitb32_random",
        backend="open_clip",
        arch="ViT-B-32",
        pretrained=None,
        preprocess=_clip_preprocess(224),
        tiny=False,
        description="open_clip ViT-B-32, seeded random weights (benchmark)",
        quick_gelu=True,
        init_seed=0,
    )
    n, T, bs = args.images, args.passes, args.batch_size
    pixels = synthetic_images(n, 224, args.seed)
    ids = [f"img{i:05d}" for i in range(n)]
    batches = [(ids[i : i + bs], pixels[i : i + bs]) for i in range(0, n, bs)]

    fp32 = load_encoder(spec, device=device, precision="fp32")
    bf16 = load_encoder(spec, device=device, precision="bf16")
    warm = pixels[: min(4, n)]
    fp32.encode_image(warm)
    bf16.encode_image(warm)
    peaks = {d: [matmul_peak(d, n=peak_n, device=device)] for d in ("float32", "bfloat16")}

    def timed(fn: Any, *fn_args: Any) -> tuple[Any, float]:
        synchronize(device)
        t0 = time.perf_counter()
        result = fn(*fn_args)
        synchronize(device)
        return result, time.perf_counter() - t0

    def trial(encoder: Any, T_list: list[int], kind: str) -> Any:
        """vlmrel's trial on the bench's images, masks and rate (the same for every encoder)."""
        return run_trial(
            encoder, batches, p=args.p, seed=args.seed, trial=0, T_list=T_list, kind=kind, progress=False
        )

    ref_trace, ref_s = timed(reference_loop, fp32, batches, args.p, args.seed, T, args.kind)
    del fp32

    t64 = max(2, min(args.fp64_passes, T))
    res, ours_s = timed(trial, bf16, sorted({t64, T}), args.kind)
    other_s = {kind: timed(trial, bf16, [T], kind)[1] for kind in also}

    out: dict[str, Any] = {}
    if not args.no_fp64:
        fp64 = load_encoder(spec, device=device, precision="fp64")
        ref64, fp64_s = timed(trial, fp64, [t64], args.kind)
        del fp64
        out["fp64_seconds"] = round(fp64_s, 2)
        out["fp64_passes"] = t64
        # same masks: the bf16 run's T=t64 snapshot saw exactly the fp64 run's passes
        ours = res.T.index(t64)
        rho_pre = float(spearmanr(res.trace_pre[ours], ref64.trace_pre[-1]).statistic)
        rho_post = float(spearmanr(res.trace_post[ours], ref64.trace_post[-1]).statistic)
        out["spearman_vs_fp64"] = round(min(rho_pre, rho_post), 5)
        out["spearman_vs_fp64_pre"] = round(rho_pre, 5)
        out["spearman_vs_fp64_post"] = round(rho_post, 5)
        rel = np.abs(res.trace_pre[ours] - ref64.trace_pre[-1]) / ref64.trace_pre[-1]
        out["bf16_trace_rel_err_median"] = float(np.median(rel))
        out["trace_pre_cv_across_images"] = float(np.std(ref64.trace_pre[-1]) / np.mean(ref64.trace_pre[-1]))

    for d in peaks:
        peaks[d].append(matmul_peak(d, n=peak_n, device=device))
    peak32, peak16 = max(peaks["float32"]), max(peaks["bfloat16"])
    flops = vit_flops_per_image(224, 32, 768, 12, 4.0, 512)
    ref_ips = n * T / ref_s
    ours_ips = n * T / ours_s
    out.update(
        {
            "benchmark": "mcdo",
            "model": "open_clip ViT-B-32 (random weights), 224 px",
            "device": str(torch.device(device)),
            "device_name": device_name(device),
            "images": n,
            "passes": T,
            "batch_size": bs,
            "p": args.p,
            "kind": args.kind,
            "reference_ips": round(ref_ips, 2),
            "vlmrel_ips": round(ours_ips, 2),
            "speedup": round(ours_ips / ref_ips, 3),
            "reference_seconds": round(ref_s, 2),
            "spearman_vlmrel_vs_reference": round(
                float(spearmanr(res.trace_pre[-1], ref_trace).statistic), 5
            ),
            "vlmrel_seconds": round(ours_s, 2),
            "gflop_per_image": round(flops / 1e9, 3),
            "matmul_n": peak_n,
            "matmul_peak_gflops_fp32": round(peak32, 1),
            "matmul_peak_gflops_bf16": round(peak16, 1),
            "matmul_peak_gflops_bf16_before_after": [round(v, 1) for v in peaks["bfloat16"]],
            "achieved_gflops_vlmrel": round(ours_ips * flops / 1e9, 1),
            "fraction_of_peak": round(ours_ips * flops / (peak16 * 1e9), 3),
            "other_kinds": {
                kind: {
                    "vlmrel_ips": round(n * T / sec, 2),
                    "fraction_of_peak": round(n * T / sec * flops / (peak16 * 1e9), 3),
                }
                for kind, sec in other_s.items()
            },
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "loadavg": {"before": load_before, "after": loadavg()},
            "total_seconds": round(time.perf_counter() - started, 1),
        }
    )
    if "spearman_vs_fp64" in out:
        out["target_met"] = bool(out["speedup"] >= 2.0 and out["spearman_vs_fp64"] >= 0.99)
    if args.json:
        print(json.dumps(out, indent=2, sort_keys=True))
    else:
        for key in sorted(out):
            print(f"{key:32s} {out[key]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
