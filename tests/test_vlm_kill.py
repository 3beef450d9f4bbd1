"""A client killed with SIGKILL mid-run loses no finished response; the re-run sends only the rest."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from vlmrel import vlm
from vlmrel.vlm.config import SimulatorConfig
from vlmrel.vlm.simulator import Simulator

N = 60
CONC = 2

SCRIPT = (
    textwrap.dedent(
        """
    import sys
    from vlmrel import vlm

    cfg = vlm.VLMConfig.from_dict({
        "backend": sys.argv[3], "model": "vlmrel-sim", "endpoints": [sys.argv[1]],
        "concurrency": CONC, "timeout_s": 10, "retries": 2, "backoff_s": 0.01,
    })
    reqs = [vlm.Request(prompt=f"item {i}", schema=None) for i in range(N)]
    vlm.run_requests(cfg, reqs, cache_path=sys.argv[2], progress=False)
    print("FINISHED")
    """
    )
    .replace("CONC", str(CONC))
    .replace("range(N)", f"range({N})")
)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
@pytest.mark.parametrize("backend", ["openai"])
def test_kill9_keeps_finished_responses(tmp_path: Path, backend: str) -> None:
    cache = tmp_path / "cache" / "vlm.sqlite"
    script = tmp_path / "client.py"
    script.write_text(SCRIPT)
    with Simulator(SimulatorConfig(enabled=True, latency_s=0.1)) as sim:
        proc = subprocess.Popen(
            [sys.executable, str(script), sim.base_url(backend), str(cache), backend],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + 60
        while sim.stats()["completed"] < N // 3:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "client made no progress"
            time.sleep(0.01)
        completed_at_kill = sim.stats()["completed"]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL
        assert b"FINISHED" not in proc.stdout.read()

        db = sqlite3.connect(cache)
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        cached = db.execute("SELECT COUNT(*) FROM responses WHERE status = 'ok'").fetchone()[0]
        db.close()
        # every response the server had finished is kept, save those still on the wire: per slot
        # one whose reply came but was not yet committed (the next request is sent first) and the
        # next one, which a stalled client may not have read yet
        assert completed_at_kill - 2 * CONC <= cached < N

        sim.reset_stats()
        cfg = vlm.VLMConfig.from_dict(
            {
                "backend": backend,
                "model": "vlmrel-sim",
                "endpoints": [sim.base_url(backend)],
                "concurrency": 4,
            }
        )
        res = vlm.run_requests(
            cfg, [vlm.Request(prompt=f"item {i}") for i in range(N)], cache_path=cache, progress=False
        )
        assert sim.stats()["requests"] == N - cached  # only the missing ones are sent
    assert all(r.ok for r in res)
    assert sum(r.cache_hit for r in res) == cached
