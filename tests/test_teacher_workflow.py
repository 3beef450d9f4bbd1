"""The teacher chain end to end through real snakemake, against the built-in VLM simulator."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest

from vlmrel.vlm.config import SimulatorConfig
from vlmrel.vlm.simulator import Simulator
from wfutil import REPO, SNAKEMAKE, job_counts, load_config, snakemake, write_config

pytestmark = pytest.mark.workflow

# the teacher section proposed for config/demo.yaml (the test uses the file's own once it has one)
DEMO_TEACHER = {
    "models": ["tiny_clip"],
    "seed": 42,
    "mem_mb": 2000,
    "ground_truth": {
        "min_object_confidence": 0.7,
        "include_non_main": False,
        "object_map": {
            "keyboard": "object.electronics.peripheral.keyboard",
            "mouse": "object.electronics.peripheral.mouse",
            "monitor": "object.electronics.display.monitor",
            "phone": "object.electronics.phone",
            "laptop": "object.electronics.laptop",
            "tablet": "object.electronics.tablet",
            "food": "object.food",
            "drink": "object.drink",
            "dessert": "object.food.dessert",
            "person": "object.person",
            "cat": "object.animal.cat",
            "horse": "object.animal.horse",
            "vehicle": "object.vehicle",
            "camera": "object.electronics.camera",
            "clock": "object.clock",
            "coin": "object.coin",
            "document": "object.document",
            "building": "object.building",
            "flower": "object.plant.flower",
        },
    },
    "human": {"size": 10, "seed": 42},
    "embeddings": {"batch_size": 16},
    "heads": {"max_epochs": 300, "patience": 30},
}
SECRET = "sk-vlmrel-test-0123456789abcdef-SECRET"


def teacher_config(**vlm_changes) -> dict:
    cfg = load_config()
    cfg["chains"] = ["teacher"]
    cfg["teacher"] = {**DEMO_TEACHER, **cfg.get("teacher", {})}
    cfg["vlm"] = {**cfg["vlm"], **vlm_changes}
    return cfg


def test_teacher_chain_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMREL_TEST_API_KEY", SECRET)
    cfg = teacher_config(api_key_env="VLMREL_TEST_API_KEY")
    conf = write_config(tmp_path / "c.yaml", cfg)
    proc = snakemake(tmp_path, conf, "teacher")
    assert "Finished" in proc.stdout + proc.stderr
    run = tmp_path / "results" / cfg["run"]
    out = run / "teacher"

    # raw.jsonl: one line per accepted image, an annotation or a failure by kind
    manifest = [line.split("\t") for line in (run / "images" / "manifest.tsv").read_text().splitlines()[1:]]
    ok_ids = [row[0] for row in manifest if row[4] == "ok"]
    raw = [json.loads(line) for line in (out / "raw.jsonl").read_text().splitlines()]
    assert [r["image_id"] for r in raw] == ok_ids
    for r in raw:
        assert r["status"] in ("ok", "failed")
        assert ("annotation" in r) == (r["status"] == "ok") and ("failure" in r) == (r["status"] == "failed")
    failed = Counter(r["failure"]["kind"] for r in raw if r["status"] == "failed")
    stats = json.loads((out / "vlm_stats.json").read_text())
    assert sum(failed.values()) == stats["failed"]

    # ground truth: only the successful annotations, in the seed's format
    gt = [json.loads(line) for line in (out / "ground_truth_auto.jsonl").read_text().splitlines()]
    assert [g["image_id"] for g in gt] == [r["image_id"] for r in raw if r["status"] == "ok"]
    for g in gt:
        assert set(g) == {"image_id", "scene", "attributes", "objects"}
        assert len(g["scene"]) == 1 and g["scene"][0].startswith("scene.")
        assert all(k.startswith("attr.") for k in g["attributes"])
        assert all(o.startswith("object.") for o in g["objects"])
    gt_stats = json.loads((out / "ground_truth_stats.json").read_text())
    assert gt_stats["failures_by_kind"] == dict(failed)

    # human sample + Label Studio tasks
    sample = json.loads((out / "human_sample.json").read_text())
    assert len(sample) == min(DEMO_TEACHER["human"]["size"], len(gt))
    assert {s["image_id"] for s in sample} <= {g["image_id"] for g in gt}
    tasks = json.loads((out / "label_studio" / "tasks.json").read_text())
    assert [t["data"]["image_id"] for t in tasks] == [s["image_id"] for s in sample]
    assert '<Choices name="scene"' in (out / "label_studio" / "config.xml").read_text()

    # embeddings from the pixel file
    with h5py.File(run / "embeddings" / "tiny_clip.h5", "r") as f:
        emb = f["embedding"][...]
        assert list(f["image_id"].asstr()[...]) == ok_ids
        assert f.attrs["model"] == "tiny_clip"
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    # the demo's trained network: heads on effnet_lite0's 1280-d pre-logits features
    for model in cfg["teacher"]["models"]:
        ev_m = json.loads((out / model / "eval.json").read_text())
        assert ev_m["n"] == len(gt)
    if "effnet_lite0" in cfg["teacher"]["models"]:
        with h5py.File(run / "embeddings" / "effnet_lite0.h5", "r") as f:
            assert f["embedding"].shape == (len(ok_ids), 1280) and f.attrs["model"] == "effnet_lite0"

    # heads + card, eval, figures
    card = json.loads((out / "tiny_clip" / "card.json").read_text())
    assert card["n_examples"] == len(gt) and len(card["training_data_hash"]) == 64
    assert set(card["labels"]["derived_attributes"]) == {"attr.is_document", "attr.is_screenshot"}
    ev = json.loads((out / "tiny_clip" / "eval.json").read_text())
    assert ev["truth"] == "auto" and ev["n"] == len(gt)
    cm = np.array(ev["scene"]["confusion_matrix"])
    assert cm.sum() == len(gt) and abs(np.trace(cm) / cm.sum() - ev["scene"]["accuracy"]) < 1e-12
    assert set(ev["attributes"]) == {
        "attr.has_person",
        "attr.has_animal",
        "attr.is_document",
        "attr.is_screenshot",
    }
    assert "heldout" in ev
    for fig in ("confusion", "attributes"):
        assert (out / "tiny_clip" / "figures" / f"{fig}.png").stat().st_size > 10_000

    # the API key is nowhere under results/, the logs or the cache
    secret = SECRET.encode()
    for root in (tmp_path / "results", tmp_path / ".vlmrel-cache", tmp_path / ".snakemake"):
        for p in root.rglob("*"):
            if p.is_file():
                assert secret not in p.read_bytes(), f"API key found in {p}"
    assert (tmp_path / ".vlmrel-cache").is_dir()

    again = snakemake(tmp_path, conf, "teacher", "-n")
    assert "Nothing to be done" in again.stdout + again.stderr

    # an audited human truth (here: the review sample with one scene corrected) replaces the auto truth
    audited = [dict(r) for r in sample]
    audited[0]["scene"] = [
        "scene.screenshot" if audited[0]["scene"] != ["scene.screenshot"] else "scene.food"
    ]
    (tmp_path / "audited.json").write_text(json.dumps(audited))
    cfg["teacher"] = {**cfg["teacher"], "human": {**cfg["teacher"]["human"], "audited": "audited.json"}}
    conf = write_config(tmp_path / "c.yaml", cfg)
    dry = snakemake(tmp_path, conf, "teacher", "-n")
    counts = job_counts(dry.stdout)
    n_models = len(cfg["teacher"]["models"])
    assert counts.get("teacher_audited_truth") == 1 and counts.get("teacher_eval") == n_models
    assert not {"teacher_annotate", "embeddings", "teacher_heads"} & set(counts)
    snakemake(tmp_path, conf, "teacher")
    ev = json.loads((out / "tiny_clip" / "eval.json").read_text())
    assert ev["truth"] == "human_audited" and ev["n"] == len(audited) and "heldout" not in ev
    assert json.loads((out / "ground_truth_human.json").read_text()) == audited


def _annotate_cmd(workdir: Path, conf: Path) -> list[str]:
    target = "results/demo/teacher/raw.jsonl"
    return [
        SNAKEMAKE,
        "-s",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(conf),
        "--cores",
        "2",
        target,
    ]


def test_annotate_killed_then_rerun(tmp_path):
    """kill -9 of the annotate job: finished answers are kept, none is requested twice, same output."""
    n_conc = 1
    with Simulator(SimulatorConfig(enabled=True, latency_s=0.25)) as sim:
        cfg = teacher_config(
            backend="openai",
            endpoints=[sim.openai_url],
            concurrency=n_conc,
            simulator={"enabled": False},
        )
        assert cfg["run"] == "demo"
        work, ref = tmp_path / "killed", tmp_path / "uninterrupted"
        work.mkdir()
        ref.mkdir()
        conf = write_config(tmp_path / "c.yaml", cfg)
        snakemake(work, conf, "results/demo/images/manifest.tsv")
        n_images = sum(
            1
            for line in (work / "results/demo/images/manifest.tsv").read_text().splitlines()[1:]
            if line.split("\t")[4] == "ok"
        )
        sim.reset_stats()
        proc = subprocess.Popen(
            _annotate_cmd(work, conf),
            cwd=work,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 90
        while sim.stats()["completed"] < n_images // 3:
            assert proc.poll() is None, "annotate finished before it could be killed"
            assert time.monotonic() < deadline, "annotate made no progress"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        time.sleep(0.3)
        first = sim.stats()
        assert not (work / "results/demo/teacher/raw.jsonl").exists()

        import sqlite3

        db = sqlite3.connect(work / cfg["vlm"]["cache_path"])
        cached = db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
        db.close()
        # Each slot may hold one request on the wire plus one answer that came back and freed
        # the slot but was not yet committed (the next request is sent first, see
        # vlmrel.vlm.client._SEND_FIRST_YIELDS): at most 2 * n_conc requests are lost.
        assert first["completed"] - 2 * n_conc <= cached < n_images
        assert first["requests"] <= cached + 2 * n_conc

        sim.reset_stats()
        snakemake(work, conf, "--unlock")
        snakemake(work, conf, "results/demo/teacher/raw.jsonl")
        second = sim.stats()
        assert second["requests"] == n_images - cached  # only the missing ones are sent
        assert first["requests"] + second["requests"] <= n_images + 2 * n_conc

        sim.reset_stats()
        snakemake(ref, conf, "results/demo/teacher/raw.jsonl")
        assert sim.stats()["requests"] == n_images
    resumed = (work / "results/demo/teacher/raw.jsonl").read_text()
    assert resumed == (ref / "results/demo/teacher/raw.jsonl").read_text()
    assert len(resumed.splitlines()) == n_images


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
