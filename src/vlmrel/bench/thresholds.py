"""Benchmark: exact MI threshold search (DP) against notebook 02's L-BFGS-B, checked by brute force.

Synthetic grounding results shaped like the seeds' runs (51 x 25 with the 5x5 grid, 99 x 100 with
the 10x10 grid): per-sample skill, IoU falling with perturbation magnitude plus noise, boxes on a
0..1000 grid (so IoUs tie), some misses at IoU 0. For each signal (perturbation magnitude, IoU
drop, and a noisy stand-in for semantic drift) it times the exact optimum, the seed's 10-start
L-BFGS-B and the baseline [0.3, 0.5, 0.7], and checks that the exact MI is >= every other. On small
inputs it also checks that the exact MI equals brute force over all k-subsets of candidate cuts.

    python -m vlmrel.bench thresholds --json [--k 3] [--n-bins 20] [--repeats 3]

Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import numpy as np

from vlmrel.grounding.perturb import PRESETS, perturbation_magnitude
from vlmrel.grounding.thresholds import (
    BASELINE_THRESHOLDS,
    brute_force_thresholds,
    candidate_cuts,
    lbfgsb_thresholds,
    mutual_information,
    optimal_thresholds,
)

TOL = 1e-12


def synthetic_run(n_samples: int, preset: str, seed: int, decimals: int | None = 3) -> dict[str, np.ndarray]:
    """IoUs and signals ``[n_samples, n_perturbations]`` resembling a grounding run.

    ``decimals=3`` rounds IoUs (many ties, as boxes on a 0..1000 grid give); ``None`` keeps them
    continuous (the DP's worst case: every IoU distinct).
    """
    rng = np.random.default_rng(seed)
    bs, cs = PRESETS[preset]
    mags = np.array([perturbation_magnitude({"brightness": b, "contrast": c}) for b in bs for c in cs])
    skill = rng.beta(4, 2, n_samples)
    sensitivity = rng.gamma(2.0, 0.6, n_samples)
    iou_orig = np.clip(skill + rng.normal(0, 0.05, n_samples), 0, 1)
    iou = skill[:, None] - sensitivity[:, None] * mags[None, :] + rng.normal(0, 0.08, (n_samples, mags.size))
    iou = np.clip(iou, 0, 1)
    iou[rng.random(iou.shape) < 0.05] = 0.0  # wrong object
    if decimals is not None:
        iou = np.round(iou, decimals)
    drop = iou_orig[:, None] - iou
    drift = np.clip(0.5 * np.abs(drop) + rng.gamma(1.0, 0.05, drop.shape), 0, 2)
    return {
        "iou": iou,
        "perturbation_magnitude": np.broadcast_to(mags, iou.shape).copy(),
        "iou_drop": drop,
        "semantic_drift": drift,
    }


def seed_code_optimize(iou: np.ndarray, signal: np.ndarray, k: int = 3, n_bins: int = 20, seed: int = 42):
    """Notebook 02's ``optimize_thresholds`` as written (its binning with ``np.digitize``, sklearn's
    ``mutual_info_score``, the class loop), with a seeded generator instead of the global one.

    Only for timing the seed's code: its binning differs from the default ``width`` (``n_bins + 1``
    bins, the maximum alone in the last), so its MI is comparable only to ``binning="seed"``."""
    from scipy import optimize
    from sklearn.metrics import mutual_info_score

    rng = np.random.default_rng(seed)
    iou, signal = np.asarray(iou, float).ravel(), np.asarray(signal, float).ravel()
    binned = np.digitize(signal, np.linspace(signal.min(), signal.max(), n_bins))

    def objective(thresholds):
        thresholds = np.sort(np.clip(thresholds, 0.01, 0.99))
        classes = np.zeros_like(iou, dtype=int)
        for i, t in enumerate(sorted(thresholds.tolist())):
            classes[iou >= t] = i + 1
        return -mutual_info_score(classes, binned)

    best_x, best_mi = None, -np.inf
    for _ in range(10):
        x0 = np.sort(rng.uniform(0.1, 0.9, k))
        res = optimize.minimize(objective, x0, method="L-BFGS-B", bounds=[(0.05, 0.95)] * k)
        if -res.fun > best_mi:
            best_mi, best_x = -float(res.fun), res.x
    return np.sort(best_x), best_mi


def _best_time(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def run(k: int = 3, n_bins: int = 20, repeats: int = 3) -> dict:
    cases = []
    ok = True
    for name, n_samples, preset, decimals in (
        ("seed001_51x25", 51, "5x5", 3),
        ("seed000_99x100", 99, "10x10", 3),
        ("seed000_99x100_continuous", 99, "10x10", None),
    ):
        data = synthetic_run(n_samples, preset, seed=n_samples, decimals=decimals)
        for signal in ("perturbation_magnitude", "iou_drop", "semantic_drift"):
            iou, sig = data["iou"], data[signal]
            t_exact, (th_e, mi_e) = _best_time(
                lambda iou=iou, sig=sig: optimal_thresholds(iou, sig, k, n_bins), repeats
            )
            t_lb, (th_l, mi_l) = _best_time(
                lambda iou=iou, sig=sig: lbfgsb_thresholds(iou, sig, k, n_bins), repeats
            )
            t_seed_code, _ = _best_time(
                lambda iou=iou, sig=sig: seed_code_optimize(iou, sig, k, n_bins), repeats
            )
            mi_b = mutual_information(iou, sig, BASELINE_THRESHOLDS, n_bins)
            mi_e_check = mutual_information(iou, sig, th_e, n_bins)
            good = mi_e >= mi_l - TOL and mi_e >= mi_b - TOL and abs(mi_e - mi_e_check) < 1e-9
            ok &= good
            cases.append(
                {
                    "case": name,
                    "signal": signal,
                    "n_pairs": int(iou.size),
                    "n_candidate_cuts": int(candidate_cuts(iou).size),
                    "exact": {"mi": mi_e, "seconds": t_exact, "thresholds": th_e.round(6).tolist()},
                    "lbfgsb": {
                        "mi": mi_l,
                        "seconds": t_lb,
                        "thresholds": th_l.round(6).tolist(),
                        "restarts": 10,
                        "implementation": "vlmrel.grounding.thresholds.lbfgsb_thresholds (vectorised MI)",
                    },
                    "lbfgsb_seed_code": {
                        "seconds": t_seed_code,
                        "implementation": "notebook 02's optimize_thresholds as written (sklearn "
                        "mutual_info_score); timing only, its binning differs",
                    },
                    "baseline": {"mi": mi_b, "thresholds": list(BASELINE_THRESHOLDS)},
                    "exact_gain_over_lbfgsb_pct": 100 * (mi_e - mi_l) / mi_l if mi_l > 0 else None,
                    "exact_gain_over_baseline_pct": 100 * (mi_e - mi_b) / mi_b if mi_b > 0 else None,
                    "exact_ge_others": bool(good),
                }
            )
    brute = []
    for seed in range(6):
        rng = np.random.default_rng(1000 + seed)
        n = 30
        iou = np.round(rng.beta(2, 2, n), 2)  # ties
        sig = iou + rng.normal(0, 0.2, n)
        kk = 2 + seed % 2
        t0 = time.perf_counter()
        _, mi_e = optimal_thresholds(iou, sig, kk, 8)
        t1 = time.perf_counter()
        _, mi_bf = brute_force_thresholds(iou, sig, kk, 8)
        t2 = time.perf_counter()
        equal = abs(mi_e - mi_bf) < 1e-12
        ok &= equal
        brute.append(
            {
                "seed": seed,
                "n_pairs": n,
                "k": kk,
                "n_bins": 8,
                "n_candidate_cuts": int(candidate_cuts(iou).size),
                "exact_mi": mi_e,
                "brute_force_mi": mi_bf,
                "equal": bool(equal),
                "exact_seconds": t1 - t0,
                "brute_force_seconds": t2 - t1,
            }
        )
    return {
        "benchmark": "thresholds",
        "what": "exact DP MI threshold search vs notebook 02's L-BFGS-B (10 starts) and the baseline",
        "mi_units": "nats",
        "k": k,
        "n_bins": n_bins,
        "binning": "width",
        "timing": f"best of {repeats}",
        "machine": {
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
        },
        "cases": cases,
        "brute_force_checks": brute,
        "targets": {
            "mi_exact_ge_seed_every_signal": all(c["exact"]["mi"] >= c["lbfgsb"]["mi"] - TOL for c in cases),
            "mi_exact_equals_brute_force": all(b["equal"] for b in brute),
            # reported, not enforced: the seed's L-BFGS-B stops at once (zero gradient almost
            # everywhere), so it is fast and wrong; the exact DP is O(k m^2 n_bins) in m distinct IoUs
            "exact_no_slower_than_seed_code": {
                f"{c['case']}/{c['signal']}": c["exact"]["seconds"] <= c["lbfgsb_seed_code"]["seconds"]
                for c in cases
            },
            "exact_no_slower_than_vectorised_lbfgsb": {
                f"{c['case']}/{c['signal']}": c["exact"]["seconds"] <= c["lbfgsb"]["seconds"] for c in cases
            },
        },
        "ok": bool(ok),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m vlmrel.bench thresholds", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--json", action="store_true", help="print the result as JSON (default: a short table)")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--n-bins", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    res = run(args.k, args.n_bins, args.repeats)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for c in res["cases"]:
            print(
                f"{c['case']:26s} {c['signal']:24s} exact MI {c['exact']['mi']:.4f} ({c['exact']['seconds']:.3f}s)  "
                f"L-BFGS-B {c['lbfgsb']['mi']:.4f} ({c['lbfgsb']['seconds']:.3f}s)  baseline {c['baseline']['mi']:.4f}"
            )
        print("brute force equal:", all(b["equal"] for b in res["brute_force_checks"]), " ok:", res["ok"])
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
