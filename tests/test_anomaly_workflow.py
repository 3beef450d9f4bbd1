"""The anomaly chain of the demo config end to end through real snakemake."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from wfutil import load_config, snakemake, write_config

pytestmark = pytest.mark.workflow


def test_demo_anomaly_chain_end_to_end(tmp_path):
    cfg = load_config()
    an = cfg["anomaly"]
    proc = snakemake(tmp_path, write_config(tmp_path / "c.yaml", cfg), "anomaly")
    assert "Finished" in proc.stdout + proc.stderr
    out = tmp_path / "results" / cfg["run"] / "anomaly"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["methods"] == an["methods"]
    for m in an["methods"]:
        p = metrics["pooled"][m]
        assert 0.5 < p["auroc"] <= 1.0 and 0.0 < p["aupr"] <= 1.0 and 0.0 <= p["fpr95"] <= 1.0
        assert p["n_anomaly"] > 0
        q = metrics["per_image"][m]
        assert q["n_images_used"] + q["n_images_no_anomaly"] + q["n_images_no_normal"] == q["n_images"]
    table = pd.read_csv(out / "comparison.csv")
    assert list(table["method"]) == an["methods"]
    # HEAT ran on the tiny net's features (no fallback) and has its row; the producer's mIoU is reported
    assert "heat" in an["methods"] and metrics["heat"]["fallback"] is None
    assert (out / "heat" / "feature_stats.safetensors").stat().st_size > 0
    seg = metrics["segmentation"]
    assert 0.3 < seg["miou"] <= 1.0 and seg["n_pixels"] > 0
    assert (table["producer_miou"] - seg["miou"]).abs().max() < 1e-9
    assert "producer mIoU" in (out / "comparison.md").read_text()
    # float32 scores: pooled metrics exact for the scores themselves
    assert all(metrics["pooled"][m]["quantization"]["exact"] for m in an["methods"])
    sub = pd.read_csv(out / "subsampling.tsv", sep="\t")
    full = sub[sub["ratio"] == 1.0]
    assert (full["auroc_mean"] - full["auroc_exact"]).abs().max() < 1e-12
    for fig in ("roc_pr", "threshold_sensitivity", "subsampling"):
        assert (out / "figures" / f"{fig}.png").stat().st_size > 10_000
    if an.get("classification", {}).get("source", "none") != "none":
        got = json.loads((out / "classification" / "metrics.json").read_text())
        assert got["methods"] == [m for m in an["methods"] if m != "heat"]  # HEAT is a pixel-map score
    # image-level OOD with the trained classifier: real photos against textures and generated images
    for model in an["image_ood"]["models"]:
        ood = json.loads((out / "image_ood" / model / "metrics.json").read_text())
        assert ood["n_images"]["photo"] >= 15 and ood["n_images"]["texture"] == 3
        groups = {"texture", *an["image_ood"]["generated"]}
        assert set(ood["by_group"]) == groups
        for m in ood["methods"]:
            assert 0.0 <= ood["pooled"][m]["auroc"] <= 1.0
            assert (
                ood["pooled"][m]["n_anomaly"] == 3 + len(an["image_ood"]["generated"]) * an["image_ood"]["n"]
            )
        table = pd.read_csv(out / "image_ood" / model / "per_image.tsv", sep="\t")
        assert len(table) == sum(ood["n_images"].values())
    # nothing left to do on a second run
    again = snakemake(tmp_path, tmp_path / "c.yaml", "anomaly", "-n")
    assert "Nothing to be done" in again.stdout + again.stderr
