"""Helpers shared by the integration tests: running snakemake, comparing JSON numerically."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DEMO = "config/demo.yaml"


def env_with_src(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    env.update(extra or {})
    return env


def overlay(tmp: Path, run: str, extra: str = "") -> Path:
    """A config layered over the demo: its own run folder and its own VLM cache (no shared answers)."""
    p = tmp / f"{run}.yaml"
    p.write_text(f"run: {run}\nvlm:\n  cache_path: results/{run}/vlm-cache.sqlite\n{extra}", encoding="utf-8")
    return p


def snakemake(
    targets: Sequence[str], profile: str, configs: Sequence[Path | str], log: Path, env: dict[str, str]
) -> float:
    """Run snakemake (targets before --configfile), return the wall time; fail with the log's tail."""
    cmd = [str(BIN / "snakemake"), *targets, "--profile", profile, "--configfile", DEMO, *map(str, configs)]
    t0 = time.monotonic()
    with open(log, "w", encoding="utf-8") as fh:
        rc = subprocess.call(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)
    elapsed = time.monotonic() - t0
    if rc != 0:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-60:])
        raise AssertionError(f"{' '.join(cmd)} failed ({rc}); log {log}:\n{tail}")
    return elapsed


# keys whose values are clocks, ports or paths, which differ between two equal runs
VOLATILE = ("latency", "wall", "seconds", "elapsed", "duration", "timing", "requests_per_s", "per_endpoint",
            "path", "created", "time")


def json_diff(a: Any, b: Any, where: str = "", rtol: float = 1e-9, atol: float = 1e-12) -> list[str]:
    """Differences between two JSON values: numbers compared with a tolerance, volatile keys skipped."""
    out: list[str] = []
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if any(v in k.lower() for v in VOLATILE):
                continue
            if k not in a or k not in b:
                out.append(f"{where}/{k}: only in {'second' if k not in a else 'first'}")
            else:
                out += json_diff(a[k], b[k], f"{where}/{k}", rtol, atol)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{where}: lengths {len(a)} != {len(b)}")
        else:
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                out += json_diff(x, y, f"{where}[{i}]", rtol, atol)
    elif isinstance(a, bool) or isinstance(b, bool) or a is None or b is None or isinstance(a, str):
        if a != b:
            out.append(f"{where}: {a!r} != {b!r}")
    elif isinstance(a, int | float) and isinstance(b, int | float):
        if not (math.isclose(a, b, rel_tol=rtol, abs_tol=atol) or (math.isnan(a) and math.isnan(b))):
            out.append(f"{where}: {a!r} != {b!r}")
    elif a != b:
        out.append(f"{where}: {a!r} != {b!r}")
    return out


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))
