"""Atomic writes: the next write of an output removes the temporary files a killed writer left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlmrel import io as vio
from vlmrel.models import preprocess_spec
from vlmrel.pixels import preproc_key
from wfutil import REPO, SNAKEMAKE, load_config, snakemake, write_config


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_remove_stale_temporaries(tmp_path):
    out = tmp_path / "x.h5"
    host = vio._HOST
    dead = tmp_path / f".x.h5.{host}-{_dead_pid()}.abcd1234.h5"
    live = tmp_path / f".x.h5.{host}-{os.getppid()}.abcd1234.h5"
    legacy = tmp_path / ".x.h5.k2j_9zq1.h5"
    other_new = tmp_path / ".x.h5.node17-4242.abcd1234.h5"
    other_old = tmp_path / ".x.h5.node18-4242.abcd1234.h5"
    unrelated = tmp_path / ".y.h5.k2j_9zq1.h5"
    for p in (dead, live, legacy, other_new, other_old, unrelated):
        p.write_bytes(b"partial")
    old = time.time() - vio.STALE_AFTER_S - 10
    os.utime(other_old, (old, old))
    with vio.atomic_path(out) as tmp:
        assert tmp.name.startswith(f".x.h5.{host}-{os.getpid()}.") and tmp.suffix == ".h5"
        tmp.write_bytes(b"done")
    assert out.read_bytes() == b"done"
    assert {p.name for p in tmp_path.iterdir()} == {live.name, other_new.name, unrelated.name, "x.h5"}


@pytest.mark.workflow
@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_kill9_pixels_job_leaves_no_temporary_file(tmp_path):
    """kill -9 of a pixels job mid-write, --unlock, re-run: the output is rebuilt, no temp file left."""
    import numpy as np
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(800):
        Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(photos / f"p{i:04d}.png")
    cfg = load_config()
    cfg["chains"] = ["mcdo"]
    cfg["images"] = {**cfg["images"], "source": str(photos), "glob": "*.png", "limit": None}
    conf = write_config(tmp_path / "c.yaml", cfg)
    work = tmp_path / "w"
    work.mkdir()
    run = work / "results" / cfg["run"]
    snakemake(work, conf, f"results/{cfg['run']}/images/manifest.tsv")
    models = cfg["mcdo"]["exp0"]["models"]
    target = f"results/{cfg['run']}/pixels/{preproc_key(preprocess_spec(models[0]))}.h5"
    proc = subprocess.Popen(
        [
            SNAKEMAKE,
            "-s",
            str(REPO / "Snakefile"),
            "--directory",
            str(work),
            "--configfile",
            str(conf),
            "--cores",
            "1",
            target,
        ],
        cwd=work,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    folder = run / "pixels"
    deadline = time.monotonic() + 120
    temps: list[Path] = []
    while True:
        assert proc.poll() is None, "the pixels job finished before it could be killed"
        assert time.monotonic() < deadline, "no temporary pixel file appeared"
        # the writer keeps a few HDF5 chunks in its cache (uint8 blocks at 64 px are small), so the
        # temporary file can stay small until the end: kill as soon as it exists
        temps = [p for p in folder.glob(".*.h5")] if folder.is_dir() else []
        if temps:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    time.sleep(0.5)
    assert [p for p in folder.glob(".*.h5")], "the kill should have left the temporary file"
    assert not (work / target).exists()
    snakemake(work, conf, "--unlock")
    snakemake(work, conf, target)
    assert (work / target).stat().st_size > 1_000_000
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []
