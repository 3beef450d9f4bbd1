"""The HTTP side of the stand-in server: OpenAI and Ollama routes on 127.0.0.1, latency,
bounded concurrency, fault injection, counters; :func:`simulated` starts a group of them for
the client layer (the demo's and the tests' jobs).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import hashlib
import json
import select
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from ..config import SIM_FAULTS, SimulatorConfig, VLMConfig
from .answers import _seed_of, _violate, answer_chat, embed_texts
from .registry import SIM_VERSION, Registry

#: faults answered with their HTTP status (``http_503`` -> 503) instead of an answer
_STATUS_FAULTS = frozenset(f for f in SIM_FAULTS if f.startswith("http_"))


# -- server --------------------------------------------------------------------------------
class _Shared:
    """State shared by a group of simulators started together (attempt counters)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.attempts: Counter = Counter()

    def next_attempt(self, key: str) -> int:
        with self.lock:
            n = self.attempts[key]
            self.attempts[key] += 1
            return n


@dataclass
class _Counters:
    requests: Counter = field(default_factory=Counter)
    faults: Counter = field(default_factory=Counter)
    completed: int = 0
    disconnected: int = 0
    overloaded: int = 0
    inflight: int = 0
    peak_inflight: int = 0
    processing: int = 0
    peak_processing: int = 0
    slot_s: float = 0.0


class Simulator:
    """A simulated VLM server on 127.0.0.1 (a simulator, not a model); a context manager.

    ``sim.url`` is the Ollama base URL, ``sim.openai_url`` the OpenAI one (``.../v1``);
    ``sim.stats()`` returns counters (requests by path, faults, peak concurrency: requests
    in the server, ``peak_processing``: requests holding a slot, ``slot_s``: seconds of slot
    time, summed over requests, so ``slot_s / (wall * slots)`` is how busy the slots were).
    """

    def __init__(
        self,
        config: SimulatorConfig | None = None,
        port: int = 0,
        require_api_key: str | None = None,
        shared: _Shared | None = None,
        builtin_registry: bool = True,
        echo_auth: bool = False,
    ) -> None:
        self.config = config or SimulatorConfig(enabled=True)
        self.registry = Registry(self.config.metadata, builtin=builtin_registry)
        self.shared = shared or _Shared()
        self._require_key = require_api_key
        self._echo_auth = echo_auth  # tests only: echo a wrong Authorization header, as some proxies do
        self._lock = threading.Lock()
        self._counters = _Counters()
        self._slots = (
            threading.Semaphore(self.config.max_concurrency) if self.config.max_concurrency else None
        )
        self._stopping = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _make_handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_url(self) -> str:
        return f"{self.url}/v1"

    def base_url(self, backend: str) -> str:
        return self.openai_url if backend == "openai" else self.url

    def start(self) -> Simulator:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:  # shutdown() waits for serve_forever, which never ran otherwise
            self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            c = self._counters
            return {
                "requests": sum(c.requests.values()),
                "requests_by_path": dict(c.requests),
                "faults": dict(c.faults),
                "completed": c.completed,
                "disconnected": c.disconnected,
                "overloaded": c.overloaded,
                "peak_concurrency": c.peak_inflight,
                "peak_processing": c.peak_processing,
                "slot_s": c.slot_s,
            }

    def reset_stats(self) -> None:
        """Zero the counters; the gauges (requests in the server, holding a slot) stay as they
        are, so a request still finishing does not leave them at -1 (a peak one too low)."""
        with self._lock:
            c = self._counters
            self._counters = _Counters(
                inflight=c.inflight,
                peak_inflight=c.inflight,
                processing=c.processing,
                peak_processing=c.processing,
            )

    # -- request handling (runs in server threads) -----------------------------------------
    def _enter(self, path: str) -> None:
        with self._lock:
            c = self._counters
            c.requests[path] += 1
            c.inflight += 1
            c.peak_inflight = max(c.peak_inflight, c.inflight)

    def _leave(self) -> None:
        with self._lock:
            self._counters.inflight -= 1

    def _count(self, what: str, fault: str | None = None) -> None:
        with self._lock:
            if fault is not None:
                self._counters.faults[fault] += 1
            if what == "completed":
                self._counters.completed += 1
            elif what == "disconnected":
                self._counters.disconnected += 1
            elif what == "overloaded":
                self._counters.overloaded += 1

    def _processing(self, delta: int, held_s: float = 0.0) -> None:
        with self._lock:
            c = self._counters
            c.processing += delta
            c.peak_processing = max(c.peak_processing, c.processing)
            c.slot_s += held_s

    def draw_fault(self, key: str, attempt: int) -> str | None:
        cfg = self.config
        if not cfg.faults or (cfg.faults_max_attempt is not None and attempt >= cfg.faults_max_attempt):
            return None
        u = np.random.default_rng([cfg.seed, _seed_of(key), attempt]).random()
        acc = 0.0
        for kind in SIM_FAULTS:
            acc += float(cfg.faults.get(kind, 0.0))
            if u < acc:
                return kind
        return None

    def answer_chat(self, prompt: str, image_bytes: bytes | None, schema: dict[str, Any] | None) -> Any:
        """The deterministic answer (a JSON value, or a string for free-text prompts)."""
        return answer_chat(self.config, self.registry, prompt, image_bytes, schema)

    def embed_texts(self, texts: list[str]) -> list[list[float]]:
        return embed_texts(self.config, texts)


