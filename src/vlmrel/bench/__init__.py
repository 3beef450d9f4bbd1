"""Benchmarks that print JSON: ``python -m vlmrel.bench <name> --json``."""

from __future__ import annotations

import os


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (as ``/proc/loadavg`` shows them), or None where the
    system has none. Benchmarks print it beside their timings: on a shared machine it says how
    much the figures were held back by other work."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None
