"""The teacher's human review through a real Label Studio server and back.

A Label Studio server (its own venv, named by VLMREL_LS_VENV; SQLite; 127.0.0.1) gets a project
with vlmrel's labelling config (results/{run}/teacher/label_studio/config.xml) through its API and
imports tasks.json. A reviewer annotates every task: most as pre-annotated, some with a changed
scene, attribute or object. The JSON export is set as `teacher.human.audited`; the workflow then
imports it and eval.json must say human_audited, with the audited truth equal to the sample plus
exactly those changes and the metrics equal to an evaluation against that truth.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from common import ROOT, env_with_src, json_diff, overlay, read_json, snakemake

sys.path.insert(0, str(ROOT / "src"))

# the SLURM part's local run (its teacher chain is then already built); built here when missing
RUN = "it-local"
TOKEN = "vlmrel-integration-token-0123456789"
REVIEWER = "reviewer@vlmrel.test"
TEACHER = ROOT / "results" / RUN / "teacher"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LabelStudio:
    def __init__(self, venv: Path, data_dir: Path, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [
            str(venv / "bin" / "label-studio"), "start", "--no-browser",
            "--internal-host", "127.0.0.1", "--port", str(self.port), "--data-dir", str(data_dir),
            "--username", REVIEWER, "--password", "vlmrel-review", "--user-token", TOKEN,
            "--enable-legacy-api-token",
        ]
        env = dict(os.environ, LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK="true")
        env.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen(
            cmd, cwd=data_dir, env=env, stdin=subprocess.DEVNULL, stdout=open(log, "w"),
            stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait(self, timeout: float = 600) -> None:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise AssertionError(f"Label Studio exited ({self.proc.returncode}); see {self.log}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(2)
        raise AssertionError(f"Label Studio did not answer within {timeout} s; see {self.log}")

    def api(self, method: str, path: str, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.url}{path}", data=data, method=method)
        req.add_header("Authorization", f"Token {TOKEN}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{method} {path}: HTTP {e.code}: {e.read()[:500]!r}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server's own process group (start_new_session)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def choices(config_xml: str) -> dict[str, list[str]]:
    root = ET.fromstring(config_xml)
    return {c.get("name"): [x.get("value") for x in c.findall("Choice")] for c in root.iter("Choices")}


def values(result: list[dict], name: str) -> list[str]:
    return next((r["value"]["choices"] for r in result if r["from_name"] == name), [])


def set_values(result: list[dict], name: str, vals: list[str]) -> list[dict]:
    out = [r for r in result if r["from_name"] != name]
    return out + [{"from_name": name, "to_name": "image", "type": "choices", "value": {"choices": vals}}]


def review(tasks: list[dict], labels: dict[str, list[str]]) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    """The reviewer's results per image: the pre-annotation, changed on three tasks; the expected truth."""
    results, changed = {}, {}
    for n, task in enumerate(sorted(tasks, key=lambda t: t["data"]["image_id"])):
        iid = task["data"]["image_id"]
        result = [dict(r) for r in task["predictions"][0]["result"]]
        if n == 0:  # another scene
            scene = values(result, "scene")
            result = set_values(result, "scene", [next(s for s in labels["scene"] if s not in scene)])
        elif n == 1:  # one more attribute checked
            attrs = values(result, "attributes")
            result = set_values(result, "attributes", attrs + [next(a for a in labels["attributes"] if a not in attrs)])
        elif n == 2:  # objects replaced, scene changed too
            objs = values(result, "objects")
            result = set_values(result, "objects", [next(o for o in labels["objects"] if o not in objs)])
            scene = values(result, "scene")
            result = set_values(result, "scene", [next(s for s in reversed(labels["scene"]) if s not in scene)])
        if n < 3:
            changed[iid] = result
        results[iid] = result
    return results, changed


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory):
    venv = Path(os.environ.get("VLMREL_LS_VENV", ROOT / ".integration" / "ls-venv"))
    assert (venv / "bin" / "label-studio").exists(), f"no Label Studio in {venv}: ci/integration.sh installs it"
    tmp = tmp_path_factory.mktemp("labelstudio")
    logs = ROOT / "results" / "integration"
    logs.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    ls = LabelStudio(venv, tmp, logs / "label-studio.log")
    try:
        # the teacher chain against the auto truth (built, or brought back) while the server starts
        env = env_with_src()
        snakemake(["teacher"], "profiles/default", [overlay(tmp, RUN)], logs / "ls-teacher-auto.log", env)
        auto_eval = read_json(TEACHER / "tiny_clip" / "eval.json")
        ls.wait()
        t_up = time.monotonic() - t0
        config_xml = (TEACHER / "label_studio" / "config.xml").read_text(encoding="utf-8")
        tasks = read_json(TEACHER / "label_studio" / "tasks.json")
        project = ls.api("POST", "/api/projects/", {"title": "vlmrel teacher review", "label_config": config_xml})
        imported = ls.api("POST", f"/api/projects/{project['id']}/import", tasks)
        assert imported["task_count"] == len(tasks)
        listed = ls.api("GET", f"/api/tasks/?project={project['id']}&page_size=1000")
        ls_tasks = listed["tasks"] if isinstance(listed, dict) else listed
        assert len(ls_tasks) == len(tasks)
        results, changed = review(tasks, choices(config_xml))
        for t in ls_tasks:
            ls.api("POST", f"/api/tasks/{t['id']}/annotations/",
                   {"result": results[t["data"]["image_id"]], "was_cancelled": False, "lead_time": 12.5})
        export = ls.api("GET", f"/api/projects/{project['id']}/export?exportType=JSON")
    finally:
        ls.stop()
    export_path = ROOT / "results" / RUN / "label_studio_export.json"
    export_path.write_text(json.dumps(export, indent=2), encoding="utf-8")
    audited = overlay(tmp, RUN, f"teacher:\n  human:\n    audited: {export_path}\n")
    t1 = time.monotonic()
    snakemake(["teacher"], "profiles/default", [audited], logs / "ls-teacher-audited.log", env)
    print(f"\nLabel Studio: server up and review round trip {t_up:.1f} s; audited re-evaluation "
          f"{time.monotonic() - t1:.1f} s")
    return {"tasks": tasks, "results": results, "changed": changed, "export": export, "auto_eval": auto_eval,
            "labels": choices(config_xml)}