def _make_handler(sim: Simulator) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "vlmrel-simulator/" + SIM_VERSION

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: the simulator keeps counters instead of an access log."""
            return

        # -- plumbing ------------------------------------------------------------------------
        def setup(self) -> None:
            super().setup()
            # headers and body go out in separate writes: without TCP_NODELAY, Nagle's algorithm
            # and delayed ACKs add ~40 ms to every keep-alive response
            with contextlib.suppress(OSError):
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def _hang_up(self) -> None:
            """End the request without an answer (the client left, the server stops, or a
            simulated hang ran out): counted as ``disconnected``; the connection is closed."""
            self._sent = True
            sim._leave()
            sim._count("disconnected")
            self.close_connection = True

        def _disconnected(self) -> bool:
            try:
                r, _, _ = select.select([self.connection], [], [], 0)
                if not r:
                    return False
                return self.connection.recv(1, socket.MSG_PEEK) == b""
            except (OSError, ValueError):
                return True

        def _wait(self, seconds: float, since: float | None = None) -> bool:
            """Sleep until ``seconds`` after ``since`` (default: now); False as soon as the client
            goes away or the server stops.

            It blocks in ``select`` on the connection (which wakes it when the client hangs up)
            for at most 0.1 s at a time, instead of waking every 20 ms to look: eight waiting
            handlers polled 400 times a second, each wake-up taking the GIL from the client's
            event loop when both run in one process (the tests, the bench, the demo).
            """
            end = (time.monotonic() if since is None else since) + seconds
            while True:
                left = end - time.monotonic()
                if left <= 0:
                    return True
                if sim._stopping.is_set():
                    return False
                try:
                    readable, _, _ = select.select([self.connection], [], [], min(0.1, left))
                except (OSError, ValueError):
                    return False
                if readable:
                    if self._disconnected():
                        return False
                    time.sleep(min(0.02, max(0.0, end - time.monotonic())))  # pipelined bytes: poll

        def _send(
            self, status: int, body: bytes, content_type: str = "application/json", truncate: bool = False
        ) -> None:
            self._sent = True
            sim._leave()
            try:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                if truncate:
                    self.send_header("Connection", "close")
                self.end_headers()
                if truncate:
                    self.wfile.write(body[: max(1, len(body) // 2)])
                    self.wfile.flush()
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                else:
                    self.wfile.write(body)
            except OSError:
                self.close_connection = True

        def _json(self, status: int, obj: Any, truncate: bool = False) -> None:
            self._send(status, json.dumps(obj).encode(), truncate=truncate)

        def _error(self, status: int, message: str, api: str) -> None:
            if api == "openai":
                etype = {
                    400: "invalid_request_error",
                    401: "authentication_error",
                    429: "rate_limit_error",
                }.get(status, "server_error")
                self._json(status, {"error": {"message": message, "type": etype, "code": status}})
            else:
                self._json(status, {"error": message})

        def _read_body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length > 0 else b""

        # -- routes --------------------------------------------------------------------------
        def do_GET(self) -> None:
            sim._enter(self.path)
            if self.path in ("/", "/health"):
                self._send(200, b"vlmrel simulator is running (a simulator, not a model)\n", "text/plain")
            elif self.path == "/api/version":
                self._json(200, {"version": f"vlmrel-sim-{SIM_VERSION}"})
            elif self.path == "/api/tags":
                self._json(200, {"models": [{"name": "vlmrel-sim", "model": "vlmrel-sim", "details": {}}]})
            elif self.path == "/v1/models":
                self._json(
                    200,
                    {
                        "object": "list",
                        "data": [{"id": "vlmrel-sim", "object": "model", "owned_by": "vlmrel"}],
                    },
                )
            else:
                self._error(404, f"no route {self.path}", "ollama")

        def do_POST(self) -> None:
            path = self.path.split("?")[0]
            raw = self._read_body()
            sim._enter(path)
            routes = {
                "/v1/chat/completions": ("openai", "chat"),
                "/v1/embeddings": ("openai", "embed"),
                "/api/chat": ("ollama", "chat"),
                "/api/embed": ("ollama", "embed"),
            }
            if path not in routes:
                self._error(404, f"no route {path}", "ollama")
                return
            api, what = routes[path]
            if sim._require_key is not None:
                auth = self.headers.get("Authorization") or ""
                if auth != f"Bearer {sim._require_key}":
                    got = f" (got {auth!r})" if sim._echo_auth else ""
                    self._error(401, f"invalid or missing API key{got}", api)
                    return
            try:
                body = json.loads(raw or b"{}")
                if not isinstance(body, dict):
                    raise ValueError("body is not a JSON object")
            except ValueError as exc:
                self._error(400, f"invalid JSON body: {exc}", api)
                return
            key = hashlib.sha256(
                path.encode() + b"\n" + json.dumps(body, sort_keys=True).encode()
            ).hexdigest()
            attempt = sim.shared.next_attempt(key)
            fault = sim.draw_fault(key, attempt)
            if fault is not None:
                sim._count("fault", fault)
            # concurrency limit
            if sim._slots is not None:
                if sim.config.overload == "reject":
                    if not sim._slots.acquire(blocking=False):
                        sim._count("overloaded")
                        self._error(sim.config.overload_status, "server busy", api)
                        return
                else:
                    while not sim._slots.acquire(timeout=0.02):
                        if self._disconnected() or sim._stopping.is_set():
                            self._hang_up()
                            return
            sim._processing(+1)
            started = time.monotonic()
            self._sent = False
            try:
                self._handle(api, what, body, fault, key, attempt, started)
            except Exception as exc:  # a simulator bug must not hang the client
                if not self._sent:
                    self._error(500, f"simulator error: {type(exc).__name__}: {exc}", api)
                raise
            finally:
                sim._processing(-1, time.monotonic() - started)
                if sim._slots is not None:
                    sim._slots.release()

        def _handle(
            self,
            api: str,
            what: str,
            body: dict[str, Any],
            fault: str | None,
            key: str,
            attempt: int,
            started: float,
        ) -> None:
            """Answer after ``latency`` seconds in the slot taken at ``started``.

            The answer is worked out first and the latency counted from when the slot was
            taken, so a slot is held for the latency (as a real server's slot is held for its
            model's time, answer included), not for the latency plus the simulator's own work
            (~2 ms a request, more when the client's event loop holds the GIL).
            """
            cfg = sim.config
            rng = np.random.default_rng([cfg.seed, _seed_of(key), attempt, 1])
            latency = (
                cfg.latency_s + abs(rng.normal(0, cfg.latency_jitter_s))
                if cfg.latency_jitter_s
                else cfg.latency_s
            )
            if fault == "timeout":
                self._wait(cfg.hang_s, started)
                self._hang_up()
                return
            payload: dict[str, Any] | None = None
            bad: str | None = None
            if fault not in _STATUS_FAULTS:
                try:
                    if what == "embed":
                        payload = self._embed(api, body)
                    else:
                        payload = self._chat(api, body, fault)
                except _BadRequest as exc:
                    bad = str(exc)
            if not self._wait(latency, started):
                self._hang_up()
                return
            if fault in _STATUS_FAULTS:
                status = int(fault[-3:])
                self._error(status, f"simulated fault {fault}", api)
                return
            if bad is not None or payload is None:
                self._error(400, bad or "no answer", api)
                return
            if fault == "malformed_body":
                self._send(200, b'{"choices": [{"message": {"content": "oops', truncate=False)
                sim._count("completed")
                return
            self._json(200, payload, truncate=fault == "truncated")
            sim._count("completed")

        def _embed(self, api: str, body: dict[str, Any]) -> dict[str, Any]:
            inp = body.get("input")
            texts = [inp] if isinstance(inp, str) else inp
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise _BadRequest("'input' must be a string or a list of strings")
            vecs = sim.embed_texts(texts)
            model = body.get("model", "vlmrel-sim")
            if api == "ollama":
                return {
                    "model": model,
                    "embeddings": vecs,
                    "total_duration": 0,
                    "load_duration": 0,
                    "prompt_eval_count": sum(len(t.split()) for t in texts),
                }
            if body.get("encoding_format") == "base64":
                data = [
                    {
                        "object": "embedding",
                        "index": i,
                        "embedding": base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode(),
                    }
                    for i, v in enumerate(vecs)
                ]
            else:
                data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vecs)]
            n = sum(len(t.split()) for t in texts)
            return {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": n, "total_tokens": n},
            }

        def _chat(self, api: str, body: dict[str, Any], fault: str | None) -> dict[str, Any]:
            prompt, image, schema = _parse_chat(api, body)
            try:
                answer = sim.answer_chat(prompt, image, schema)
            except OSError as exc:
                raise _BadRequest(f"cannot decode image: {exc}") from exc
            if fault == "schema_violation":
                answer = _violate(answer, schema)
            text = answer if isinstance(answer, str) else json.dumps(answer)
            if fault == "malformed_json":
                text = text[: max(1, len(text) // 2)]
            model = body.get("model", "vlmrel-sim")
            if api == "ollama":
                return {
                    "model": model,
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "message": {"role": "assistant", "content": text},
                    "done": True,
                    "done_reason": "stop",
                    "total_duration": int(sim.config.latency_s * 1e9),
                    "eval_count": len(text.split()),
                }
            return {
                "id": "chatcmpl-sim-" + hashlib.sha256(text.encode()).hexdigest()[:12],
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                ],
                "usage": {
                    "prompt_tokens": len(prompt.split()),
                    "completion_tokens": len(text.split()),
                    "total_tokens": len(prompt.split()) + len(text.split()),
                },
            }

    return Handler


class _BadRequest(ValueError):
    pass


def _decode_b64(data: str) -> bytes:
    if data.startswith("data:"):
        data = data.split(",", 1)[1] if "," in data else ""
    try:
        return base64.b64decode(data, validate=False)
    except (binascii.Error, ValueError) as exc:
        raise _BadRequest(f"image is not base64: {exc}") from exc


def _parse_chat(api: str, body: dict[str, Any]) -> tuple[str, bytes | None, dict[str, Any] | None]:
    """(prompt text, first image bytes, response schema) of a chat request of either API."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("'messages' must be a non-empty list")
    texts: list[str] = []
    image: bytes | None = None
    for msg in messages:
        if not isinstance(msg, dict) or msg.get("role") != "user":
            continue
        content = msg.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for part in content:
                if not isinstance(part, dict):
                    continue
                if part.get("type") == "text":
                    texts.append(str(part.get("text", "")))
                elif part.get("type") == "image_url" and image is None:
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    if not isinstance(url, str) or not url.startswith("data:"):
                        raise _BadRequest("only data: URLs are supported for images")
                    image = _decode_b64(url)
        for img in msg.get("images") or []:
            if image is None and isinstance(img, str):
                image = _decode_b64(img)
    schema = None
    if api == "ollama":
        fmt = body.get("format")
        schema = fmt if isinstance(fmt, dict) else None
    else:
        rf = body.get("response_format")
        if isinstance(rf, dict) and rf.get("type") == "json_schema":
            js = rf.get("json_schema") or {}
            schema = js.get("schema") if isinstance(js, dict) else None
    return "\n".join(texts), image, schema


# -- group helper used by the client layer -------------------------------------------------
def simulator_salt(sim_cfg: SimulatorConfig) -> str:
    """Hash of everything that changes the simulator's answers (for the cache key)."""
    d = dataclasses.asdict(sim_cfg)
    parts: dict[str, Any] = {
        "version": SIM_VERSION,
        **{
            k: d[k]
            for k in (
                "seed",
                "faults",
                "faults_max_attempt",
                "coords",
                "grounding_sensitivity",
                "embedding_dim",
            )
        },
        "metadata": [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in sim_cfg.metadata],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def simulated(cfg: VLMConfig) -> Iterator[VLMConfig]:
    """Start ``cfg.simulator.instances`` simulators; yield ``cfg`` pointed at them.

    The yielded config has the simulator disabled (it *is* the endpoints now), the
    embedding endpoints cleared (they default to the chat ones) and ``cache_salt``
    extended with :func:`simulator_salt`, so simulated answers never mix with real ones
    nor with answers of a differently configured simulator.
    """
    shared = _Shared()
    sims = [Simulator(cfg.simulator, shared=shared).start() for _ in range(cfg.simulator.instances)]
    try:
        urls = [s.base_url(cfg.backend) for s in sims]
        emb_backend = cfg.embedding.backend or cfg.backend
        emb = dataclasses.asdict(cfg.embedding)
        emb["endpoints"] = [s.base_url(emb_backend) for s in sims]
        sim = dataclasses.asdict(cfg.simulator)
        sim["enabled"] = False
        salt = f"{cfg.cache_salt}|sim:{simulator_salt(cfg.simulator)}"
        yield cfg.replace(endpoints=urls, embedding=emb, simulator=sim, cache_salt=salt)
    finally:
        for s in sims:
            s.stop()
