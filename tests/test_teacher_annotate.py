"""The annotate step: injected faults become recorded failures (never labels); the API key stays secret."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest

from vlmrel import vlm
from vlmrel.images import build_manifest, list_images, materialize_demo
from vlmrel.teacher.annotate import annotate
from vlmrel.teacher.truth import build_ground_truth, read_jsonl
from vlmrel.vlm.config import SimulatorConfig
from vlmrel.vlm.simulator import Simulator

SECRET = "sk-teacher-test-key-9f8e7d6c5b4a"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("demo") / "images"
    materialize_demo(root)
    manifest = root.parent / "manifest.tsv"
    build_manifest(root, list_images(root), manifest)
    return root, manifest


def test_faults_are_recorded_failures_never_labels(tmp_path, demo):
    root, manifest = demo
    faults = {"malformed_json": 0.25, "schema_violation": 0.25, "http_400": 0.15}
    vlm_cfg = {
        "backend": "openai",
        "model": "sim",
        "concurrency": 4,
        "retries": 0,
        "cache_path": str(tmp_path / "cache.sqlite"),
        "simulator": {"enabled": True, "latency_s": 0.0, "faults": faults, "seed": 3},
        "max_failure_share": 1.0,  # the faults are the point here (outages: test_vlm_outage.py)
    }
    summary = annotate(
        manifest, root, vlm_cfg, tmp_path / "raw.jsonl", tmp_path / "stats.json", progress=False
    )
    raw = read_jsonl(tmp_path / "raw.jsonl")
    kinds = Counter(r["failure"]["kind"] for r in raw if r["status"] == "failed")
    assert set(kinds) <= {"malformed_json", "schema_violation", "http_4xx"}
    assert len(kinds) == 3, kinds  # every injected kind shows up, under its own name
    assert dict(kinds) == summary["failures_by_kind"]
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["failures_by_kind"] == dict(kinds)
    for r in raw:
        if r["status"] == "failed":
            assert "annotation" not in r and r["failure"]["error"]
    gt_stats = build_ground_truth(tmp_path / "raw.jsonl", tmp_path / "gt.jsonl", tmp_path / "gts.json", {})
    gt_ids = {g["image_id"] for g in read_jsonl(tmp_path / "gt.jsonl")}
    failed_ids = {r["image_id"] for r in raw if r["status"] == "failed"}
    assert failed_ids and not gt_ids & failed_ids
    assert gt_ids == {r["image_id"] for r in raw if r["status"] == "ok"}
    assert gt_stats["failures_by_kind"] == dict(kinds)

    # a re-run answers from the cache: same file, failures included (not retried unless configured)
    again = annotate(manifest, root, vlm_cfg, tmp_path / "raw2.jsonl", progress=False)
    assert again == summary
    assert (tmp_path / "raw2.jsonl").read_text() == (tmp_path / "raw.jsonl").read_text()


def test_api_key_is_sent_but_never_written(tmp_path, demo, monkeypatch, caplog):
    root, manifest = demo
    monkeypatch.setenv("TEACHER_TEST_KEY", SECRET)
    log_path = tmp_path / "job.log"
    handler = logging.FileHandler(log_path)
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.DEBUG)
    try:
        with Simulator(
            SimulatorConfig(enabled=True, latency_s=0.0), require_api_key=SECRET, echo_auth=True
        ) as sim:
            out = tmp_path / "results"
            cfg = {
                "backend": "openai",
                "model": "sim",
                "endpoints": [sim.openai_url],
                "api_key_env": "TEACHER_TEST_KEY",
                "concurrency": 2,
                "cache_path": str(tmp_path / "cache" / "vlm.sqlite"),
            }
            summary = annotate(manifest, root, cfg, out / "raw.jsonl", out / "stats.json", progress=False)
            assert summary["n_ok"] == summary["n_images"]  # the key was sent: the simulator demands it
            # a wrong key: the server echoes the header it got; the error must still not hold the key
            monkeypatch.setenv("TEACHER_TEST_KEY", SECRET + "-wrong")
            cfg["cache_salt"] = "wrong-key"
            with pytest.raises(vlm.VLMOutage, match="http_auth"):  # every request refused: the job fails
                annotate(manifest, root, cfg, out / "raw_bad.jsonl", out / "stats_bad.json", progress=False)
            cfg["max_failure_share"] = 1.0
            bad = annotate(manifest, root, cfg, out / "raw_bad.jsonl", out / "stats_bad.json", progress=False)
            assert bad["failures_by_kind"] == {"http_auth": bad["n_images"]}
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    secret = SECRET.encode()
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".sqlite" for p in files) and log_path.stat().st_size > 0
    for p in files:
        assert secret not in p.read_bytes(), f"API key found in {p}"
    assert SECRET not in caplog.text
