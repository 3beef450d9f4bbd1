"""The VLM client layer over real HTTP on 127.0.0.1 against the in-process simulator."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from vlmrel import vlm
from vlmrel.teacher.schema import ANNOTATION_SCHEMA, annotation_prompt
from vlmrel.vlm.config import SimulatorConfig
from vlmrel.vlm.simulator import Simulator

BACKENDS = ["ollama", "openai"]


def _sim(**kw) -> Simulator:
    kw.setdefault("latency_s", 0.0)
    require = kw.pop("require_api_key", None)
    echo = kw.pop("echo_auth", False)
    return Simulator(SimulatorConfig(enabled=True, **kw), require_api_key=require, echo_auth=echo)


def _cfg(backend: str, sims: list[Simulator] | Simulator, **kw) -> vlm.VLMConfig:
    sims = sims if isinstance(sims, list) else [sims]
    base = {
        "backend": backend,
        "model": "vlmrel-sim",
        "endpoints": [s.base_url(backend) for s in sims],
        "timeout_s": 5,
        "connect_timeout_s": 2,
        "retries": 3,
        "backoff_s": 0.01,
        "backoff_max_s": 0.05,
        "concurrency": 2,
        "max_failure_share": 1.0,  # these tests look at failures one by one; outages: test_vlm_outage.py
    }
    base.update(kw)
    return vlm.VLMConfig.from_dict(base)


def _text_reqs(n: int, tag: str = "") -> list[vlm.Request]:
    return [vlm.Request(prompt=f"say something {tag}{i}", meta={"i": i}) for i in range(n)]


def _json_reqs(n: int) -> list[vlm.Request]:
    # annotation requests without an image: the simulator answers with a schema-shaped object
    return [
        vlm.Request(prompt=f"{annotation_prompt()} #{i}", schema=ANNOTATION_SCHEMA, meta={"i": i})
        for i in range(n)
    ]


def _dead_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_both_backends_answer_and_validate(tmp_path: Path, backend: str) -> None:
    with _sim() as sim:
        cfg = _cfg(backend, sim)
        res = vlm.run_requests(
            cfg, _json_reqs(6) + _text_reqs(2), cache_path=tmp_path / "c.sqlite", progress=False
        )
        assert sim.stats()["requests"] == 8
    assert [r.meta.get("i") for r in res] == [0, 1, 2, 3, 4, 5, 0, 1]  # input order
    assert all(r.ok and not r.cache_hit and r.attempts == 1 for r in res)
    for r in res[:6]:
        # independent check: the parsed answer validates against the schema and equals the raw text
        import jsonschema

        jsonschema.validate(r.parsed, ANNOTATION_SCHEMA)
        assert r.parsed == json.loads(r.text)
    assert res[6].parsed is None and isinstance(res[6].text, str) and res[6].text


def test_backends_agree(tmp_path: Path) -> None:
    """The same request through the ollama and openai clients reaches the same answer."""
    img = np.random.default_rng(3).integers(0, 255, size=(40, 60, 3), dtype=np.uint8)
    reqs = [vlm.Request(annotation_prompt(), img, ANNOTATION_SCHEMA)]
    with _sim() as sim:
        a = vlm.run_requests(_cfg("ollama", sim), reqs, cache_path=tmp_path / "a.sqlite", progress=False)
        b = vlm.run_requests(_cfg("openai", sim), reqs, cache_path=tmp_path / "b.sqlite", progress=False)
    assert a[0].ok and b[0].ok and a[0].parsed == b[0].parsed
    assert a[0].key != b[0].key  # the backend is part of the key


@pytest.mark.parametrize("backend", BACKENDS)
def test_retries_recover_from_429_500_503(tmp_path: Path, backend: str) -> None:
    faults = {"http_429": 0.4, "http_500": 0.3, "http_503": 0.3}
    with _sim(faults=faults, faults_max_attempt=2) as sim:
        res = vlm.run_requests(
            _cfg(backend, sim),
            _text_reqs(8),
            cache_path=tmp_path / "c.sqlite",
            stats_path=tmp_path / "s.json",
            progress=False,
        )
        st = sim.stats()
    assert all(r.ok for r in res)
    assert all(r.attempts == 3 for r in res)  # two injected faults each, then success
    assert st["requests"] == 24 and sum(st["faults"].values()) == 16
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["requests"] == 24 and stats["retries"] == 16 and stats["failed"] == 0
    assert stats["attempt_errors_by_kind"].get("http_429", 0) == st["faults"].get("http_429", 0)
    assert stats["attempt_errors_by_kind"].get("http_5xx", 0) == st["faults"].get("http_500", 0) + st[
        "faults"
    ].get("http_503", 0)
    assert stats["latency_s"]["n"] == 8 and stats["latency_s"]["p50"] <= stats["latency_s"]["p95"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_timeouts_are_retried(tmp_path: Path, backend: str) -> None:
    with _sim(faults={"timeout": 1.0}, faults_max_attempt=1, hang_s=30) as sim:
        cfg = _cfg(backend, sim, timeout_s=0.4, concurrency=4)
        res = vlm.run_requests(
            cfg,
            _text_reqs(4),
            cache_path=tmp_path / "c.sqlite",
            stats_path=tmp_path / "s.json",
            progress=False,
        )
    assert all(r.ok and r.attempts == 2 for r in res)
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["attempt_errors_by_kind"] == {"timeout": 4}


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_and_malformed_bodies_are_retried(tmp_path: Path, backend: str) -> None:
    with _sim(faults={"truncated": 0.5, "malformed_body": 0.5}, faults_max_attempt=1) as sim:
        res = vlm.run_requests(
            _cfg(backend, sim),
            _text_reqs(8),
            cache_path=tmp_path / "c.sqlite",
            stats_path=tmp_path / "s.json",
            progress=False,
        )
        st = sim.stats()
    assert all(r.ok and r.attempts == 2 for r in res)
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["attempt_errors_by_kind"] == {
        k: v
        for k, v in {
            "truncated": st["faults"].get("truncated", 0),
            "malformed_response": st["faults"].get("malformed_body", 0),
        }.items()
        if v
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_400_is_not_retried(tmp_path: Path, backend: str) -> None:
    with _sim(faults={"http_400": 1.0}) as sim:
        res = vlm.run_requests(
            _cfg(backend, sim, retries=5), _text_reqs(3), cache_path=tmp_path / "c.sqlite", progress=False
        )
        assert sim.stats()["requests"] == 3
    assert all(r.status == "failed" and r.failure_kind == "http_4xx" and r.attempts == 1 for r in res)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "fault,kind", [("malformed_json", "malformed_json"), ("schema_violation", "schema_violation")]
)
def test_invalid_answers_are_recorded_failures(tmp_path: Path, backend: str, fault: str, kind: str) -> None:
    with _sim(faults={fault: 1.0}) as sim:
        res = vlm.run_requests(
            _cfg(backend, sim), _json_reqs(3), cache_path=tmp_path / "c.sqlite", progress=False
        )
        assert sim.stats()["requests"] == 3  # answer-level failures are not retried
    for r in res:
        assert r.status == "failed" and r.failure_kind == kind and r.parsed is None
        assert r.text  # the raw answer is kept for inspection
    with vlm.ResponseCache(tmp_path / "c.sqlite") as cache:
        assert cache.count("failed") == 3 and cache.count("ok") == 0


def test_connection_failover_to_live_endpoint(tmp_path: Path) -> None:
    with _sim() as sim:
        cfg = vlm.VLMConfig.from_dict(
            {
                **_cfg("ollama", sim).to_dict(),
                "endpoints": [_dead_url(), sim.url],
                "concurrency": 1,
                "retries": 4,
            }
        )
        res = vlm.run_requests(
            cfg,
            _text_reqs(6),
            cache_path=tmp_path / "c.sqlite",
            stats_path=tmp_path / "s.json",
            progress=False,
        )
        assert sim.stats()["requests"] == 6
    assert all(r.ok and r.endpoint == sim.url for r in res)
    stats = json.loads((tmp_path / "s.json").read_text())
    dead = stats["per_endpoint"][cfg.endpoints[0]]
    assert dead["requests"] == dead["error_connection"] == stats["attempt_errors_by_kind"]["connection"] >= 1
    assert dead["requests"] <= 4  # the dead endpoint cools down instead of catching every retry


def test_all_endpoints_dead_is_a_connection_failure(tmp_path: Path) -> None:
    cfg = vlm.VLMConfig.from_dict(
        {"endpoints": [_dead_url()], "retries": 1, "backoff_s": 0.01, "timeout_s": 2, "max_failure_share": 1}
    )
    res = vlm.run_requests(cfg, _text_reqs(2), cache_path=tmp_path / "c.sqlite", progress=False)
    assert all(r.failure_kind == "connection" and r.attempts == 2 for r in res)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_endpoint_concurrency_bound(tmp_path: Path, backend: str) -> None:
    with _sim(latency_s=0.03) as a, _sim(latency_s=0.03) as b:
        cfg = _cfg(backend, [a, b], concurrency=3)
        res = vlm.run_requests(cfg, _text_reqs(40), cache_path=tmp_path / "c.sqlite", progress=False)
        sa, sb = a.stats(), b.stats()
    assert all(r.ok for r in res)
    # never more than 3 at once on either server, and the bound is actually reached
    assert sa["peak_concurrency"] == 3 and sb["peak_concurrency"] == 3


def test_round_robin_over_two_instances(tmp_path: Path) -> None:
    with _sim(latency_s=0.01) as a, _sim(latency_s=0.01) as b:
        cfg = _cfg("openai", [a, b], concurrency=1)
        res = vlm.run_requests(cfg, _text_reqs(20), cache_path=tmp_path / "c.sqlite", progress=False)
        na, nb = a.stats()["requests"], b.stats()["requests"]
    assert na + nb == 20 and 8 <= na <= 12
    assert {r.endpoint for r in res} == {a.openai_url, b.openai_url}


def test_overload_rejections_are_retried(tmp_path: Path) -> None:
    with _sim(latency_s=0.02, max_concurrency=1, overload="reject", overload_status=429) as sim:
        cfg = _cfg("ollama", sim, concurrency=3, retries=20)
        res = vlm.run_requests(
            cfg,
            _text_reqs(6),
            cache_path=tmp_path / "c.sqlite",
            stats_path=tmp_path / "s.json",
            progress=False,
        )
        st = sim.stats()
    assert all(r.ok for r in res)
    assert st["overloaded"] > 0 and st["peak_processing"] == 1
    assert (
        json.loads((tmp_path / "s.json").read_text())["attempt_errors_by_kind"]["http_429"]
        == st["overloaded"]
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_rerun_hits_cache_and_sends_nothing(tmp_path: Path, backend: str) -> None:
    reqs = _json_reqs(5) + _text_reqs(3)
    with _sim() as sim:
        cfg = _cfg(backend, sim)
        first = vlm.run_requests(cfg, reqs, cache_path=tmp_path / "c.sqlite", progress=False)
        sim.reset_stats()
        second = vlm.run_requests(
            cfg, reqs, cache_path=tmp_path / "c.sqlite", stats_path=tmp_path / "s.json", progress=False
        )
        assert sim.stats()["requests"] == 0
        # one new request: only it is sent
        third = vlm.run_requests(
            cfg, reqs + _text_reqs(1, "new"), cache_path=tmp_path / "c.sqlite", progress=False
        )
        assert sim.stats()["requests"] == 1
    assert all(r.cache_hit for r in second) and not third[-1].cache_hit
    assert [(r.key, r.text, r.parsed) for r in first] == [(r.key, r.text, r.parsed) for r in second]
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["cache_hits"] == 8 and stats["requests"] == 0


def test_duplicates_in_a_batch_are_sent_once(tmp_path: Path) -> None:
    reqs = [vlm.Request("same prompt", meta={"i": i}) for i in range(5)]
    with _sim(latency_s=0.05) as sim:
        res = vlm.run_requests(
            _cfg("ollama", sim, concurrency=4), reqs, cache_path=tmp_path / "c.sqlite", progress=False
        )
        assert sim.stats()["requests"] == 1
    assert len({r.text for r in res}) == 1 and [r.meta["i"] for r in res] == list(range(5))


def test_failures_retried_only_when_config_says_so(tmp_path: Path) -> None:
    cache = tmp_path / "c.sqlite"
    with _sim(faults={"schema_violation": 1.0}, faults_max_attempt=1) as sim:
        cfg = _cfg("openai", sim)
        first = vlm.run_requests(cfg, _json_reqs(4), cache_path=cache, progress=False)
        assert all(r.failure_kind == "schema_violation" for r in first)
        sim.reset_stats()
        again = vlm.run_requests(cfg, _json_reqs(4), cache_path=cache, progress=False)
        assert sim.stats()["requests"] == 0
        assert all(r.cache_hit and r.failure_kind == "schema_violation" for r in again)
        other = vlm.run_requests(
            cfg.replace(retry_failed=["timeout"]), _json_reqs(4), cache_path=cache, progress=False
        )
        assert sim.stats()["requests"] == 0 and not any(r.ok for r in other)
        fixed = vlm.run_requests(
            cfg.replace(retry_failed=["schema_violation"]), _json_reqs(4), cache_path=cache, progress=False
        )
        assert sim.stats()["requests"] == 4  # the simulator's second attempt has no fault
        assert all(r.ok and not r.cache_hit for r in fixed)
        final = vlm.run_requests(
            cfg.replace(retry_failed=["all"]), _json_reqs(4), cache_path=cache, progress=False
        )
        assert sim.stats()["requests"] == 4 and all(r.ok and r.cache_hit for r in final)


def test_api_key_is_sent_but_never_stored_or_logged(tmp_path: Path, monkeypatch, caplog, capfd) -> None:
    good, bad = "sk-vlmrel-GOODKEY-7c1e9d0a55", "sk-vlmrel-BADKEY-3f4a2b1c99"
    monkeypatch.setenv("VLMREL_TEST_GOOD", good)
    monkeypatch.setenv("VLMREL_TEST_BAD", bad)
    caplog.set_level(logging.DEBUG)
    # a server that echoes a wrong key in its error message, as some proxies do
    with _sim(
        require_api_key=good, echo_auth=True, faults={"http_500": 0.3, "http_400": 0.2}, faults_max_attempt=1
    ) as sim:
        for backend in BACKENDS:
            ok = vlm.run_requests(
                _cfg(backend, sim, api_key_env="VLMREL_TEST_GOOD"),
                _json_reqs(6),
                cache_path=tmp_path / "c.sqlite",
                stats_path=tmp_path / f"s_{backend}.json",
                progress=True,
            )
            assert sum(r.ok for r in ok) >= 3 and all(r.ok or r.failure_kind == "http_4xx" for r in ok)
            wrong = vlm.run_requests(
                _cfg(backend, sim, api_key_env="VLMREL_TEST_BAD"),
                _text_reqs(2, backend),
                cache_path=tmp_path / "c.sqlite",
                stats_path=tmp_path / f"w_{backend}.json",
                progress=True,
            )
            assert all(r.failure_kind == "http_auth" for r in wrong)  # 401: re-sent on a re-run
            assert all(bad not in (r.error or "") for r in wrong)
            assert any("***" in (r.error or "") for r in wrong)  # the echoed key was redacted
            for r in ok + wrong:
                assert good not in json.dumps(r.to_dict()) and bad not in json.dumps(r.to_dict())
    out, err = capfd.readouterr()
    blobs = [out, err, caplog.text]
    with contextlib.suppress(sqlite3.Error):
        sqlite3.connect(tmp_path / "c.sqlite").execute("PRAGMA wal_checkpoint(FULL)").fetchall()
    for p in tmp_path.iterdir():
        blobs.append(p.read_bytes().decode("latin-1"))
    for blob in blobs:
        assert good not in blob and bad not in blob
        assert "GOODKEY" not in blob and "BADKEY" not in blob


def test_missing_api_key_variable_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("VLMREL_NO_SUCH_KEY", raising=False)
    cfg = vlm.VLMConfig.from_dict({"api_key_env": "VLMREL_NO_SUCH_KEY"})
    with pytest.raises(vlm.ConfigError, match="VLMREL_NO_SUCH_KEY"):
        vlm.run_requests(cfg, _text_reqs(1), cache_path=tmp_path / "c.sqlite", progress=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_embed_dedups_caches_and_matches_reference(tmp_path: Path, backend: str) -> None:
    texts = ["a red cup", "a cat", "a red cup", "a red mug", "a cat"]
    with _sim() as sim:
        cfg = _cfg(backend, sim, embedding={"model": "sim-embed", "batch_size": 2})
        e = vlm.embed(
            cfg, texts, cache_path=tmp_path / "c.sqlite", stats_path=tmp_path / "s.json", progress=False
        )
        assert sim.stats()["requests"] == 2  # 3 unique texts in batches of 2
        sim.reset_stats()
        e2 = vlm.embed(cfg, texts, cache_path=tmp_path / "c.sqlite", progress=False)
        assert sim.stats()["requests"] == 0
        ref = np.asarray(sim.embed_texts(texts), dtype=np.float32)
    assert e.shape == (5, 64) and e.dtype == np.float32
    np.testing.assert_allclose(e, ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(e, e2)
    assert float(e[0] @ e[3]) > float(e[0] @ e[1])  # similar texts, similar vectors
    stats = json.loads((tmp_path / "s.json").read_text())
    assert stats["items"] == 5 and stats["duplicates"] == 2 and stats["ok"] == 5


def test_embed_all_failed_raises(tmp_path: Path) -> None:
    with _sim(faults={"http_400": 1.0}) as sim:
        with pytest.raises(RuntimeError, match="every request failed"):
            vlm.embed(_cfg("ollama", sim), ["x", "y"], cache_path=tmp_path / "c.sqlite", progress=False)


def test_simulator_enabled_in_config_runs_in_process(tmp_path: Path) -> None:
    cfg = vlm.VLMConfig.from_dict(
        {
            "backend": "openai",
            "model": "sim",
            "simulator": {"enabled": True, "instances": 2, "latency_s": 0.0},
        }
    )
    res = vlm.run_requests(cfg, _json_reqs(4), cache_path=tmp_path / "c.sqlite", progress=False)
    assert all(r.ok for r in res)
    again = vlm.run_requests(cfg, _json_reqs(4), cache_path=tmp_path / "c.sqlite", progress=False)
    assert all(r.cache_hit for r in again)
    # a differently configured simulator is a different cache namespace
    other = vlm.run_requests(
        cfg.replace(simulator={"enabled": True, "seed": 1, "latency_s": 0.0}),
        _json_reqs(4),
        cache_path=tmp_path / "c.sqlite",
        progress=False,
    )
    assert not any(r.cache_hit for r in other)
    assert {len({r.endpoint for r in res})} == {2}
