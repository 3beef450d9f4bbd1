"""Dispatch ``python -m vlmrel.bench <name> [args]`` to ``vlmrel.bench.<name>.main``."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = ("mcdo", "anomaly", "thresholds", "vlm", "scale")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m vlmrel.bench {{{','.join(BENCHMARKS)}}} [--json] [options]")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"unknown benchmark {name!r}; choose one of {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(f"vlmrel.bench.{name}")
    except ModuleNotFoundError as exc:
        print(f"benchmark {name!r} is not available: {exc}", file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
