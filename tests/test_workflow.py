"""The workflow through real snakemake runs: config validation, dry runs, the demo end to end,
and rebuilding only what changed."""

from __future__ import annotations

import json
import os
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest

from wfutil import REPO, job_counts, load_config, snakemake, write_config

pytestmark = pytest.mark.workflow


# ---- config validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "mutate,needle",
    [
        (lambda c: c["mcdo"]["exp0"].update(trails=3), "trails"),  # unknown key (typo)
        (lambda c: c["mcdo"]["exp0"].update(trials="four"), "four"),  # wrong type
        (lambda c: c["mcdo"]["exp0"].pop("models"), "models"),  # missing required value
        (lambda c: c["mcdo"].update(precision="fp8"), "fp8"),  # not an allowed value
        (lambda c: c["images"].update(source="/no/such/folder"), "/no/such/folder"),
    ],
)
def test_bad_config_stops_with_a_message_naming_the_key(tmp_path, mutate, needle):
    cfg = load_config()
    mutate(cfg)
    proc = snakemake(tmp_path, write_config(tmp_path / "c.yaml", cfg), "-n", check=False)
    assert proc.returncode != 0
    assert needle in proc.stdout + proc.stderr


# ---- dry runs -------------------------------------------------------------------------------


def test_demo_dry_run_lists_the_expected_jobs(tmp_path):
    cfg = load_config()
    k = cfg["mcdo"]["exp0"]["trials"]
    proc = snakemake(tmp_path, write_config(tmp_path / "c.yaml", cfg), "-n")
    counts = job_counts(proc.stdout)
    assert counts == {
        "all": 1,
        "demo_images": 1,
        "manifest": 1,
        "pixels": 2,  # tiny_clip and tiny_siglip preprocess differently
        "mcdo_trial": 2 * k,
        "mcdo_summary": 2,
        "mcdo_overall": 1,
        "mcdo_figure_reliability": 2,
        "mcdo_figure_scores": 1,
    }


