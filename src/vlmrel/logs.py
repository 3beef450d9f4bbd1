"""Logging set-up for workflow jobs.

Snakemake scripts call ``setup_job_log(snakemake.log[0])`` first: stderr (where tqdm
progress bars and Python logging go) is redirected to the rule's log file, line-buffered,
so a job's progress can be followed with ``tail -f`` while it runs.
"""

from __future__ import annotations

import logging
import os
import sys


def setup_job_log(path: str | os.PathLike[str] | None, level: int = logging.INFO) -> logging.Logger:
    """Send stderr and the ``vlmrel`` logger to ``path`` (append mode keeps earlier attempts)."""
    if path:
        os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
        sys.stderr = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - lives for the job
    logging.basicConfig(
        stream=sys.stderr,
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    return logging.getLogger("vlmrel")
