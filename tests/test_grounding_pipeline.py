"""The grounding chain's steps against the HTTP simulator: failures injected at the server end are
recorded failures absent from IoU statistics; a killed and resumed prediction run equals an
uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vlmrel.grounding import pipeline as gp
from vlmrel.grounding.iou import box_iou
from vlmrel.grounding.parse import QWEN3_PROMPT
from vlmrel.io import read_json

GRID = {"brightness_contrast": {"brightness": [-0.15, 0.15], "contrast": [1.0]}, "noise": [0.04]}
CONTENT = ["sample_id", "perturbation_id", "parameters", "raw_answer", "box", "status", "failure_kind"]


def _vlm(cache: Path, faults: dict, **sim) -> dict:
    return {
        "backend": "openai",
        "model": "qwen3-vl-sim",
        "concurrency": 4,
        "retries": 1,
        "backoff_s": 0.01,
        "backoff_max_s": 0.05,
        "timeout_s": 20,
        "cache_path": str(cache),
        "simulator": {"enabled": True, "instances": 1, "latency_s": 0.0, "faults": faults, **sim},
    }


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Generated scenes, a subset of 6 and a 3-perturbation grid."""
    root = tmp_path_factory.mktemp("gdemo")
    gp.prepare_demo(str(root / "demo.parquet"), str(root / "sim"), 12, 0, (160, 120))
    samples = gp.load_samples({"source": "demo"}, str(root / "demo.parquet"), keep_images=False)
    subset = gp.make_subset(
        samples, str(root / "s6.json"), name="s6", n=6, seed=1, allocation="equal", thresholds=(0.05, 0.2)
    )
    grid = gp.write_grid(GRID, str(root / "grid.tsv"))
    return root, subset, grid


def _predict(root: Path, subset: dict, grid, vlm_cfg: dict, out: Path, chunk: int = 16) -> pd.DataFrame:
    idx = [r["index"] for r in subset["sample_records"]]
    gp.predict(
        dataset=gp.load_samples({"source": "demo"}, str(root / "demo.parquet"), indices=idx),
        subset=subset,
        grid=grid,
        vlm_cfg=vlm_cfg,
        prompt=QWEN3_PROMPT,
        coords="rel1000",
        use_schema=True,
        seed=0,
        out_path=str(out),
        stats_path=str(out.with_suffix(".stats.json")),
        sim_metadata=[str(root / "sim" / "metadata.json")],
        chunk_samples=chunk,
        progress=False,
    )
    return pd.read_parquet(out)


def test_subset_and_grid_files(demo):
    root, subset, grid = demo
    assert subset["n"] == 6 and len(subset["indices"]) == 6
    assert subset["difficulty_counts"] == {"easy": 2, "medium": 2, "hard": 2}
    assert [r["index"] for r in subset["sample_records"]] == subset["indices"]
    tsv = pd.read_csv(root / "grid.tsv", sep="\t")
    assert list(tsv.columns) == ["id", "family", "params", "magnitude"]
    assert [p.id for p in gp.read_grid(str(root / "grid.tsv"))] == list(tsv["id"])
    assert tsv["id"].is_unique and len(tsv) == len(grid) == 3


def test_reused_subset_gives_the_same_indices(demo, tmp_path):
    root, subset, _ = demo
    samples = gp.load_samples({"source": "demo"}, str(root / "demo.parquet"), keep_images=False)
    npy = tmp_path / "small_subset_indices.npy"
    np.save(npy, np.asarray(subset["indices"][::-1], dtype=np.int64))
    again = gp.make_subset(
        samples, str(tmp_path / "again.json"), name="again", n=99, seed=5, allocation="equal",
        thresholds=(0.05, 0.2), indices_file=str(npy),
    )  # fmt: skip
    assert again["indices"] == subset["indices"]
    assert again["sample_ids"] == subset["sample_ids"]


def test_validation_subset_is_drawn_disjoint_from_the_threshold_subset(demo, tmp_path):
    root, subset, _ = demo  # s6: the threshold subset here
    samples = gp.load_samples({"source": "demo"}, str(root / "demo.parquet"), keep_images=False)
    other = gp.make_subset(
        samples, str(tmp_path / "v.json"), name="v", n=6, seed=1, allocation="equal",
        thresholds=(0.05, 0.2), exclude_file=str(root / "s6.json"),
    )  # fmt: skip
    assert len(other["indices"]) == 6 and not set(other["indices"]) & set(subset["indices"])
    assert other["disjoint_from"] == "s6"
    # a reused subset that shares samples with the threshold subset is refused
    npy = tmp_path / "overlap.npy"
    np.save(npy, np.asarray(subset["indices"][:2] + other["indices"][:2], dtype=np.int64))
    with pytest.raises(ValueError, match="must be disjoint"):
        gp.make_subset(
            samples, str(tmp_path / "bad.json"), name="bad", n=4, seed=0, allocation="equal",
            thresholds=(0.05, 0.2), indices_file=str(npy), exclude_file=str(root / "s6.json"),
        )  # fmt: skip


