"""The client keeps the server's slots busy, and what it sends is what the official client would.

Timing assertions are loose on purpose (the test machine is shared); the benchmark
(``python -m vlmrel.bench vlm``) measures the real figures.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vlmrel import vlm
from vlmrel.teacher.schema import ANNOTATION_SCHEMA, annotation_prompt
from vlmrel.vlm.backends import OpenAIBackend
from vlmrel.vlm.config import GenerationConfig, SimulatorConfig
from vlmrel.vlm.simulator import Simulator


def _images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(n)]


def _cfg(sim: Simulator, cache: Path, concurrency: int, backend: str = "openai") -> vlm.VLMConfig:
    return vlm.VLMConfig.from_dict(
        {
            "backend": backend,
            "model": "vlmrel-sim",
            "endpoints": [sim.base_url(backend)],
            "concurrency": concurrency,
            "timeout_s": 10,
            "cache_path": str(cache),
        }
    )


@pytest.mark.parametrize("backend", ["openai", "ollama"])
def test_every_slot_is_used_and_results_keep_input_order(tmp_path: Path, backend: str) -> None:
    n, slots, latency = 32, 4, 0.1
    reqs = [
        vlm.Request(prompt=annotation_prompt(), image=a, schema=ANNOTATION_SCHEMA, meta={"i": i})
        for i, a in enumerate(_images(n))
    ]
    sim_cfg = SimulatorConfig(enabled=True, latency_s=latency, max_concurrency=slots, overload="queue")
    with Simulator(sim_cfg) as sim:
        res = vlm.run_requests(_cfg(sim, tmp_path / "c.sqlite", slots, backend), reqs, progress=False)
        st = sim.stats()
    assert [r.meta["i"] for r in res] == list(range(n)) and all(r.ok for r in res)
    assert st["requests"] == n and st["peak_processing"] == slots  # never more, and all of them
    # a slot is held for the latency, the simulator's own work included in it
    assert latency <= st["slot_s"] / n < latency + 0.05


def test_slots_stay_busy_over_a_run(tmp_path: Path) -> None:
    n, slots, latency = 48, 4, 0.1
    reqs = [vlm.Request(prompt=f"{annotation_prompt()} #{i}", schema=ANNOTATION_SCHEMA) for i in range(n)]
    sim_cfg = SimulatorConfig(enabled=True, latency_s=latency, max_concurrency=slots, overload="queue")
    with Simulator(sim_cfg) as sim:
        cfg = _cfg(sim, tmp_path / "c.sqlite", slots)
        vlm.run_requests(cfg, reqs[:1], progress=False)  # imports and first connection out of the way
        sim.reset_stats()
        t0 = time.perf_counter()
        vlm.run_requests(cfg, reqs[1:], progress=False)
        wall = time.perf_counter() - t0
        st = sim.stats()
    assert st["requests"] == n - 1 and st["peak_processing"] == slots
    assert st["slot_s"] / (wall * slots) > 0.6  # ~0.95 on a quiet machine


def test_results_do_not_depend_on_completion_order(tmp_path: Path) -> None:
    """With jittered latencies answers come back out of order; results are the same as one at a time."""
    reqs = [
        vlm.Request(prompt=annotation_prompt(), image=a, schema=ANNOTATION_SCHEMA, meta={"i": i})
        for i, a in enumerate(_images(24))
    ]
    sim_cfg = SimulatorConfig(
        enabled=True, latency_s=0.01, latency_jitter_s=0.03, max_concurrency=8, overload="queue"
    )
    with Simulator(sim_cfg) as sim:
        wide = vlm.run_requests(_cfg(sim, tmp_path / "a.sqlite", 8), reqs, progress=False)
        narrow = vlm.run_requests(_cfg(sim, tmp_path / "b.sqlite", 1), reqs, progress=False)
    assert [r.meta["i"] for r in wide] == list(range(24))
    assert [(r.key, r.status, r.text, r.parsed) for r in wide] == [
        (r.key, r.status, r.text, r.parsed) for r in narrow
    ]


def test_prepared_chat_body_is_what_chat_completions_create_sends() -> None:
    """The backend serializes the body itself and sends it with ``client.post``; the server must
    get the same request as from ``client.chat.completions.create`` with the same arguments."""
    import httpx2
    import openai

    seen: list[tuple[str, str, dict[str, Any]]] = []
    reply = {
        "id": "x",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "{}"}, "finish_reason": "stop"}],
    }

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append((request.url.path, request.headers["content-type"], json.loads(request.content)))
        return httpx2.Response(200, json=reply)

    def client() -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url="http://127.0.0.1:9/v1",
            api_key="k",
            max_retries=0,
            http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(handler)),
        )

    enc = vlm.encode_image(_images(1)[0])
    gen = GenerationConfig(temperature=0.0, top_p=0.9, max_tokens=64, seed=3, extra={"top_k": 5})
    backend = OpenAIBackend("http://127.0.0.1:9/v1", "k", 5.0, 2.0)
    backend._client = client()
    for system, schema, mode in [
        ("be brief", ANNOTATION_SCHEMA, "json_schema"),
        (None, ANNOTATION_SCHEMA, "json_object"),
        (None, None, "none"),
    ]:
        seen.clear()
        prepared = backend.prepare_chat("m", "describe", system, enc, schema, mode, gen)
        got = asyncio.run(backend.send_chat(prepared))
        assert got.text == "{}" and got.finish_reason == "stop"
        messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
        messages.append(
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": enc.data_url()}},
                    {"type": "text", "text": "describe"},
                ],
            }
        )
        kwargs: dict[str, Any] = {
            "model": "m",
            "messages": messages,
            "temperature": 0.0,
            "top_p": 0.9,
            "max_tokens": 64,
            "seed": 3,
            "extra_body": {"top_k": 5},
        }
        if mode == "json_schema":
            kwargs["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": schema, "strict": True},
            }
        elif mode == "json_object":
            kwargs["response_format"] = {"type": "json_object"}
        asyncio.run(client().chat.completions.create(**kwargs))
        assert len(seen) == 2
        assert seen[0] == seen[1]
        assert seen[0][0] == "/v1/chat/completions" and seen[0][1] == "application/json"


@pytest.mark.parametrize(
    "body,kind",
    [
        ({"choices": []}, "malformed_response"),
        ({"choices": [{"message": None}]}, "malformed_response"),
        ({"choices": [{"message": {"content": None}}]}, "malformed_response"),
        ("not json at all", "malformed_response"),
    ],
)
def test_openai_replies_without_an_answer_are_malformed(body: Any, kind: str) -> None:
    from vlmrel.vlm.backends import BackendError, _openai_reply

    with pytest.raises(BackendError) as err:
        _openai_reply(body)
    assert err.value.kind == kind


def test_bad_schema_raises_and_nothing_is_cached(tmp_path: Path) -> None:
    """The schema check runs while the first requests are out; a bad one still fails the call."""
    import jsonschema

    bad = {"type": "object", "properties": {"x": {"type": "no-such-type"}}}
    reqs = [vlm.Request(prompt=f"q{i}", schema=bad) for i in range(6)]
    with Simulator(SimulatorConfig(enabled=True, latency_s=0.05, max_concurrency=2)) as sim:
        cfg = _cfg(sim, tmp_path / "c.sqlite", 2)
        with pytest.raises(jsonschema.SchemaError):
            vlm.run_requests(cfg, reqs, progress=False)
        assert sim.stats()["requests"] <= 2  # at most one per slot went out
    with vlm.ResponseCache(tmp_path / "c.sqlite") as cache:
        assert cache.count() == 0


def test_a_duplicate_after_its_answer_is_not_sent_again(tmp_path: Path) -> None:
    reqs = [vlm.Request(prompt=p, meta={"i": i}) for i, p in enumerate(["a", "b", "c", "a", "b"])]
    with Simulator(SimulatorConfig(enabled=True, latency_s=0.01)) as sim:
        res = vlm.run_requests(_cfg(sim, tmp_path / "c.sqlite", 1), reqs, progress=False)
        assert sim.stats()["requests"] == 3
    assert [r.meta["i"] for r in res] == list(range(5))
    assert res[3].text == res[0].text and res[4].text == res[1].text and res[3].cache_hit


def test_reset_stats_keeps_the_gauges_of_requests_still_running() -> None:
    with Simulator(SimulatorConfig(enabled=True, latency_s=0.0, max_concurrency=2)) as sim:
        sim._enter("/x")
        sim._processing(+1)
        sim.reset_stats()  # a request is still finishing
        sim._processing(-1, 0.01)
        sim._leave()
        sim._enter("/x")
        sim._processing(+1)
        st = sim.stats()
    assert st["peak_processing"] == 1 and st["peak_concurrency"] == 1 and st["requests"] == 1
