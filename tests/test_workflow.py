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
        (lambda c: c.pop("teacher"), "no 'teacher:' section"),  # a listed chain without its section
        (lambda c: c["vlm"].update(backend="llama"), "llama"),
    ],
)
def test_bad_config_stops_with_a_message_naming_the_key(tmp_path, mutate, needle):
    cfg = load_config()
    mutate(cfg)
    proc = snakemake(tmp_path, write_config(tmp_path / "c.yaml", cfg), "-n", check=False)
    assert proc.returncode != 0
    assert needle in proc.stdout + proc.stderr


def test_sections_of_unlisted_chains_may_be_left_out(tmp_path):
    cfg = load_config()
    cfg["chains"] = ["mcdo"]
    for section in ("anomaly", "vlm", "teacher", "grounding"):
        cfg.pop(section, None)
    proc = snakemake(tmp_path, write_config(tmp_path / "c.yaml", cfg), "-n")
    assert job_counts(proc.stdout)["mcdo_gate"] == 1


# ---- dry runs -------------------------------------------------------------------------------


def _phase1_counts(mcdo: dict) -> dict[str, int]:
    """The Phase 1 jobs of an mcdo config, computed from it (the gate hides Phase 2 in a dry run)."""

    def jobs(exp: str) -> int:
        return len(mcdo[exp]["models"]) * mcdo[exp]["trials"] if exp in mcdo else 0

    def models(exp: str) -> int:
        return len(mcdo[exp]["models"]) if exp in mcdo else 0

    return {
        "mcdo_trial": jobs("exp0") + jobs("exp5_subset"),
        "mcdo_geometry": jobs("exp0b") + jobs("exp4_subset"),
        "mcdo_summary": models("exp0"),
        "mcdo_overall": 1,
        "mcdo_figure_reliability": models("exp0"),
        "mcdo_figure_scores": 1,
        "mcdo_experiment_summary": models("exp0b") + models("exp4_subset"),
        "mcdo_figure_geometry": 1 if "exp0b" in mcdo else 0,
        "mcdo_figure_experiment": models("exp4_subset"),
        "mcdo_ambiguity": models("exp5_subset"),
        "mcdo_ambiguity_overall": 1 if "exp5_subset" in mcdo else 0,
        "mcdo_figure_ambiguity": models("exp5_subset"),
        "mcdo_gate": 1,
    }


def test_demo_dry_run_lists_the_expected_jobs(tmp_path):
    cfg = load_config()
    cfg["chains"] = ["mcdo"]
    proc = snakemake(tmp_path, write_config(tmp_path / "c.yaml", cfg), "-n")
    counts = job_counts(proc.stdout)
    assert counts == {
        "all": 1,
        "demo_images": 1,
        "manifest": 1,
        "pixels": 3,  # tiny_clip, tiny_siglip and effnet_lite0 preprocess differently
        **{rule: n for rule, n in _phase1_counts(cfg["mcdo"]).items() if n},
    }
    assert counts["mcdo_trial"] == 3 * 4 + 3 * 1 and counts["mcdo_geometry"] == 3 + 2 * 3


