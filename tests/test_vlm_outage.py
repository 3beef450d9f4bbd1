"""Issue 19: transient failures are not final, an outage fails loudly, credentials stay out of metadata.

Unit tests on :func:`vlmrel.vlm.run_requests`, then the teacher's annotate job through real
snakemake against the simulator over real HTTP on 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import socket
from collections import Counter
from pathlib import Path

import pytest

from test_teacher_workflow import teacher_config
from vlmrel import vlm
from vlmrel.vlm.config import SimulatorConfig, redact_url, redacted, runtime_section
from vlmrel.vlm.simulator import Simulator
from wfutil import job_counts, snakemake, write_config

RAW = "results/demo/teacher/raw.jsonl"
LOG = "results/demo/logs/teacher/annotate.log"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _reqs(n: int) -> list[vlm.Request]:
    return [vlm.Request(prompt=f"say {i}", schema=None) for i in range(n)]


def _cfg(endpoint: str, **kw) -> vlm.VLMConfig:
    base = {
        "backend": "openai",
        "model": "vlmrel-sim",
        "endpoints": [endpoint],
        "retries": 0,
        "timeout_s": 5,
        "connect_timeout_s": 1,
        "backoff_s": 0.01,
    }
    return vlm.VLMConfig.from_dict({**base, **kw})


# -- the rule: which cached failures a re-run sends again ------------------------------------------
def test_transient_and_permanent_kinds_partition_the_failure_kinds():
    assert vlm.TRANSIENT_KINDS | vlm.PERMANENT_KINDS | {"image_error"} == set(vlm.FAILURE_KINDS)
    assert not vlm.TRANSIENT_KINDS & vlm.PERMANENT_KINDS
    assert {"timeout", "connection", "http_429", "http_5xx", "http_404", "http_408"} <= vlm.TRANSIENT_KINDS
    assert vlm.PERMANENT_KINDS == {"malformed_json", "schema_violation", "length", "http_4xx"}


def test_connection_failures_are_resent_and_an_outage_raises(tmp_path, caplog):
    port = _free_port()
    cfg = _cfg(f"http://127.0.0.1:{port}/v1")
    cache = tmp_path / "c.sqlite"
    caplog.set_level(logging.WARNING, logger="vlmrel.vlm")
    with pytest.raises(vlm.VLMOutage) as info:
        vlm.run_requests(cfg, _reqs(4), cache_path=cache, stats_path=tmp_path / "s.json", progress=False)
    msg = str(info.value)
    assert f"endpoint http://127.0.0.1:{port}/v1: connection 4" in msg and "4 of 4" in msg
    assert "vlmrel-sim" in msg
    assert json.loads((tmp_path / "s.json").read_text())["failures_by_kind"] == {"connection": 4}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    first = [w for w in warnings if w.startswith("cannot connect")]
    assert len(first) == 1 and f"127.0.0.1:{port}/v1" in first[0] and "vlmrel-sim" in first[0]
    with Simulator(SimulatorConfig(enabled=True, latency_s=0.0), port=port) as sim:
        res = vlm.run_requests(cfg, _reqs(4), cache_path=cache, progress=False)
        assert sim.stats()["requests"] == 4  # the cached connection failures were sent again
    assert all(r.ok and not r.cache_hit for r in res)


def test_404_is_transient_logged_and_fails_the_batch(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="vlmrel.vlm")
    with Simulator(SimulatorConfig(enabled=True, latency_s=0.0)) as sim:
        cfg = _cfg(f"{sim.url}/not-there")  # the server answers 404 for this route
        with pytest.raises(vlm.VLMOutage, match="http_404 3"):
            vlm.run_requests(cfg, _reqs(3), cache_path=tmp_path / "c.sqlite", progress=False)
        first = [r.getMessage() for r in caplog.records if r.getMessage().startswith("404")]
        assert len(first) == 1 and "/not-there" in first[0] and "vlmrel-sim" in first[0]
        sim.reset_stats()
        ok = _cfg(f"{sim.url}/not-there", max_failure_share=1.0)
        res = vlm.run_requests(ok, _reqs(3), cache_path=tmp_path / "c.sqlite", progress=False)
        assert sim.stats()["requests"] == 3 and all(r.failure_kind == "http_404" for r in res)


def test_permanent_failures_stay_cached_unless_listed(tmp_path):
    cache = tmp_path / "c.sqlite"
    schema = {"type": "object", "required": ["x"], "properties": {"x": {"type": "integer"}}}
    reqs = [vlm.Request(prompt=f"json {i}", schema=schema) for i in range(12)]
    with Simulator(SimulatorConfig(enabled=True, latency_s=0.0, faults={"schema_violation": 0.4})) as sim:
        first = vlm.run_requests(_cfg(sim.openai_url), reqs, cache_path=cache, progress=False)
    bad = [r for r in first if not r.ok]
    assert bad and all(r.failure_kind == "schema_violation" for r in bad) and len(bad) <= 6
    with Simulator(SimulatorConfig(enabled=True, latency_s=0.0)) as sim:
        again = vlm.run_requests(_cfg(sim.openai_url), reqs, cache_path=cache, progress=False)
        assert sim.stats()["requests"] == 0 and [r.failure_kind for r in again] == [
            r.failure_kind for r in first
        ]
        listed = _cfg(sim.openai_url, retry_failed=["schema_violation"])
        fixed = vlm.run_requests(listed, reqs, cache_path=cache, progress=False)
        assert sim.stats()["requests"] == len(bad) and all(r.ok for r in fixed)


def test_failure_share_bound(tmp_path):
    with Simulator(SimulatorConfig(enabled=True, latency_s=0.0, faults={"http_400": 0.5}, seed=1)) as sim:
        res = vlm.run_requests(
            _cfg(sim.openai_url, max_failure_share=1.0),
            _reqs(20),
            cache_path=tmp_path / "a.sqlite",
            progress=False,
        )
        share = sum(not r.ok for r in res) / len(res)
        assert 0 < share < 1
        below = _cfg(sim.openai_url, max_failure_share=share)  # "more than" the bound fails, equal passes
        vlm.run_requests(below, _reqs(20), cache_path=tmp_path / "a.sqlite", progress=False)
        with pytest.raises(vlm.VLMOutage, match=r"http_4xx \d+"):
            vlm.run_requests(
                _cfg(sim.openai_url, max_failure_share=share - 0.01),
                _reqs(20),
                cache_path=tmp_path / "a.sqlite",
                progress=False,
            )


def test_redacted_view_and_runtime_section():
    url = "http://vlmuser:s3cret-PASS@gpu-7.lab:8000/v1?token=t0ken-XYZ"
    assert redact_url(url) == "http://vlmuser:***@gpu-7.lab:8000/v1?token=***"
    section = {"endpoints": [url], "model": "m", "embedding": {"endpoints": [url]}}
    view = redacted(section)
    text = json.dumps(view)
    assert "s3cret-PASS" not in text and "t0ken-XYZ" not in text and "gpu-7.lab:8000" in text
    assert runtime_section(view, section) == section
    assert runtime_section({}, section) == {}
    other_host = {**section, "endpoints": ["http://vlmuser:s3cret-PASS@gpu-8.lab:8000/v1?token=t0ken-XYZ"]}
    assert redacted(other_host) != view  # a new endpoint identity changes the params
    new_password = {**section, "endpoints": ["http://vlmuser:other@gpu-7.lab:8000/v1?token=t0ken-XYZ"]}
    assert redacted(new_password)["endpoints"] == view["endpoints"]
    with pytest.raises(vlm.ConfigError):
        runtime_section(view, other_host)


def test_url_password_is_redacted_from_errors(tmp_path):
    port = _free_port()
    cfg = _cfg(f"http://vlmuser:MARKER-pw-0451@127.0.0.1:{port}/v1", max_failure_share=1.0)
    res = vlm.run_requests(cfg, _reqs(2), cache_path=tmp_path / "c.sqlite", progress=False)
    assert all(r.failure_kind == "connection" for r in res)
    assert "MARKER-pw-0451" not in json.dumps([r.to_dict() for r in res])
    assert b"MARKER-pw-0451" not in (tmp_path / "c.sqlite").read_bytes()


# -- through snakemake -----------------------------------------------------------------------------
def _teacher_cfg(endpoint: str, **vlm_changes) -> dict:
    return teacher_config(
        backend="openai",
        endpoints=[endpoint],
        simulator={"enabled": False},
        retries=0,
        connect_timeout_s=1,
        timeout_s=10,
        backoff_s=0.01,
        backoff_max_s=0.05,  # a dead endpoint's slots cool down for at most this long
        concurrency=2,
        **vlm_changes,
    )


def _n_images(work: Path) -> int:
    rows = (work / "results/demo/images/manifest.tsv").read_text().splitlines()[1:]
    return sum(1 for line in rows if line.split("\t")[4] == "ok")


def _raw_kinds(work: Path) -> Counter:
    raw = [json.loads(line) for line in (work / RAW).read_text().splitlines()]
    return Counter(r["failure"]["kind"] if r["status"] == "failed" else "ok" for r in raw)


@pytest.mark.workflow
def test_annotate_outage_fails_then_rerun_sends_exactly_the_failed(tmp_path):
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}/v1"
    conf = write_config(tmp_path / "c.yaml", _teacher_cfg(endpoint))
    work = tmp_path / "w"
    work.mkdir()
    snakemake(work, conf, "results/demo/images/manifest.tsv")
    n = _n_images(work)

    # 1. the server is down: the job fails, naming the endpoint and the failure kind
    down = snakemake(work, conf, RAW, check=False)
    assert down.returncode != 0 and not (work / RAW).exists()
    log_text = (work / LOG).read_text()
    assert f"endpoint {endpoint}: connection {n}" in log_text
    assert f"cannot connect from endpoint {endpoint} for model qwen3-vl-sim" in log_text

    # 2. the server comes up, with some 503s: exactly the failed requests are sent; the job
    #    succeeds because fewer than half fail; the 503s are recorded as failures
    with Simulator(
        SimulatorConfig(enabled=True, latency_s=0.0, faults={"http_503": 0.3}, seed=5), port=port
    ) as sim:
        snakemake(work, conf, RAW)
        assert sim.stats()["requests"] == n
    kinds = _raw_kinds(work)
    assert kinds["http_5xx"] > 0 and kinds["ok"] + kinds["http_5xx"] == n

    # 3. a forced re-run sends exactly the 5xx failures again (transient), none of the answers
    with Simulator(SimulatorConfig(enabled=True, latency_s=0.0), port=port) as sim:
        snakemake(work, conf, RAW, "-R", "teacher_annotate")
        assert sim.stats()["requests"] == kinds["http_5xx"]
    assert _raw_kinds(work) == Counter({"ok": n})


@pytest.mark.workflow
def test_annotate_permanent_failures_resent_only_when_listed(tmp_path):
    with Simulator(SimulatorConfig(enabled=True, latency_s=0.0)) as good:
        port = good.port
    faulty = SimulatorConfig(enabled=True, latency_s=0.0, faults={"schema_violation": 0.25}, seed=2)
    cfg = _teacher_cfg(f"http://127.0.0.1:{port}/v1")
    conf = write_config(tmp_path / "c.yaml", cfg)
    work = tmp_path / "w"
    work.mkdir()
    with Simulator(faulty, port=port):
        snakemake(work, conf, RAW)
    kinds = _raw_kinds(work)
    assert 0 < kinds["schema_violation"] < _n_images(work) / 2
    before = (work / RAW).read_text()
    with Simulator(SimulatorConfig(enabled=True, latency_s=0.0), port=port) as sim:
        snakemake(work, conf, RAW, "-R", "teacher_annotate")
        assert sim.stats()["requests"] == 0  # permanent: served from the cache
        assert (work / RAW).read_text() == before
        cfg["vlm"]["retry_failed"] = ["schema_violation"]
        write_config(conf, cfg)
        assert job_counts(snakemake(work, conf, RAW, "-n").stdout).get("teacher_annotate") == 1  # params
        snakemake(work, conf, RAW)
        assert sim.stats()["requests"] == kinds["schema_violation"]
    assert _raw_kinds(work) == Counter({"ok": _n_images(work)})


@pytest.mark.workflow
def test_endpoint_password_never_written(tmp_path):
    marker = "MARKERpw-9f3e77d1"
    with Simulator(SimulatorConfig(enabled=True, latency_s=0.0)) as sim:
        endpoint = f"http://vlmuser:{marker}@127.0.0.1:{sim.port}/v1"
        cfg = _teacher_cfg(endpoint)
        conf = write_config(tmp_path / "c.yaml", cfg)
        work = tmp_path / "w"
        work.mkdir()
        snakemake(work, conf, RAW)
        assert sim.stats()["requests"] == _n_images(work)
        # a new password is no new endpoint; a new host is (the params change, the job reruns)
        cfg["vlm"]["endpoints"] = [endpoint.replace(marker, "another-secret")]
        write_config(conf, cfg)
        assert "teacher_annotate" not in job_counts(snakemake(work, conf, RAW, "-n").stdout)
        cfg["vlm"]["endpoints"] = [endpoint.replace("127.0.0.1", "localhost")]
        write_config(conf, cfg)
        assert job_counts(snakemake(work, conf, RAW, "-n").stdout).get("teacher_annotate") == 1
    secret = marker.encode()
    roots = [work / ".snakemake", work / "results", work / ".vlmrel-cache"]
    assert all(r.is_dir() for r in roots) and (work / LOG).is_file()
    for root in roots:
        for p in root.rglob("*"):
            if p.is_file():
                assert secret not in p.read_bytes(), f"endpoint password found in {p}"