def test_injected_failures_are_recorded_and_left_out_of_iou_statistics(demo, tmp_path):
    root, subset, grid = demo
    faults = {"malformed_json": 0.2, "schema_violation": 0.15, "http_503": 0.25}
    cfg = _vlm(tmp_path / "c.sqlite", faults) | {"retries": 0}
    df = _predict(root, subset, grid, cfg, tmp_path / "predictions.parquet")
    assert len(df) == 6 * (1 + len(grid))
    failed = df[df["status"] == "failed"]
    kinds = set(failed["failure_kind"])
    assert {"malformed_json", "schema_violation", "http_5xx"} <= kinds, kinds
    assert failed["box"].isna().all()
    assert (
        df.loc[df["status"] == "ok", "box"].notna().all()
        and df.loc[df["status"] == "ok", "failure_kind"].isna().all()
    )

    gp.compute_ious(str(tmp_path / "predictions.parquet"), subset, grid, str(tmp_path / "ious.parquet"))
    ious = pd.read_parquet(tmp_path / "ious.parquet")
    merged = ious.merge(df, on=["sample_id", "perturbation_id"], suffixes=("", "_p"))
    assert merged.loc[merged["status_p"] == "failed", "iou"].isna().all()  # never IoU 0
    assert merged.loc[merged["status_p"] == "ok", "iou"].notna().all()
    # the IoU of every answered request, computed directly
    gt = {r["sample_id"]: r["bbox_norm"] for r in subset["sample_records"]}
    ok = merged[merged["status_p"] == "ok"]
    direct = box_iou(np.stack(ok["box"].to_numpy()), np.asarray([gt[s] for s in ok["sample_id"]]))
    np.testing.assert_allclose(ok["iou"].to_numpy(), direct)

    gp.compute_thresholds(
        str(tmp_path / "ious.parquet"), None, str(tmp_path / "t.json"),
        signal_names=["perturbation_magnitude", "iou_drop"], k=2, n_bins=5,
    )  # fmt: skip
    gp.compute_boundary(
        str(tmp_path / "ious.parquet"),
        None,
        str(tmp_path / "t.json"),
        str(tmp_path / "b.json"),
        source="baseline",
    )
    b = read_json(tmp_path / "b.json")
    assert not b["out_of_sample"] and b["semantic"]["note"].startswith("no semantic drift")
    assert {c["check"] for c in b["checks"]["items"]} >= {"iou_spread", "boundary_rate", "mi_gain"}
    # thresholds given by hand still work, with another subset's thresholds.json in the DAG and this
    # subset's own optimum beside
    gp.compute_boundary(
        str(tmp_path / "ious.parquet"), None, str(tmp_path / "t.json"), str(tmp_path / "b2.json"),
        source=[0.4, 0.8], own_thresholds=str(tmp_path / "t.json"), thresholds_subset="other", subset="s6",
    )  # fmt: skip
    b2 = read_json(tmp_path / "b2.json")
    assert b2["thresholds"]["thresholds"] == [0.4, 0.8] and b2["thresholds_source"] == "config list"
    assert not b2["out_of_sample"] and b2["thresholds_kind"] == "given (not learned)"
    assert "in_sample_reference" not in b2
    gp.compute_boundary(
        str(tmp_path / "ious.parquet"), None, str(tmp_path / "t.json"), str(tmp_path / "b3.json"),
        source="iou_drop", own_thresholds=str(tmp_path / "t.json"), thresholds_subset="other", subset="s6",
    )  # fmt: skip
    b3 = read_json(tmp_path / "b3.json")
    assert b3["out_of_sample"] and b3["thresholds_subset"] == "other"
    assert b3["in_sample_reference"]["boundary_000"]["rate"] == b3["thresholds"]["boundary_000"]["rate"]
    n_failed = len(failed)
    assert b["failure_rate"]["n_failed"] == n_failed
    assert b["failure_rate"]["n_requests"] == len(df)
    assert b["failure_rate"]["by_kind"] == failed["failure_kind"].value_counts().to_dict()
    orig = ious[ious["perturbation_id"] == "original"]
    pert = ious[ious["perturbation_id"] != "original"]
    assert b["iou"]["original_mean"] == pytest.approx(orig["iou"].dropna().mean())
    assert b["iou"]["perturbed_mean"] == pytest.approx(pert["iou"].dropna().mean())
    acc = b["accuracy"]["perturbed"]["acc@0.5"]
    assert acc["n_valid"] == pert["iou"].notna().sum() and acc["n"] == len(pert)
    assert acc["acc"] == pytest.approx((pert["iou"].dropna() >= 0.5).mean())
    t = read_json(tmp_path / "t.json")
    assert t["signals"]["perturbation_magnitude"]["n_dropped"] == pert["iou"].isna().sum()
    per_sample = b["failure_rate"]["per_sample"]
    for s, g in ious.groupby("sample_id"):
        assert per_sample[s] == pytest.approx(g["iou"].isna().mean())


