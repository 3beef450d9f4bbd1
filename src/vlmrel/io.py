"""Atomic file writes and small JSON helpers shared by every chain.

A write goes to a temporary file in the destination's directory and is renamed into
place only when complete, so a killed job never leaves a half-written result that a
later run would mistake for a finished one; the next write of the same output removes
the temporary file a killed job left behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
_UMASK = os.umask(0)
os.umask(_UMASK)


#: a temporary file of another host (a cluster node) counts as stale after this many seconds
#: without a change; on this host its writer's process id decides
STALE_AFTER_S = 24 * 3600
_HOST = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:64] or "host"


def _tmp_pattern(final: Path, suffix: str) -> re.Pattern[str]:
    """Temporary names of ``final``: ``.{name}.{host}-{pid}.XXXXXXXX{suffix}`` (and the older
    ``.{name}.XXXXXXXX{suffix}`` without host and pid)."""
    return re.compile(
        rf"^\.{re.escape(final.name)}\.(?:(?P<host>[A-Za-z0-9_.-]+)-(?P<pid>\d+)\.)?[a-z0-9_]{{8}}"
        + re.escape(suffix)
        + "$"
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike[str], suffix: str | None = None) -> list[Path]:
    """Remove temporary files that a killed writer of ``path`` left behind; return them.

    A write that is killed (``kill -9``, out of memory, a cluster's time limit) cannot clean
    up, so the next write of the same output does: a temporary file of this host whose
    process is gone, of another host unchanged for ``STALE_AFTER_S``, or of the older naming
    without a process id, is removed. A live writer's file is never touched.
    """
    final = Path(path)
    suffix = suffix if suffix is not None else final.suffix
    pattern = _tmp_pattern(final, suffix)
    removed = []
    try:
        entries = list(os.scandir(final.parent))
    except FileNotFoundError:
        return removed
    now = time.time()
    for entry in entries:
        m = pattern.match(entry.name)
        if m is None or not entry.is_file(follow_symlinks=False):
            continue
        stale = False
        if m.group("pid") is None:
            stale = True
        elif m.group("host") == _HOST:
            stale = int(m.group("pid")) != os.getpid() and not _pid_alive(int(m.group("pid")))
        else:
            with contextlib.suppress(FileNotFoundError):
                stale = now - entry.stat().st_mtime > STALE_AFTER_S
        if stale:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    if removed:
        log.warning(
            "removed %d stale temporary file(s) of %s: %s", len(removed), final, [p.name for p in removed]
        )
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` on success.

    The temporary file keeps ``path``'s suffix (or ``suffix``) so libraries that pick a
    format from the extension (h5py, numpy, matplotlib) behave as for the final name.
    On an exception the temporary file is removed and ``path`` is left untouched. Its name,
    ``.{name}.{host}-{pid}.XXXXXXXX{suffix}``, says who writes it, so the next write of
    ``path`` removes what a killed writer left (:func:`remove_stale_temporaries`).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix if suffix is not None else final.suffix
    remove_stale_temporaries(final, suffix)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{final.name}.{_HOST}-{os.getpid()}.", suffix=suffix, dir=final.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates 0600; give the result the permissions a plain open() would have
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _json_default(obj: Any) -> Any:
    # numpy scalars and arrays without importing numpy at module import time
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable")


def _finite(obj: Any) -> Any:
    """Replace NaN/inf floats with None: JSON has no NaN, and readers must not guess."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if hasattr(obj, "tolist"):
        return _finite(obj.tolist())
    return obj


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as indented, key-sorted JSON, atomically; NaN becomes null."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_finite(data), indent=2, sort_keys=True, default=_json_default) + "\n")


def write_npz(path: str | os.PathLike[str], arrays: Any, meta: Any = None) -> None:
    """Arrays (a name -> array-like mapping) and, if given, a JSON ``meta`` (key-sorted; numpy
    scalars as numbers) as an ``.npz``, atomically; readers use ``allow_pickle=False``."""
    import numpy as np

    out = {k: np.asarray(v) for k, v in arrays.items()}
    if meta is not None:
        out["meta"] = np.asarray(json.dumps(dict(meta), sort_keys=True, default=_json_default))
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **out)


def read_npz(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The arrays of a :func:`write_npz` file (no pickles) and its ``meta`` (``{}`` if none)."""
    import numpy as np

    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files if k != "meta"}
        meta = json.loads(str(z["meta"][()])) if "meta" in z.files else {}
    return arrays, meta


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)
