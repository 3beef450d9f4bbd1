"""The grounding chain of the demo config end to end through real snakemake, against the simulator."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from wfutil import job_counts, load_config, snakemake, write_config

pytestmark = pytest.mark.workflow

GROUNDING = {
    "data": {"source": "demo", "demo": {"n_scenes": 24, "seed": 0}},
    "threshold_subset": {
        "name": "demo_t9",
        "n": 9,
        "seed": 1,
        "perturbations": {"brightness_contrast": {"brightness": [-0.15, 0.0, 0.15], "contrast": [0.8, 1.0, 1.2]}},
    },
    "subset": {"name": "demo12", "n": 12, "seed": 0},
    "perturbations": {
        "brightness_contrast": {"brightness": [-0.15, 0.0, 0.15], "contrast": [0.8, 1.0, 1.2]},
        "blur": [1.0],
        "noise": [0.04],
        "corruptions": {"names": ["jpeg_compression"], "severities": [2]},
    },
    "drift": {"region": {"enabled": True, "model": "tiny_clip"}},
}
CONTENT = ["sample_id", "perturbation_id", "parameters", "raw_answer", "box", "status", "failure_kind"]


def _config(tmp_path):
    cfg = load_config()
    cfg["chains"] = ["grounding"]
    cfg["grounding"] = GROUNDING
    # more injected answer faults than the demo's, so failures surely occur among 156 requests
    cfg["vlm"]["simulator"]["faults"] = {**cfg["vlm"]["simulator"].get("faults", {}), "malformed_json": 0.06}
    return write_config(tmp_path / "c.yaml", cfg), cfg


def test_demo_grounding_chain_end_to_end(tmp_path):
    cfgfile, cfg = _config(tmp_path)
    proc = snakemake(tmp_path, cfgfile, "grounding")
    assert "Finished" in proc.stdout + proc.stderr
    root = tmp_path / "results" / cfg["run"] / "grounding"
    out = root / "demo12"

    subset = json.loads((root / "subsets" / "demo12.json").read_text())
    assert subset["name"] == "demo12" and len(subset["indices"]) == 12
    assert subset["difficulty_counts"] == {"easy": 4, "medium": 4, "hard": 4}
    tsub = json.loads((root / "subsets" / "demo_t9.json").read_text())
    assert len(tsub["indices"]) == 9 and not set(tsub["indices"]) & set(subset["indices"])  # disjoint
    assert subset["disjoint_from"] == "demo_t9"
    assert len(pd.read_csv(root / "demo_t9" / "grid.tsv", sep="\t")) == 9

    grid = pd.read_csv(out / "grid.tsv", sep="\t")
    assert len(grid) == 9 + 3 and grid["id"].is_unique
    assert {"id", "family", "params", "magnitude"} <= set(grid.columns)

    pred = pd.read_parquet(out / "predictions.parquet")
    for col in (*CONTENT, "latency_s", "cache_hit"):
        assert col in pred.columns
    assert len(pred) == 12 * 13
    assert set(pred["perturbation_id"]) == {"original", *grid["id"]}
    failed = pred["status"] == "failed"
    assert failed.any(), "the injected faults produced no recorded failure"
    assert pred.loc[failed, "box"].isna().all() and pred.loc[failed, "failure_kind"].notna().all()
    # a fresh cache in tmp_path: only the identity grid point (b=0, c=1, the original image again) is shared
    assert pred["cache_hit"].sum() <= 12

    ious = pd.read_parquet(out / "ious.parquet")
    key = ["sample_id", "perturbation_id"]
    m = ious.merge(pred[[*key, "status"]], on=key, suffixes=("", "_pred"))
    assert len(m) == len(pred)
    assert m.loc[m["status_pred"] == "failed", "iou"].isna().all()
    assert m.loc[m["status_pred"] == "ok", "iou"].between(0, 1).all()

    thresholds = json.loads((out / "thresholds.json").read_text())
    assert set(thresholds["signals"]) == {"perturbation_magnitude", "semantic_drift", "iou_drop"}
    for entry in thresholds["signals"].values():
        assert entry["exact"]["mi"] >= entry["lbfgsb"]["mi"] - 1e-12
        assert entry["exact"]["mi"] >= entry["baseline"]["mi"] - 1e-12
        assert len(entry["exact"]["thresholds"]) == 3
        n_pert_failed = int(m.loc[m["perturbation_id"] != "original", "iou"].isna().sum())
        assert entry["n_pairs"] + entry["n_dropped"] == 12 * 12 and entry["n_dropped"] >= n_pert_failed

    boundary = json.loads((out / "boundary.json").read_text())
    assert boundary["failure_rate"]["n_failed"] == int(failed.sum())
    assert boundary["iou"]["perturbed_mean"] == pytest.approx(
        ious.loc[ious["perturbation_id"] != "original", "iou"].dropna().mean()
    )
    chosen = boundary["thresholds"]
    # validated out-of-sample: the thresholds chosen on the threshold subset, through the DAG
    t9 = json.loads((root / "demo_t9" / "thresholds.json").read_text())
    assert chosen["thresholds"] == t9["signals"]["perturbation_magnitude"]["exact"]["thresholds"]
    assert boundary["out_of_sample"] and boundary["thresholds_subset"] == "demo_t9"
    assert "chosen on subset demo_t9" in boundary["thresholds_source"]
    own = thresholds["signals"]["perturbation_magnitude"]["exact"]["thresholds"]
    assert boundary["in_sample_reference"]["thresholds"] == own
    # semantic boundary samples beside the geometric ones, with beta_sem of the threshold subset
    sem = boundary["semantic"]
    assert sem["thresholds"] == t9["signals"]["semantic_drift"]["exact"]["thresholds"]
    assert set(sem["samples"]) <= set(subset["sample_ids"]) and 0 <= sem["rate"] <= 1
    ov = boundary["overlap"]
    assert ov["n_both"] == len(set(sem["samples"]) & set(chosen["boundary_000"]["samples"]))
    checks = {c["check"]: c for c in boundary["checks"]["items"]}
    assert set(checks) == {"iou_spread", "share_sensitive", "boundary_rate", "geo_sem_rho", "mi_gain"}
    assert checks["boundary_rate"]["value"] == chosen["boundary_000"]["rate"]
    assert checks["boundary_rate"]["pass"] == (0.2 <= chosen["boundary_000"]["rate"] <= 0.4)
    in_out = json.loads((out / "in_vs_out_of_sample.json").read_text())
    assert in_out["disjoint"] and [r["in_sample"] for r in in_out["rows"]] == [True, False, True]
    for table in ("thresholds", "boundary", "checks"):
        assert "<table>" in (out / "tables" / f"{table}.html").read_text()
    assert "out-of-sample" in (out / "tables" / "in_vs_out_of_sample.html").read_text()
    for name in ("boundary_000", "boundary_001"):
        assert set(chosen[name]["by_difficulty"]) == {"easy", "medium", "hard"}
        assert set(chosen[name]["samples"]) <= set(subset["sample_ids"])
    assert boundary["baseline"]["thresholds"] == [0.3, 0.5, 0.7]
    assert "rho" in boundary["spearman_iou_drop_vs_semantic_drift"]["pairs"]

    drift = pd.read_parquet(out / "drift.parquet")
    summary = json.loads((out / "drift.json").read_text())
    assert summary["embedder"] == "minilm" and summary["n_texts_embedded"] <= summary["n_answers"]
    d = drift.merge(pred[[*key, "status"]], on=key)
    assert d.loc[d["status"] == "failed", "semantic_drift"].isna().all()
    assert d.loc[d["status"] == "failed", "region_drift"].isna().all()
    assert d.loc[d["status"] == "ok", "region_drift"].notna().sum() > 0
    assert "rho" in boundary["spearman_iou_drop_vs_region_drift"]["pairs"]
    assert np.nanmax(drift["semantic_drift"]) > 0  # the answers are embedded, not the question

    for fig in ("validation", "thresholds", "timing"):
        assert (out / "figures" / f"{fig}.png").stat().st_size > 10_000

    # nothing left to do on a second run
    again = snakemake(tmp_path, cfgfile, "grounding", "-n")
    assert "Nothing to be done" in again.stdout + again.stderr

    # predictions lost (a killed job leaves none): the re-run answers everything from the cache and
    # writes the same predictions
    (out / "predictions.parquet").unlink()
    snakemake(tmp_path, cfgfile, "grounding")
    redo = pd.read_parquet(out / "predictions.parquet")
    assert redo["cache_hit"].all()
    pd.testing.assert_frame_equal(pred[CONTENT], redo[CONTENT])
    assert json.loads((out / "boundary.json").read_text()) == boundary


def test_local_refcoco_layouts_dry_run_and_subset(tmp_path):
    """The real-run sources (parquet shards, refs(unc).p + instances.json) enter the DAG from config
    paths; the subset is selected from the parquet and reused from a saved indices file."""
    from test_grounding_data import _classic_files
    from vlmrel.grounding.data import write_demo_parquet

    write_demo_parquet(tmp_path / "refcoco" / "val-00000-of-00001.parquet", 30, 5, (160, 120))
    cfg = load_config()
    cfg["chains"] = ["grounding"]
    cfg["grounding"] = {
        "data": {"source": "parquet", "parquet": {"path": str(tmp_path / "refcoco")}},
        "subset": {"name": "val9", "n": 9, "seed": 3},
        "perturbations": {"brightness_contrast": "5x5"},
    }
    cfgfile = write_config(tmp_path / "p.yaml", cfg)
    dry = snakemake(tmp_path, cfgfile, "grounding", "-n")
    counts = job_counts(dry.stdout + dry.stderr)
    assert "grounding_demo_data" not in counts
    assert counts["grounding_predict"] == 1 and counts["grounding_subset"] == 1
    root = tmp_path / "results" / cfg["run"] / "grounding"
    snakemake(
        tmp_path,
        cfgfile,
        f"results/{cfg['run']}/grounding/subsets/val9.json",
        f"results/{cfg['run']}/grounding/val9/grid.tsv",
    )
    subset = json.loads((root / "subsets" / "val9.json").read_text())
    assert subset["dataset_size"] == 30 and subset["difficulty_counts"] == {"easy": 3, "medium": 3, "hard": 3}
    assert len(pd.read_csv(root / "val9" / "grid.tsv", sep="\t")) == 25

    # the same subset again, named differently, from the saved indices
    np.save(tmp_path / "small_subset_indices.npy", np.asarray(subset["indices"], dtype=np.int64))
    cfg["grounding"]["subset"] = {"name": "val9b", "indices": str(tmp_path / "small_subset_indices.npy")}
    snakemake(
        tmp_path,
        write_config(tmp_path / "p2.yaml", cfg),
        f"results/{cfg['run']}/grounding/subsets/val9b.json",
    )
    again = json.loads((root / "subsets" / "val9b.json").read_text())
    assert again["indices"] == subset["indices"] and again["sample_ids"] == subset["sample_ids"]

    # the classic layout
    classic = tmp_path / "classic"
    classic.mkdir()
    _classic_files(classic)
    cfg["grounding"] = {
        "data": {
            "source": "classic",
            "classic": {
                "refs": str(classic / "refs(unc).p"),
                "instances": str(classic / "instances.json"),
                "images": str(classic / "images"),
            },
        },
        "subset": {"name": "c2", "n": 2, "allocation": "proportional"},
    }
    cfgfile = write_config(tmp_path / "c.yaml", cfg)
    snakemake(tmp_path, cfgfile, f"results/{cfg['run']}/grounding/subsets/c2.json")
    c2 = json.loads((root / "subsets" / "c2.json").read_text())
    assert c2["sample_ids"] == ["ref5", "ref7"]