RUNNER = """
import json, sys
from vlmrel.grounding import pipeline as gp
from vlmrel.grounding.parse import QWEN3_PROMPT
from vlmrel.io import read_json
root, cfg, out, chunk = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])
subset = read_json(root + "/s6.json")
idx = [r["index"] for r in subset["sample_records"]]
gp.predict(dataset=gp.load_samples({"source": "demo"}, root + "/demo.parquet", indices=idx), subset=subset,
           grid=gp.read_grid(root + "/grid.tsv"), vlm_cfg=cfg, prompt=QWEN3_PROMPT, coords="rel1000",
           use_schema=True, seed=0, out_path=out, stats_path=out + ".stats.json",
           sim_metadata=[root + "/sim/metadata.json"], chunk_samples=chunk, progress=False)
print("FINISHED")
"""


def _cached(path: Path) -> int:
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(path, timeout=5) as con:
            return con.execute("SELECT count(*) FROM responses").fetchone()[0]
    except sqlite3.Error:
        return 0


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_killed_and_resumed_prediction_equals_an_uninterrupted_one(demo, tmp_path):
    root, subset, grid = demo
    faults = {"malformed_json": 0.1, "schema_violation": 0.1, "http_429": 0.1, "http_503": 0.1}
    n = 6 * (1 + len(grid))
    # uninterrupted, in one chunk and a fast simulator
    full = _predict(root, subset, grid, _vlm(tmp_path / "a.sqlite", faults), tmp_path / "full.parquet")

    # killed with SIGKILL partway (slow simulator, one request at a time, chunks of 2 samples) ...
    slow = _vlm(tmp_path / "b.sqlite", faults, latency_s=0.15) | {"concurrency": 1}
    out = tmp_path / "resumed.parquet"
    proc = subprocess.Popen(
        [sys.executable, "-c", RUNNER, str(root), json.dumps(slow), str(out), "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 60
    while _cached(tmp_path / "b.sqlite") < n // 3:
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "prediction made no progress"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    done = _cached(tmp_path / "b.sqlite")
    assert not out.exists() and 0 < done < n

    # ... then resumed: only what is missing is sent, and the result equals the uninterrupted run
    resumed = _predict(root, subset, grid, slow | {"concurrency": 4}, out)
    assert int(resumed["cache_hit"].sum()) == done
    assert not resumed["cache_hit"].all()
    pd.testing.assert_frame_equal(full[CONTENT], resumed[CONTENT])
    assert (full["status"] == "failed").any()


def test_unreadable_image_is_a_recorded_failure_not_a_crash(demo, tmp_path):
    root, subset, grid = demo
    idx = [r["index"] for r in subset["sample_records"]]
    dataset = gp.load_samples({"source": "demo"}, str(root / "demo.parquet"), indices=idx)
    dataset[2]._image_bytes = b"not an image"
    out = tmp_path / "p.parquet"
    gp.predict(
        dataset=dataset,
        subset=subset,
        grid=grid,
        vlm_cfg=_vlm(tmp_path / "c.sqlite", {}),
        prompt=QWEN3_PROMPT,
        coords="rel1000",
        use_schema=True,
        seed=0,
        out_path=str(out),
        stats_path=str(tmp_path / "s.json"),
        sim_metadata=[str(root / "sim" / "metadata.json")],
        progress=False,
    )
    df = pd.read_parquet(out)
    bad = df["sample_id"] == dataset[2].sample_id
    assert len(df) == 6 * (1 + len(grid))
    assert (df.loc[bad, "failure_kind"] == "image_error").all() and df.loc[bad, "box"].isna().all()
    assert df.loc[bad, "error"].str.contains("cannot read image").all()
    assert (df.loc[~bad, "status"] == "ok").all()


def test_grid_rejects_unusable_corruptions(tmp_path):
    with pytest.raises(ValueError, match="fog"):
        gp.write_grid({"corruptions": {"names": ["fog"], "severities": [1]}}, str(tmp_path / "g.tsv"))
    with pytest.raises(ValueError, match="no_such_corruption"):
        gp.write_grid({"corruptions": {"names": ["no_such_corruption"]}}, str(tmp_path / "g.tsv"))
    with pytest.raises(ValueError, match="empty"):
        gp.write_grid({}, str(tmp_path / "g.tsv"))
    assert not (tmp_path / "g.tsv").exists()
