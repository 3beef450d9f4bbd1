"""The demo through profiles/slurm on the one-node cluster (ci/slurm-local.sh), against a local run.

Runs exp0, then teacher, grounding and the gate checkpoint, once locally (profiles/default) and
once through `--profile profiles/slurm` with only the site set in the environment, then checks
in sacct that every cluster job COMPLETED, that each asked for the memory, CPUs and time its
rule declares, that the gate ran as a cluster job and the tiny rules did not, and that the
summaries equal the local run's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from common import ROOT, env_with_src, json_diff, overlay, read_json, snakemake

LOCAL, CLUSTER = "it-local", "it-slurm"
SITE = {"VLMREL_SLURM_PARTITION": "main", "VLMREL_SLURM_ACCOUNT": "vlmrel"}
REST = ["teacher", "grounding"]  # plus the gate's output, per run

# the summaries compared between the two runs (numbers, with clocks and paths left out)
SUMMARIES = [
    "mcdo/exp0/overall_summary.json",
    "mcdo/exp0/tiny_clip/summary.json",
    "mcdo/exp0/tiny_siglip/summary.json",
    "mcdo/gate.json",
    "teacher/ground_truth_stats.json",
    "teacher/human_sample.json",
    "teacher/tiny_clip/eval.json",
    "grounding/subsets/demo12.json",
    "grounding/demo12/thresholds.json",
    "grounding/demo12/boundary.json",
    "grounding/demo12/drift.json",
    "grounding/demo12/in_vs_out_of_sample.json",
    "grounding/subsets/demo_t9.json",
    "grounding/demo_t9/thresholds.json",
    "grounding/demo_t9/boundary.json",
]


def localrules() -> set[str]:
    text = (ROOT / "Snakefile").read_text(encoding="utf-8")
    block = re.search(r"^localrules:\n((?:[ \t]+\w+,?\n)+)", text, re.M)
    assert block, "the Snakefile has no localrules: block"
    return set(re.findall(r"\w+", block.group(1)))


def profile_groups() -> dict[str, str]:
    """rule -> group from profiles/slurm (`groups:`): each connected set is one cluster job."""
    import yaml

    prof = yaml.safe_load((ROOT / "profiles/slurm/config.yaml").read_text(encoding="utf-8"))
    return dict(prof.get("groups") or {})


def dry_run_jobs(targets: list[str], cfg: Path, env: dict[str, str]) -> list[dict]:
    """Every job of the targets as the workflow resolves it: rule, threads, mem_mb, runtime."""
    out = subprocess.run(
        [str(Path(__import__("sys").executable).parent / "snakemake"), *targets, "-n", "--forceall",
         "--profile", "profiles/slurm", "--configfile", "config/demo.yaml", str(cfg)],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True,
    ).stdout
    jobs = []
    for block in re.split(r"\n(?= *(?:rule|checkpoint|localrule|localcheckpoint) \w+:\n)", out):
        m = re.match(r" *(?:rule|checkpoint|localrule|localcheckpoint) (\w+):\n", block)
        if not m or "    output:" not in block:
            continue  # the log's head, or a target rule without outputs
        res = dict(re.findall(r"(\w+)=([^,\n]+)", re.search(r"resources: (.*)", block).group(1)))
        threads = re.search(r"threads: (\d+)", block)
        jobs.append({
            "rule": m.group(1),
            "threads": int(threads.group(1)) if threads else 1,
            "mem_mb": int(res["mem_mb"]),
            "runtime": int(res["runtime"]),
        })
    return jobs


def expected_cluster_jobs(expected: list[dict]) -> Counter:
    """(name, mem_mb, cpus, minutes) of each cluster job: one per job of a rule that is neither local
    nor grouped; one per group, asking for its widest layer's summed memory and CPUs and the sum of
    its layers' longest runtimes (snakemake's layered group resources). The demo's groups hold one
    connected set of jobs per run, layered in the order their rules first appear."""
    local, groups = localrules(), profile_groups()
    out: Counter = Counter()
    members: dict[str, list[dict]] = {}
    for j in expected:
        if j["rule"] in local:
            continue
        if j["rule"] in groups:
            members.setdefault(groups[j["rule"]], []).append(j)
        else:
            out[(j["rule"], j["mem_mb"], j["threads"], j["runtime"])] += 1
    width = os.cpu_count() or 1  # snakemake layers a group within the submitting machine's cores
    for group, jobs in members.items():
        by_rule: dict[str, list[dict]] = {}
        for j in jobs:
            by_rule.setdefault(j["rule"], []).append(j)
        name = f"{group}_" + "_".join(sorted(by_rule))
        layers: list[list[dict]] = []
        for rule_jobs in by_rule.values():  # a rule's jobs side by side, at most `width` CPUs per layer
            layer: list[dict] = []
            for j in rule_jobs:
                if layer and sum(x["threads"] for x in layer) + j["threads"] > width:
                    layers.append(layer)
                    layer = []
                layer.append(j)
            layers.append(layer)
        mem = max(sum(j["mem_mb"] for j in layer) for layer in layers)
        cpus = max(sum(j["threads"] for j in layer) for layer in layers)
        minutes = sum(max(j["runtime"] for j in layer) for layer in layers)
        out[(name, mem, cpus, minutes)] += 1
    return out


def sacct(run_ids: list[str]) -> list[dict]:
    fields = ["JobID", "JobName", "State", "Comment", "ReqMem", "ReqCPUS", "TimelimitRaw", "Partition", "Account"]
    out = subprocess.run(
        ["sacct", "-X", "-P", "-n", "-a", "--name", ",".join(run_ids), "-o", ",".join(fields), "-S", "now-1days"],
        capture_output=True, text=True, check=True,
    ).stdout
    rows = [dict(zip(fields, line.split("|"), strict=True)) for line in out.splitlines() if line]
    for r in rows:
        r["rule"] = r["Comment"].removeprefix("rule_").split("_wildcards_")[0]
        mem = re.fullmatch(r"(\d+)([MG])n?", r["ReqMem"])
        r["mem_mb"] = int(mem.group(1)) * (1024 if mem.group(2) == "G" else 1) if mem else None
    return rows


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    status = subprocess.run([str(ROOT / "ci/slurm-local.sh"), "status"], capture_output=True, text=True)
    assert status.returncode == 0, f"no cluster: run `ci/slurm-local.sh start` first\n{status.stdout}"
    tmp = tmp_path_factory.mktemp("slurm")
    logs = ROOT / "results" / "integration"
    logs.mkdir(parents=True, exist_ok=True)
    for run in (LOCAL, CLUSTER):
        shutil.rmtree(ROOT / "results" / run, ignore_errors=True)
    cfg = {LOCAL: overlay(tmp, LOCAL), CLUSTER: overlay(tmp, CLUSTER)}
    local_env, cluster_env = env_with_src(), env_with_src(SITE)
    t = {}
    # exp0 back to back, so both see the same machine load; then the rest
    t["exp0 local"] = snakemake(["exp0"], "profiles/default", [cfg[LOCAL]], logs / "exp0-local.log", local_env)
    t["exp0 cluster"] = snakemake(["exp0"], "profiles/slurm", [cfg[CLUSTER]], logs / "exp0-slurm.log", cluster_env)
    rest = {r: REST + [f"results/{r}/mcdo/gate.json"] for r in (LOCAL, CLUSTER)}
    t["teacher+grounding+gate local"] = snakemake(
        rest[LOCAL], "profiles/default", [cfg[LOCAL]], logs / "rest-local.log", local_env
    )
    t["teacher+grounding+gate cluster"] = snakemake(
        rest[CLUSTER], "profiles/slurm", [cfg[CLUSTER]], logs / "rest-slurm.log", cluster_env
    )
    run_ids = [
        m.group(1)
        for name in ("exp0-slurm.log", "rest-slurm.log")
        for m in re.finditer(r"SLURM run ID: (\S+)", (logs / name).read_text(encoding="utf-8"))
    ]
    assert len(run_ids) == 2, f"expected a SLURM run ID in each cluster log, got {run_ids}"
    times = {k: round(v, 1) for k, v in t.items()}
    times["exp0 cluster/local"] = round(t["exp0 cluster"] / t["exp0 local"], 2)
    (logs / "slurm-times.json").write_text(json.dumps(times, indent=2) + "\n", encoding="utf-8")
    print("\nSLURM integration times (s):", json.dumps(times, indent=2))
    expected = dry_run_jobs(["exp0", *rest[CLUSTER]], cfg[CLUSTER], cluster_env)
    return {"run_ids": run_ids, "jobs": sacct(run_ids), "expected": expected, "times": times}


def test_every_cluster_job_completed(runs):
    jobs = runs["jobs"]
    assert jobs, "sacct lists no job of the two cluster runs"
    bad = [(j["JobID"], j["rule"], j["State"]) for j in jobs if j["State"] != "COMPLETED"]
    assert not bad, f"jobs not COMPLETED: {bad}"
    assert {j["Partition"] for j in jobs} == {SITE["VLMREL_SLURM_PARTITION"]}
    assert {j["Account"] for j in jobs} == {SITE["VLMREL_SLURM_ACCOUNT"]}


def test_cluster_jobs_are_the_workflow_jobs_less_the_local_rules(runs):
    local = localrules()
    want: Counter = Counter()
    for (name, *_), n in expected_cluster_jobs(runs["expected"]).items():
        want[name] += n
    got = Counter(j["rule"] for j in runs["jobs"])
    assert got == want
    assert not local & set(got), f"local rules ran as cluster jobs: {sorted(local & set(got))}"
    assert got["mcdo_trial"] == sum(j["rule"] == "mcdo_trial" for j in runs["expected"]) > 0


def test_requested_resources_match_the_rules(runs):
    want = expected_cluster_jobs(runs["expected"])
    got = Counter((j["rule"], j["mem_mb"], int(j["ReqCPUS"]), int(j["TimelimitRaw"])) for j in runs["jobs"])
    assert got == want
    # and in numbers, from the rules and the profile: the demo's mcdo.mem_mb, the profile's 240 min;
    # the prep group: pixels jobs side by side within the machine's cores (2000 MB each), 60 min layers
    assert {k for k in got if k[0] == "mcdo_trial"} == {("mcdo_trial", 2000, 1, 240)}
    (prep,) = [k for k in got if k[0].startswith("prep_")]
    assert prep[0] == "prep_demo_images_manifest_pixels" and prep[1] == 2000 * prep[2] and prep[3] % 60 == 0
    assert prep[2] <= (os.cpu_count() or 1)


def test_gate_checkpoint_ran_as_a_cluster_job(runs):
    gates = [j for j in runs["jobs"] if j["rule"] == "mcdo_gate"]
    assert len(gates) == 1 and gates[0]["State"] == "COMPLETED"
    assert read_json(ROOT / "results" / CLUSTER / "mcdo/gate.json")["decision"]


@pytest.mark.parametrize("rel", SUMMARIES)
def test_outputs_equal_the_local_run(runs, rel):
    a = read_json(ROOT / "results" / LOCAL / rel)
    b = read_json(ROOT / "results" / CLUSTER / rel)
    diff = json_diff(a, b)
    assert not diff, f"{rel} differs between the local and the cluster run:\n" + "\n".join(diff[:20])


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_only_gpu_jobs_ask_for_a_gpu_and_the_gpu_partition(device, tmp_path):
    """Dry run: with device cuda exactly the model rules go to the GPU partition with model and CPUs."""
    site = SITE | {"VLMREL_SLURM_GPU_PARTITION": "gpu", "VLMREL_SLURM_GPU_MODEL": "h100"}
    cfg = overlay(tmp_path, "it-gpu-dry", f"device: {device}\n")
    out = subprocess.run(
        [str(Path(__import__("sys").executable).parent / "snakemake"), "phase1", "teacher", "anomaly", "-n",
         "--forceall", "--profile", "profiles/slurm", "--configfile", "config/demo.yaml", str(cfg)],
        cwd=ROOT, env=env_with_src(site), capture_output=True, text=True, check=True,
    ).stdout
    routed, rules = {}, set()
    for block in re.split(r"\n(?= *(?:rule|checkpoint) \w+:\n)", out):
        m = re.match(r" *(?:rule|checkpoint) (\w+):\n", block)
        res = re.search(r"resources: (.*)", block)
        if not m or not res or "    output:" not in block:
            continue
        r = dict(re.findall(r"(\w+)=([^,\n]+)", res.group(1)))
        rules.add(m.group(1))
        routed[m.group(1)] = (r.get("slurm_partition"), r.get("gpu"), r.get("gpu_model"), r.get("cpus_per_gpu"))
    # the model rules (mcdo_geometry is `use rule mcdo_trial`) are among those asking for a GPU
    named = {"mcdo_trial", "mcdo_geometry", "mcdo_ambiguity", "embeddings", "anomaly_logits"}
    assert named <= rules
    gpu_rules = {rule for rule, got in routed.items() if got[1] not in (None, "0")}
    assert gpu_rules >= named if device == "cuda" else gpu_rules == set()
    for rule, got in routed.items():
        if device == "cuda" and rule in gpu_rules:
            assert got == ("gpu", "1", "h100", "8"), rule
        else:
            assert got[0] == "main" and got[2:] == (None, None) and got[1] in (None, "0"), (rule, got)