def test_export_holds_every_review(reviewed):
    assert len(reviewed["export"]) == len(reviewed["tasks"])
    for task in reviewed["export"]:
        anns = [a for a in task["annotations"] if not a.get("was_cancelled")]
        assert len(anns) == 1
        assert {r["from_name"] for r in anns[0]["result"]} == {"scene", "attributes", "objects"}


def test_eval_says_human_audited(reviewed):
    ev = read_json(TEACHER / "tiny_clip" / "eval.json")
    assert ev["truth"] == "human_audited"
    assert ev["n_truth"] == len(reviewed["tasks"])
    assert reviewed["auto_eval"]["truth"] == "auto"


def test_audited_truth_is_the_sample_plus_exactly_the_changes(reviewed):
    sample = {r["image_id"]: r for r in read_json(TEACHER / "human_sample.json")}
    audited = {r["image_id"]: r for r in read_json(TEACHER / "ground_truth_human.json")}
    assert set(audited) == set(sample)
    attrs = reviewed["labels"]["attributes"]
    differ = set()
    for iid, rec in audited.items():
        result = reviewed["results"][iid]
        checked = set(values(result, "attributes"))
        assert rec["scene"] == values(result, "scene")
        assert rec["attributes"] == {a: a in checked for a in sorted(attrs)}
        assert rec["objects"] == values(result, "objects")
        s = sample[iid]
        same = (rec["scene"] == s["scene"][:1] and rec["objects"] == list(s.get("objects", []))
                and {a for a, v in rec["attributes"].items() if v} == {a for a, v in s["attributes"].items() if v})
        if not same:
            differ.add(iid)
    assert differ == set(reviewed["changed"]), "the audited truth differs from the sample elsewhere than the review"


def test_eval_reflects_exactly_the_changed_labels(reviewed, tmp_path):
    from vlmrel.teacher.evaluate import evaluate

    # the same evaluation, computed here against the sample with the reviewer's changes applied
    attrs = reviewed["labels"]["attributes"]
    expected_truth = []
    for iid, result in sorted(reviewed["results"].items()):
        checked = set(values(result, "attributes"))
        expected_truth.append({"image_id": iid, "scene": values(result, "scene"),
                               "attributes": {a: a in checked for a in sorted(attrs)},
                               "objects": values(result, "objects")})
    truth = tmp_path / "expected_truth.json"
    truth.write_text(json.dumps(expected_truth), encoding="utf-8")
    out = tmp_path / "eval.json"
    model = TEACHER / "tiny_clip"
    evaluate(model / "predictions.jsonl", truth, "human_audited", model / "card.json", out)
    got = read_json(model / "eval.json")
    diff = json_diff(read_json(out), got)
    assert not diff, "eval.json is not the evaluation against the reviewed labels:\n" + "\n".join(diff[:20])
    # and the review moved the numbers: against the unchanged sample they differ
    unchanged = tmp_path / "sample_eval.json"
    evaluate(model / "predictions.jsonl", TEACHER / "human_sample.json", "human_audited", model / "card.json",
             unchanged)
    assert json_diff(read_json(unchanged), got), "the changed labels left eval.json as the unreviewed sample's"
