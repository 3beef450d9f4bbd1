"""The mcdo experiment registry: its records, that the rules are built from it alone, and that a new
experiment needs nothing but a registry entry, its functions, its caption and its config."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vlmrel.mcdo import registry
from vlmrel.mcdo.registry import Arm, kind_arms, rate_arms, single_arm
from wfutil import REPO, job_counts, load_config

MCDO = {"dropout_kind": "input", "exp0": {"p": 0.01}}


def test_rate_arms_are_explicit_records_with_replicates():
    arms = rate_arms({"rates": [0.01, 0.05, 0.01]}, MCDO)
    assert arms == [
        Arm("p0.01", "input", 0.01, 1),
        Arm("p0.05", "input", 0.05, 1),
        Arm("p0.01_rep2", "input", 0.01, 2),
    ]
    assert [a.record()["p"] for a in arms] == [0.01, 0.05, 0.01]


def test_kind_arms_and_single_arm_take_the_rate_from_the_gate_experiment():
    assert kind_arms({"kinds": ["input", "gaussian"]}, MCDO) == [
        Arm("input", "input", 0.01),
        Arm("gaussian", "gaussian", 0.01),
    ]
    assert single_arm({"p": 0.05}, MCDO) == [Arm("trials", "input", 0.05)]


def test_arm_files_follow_the_trial_path_contract():
    files = registry.arm_files("results/r", "expX", "m", Arm("p0.01", "input", 0.01), "trial", 2)
    assert files == ["results/r/mcdo/expX/m/input/p0.01/trial0.npz", "results/r/mcdo/expX/m/input/p0.01/trial1.npz"]


def test_every_entry_is_consistent_and_configured_in_the_shipped_configs():
    for cfg_name in ("config.yaml", "demo.yaml"):
        mcdo = load_config(cfg_name)["mcdo"]
        assert [e.name for e in registry.configured(mcdo)] == [n for n in registry.EXPERIMENTS if n in mcdo]
    assert registry.GATE_INPUT in registry.EXPERIMENTS and registry.SWEEP in registry.EXPERIMENTS
    with pytest.raises(ValueError, match="needs an analysis function"):
        registry.Experiment(name="x", phase=2, job="trials", summary="analysis", figure="knee", description="")
    with pytest.raises(ValueError, match="phase must be one of"):
        registry.Experiment(name="x", phase=5, job="trials", summary="reliability", figure="knee", description="")


def test_an_unknown_mcdo_key_is_named():
    with pytest.raises(ValueError, match=r"\['exp00'\] not an mcdo setting or registered experiment"):
        registry.configured({**load_config()["mcdo"], "exp00": {}})


def _string_literals(text: str) -> list[str]:
    return re.findall(r"\"([^\"\n]*)\"|'([^'\n]*)'", text)


def test_no_experiment_name_is_a_literal_in_rules_or_scripts():
    names = set(registry.EXPERIMENTS)
    found = []
    for path in [*REPO.glob("rules/*.smk"), *REPO.glob("scripts/*.py")]:
        text = path.read_text()
        for groups in _string_literals(text):
            literal = groups[0] or groups[1]
            words = set(re.findall(r"[A-Za-z0-9_]+", literal))
            found += [(path.name, literal) for n in names if n in words]
    assert found == []


TOY_ENTRY = '''

register(
    Experiment(
        name="exp_toy",
        phase=1,
        job="trials",
        summary="analysis",
        figure="experiment",
        caption="mcdo/toy.rst",
        description="a toy: exp3's comparison of dropout kinds on one model",
        arms=kind_arms,
        analysis=analyses.kinds_summary,
        plot=analyses.kinds_figure,
    )
)
'''


def test_a_toy_experiment_added_through_the_registry_alone_is_planned(tmp_path):
    """A temporary copy of the workflow; only the registry, a caption and the config gain the toy."""
    copy = tmp_path / "wf"
    copy.mkdir()
    for part in ("Snakefile", "rules", "scripts", "report", "config", "src", "profiles", "envs"):
        src = REPO / part
        if src.is_dir():
            shutil.copytree(src, copy / part, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, copy / part)
    reg = copy / "src" / "vlmrel" / "mcdo" / "registry.py"
    reg.write_text(reg.read_text() + TOY_ENTRY)
    (copy / "report" / "mcdo" / "toy.rst").write_text("A toy experiment.\n")
    schema = copy / "config" / "schemas" / "mcdo.yaml"  # the toy has a key of its own: give it a schema entry
    s = yaml.safe_load(schema.read_text())
    s["$defs"]["mcdo"]["properties"]["exp_toy"] = s["$defs"]["mcdo"]["properties"]["exp3"]
    schema.write_text(yaml.safe_dump(s, sort_keys=False))
    cfg = load_config()
    cfg["chains"] = ["mcdo"]
    cfg["mcdo"]["exp_toy"] = {"models": ["tiny_clip"], "kinds": ["input", "gaussian"], "T": [4], "trials": 2}
    (copy / "toy.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))

    def dry(config: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(copy / "src")}
        snakemake = str(Path(sys.executable).with_name("snakemake"))
        cmd = [snakemake, "-s", str(copy / "Snakefile"), "-n", "phase1", "--configfile", config, "--cores", "1"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=copy, env=env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    base = job_counts(dry(str(REPO / "config" / "demo.yaml")).stdout)
    proc = dry(str(copy / "toy.yaml"))
    counts = job_counts(proc.stdout)
    run = cfg["run"]
    for kind in ("input", "gaussian"):
        for k in range(2):
            assert f"results/{run}/mcdo/exp_toy/tiny_clip/{kind}/p0.01/trial{k}.npz" in proc.stdout
    assert counts["mcdo_trial"] == base["mcdo_trial"] + 4
    assert counts["mcdo_experiment_summary"] == base["mcdo_experiment_summary"] + 1
    assert counts["mcdo_figure_experiment"] == base["mcdo_figure_experiment"] + 1
    assert f"results/{run}/figures/mcdo/exp_toy_tiny_clip.png" in proc.stdout