def test_full_config_dry_run_at_the_seeds_scale(tmp_path):
    images = tmp_path / "imagenet_val" / "n01440764"
    images.mkdir(parents=True)
    for i in range(3):
        (images / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(b"not decoded in a dry run")
    cfg = load_config("config.yaml")
    cfg["images"]["source"] = str(tmp_path / "imagenet_val")
    proc = snakemake(tmp_path, write_config(tmp_path / "c.yaml", cfg), "-n", "mcdo")
    counts = job_counts(proc.stdout)
    models = cfg["mcdo"]["exp0"]["models"]  # clip_b32, siglip2_b16, siglip2_so400m
    assert counts["pixels"] == 3  # crop224, squash224, squash384
    assert counts["mcdo_trial"] == len(models) * cfg["mcdo"]["exp0"]["trials"] == 30
    assert counts["mcdo_summary"] == 3 and counts["mcdo_figure_reliability"] == 3
    assert "demo_images" not in counts


def test_models_with_identical_preprocessing_share_one_pixel_file(tmp_path):
    cfg = load_config()
    cfg["mcdo"]["exp0"]["models"] = ["clip_b32", "clip_l14"]
    proc = snakemake(tmp_path, write_config(tmp_path / "c.yaml", cfg), "-n", "mcdo")
    assert job_counts(proc.stdout)["pixels"] == 1


def test_slurm_profile_dry_run(tmp_path):
    cfg = load_config()
    shutil.copytree(REPO / "profiles", tmp_path / "profiles")
    proc = snakemake(
        tmp_path,
        write_config(tmp_path / "c.yaml", cfg),
        "--profile",
        str(tmp_path / "profiles" / "slurm"),
        "-n",
    )
    assert job_counts(proc.stdout)["mcdo_trial"] == 2 * cfg["mcdo"]["exp0"]["trials"]


def test_rulegraph(tmp_path):
    proc = snakemake(tmp_path, write_config(tmp_path / "c.yaml", load_config()), "--rulegraph")
    for rule in ("manifest", "pixels", "mcdo_trial", "mcdo_summary", "mcdo_overall"):
        assert rule in proc.stdout


# ---- the demo, end to end -------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo config run end to end once; later tests change the config and rerun."""
    work = tmp_path_factory.mktemp("demo")
    cfg = load_config()
    configfile = write_config(work / "c.yaml", cfg)
    snakemake(work, configfile)
    snakemake(work, configfile, "--report", str(work / "report.html"))
    return work, cfg


def test_demo_outputs_follow_their_contracts(demo_run):
    work, cfg = demo_run
    res = work / "results" / "demo"
    manifest = pd.read_csv(res / "images" / "manifest.tsv", sep="\t", keep_default_na=False)
    assert list(manifest.columns) == ["image_id", "rel_path", "width", "height", "status", "reason"]
    ok = manifest[manifest.status == "ok"]
    assert len(ok) >= 15

    pixel_files = sorted((res / "pixels").glob("*.h5"))
    assert len(pixel_files) == 2
    for path in pixel_files:
        with h5py.File(path) as f:
            assert f["pixels"].shape[0] == len(ok) and f["pixels"].shape[1] == 3
            assert [s.decode() if isinstance(s, bytes) else s for s in f["image_id"][:]] == list(ok.image_id)

    T = sorted(cfg["mcdo"]["exp0"]["T"])
    for model in cfg["mcdo"]["exp0"]["models"]:
        for k in range(cfg["mcdo"]["exp0"]["trials"]):
            with np.load(res / "mcdo" / "exp0" / model / "p0.01" / f"trial{k}.npz", allow_pickle=False) as z:
                assert list(z["T"]) == T
                assert z["trace_pre"].shape == z["trace_post"].shape == (len(T), len(ok))
                assert np.all(z["trace_pre"] > 0) and np.all(np.isfinite(z["trace_post"]))
                meta = json.loads(str(z["meta"]))
                assert meta["model"] == model and meta["trial"] == k
        summary = json.loads((res / "mcdo" / "exp0" / model / "summary.json").read_text())
        assert set(summary["reliability"]) == {"pre", "post"}
        assert set(summary["reliability"]["pre"]) == {str(t) for t in T}
        for entry in summary["reliability"]["post"].values():
            assert entry["status"] in {"usable", "marginal", "failed", "insufficient_trials"}

    overall = json.loads((res / "mcdo" / "exp0" / "overall_summary.json").read_text())
    assert set(overall["models"]) == set(cfg["mcdo"]["exp0"]["models"])
    for png in [*(res / "figures" / "mcdo").glob("*.png")]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((res / "figures" / "mcdo").glob("*.png"))) == 3
    html = (work / "report.html").read_text(errors="replace")
    assert "exp0_reliability_tiny_clip.png" in html
    assert (res / "logs" / "mcdo" / "exp0" / "tiny_clip" / "p0.01" / "trial0.log").stat().st_size > 0


def test_a_complete_run_has_nothing_left_to_do(demo_run):
    work, _ = demo_run
    proc = snakemake(work, work / "c.yaml", "-n")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def _mtimes(root):
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and "logs" not in p.parts}


def test_rebuild_only_what_changed(demo_run):
    work, cfg = demo_run
    res = work / "results" / "demo"

    # a figure setting: only figures rerun
    before = _mtimes(res)
    cfg["figures"]["dpi"] = cfg["figures"]["dpi"] + 10
    snakemake(work, write_config(work / "c.yaml", cfg))
    changed = {p for p, t in _mtimes(res).items() if before.get(p) != t}
    assert changed and all(p.suffix == ".png" for p in changed), sorted(map(str, changed))

    # one more trial: the new trial, summaries and figures rerun; pixel tensors and old trials do not
    before = _mtimes(res)
    k = cfg["mcdo"]["exp0"]["trials"]
    cfg["mcdo"]["exp0"]["trials"] = k + 1
    snakemake(work, write_config(work / "c.yaml", cfg))
    changed = {p for p, t in _mtimes(res).items() if before.get(p) != t}
    names = {os.path.relpath(p, res) for p in changed}
    assert {f"mcdo/exp0/{m}/p0.01/trial{k}.npz" for m in cfg["mcdo"]["exp0"]["models"]} <= names
    assert {f"mcdo/exp0/{m}/summary.json" for m in cfg["mcdo"]["exp0"]["models"]} <= names
    assert "mcdo/exp0/overall_summary.json" in names
    assert any(n.startswith("figures/") for n in names)
    assert not any(n.startswith(("pixels/", "images/")) for n in names), sorted(names)
    assert not any(n.endswith("trial0.npz") for n in names)