def test_full_config_dry_run_at_the_seeds_scale(tmp_path):
    images = tmp_path / "imagenet_val" / "n01440764"
    images.mkdir(parents=True)
    for i in range(3):
        (images / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(b"not decoded in a dry run")
    cfg = load_config("config.yaml")
    cfg["images"]["source"] = str(tmp_path / "imagenet_val")
    proc = snakemake(tmp_path, write_config(tmp_path / "c.yaml", cfg), "-n", "mcdo")
    counts = job_counts(proc.stdout)
    mcdo = cfg["mcdo"]
    assert counts["pixels"] == 3  # crop224 (CLIP), squash224 (SigLIP2-B/16), squash384 (So400m)
    assert len(mcdo["exp0"]["models"]) * mcdo["exp0"]["trials"] == 30  # the seed: 3 models x K=10
    expected = _phase1_counts(mcdo)
    assert {rule: counts.get(rule, 0) for rule in expected} == expected
    # Phase 2 waits for the gate: none of its jobs is in the DAG before the gate has run
    assert "pixels_synthetic" not in counts and "exp=exp1" not in proc.stdout
    assert "demo_images" not in counts


def test_models_with_identical_preprocessing_share_one_pixel_file(tmp_path):
    cfg = load_config()
    cfg["chains"] = ["mcdo"]
    for exp in ("exp0", "exp0b", "exp4_subset", "exp5_subset"):
        cfg["mcdo"][exp]["models"] = ["clip_b32", "clip_l14"]
    proc = snakemake(tmp_path, write_config(tmp_path / "c.yaml", cfg), "-n", "phase1")
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
    assert job_counts(proc.stdout)["mcdo_trial"] == _phase1_counts(cfg["mcdo"])["mcdo_trial"]


def test_rulegraph(tmp_path):
    proc = snakemake(tmp_path, write_config(tmp_path / "c.yaml", load_config()), "--rulegraph")
    for rule in ("manifest", "pixels", "mcdo_trial", "mcdo_summary", "mcdo_overall", "mcdo_gate"):
        assert rule in proc.stdout


# ---- the gate: a data-dependent DAG ---------------------------------------------------------


def _gate_config() -> dict:
    """A small mcdo config whose gate fails (T <= 4, K = 2, 8 images) and a small Phase 2 behind it."""
    cfg = load_config()
    cfg["chains"] = ["mcdo"]
    mcdo = cfg["mcdo"]
    for exp in ("exp2", "exp4_full", "exp5_full", "convergence", "exp10", "exp11"):
        mcdo.pop(exp)

    def small(T, trials):
        return {"models": ["tiny_clip"], "T": T, "trials": trials, "num_images": 8}

    # input dropout at T <= 4 keeps tiny_clip's score unreliable (failed, not marginal: no sweep)
    mcdo["dropout_kind"] = "input"
    mcdo["exp0"] = {**small([2, 4], 2), "p": 0.01}
    mcdo["exp0b"] = small([4], 2)
    mcdo["exp4_subset"] = small([4], 2)
    mcdo["exp5_subset"] = {**small([4], 1), "class_names": "demo"}
    mcdo["gate"] = {"force_phase2": False}
    mcdo["exp1"] = {**small([4], 2), "rates": [0.01, 0.01, 0.05]}  # 0.01 twice: a replicate arm
    mcdo["exp3"] = {**small([8], 2), "kinds": ["input", "gaussian"]}
    return cfg


@pytest.fixture(scope="module")
def gate_run(tmp_path_factory):
    """phase2 on a failing gate; then the force flag (dry run, then the real run)."""
    work = tmp_path_factory.mktemp("gate")
    cfg = _gate_config()
    configfile = write_config(work / "c.yaml", cfg)
    mcdo = work / "results" / cfg["run"] / "mcdo"
    state = {"failed": snakemake(work, configfile, "phase2")}
    state["gate"] = json.loads((mcdo / "gate.json").read_text())
    state["note"] = (mcdo / "phase2_not_run.md").read_text()
    state["dirs"] = sorted(p.name for p in mcdo.iterdir() if p.is_dir())

    cfg["mcdo"]["gate"]["force_phase2"] = True
    write_config(configfile, cfg)
    snakemake(work, configfile, f"results/{cfg['run']}/mcdo/gate.json")  # the gate reruns: params changed
    state["forced_dry"] = job_counts(snakemake(work, configfile, "phase2", "-n").stdout)
    snakemake(work, configfile, "mcdo")
    return work, cfg, state


def test_a_failed_gate_keeps_phase2_out_of_the_dag(gate_run):
    _, _, state = gate_run
    assert state["gate"]["decision"] == "negative_result" and state["gate"]["run_phase2"] is False
    assert "negative result" in state["note"] and "Phase 2 is not run" in state["note"]
    # nothing of Phase 2 (nor the rest of Phase 1) ran: only the gate's input and its recorded check
    assert state["dirs"] == ["exp0", "exp5_subset"]
    assert set(state["gate"]["checks"]) == {"exp5_subset"} and state["gate"]["checks"]["exp5_subset"]["blocking"] is False
    log = state["failed"].stdout + state["failed"].stderr
    assert "exp=exp1" not in log and "exp=exp3" not in log and "mcdo_experiment_summary" not in log


def test_forcing_phase2_brings_it_into_the_dag(gate_run):
    work, cfg, state = gate_run
    # exp1: rates 0.01 (listed twice, one set of files) and 0.05; exp3: input and gaussian; K=2 each
    assert state["forced_dry"]["mcdo_trial"] == 2 * 2 + 2 * 2
    assert state["forced_dry"]["mcdo_experiment_summary"] == 2
    gate = json.loads((work / "results" / cfg["run"] / "mcdo" / "gate.json").read_text())
    assert gate["decision"] == "negative_result" and gate["forced"] and gate["run_phase2"]


def test_phase3_needs_its_own_flag(gate_run):
    """force_phase2 does not force Phase 3: on a failed gate it writes its note and runs nothing."""
    work, cfg, _ = gate_run
    mcdo = work / "results" / cfg["run"] / "mcdo"
    assert "Phase 3 is not run" in (mcdo / "phase3_not_run.md").read_text()
    assert not any((mcdo / exp).exists() for exp in ("exp6", "exp7", "exp8", "exp9"))


def test_exp1_equal_rates_give_spearman_one(gate_run):
    work, cfg, _ = gate_run
    summary = json.loads((work / "results" / cfg["run"] / "mcdo/exp1/tiny_clip/summary.json").read_text())
    assert summary["arms"] == ["0.01#1", "0.01#2", "0.05"]
    by_pair = {(p["arm_a"], p["arm_b"]): p["spearman"] for p in summary["pairs"]}
    assert by_pair[("0.01#1", "0.01#2")] == 1.0
    assert by_pair[("0.01#1", "0.05")] < 1.0  # another rate draws other masks


def test_exp3_matched_gaussian_noise_gives_the_expected_trace_of_input_dropout(gate_run):
    """Multiplicative N(1, p/(1-p)) noise has the variance of inverted input dropout at rate p, so
    (to first order in the noise) the same expected trace.

    Two trials of 8 images at T = 8 are a small sample: over 20 trials of this config the ratio of
    two-trial means spread from 0.87 to 1.19 (the mean ratio was 1.00 with the mask stream of
    ``vlmrel.mcdo.dropout``). So the test bounds the ratio at 25 % and asks a paired t-test on the
    per-image log ratios not to reject equality at the 0.1 % level.
    """
    from scipy import stats

    work, cfg, _ = gate_run
    base = work / "results" / cfg["run"] / "mcdo" / "exp3" / "tiny_clip"
    traces: dict[str, np.ndarray] = {}
    for kind in ("input", "gaussian"):
        per_trial = []
        for k in range(2):
            with np.load(base / kind / "p0.01" / f"trial{k}.npz", allow_pickle=False) as z:
                per_trial.append(z["trace_pre"][-1])
        traces[kind] = np.concatenate(per_trial)  # the same images in the same order in both kinds
    assert np.all(traces["input"] > 0)
    ratio = traces["gaussian"].mean() / traces["input"].mean()
    assert ratio == pytest.approx(1.0, abs=0.25), ratio
    assert stats.ttest_1samp(np.log(traces["gaussian"] / traces["input"]), 0.0).pvalue > 1e-3
    summary = json.loads((base / "summary.json").read_text())
    assert summary["types"] == ["input", "gaussian"]


def test_angular_variance_matches_a_direct_computation(gate_run):
    """exp0b's stored angular variance against arccos of the same passes' directions."""
    import torch

    from vlmrel.mcdo.dropout import run_trial
    from vlmrel.models import load_encoder, preprocess_spec
    from vlmrel.pixels import iter_batches, preproc_key

    work, cfg, _ = gate_run
    res = work / "results" / cfg["run"]
    exp = cfg["mcdo"]["exp0b"]
    with np.load(res / f"mcdo/exp0b/tiny_clip/{cfg['mcdo']['dropout_kind']}/p0.01/geometry0.npz", allow_pickle=False) as z:
        stored, ids = z["angular_variance"], list(z["image_id"])
    passes: dict[int, list[np.ndarray]] = {}
    torch.set_num_threads(cfg["threads"])
    run_trial(
        load_encoder("tiny_clip", device="cpu", precision=cfg["mcdo"]["precision"]),
        iter_batches(
            res / "pixels" / f"{preproc_key(preprocess_spec('tiny_clip'))}.h5",
            cfg["mcdo"]["batch_size"],
            indices=range(exp["num_images"]),
        ),
        p=0.01,
        seed=cfg["mcdo"]["seed"],
        trial=0,
        T_list=exp["T"],
        kind=cfg["mcdo"]["dropout_kind"],
        progress=False,
        on_pass=lambda start, t, f: passes.setdefault(start, []).append(f.double().numpy()),
    )
    feats = np.concatenate([np.stack(v) for _, v in sorted(passes.items())], axis=1)  # [T, N, D]
    u = feats / np.linalg.norm(feats, axis=2, keepdims=True)
    m = u.mean(axis=0)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    theta = np.arccos(np.clip(np.einsum("tnd,nd->tn", u, m), -1.0, 1.0))
    direct = (theta**2).sum(axis=0) / (feats.shape[0] - 1)
    assert len(ids) == direct.size == exp["num_images"]
    np.testing.assert_allclose(stored, direct, rtol=1e-5)
    assert np.all(direct > 0)


@pytest.fixture(scope="module")
def forced_sweep_run(tmp_path_factory):
    """A marginal gate (exp0's overall summary rewritten as marginal) with Phase 2 forced: the sweep and
    the gate after it still run."""
    work = tmp_path_factory.mktemp("sweep")
    cfg = _gate_config()
    mcdo = cfg["mcdo"]
    for exp in ("exp0b", "exp4_subset", "exp3"):
        mcdo.pop(exp)
    mcdo["exp1"] = {"models": ["tiny_clip"], "rates": [0.01, 0.05], "T": [4], "trials": 2, "num_images": 8}
    mcdo["convergence"] = {"models": ["tiny_clip"], "T": [2, 4], "trials": 2, "num_images": 8}
    mcdo["gate"] = {"force_phase2": True}
    configfile = write_config(work / "c.yaml", cfg)
    res = work / "results" / cfg["run"] / "mcdo"
    snakemake(work, configfile, f"results/{cfg['run']}/mcdo/exp0/overall_summary.json")
    overall_path = res / "exp0" / "overall_summary.json"
    overall = json.loads(overall_path.read_text())
    overall.update(best_status="marginal", any_usable=False, all_failed_at_T_max=False)
    for entry in overall["models"].values():
        entry["best_status"] = "marginal"
    overall_path.write_text(json.dumps(overall))
    snakemake(work, configfile, "phase2")
    return res


def test_the_sweep_gate_is_written_even_when_phase2_is_forced(forced_sweep_run):
    res = forced_sweep_run
    gate = json.loads((res / "gate.json").read_text())
    assert gate["decision"] == "convergence_sweep" and gate["forced"] and gate["run_phase2"]
    after = json.loads((res / "gate_after_sweep.json").read_text())
    assert after["forced"] and after["run_phase2"] and after["sweep"] is not None
    assert set(after["sweep"]["models"]) == {"tiny_clip"}
    assert (res / "convergence" / "overall_summary.json").is_file()
    assert (res / "exp1" / "tiny_clip" / "summary.json").is_file()


# ---- the demo, end to end -------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo's mcdo chain (Phase 1, the gate, forced Phase 2) run end to end once; later tests
    change the config and rerun. The other chains have their own workflow tests."""
    work = tmp_path_factory.mktemp("demo")
    cfg = load_config()
    cfg["chains"] = ["mcdo"]
    configfile = write_config(work / "c.yaml", cfg)
    snakemake(work, configfile)
    snakemake(work, configfile, "--report", str(work / "report.html"))
    return work, cfg


def _exp0_trial(res, model: str, k: int):
    return res / "mcdo" / "exp0" / model / "output" / "p0.01" / f"trial{k}.npz"


def test_demo_outputs_follow_their_contracts(demo_run):
    work, cfg = demo_run
    res = work / "results" / "demo"
    manifest = pd.read_csv(res / "images" / "manifest.tsv", sep="\t", keep_default_na=False)
    assert list(manifest.columns) == ["image_id", "rel_path", "width", "height", "status", "reason"]
    ok = manifest[manifest.status == "ok"]
    assert len(ok) >= 15

    pixel_files = sorted((res / "pixels").glob("*.h5"))
    assert len(pixel_files) == 3  # tiny_clip, tiny_siglip and effnet_lite0 preprocess differently
    assert len(list((res / "pixels" / "synthetic").glob("*.h5"))) == 1  # exp2's generated images
    for path in pixel_files:
        with h5py.File(path) as f:
            assert f["pixels"].shape[0] == len(ok) and f["pixels"].shape[1] == 3
            assert [s.decode() if isinstance(s, bytes) else s for s in f["image_id"][:]] == list(ok.image_id)

    T = sorted(cfg["mcdo"]["exp0"]["T"])
    for model in cfg["mcdo"]["exp0"]["models"]:
        for k in range(cfg["mcdo"]["exp0"]["trials"]):
            with np.load(_exp0_trial(res, model, k), allow_pickle=False) as z:
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
    gate = json.loads((res / "mcdo" / "gate.json").read_text())
    assert gate["forced"] and gate["run_phase2"]  # the demo forces Phase 2

    assert set(gate["checks"]["exp5_subset"]["models"]) == set(cfg["mcdo"]["exp5_subset"]["models"])

    # Phase 1, Phase 2 and Phase 4: every experiment's summary and figure
    for exp in (
        "exp0b",
        "exp4_subset",
        "exp5_subset",
        "exp1",
        "exp2",
        "exp3",
        "exp4_full",
        "exp5_full",
        "exp10",
        "exp11",
    ):
        for model in cfg["mcdo"][exp]["models"]:
            summary = json.loads((res / "mcdo" / exp / model / "summary.json").read_text())
            assert summary.get("experiment", exp) == exp
    exp2 = json.loads((res / "mcdo/exp2/tiny_clip/summary.json").read_text())
    assert set(exp2["kinds"]) == set(cfg["mcdo"]["exp2"]["kinds"])
    amb = json.loads((res / "mcdo/exp5_subset/exp5_subset_overall_summary.json").read_text())
    assert set(amb["models"]) == set(cfg["mcdo"]["exp5_subset"]["models"])
    # the trained network: exp0 on its features, exp5 on its own ImageNet head (prompt-free)
    assert "effnet_lite0" in cfg["mcdo"]["exp0"]["models"] and "effnet_lite0" in amb["evaluated"]
    head = amb["models"]["effnet_lite0"]
    assert "classifier head" in head["probabilities"] and head["n_classes"] == 1000
    assert head["n_images"] == len(ok) and head["prompt_template"] is None
    exp3 = json.loads((res / "mcdo/exp3/tiny_clip/summary.json").read_text())
    assert {"output", "seed002", "input"} <= set(json.dumps(exp3).replace('"', " ").split())
    # exp5: the prompt sensitivity per image, and its correlation with the uncertainty
    from vlmrel.stats import spearman

    for model in cfg["mcdo"]["exp5_subset"]["models"]:
        if model == "effnet_lite0":  # a classifier head: prompt-free, no prompt sensitivity
            continue
        table = pd.read_csv(res / f"mcdo/exp5_subset/{model}/per_image.tsv", sep="\t", keep_default_na=False)
        s5 = json.loads((res / f"mcdo/exp5_subset/{model}/summary.json").read_text())
        assert "prompt_sensitivity" in table.columns and len(table) == len(ok)
        assert np.all(table["prompt_sensitivity"].to_numpy(dtype=float) >= 0)
        rho = spearman(table["uncertainty"].to_numpy(), table["prompt_sensitivity"].to_numpy(dtype=float))[0]
        assert s5["rho_uncertainty_vs_prompt_sensitivity"] == pytest.approx(rho, nan_ok=True)
    # exp4_full over models: the model matrix
    matrix = json.loads((res / "mcdo/exp4_full/exp4_full_overall_summary.json").read_text())
    for recipe in ("trace_pre", "angular_variance"):
        m = np.array(matrix["recipes"][recipe]["spearman_matrix"], dtype=float)
        assert m.shape == (2, 2) and m[0, 1] == m[1, 0] and np.all(np.diag(m) == 1)
    # Phase 4: exp10's text trials, exp11's search
    for model in cfg["mcdo"]["exp10"]["models"]:
        s10 = json.loads((res / f"mcdo/exp10/{model}/summary.json").read_text())
        assert s10["n_prompts"] == cfg["mcdo"]["exp10"]["num_prompts"] and "partial_rho_controlling_tokens" in s10
    s11 = json.loads((res / "mcdo/exp11/tiny_clip/summary.json").read_text())
    assert s11["n_candidates"] == cfg["mcdo"]["exp11"]["candidates"] + 1
    assert s11["n_search"] + s11["n_heldout"] == len(ok)
    assert {"objective_search", "objective_heldout", "uniform_objective_heldout"} <= set(s11)
    figures = sorted(p.name for p in (res / "figures" / "mcdo").glob("*.png"))
    for png in figures:
        assert (res / "figures" / "mcdo" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in (
        "exp0_scores.png",
        "exp0b_geometry.png",
        "exp1_tiny_clip.png",
        "exp2_tiny_clip.png",
        "exp3_tiny_clip.png",
        "exp4_full_tiny_siglip.png",
        "exp5_subset_ambiguity_tiny_clip.png",
        "exp4_full_matrix.png",
        "exp10_tiny_clip.png",
        "exp10_tiny_siglip.png",
        "exp11_tiny_clip.png",
    ):
        assert name in figures
    html = (work / "report.html").read_text(errors="replace")
    assert "exp0_reliability_tiny_clip.png" in html and "exp3_tiny_clip.png" in html
    assert (
        res / "logs" / "mcdo" / "exp0" / "tiny_clip" / "output" / "p0.01" / "trial0.log"
    ).stat().st_size > 0


def test_demo_runs_phase3_forced(demo_run):
    work, cfg = demo_run
    res = work / "results" / "demo"
    mcdo = cfg["mcdo"]
    assert mcdo["gate"]["force_phase3"]
    for exp in ("exp6", "exp7", "exp8"):
        for model in mcdo[exp]["models"]:
            summary = json.loads((res / "mcdo" / exp / model / "summary.json").read_text())
            assert summary["experiment"] == exp and not summary.get("skipped")
            assert (res / "figures" / "mcdo" / f"{exp}_{model}.png").read_bytes()[:4] == b"\x89PNG"
    exp6 = json.loads((res / "mcdo/exp6/tiny_clip/summary.json").read_text())
    assert set(exp6["methods"]) == {"mc_dropout", "ridge_leverage", "laplace"}
    assert exp6["n_fit"] + exp6["n_scored"] == exp6["n_images"]
    with np.load(res / "mcdo/exp6/tiny_clip/laplace.npz", allow_pickle=False) as z:
        fit = z["fit"]
        assert np.isnan(z["laplace_entropy"][fit]).all() and np.isfinite(z["laplace_entropy"][~fit]).all()
    exp7 = json.loads((res / "mcdo/exp7/tiny_clip/summary.json").read_text())
    assert set(exp7["ablation"]) == set(mcdo["exp7"]["ablation"])
    assert exp7["target_source"] == "zero-shot" and "rho_prompt_sensitivity" in exp7["vs_targets"]["epistemic"]
    assert "effnet_lite0" in mcdo["exp7"]["models"]  # the trained network: targets from its own head
    head = json.loads((res / "mcdo/exp7/effnet_lite0/summary.json").read_text())
    assert head["target_source"] == "classifier head" and set(head["ablation"]) == set(mcdo["exp7"]["ablation"])
    assert "rho_prompt_sensitivity" not in head["vs_targets"]["epistemic"]
    exp8 = json.loads((res / "mcdo/exp8/tiny_clip/summary.json").read_text())
    assert len(exp8["top_uncertain"]) == min(20, exp8["n_images"])
    exp9 = json.loads((res / "mcdo/exp9/summary.json").read_text())
    assert exp9["modes"] == ["baseline", "adaptive", "oracle"]
    assert exp9["improvement_over_baseline"]["adaptive"]["idf1"] > 0
    assert (res / "figures/mcdo/exp9.png").exists()


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

    # one more exp0 trial: the new trials, summaries and figures rerun; pixel tensors, old trials and
    # the other experiments' trials do not
    before = _mtimes(res)
    k = cfg["mcdo"]["exp0"]["trials"]
    cfg["mcdo"]["exp0"]["trials"] = k + 1
    snakemake(work, write_config(work / "c.yaml", cfg))
    changed = {p for p, t in _mtimes(res).items() if before.get(p) != t}
    names = {os.path.relpath(p, res) for p in changed}
    assert {os.path.relpath(_exp0_trial(res, m, k), res) for m in cfg["mcdo"]["exp0"]["models"]} <= names
    assert {f"mcdo/exp0/{m}/summary.json" for m in cfg["mcdo"]["exp0"]["models"]} <= names
    assert "mcdo/exp0/overall_summary.json" in names
    assert any(n.startswith("figures/") for n in names)
    assert not any(n.startswith(("pixels/", "images/")) for n in names), sorted(names)
    # files that existed before and changed (new ones may appear: with one more trial the gate may now ask
    # for the convergence sweep, which runs even though the demo forces Phase 2)
    rebuilt = {os.path.relpath(p, res) for p in changed if p in before}
    assert not any(n.endswith(("trial0.npz", "geometry0.npz")) for n in rebuilt), sorted(rebuilt)
