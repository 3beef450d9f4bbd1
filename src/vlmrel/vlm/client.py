"""The async request engine: endpoints, bounded concurrency, retries, validation, cache, stats.

See the package docstring (:mod:`vlmrel.vlm`) for the public API and its guarantees.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from .backends import BACKEND_CLASSES, Backend, BackendError, classify_error, make_backend
from .cache import CachedResponse, ResponseCache
from .config import PERMANENT_KINDS, RETRYABLE_KINDS, TRANSIENT_KINDS, VLMConfig
from .payload import EncodedImage, ImageError, encode_image
from .schemas import check_schema, parse_answer

log = logging.getLogger("vlmrel.vlm")
T = TypeVar("T")
KEY_VERSION = 1
MAX_WARNINGS = 20
#: Times a request yields to the event loop after its reply came, before validating and
#: committing it. The reply freed a slot and woke a prepared request, whose send passes a few
#: checkpoints (openai -> httpx -> httpcore -> anyio, one per socket write); yielding lets it
#: write headers and body first. Settling first held the body back ~3 ms a request, with the
#: slot idle meanwhile (measured with the bench, 8 slots x 0.2 s).
_SEND_FIRST_YIELDS = 8


# -- public data types ---------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """One chat request: a prompt, at most one image, an optional JSON schema for the answer.

    ``image`` may be a path, encoded file bytes, a PIL image, an HxWx3 uint8 array or an
    :class:`~vlmrel.vlm.payload.EncodedImage` (encode once with ``encode_image`` to reuse an
    image across many prompts). ``meta`` is passed through to the :class:`Result` untouched
    and is not part of the cache key.
    """

    prompt: str
    image: Any = None
    schema: dict[str, Any] | None = None
    system: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Result:
    """The outcome of one request; a failure is a recorded outcome, never a label.

    ``status`` is ``"ok"`` (``parsed`` holds the validated JSON when a schema was given)
    or ``"failed"`` (``failure_kind`` says why, ``error`` gives the redacted detail).
    ``endpoint`` is the server's base URL without credentials or query.
    """

    key: str
    status: str
    text: str | None
    parsed: Any
    failure_kind: str | None
    error: str | None
    latency_s: float | None
    cache_hit: bool
    endpoint: str | None
    attempts: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- keys and small helpers ----------------------------------------------------------------
def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def _simulated(cfg: VLMConfig, fields: dict[str, Any]) -> dict[str, Any]:
    """Add the simulator's answer-shaping settings to a key, so changing them is not served stale
    answers from the cache (a real server's answers depend on the model, already in the key)."""
    sim = cfg.simulator
    if sim.enabled:
        fields["simulator"] = {
            "seed": sim.seed,
            "coords": sim.coords,
            "grounding_sensitivity": float(sim.grounding_sensitivity),
            "embedding_dim": sim.embedding_dim,
        }
    return fields


def chat_key(
    cfg: VLMConfig,
    prompt: str,
    image_sha256: str | None,
    schema: dict[str, Any] | None,
    system: str | None = None,
) -> str:
    """Content address of a chat request: backend, model, prompt, encoded image, schema, sampling."""
    return _sha(
        _simulated(
            cfg,
            {
                "v": KEY_VERSION,
                "kind": "chat",
                "backend": cfg.backend,
                "model": cfg.model,
                "system": system,
                "prompt": prompt,
                "image_sha256": image_sha256,
                "schema": schema,
                "structured_output": cfg.structured_output,
                "generation": cfg.generation.key_dict(),
                "salt": cfg.cache_salt,
            },
        )
    )


def embed_key(cfg: VLMConfig, text: str) -> str:
    """Content address of one text embedding: backend, model, dimensions, text."""
    return _sha(
        _simulated(
            cfg,
            {
                "v": KEY_VERSION,
                "kind": "embed",
                "backend": cfg.embedding.backend or cfg.backend,
                "model": cfg.embedding.model,
                "dimensions": cfg.embedding.dimensions,
                "text": text,
                "salt": cfg.cache_salt,
            },
        )
    )


def sanitize_url(url: str) -> str:
    """``url`` without user info, query or fragment (what logs, stats and results may show)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def url_secrets(urls: Iterable[str]) -> list[str]:
    """Passwords and query values of ``urls``: what error texts must never show."""
    out: list[str] = []
    for url in urls:
        parts = urlsplit(url)
        if parts.password:
            out.append(parts.password)
        out.extend(kv.split("=", 1)[1] for kv in parts.query.split("&") if "=" in kv)
    return out


class VLMOutage(RuntimeError):
    """More than ``vlm.max_failure_share`` of a batch failed: the server is down, the model is
    missing, or the endpoints are wrong. Finished answers stay cached; the message names the
    endpoints (without credentials), the failure kinds and their counts."""


def _outage_message(
    cfg: VLMConfig, what: str, model: str, n: int, failed: Counter, per_endpoint: dict[str, Counter]
) -> str:
    share = sum(failed.values()) / n
    kinds = ", ".join(f"{k} {v}" for k, v in failed.most_common())
    lines = [
        f"VLM {what} failed for {sum(failed.values())} of {n} requests ({share:.0%}, more than "
        f"vlm.max_failure_share {cfg.max_failure_share:.0%}) with {cfg.backend} model {model}: {kinds}",
    ]
    for ep, counts in sorted(per_endpoint.items()):
        lines.append(f"  endpoint {ep}: " + ", ".join(f"{k} {v}" for k, v in counts.most_common()))
    transient = sorted(k for k in failed if k in TRANSIENT_KINDS)
    lines.append(
        "Finished answers stay cached; a re-run sends only the rest"
        + (f" (failures of kind {', '.join(transient)} are sent again)." if transient else ".")
    )
    return "\n".join(lines)


def _check_outage(
    cfg: VLMConfig, what: str, model: str, n: int, failed: Counter, per_endpoint: dict[str, Counter]
) -> None:
    if n and sum(failed.values()) / n > cfg.max_failure_share:
        msg = _outage_message(cfg, what, model, n, failed, per_endpoint)
        log.error("%s", msg)
        raise VLMOutage(msg)


class _Redactor:
    def __init__(self, secrets: Iterable[str | None]) -> None:
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def __call__(self, text: str | None) -> str | None:
        if text is None:
            return None
        for s in self.secrets:
            text = text.replace(s, "***")
        return text[:2000]


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


@dataclass
class Stats:
    """Counters of one job; ``to_dict`` is what the stats JSON holds."""

    kind: str = "chat"
    items: int = 0
    cache_hits: int = 0
    duplicates: int = 0
    sent: int = 0
    http_requests: int = 0
    ok: int = 0
    failed: int = 0
    retries: int = 0
    failures: Counter = field(default_factory=Counter)
    attempt_errors: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    per_endpoint: dict[str, Counter] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    wall_s: float = 0.0

    def endpoint(self, url: str, what: str) -> None:
        self.per_endpoint.setdefault(url, Counter())[what] += 1

    def to_dict(self, cfg: VLMConfig | None = None) -> dict[str, Any]:
        wall = self.wall_s or (time.perf_counter() - self.started)
        out: dict[str, Any] = {
            "kind": self.kind,
            "items": self.items,
            "cache_hits": self.cache_hits,
            "duplicates": self.duplicates,
            "sent": self.sent,
            "requests": self.http_requests,
            "ok": self.ok,
            "failed": self.failed,
            "retries": self.retries,
            "failures_by_kind": dict(sorted(self.failures.items())),
            "attempt_errors_by_kind": dict(sorted(self.attempt_errors.items())),
            "latency_s": {
                "n": len(self.latencies),
                "p50": _percentile(self.latencies, 50),
                "p95": _percentile(self.latencies, 95),
                "mean": (sum(self.latencies) / len(self.latencies)) if self.latencies else None,
                "max": max(self.latencies) if self.latencies else None,
            },
            "wall_s": wall,
            "requests_per_s": self.http_requests / wall if wall > 0 else None,
            "per_endpoint": {k: dict(v) for k, v in sorted(self.per_endpoint.items())},
        }
        if cfg is not None:
            out["backend"] = cfg.embedding.backend or cfg.backend if self.kind == "embed" else cfg.backend
            out["model"] = cfg.embedding.model if self.kind == "embed" else cfg.model
            out["concurrency_per_endpoint"] = cfg.concurrency
        return out


# -- the engine ----------------------------------------------------------------------------
@dataclass
class _Outcome:
    value: Any = None
    kind: str | None = None
    error: str | None = None
    attempts: int = 0
    latency_s: float | None = None
    endpoint: str | None = None


class _Pool:
    """Backends for the endpoints plus a FIFO of slot tokens (``concurrency`` per endpoint).

    Tokens are interleaved (e0, e1, e0, e1, ...) so requests go round robin while every
    endpoint has a free slot; a slow endpoint simply returns its tokens later. An endpoint's
    client is made when its first request goes out (~60 ms each, mostly TLS setup that an
    all-cached run does not need).
    """

    def __init__(self, backend: str, urls: tuple[str, ...], cfg: VLMConfig, api_key: str | None) -> None:
        self._kind = backend
        self._urls = urls
        self._api_key = api_key
        self._backends: list[Backend | None] = [None] * len(urls)
        self.names = [sanitize_url(url) for url in urls]
        self.tokens: asyncio.Queue[int] = asyncio.Queue()
        for _ in range(cfg.concurrency):
            for i in range(len(urls)):
                self.tokens.put_nowait(i)
        self.size = cfg.concurrency * len(urls)
        self.failures = [0] * len(urls)  # consecutive connection errors / timeouts per endpoint
        self._cfg = cfg

    def backend(self, idx: int) -> Backend:
        b = self._backends[idx]
        if b is None:
            b = self._backends[idx] = make_backend(
                self._kind, self._urls[idx], self._api_key, self._cfg.timeout_s, self._cfg.connect_timeout_s
            )
        return b

    def release(self, idx: int, kind: str | None) -> None:
        """Return a slot; after a connection error or timeout the slot cools down first.

        A dead server fails instantly, so without a cooldown its free slots would catch
        most retries; with it, traffic drains to the live endpoints while the dead one is
        still probed now and then (after ``backoff_s * 2**(n-1)``, at most ``backoff_max_s``).
        """
        if kind in ("connection", "timeout"):
            self.failures[idx] += 1
            delay = min(self._cfg.backoff_max_s, self._cfg.backoff_s * 2.0 ** (self.failures[idx] - 1))
            if delay > 0:
                asyncio.get_running_loop().call_later(delay, self.tokens.put_nowait, idx)
                return
        elif kind is None:
            self.failures[idx] = 0
        self.tokens.put_nowait(idx)

    async def aclose(self) -> None:
        for b in self._backends:
            if b is not None:
                with contextlib.suppress(Exception):
                    await b.aclose()


def _backoff(cfg: VLMConfig, key: str, attempt: int, retry_after: float | None) -> float:
    import numpy as np

    rng = np.random.default_rng([int(key[:15] or "0", 16), attempt])
    delay = min(cfg.backoff_max_s, cfg.backoff_s * (2.0**attempt)) * rng.uniform(0.5, 1.0)
    if retry_after is not None:
        delay = max(delay, min(retry_after, cfg.backoff_max_s))
    return float(delay)


async def _with_retries(
    cfg: VLMConfig,
    pool: _Pool,
    key: str,
    op: Callable[[Backend], Awaitable[T]],
    stats: Stats,
    redact: _Redactor,
    model: str | None = None,
) -> _Outcome:
    """Run ``op`` on a free endpoint slot; retry transient failures with backoff and jitter.

    The first connection error and the first 404 of each endpoint are logged at WARNING,
    naming the endpoint (without credentials) and the model.
    """
    out = _Outcome()
    hard_timeout = cfg.timeout_s + cfg.connect_timeout_s + 1.0
    for attempt in range(cfg.retries + 1):
        idx = await pool.tokens.get()
        try:
            backend = pool.backend(idx)  # made on first use; a failure here is a bug, not a reply
        except BaseException:
            pool.tokens.put_nowait(idx)
            raise
        name = pool.names[idx]
        out.attempts = attempt + 1
        out.endpoint = name
        stats.http_requests += 1
        stats.endpoint(name, "requests")
        t0 = time.perf_counter()
        delay = 0.0
        kind: str | None = None
        try:
            async with asyncio.timeout(hard_timeout):
                value = await op(backend)
            out.latency_s = time.perf_counter() - t0
            out.value, out.kind, out.error = value, None, None
            stats.latencies.append(out.latency_s)
            return out
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every failure is classified and recorded
            kind, message, retry_after = classify_error(exc)
            out.kind, out.error, out.latency_s = kind, redact(message), time.perf_counter() - t0
            stats.attempt_errors[kind] += 1
            stats.endpoint(name, f"error_{kind}")
            if kind in ("connection", "http_404") and stats.per_endpoint[name][f"error_{kind}"] == 1:
                log.warning(
                    "%s from endpoint %s for model %s: %s",
                    "cannot connect" if kind == "connection" else "404 (model not found or not pulled yet?)",
                    name,
                    model or cfg.model,
                    out.error,
                )
            if kind not in RETRYABLE_KINDS or attempt == cfg.retries:
                return out
            stats.retries += 1
            delay = _backoff(cfg, key, attempt, retry_after)
            log.debug("retry %d/%d after %s from %s in %.2fs", attempt + 1, cfg.retries, kind, name, delay)
        finally:
            pool.release(idx, kind)
        await asyncio.sleep(delay)
    return out


def _should_resend(cfg: VLMConfig, cached: CachedResponse) -> bool:
    """Whether a cached result is sent again: every transient failure (the server or the way to
    it was the trouble), and a permanent one only when ``vlm.retry_failed`` lists its kind."""
    if cached.status == "ok":
        return False
    if cached.failure_kind not in PERMANENT_KINDS:
        return True
    return "all" in cfg.retry_failed or cached.failure_kind in cfg.retry_failed


def _quiet_http_loggers() -> None:
    """httpx/httpx2 log every request at INFO; keep job logs readable unless the user set a level."""
    for name in ("httpx", "httpx2", "httpcore", "httpcore2"):
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)


class _NoBar:
    """What a disabled progress bar does: nothing (tqdm's import alone took ~15 ms)."""

    def update(self, n: int = 1) -> None:
        return None

    def set_postfix(self, **kwargs: Any) -> None:
        return None

    def close(self) -> None:
        return None


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="req", file=sys.stderr, dynamic_ncols=True)


async def arun_requests(
    cfg: VLMConfig,
    requests: Iterable[Request],
    cache_path: str | os.PathLike[str] | None = None,
    stats_path: str | os.PathLike[str] | None = None,
    progress: bool = True,
    on_result: Callable[[int, Result], None] | None = None,
) -> list[Result]:
    """Async form of :func:`run_requests` (use it when an event loop is already running)."""
    if cfg.simulator.enabled:
        from .simulator import simulated

        with simulated(cfg) as sim_cfg:
            return await arun_requests(sim_cfg, requests, cache_path, stats_path, progress, on_result)

    reqs = list(requests)
    for i, r in enumerate(reqs):
        if not isinstance(r, Request):
            raise TypeError(f"request {i}: expected vlmrel.vlm.Request, got {type(r).__name__}")
    schemas = list(
        {json.dumps(r.schema, sort_keys=True): r.schema for r in reqs if r.schema is not None}.values()
    )
    api_key = cfg.api_key()
    redact = _Redactor([api_key, *url_secrets(cfg.endpoints)])
    _quiet_http_loggers()
    stats = Stats(kind="chat", items=len(reqs))
    results: list[Result | None] = [None] * len(reqs)
    path = os.fspath(cache_path if cache_path is not None else cfg.cache_path)
    log.info(
        "VLM %s %s: %d requests over %s (concurrency %d each), cache %s",
        cfg.backend,
        cfg.model,
        len(reqs),
        ", ".join(sanitize_url(u) for u in cfg.endpoints),
        cfg.concurrency,
        path,
    )
    cache = ResponseCache(path)
    pool = _Pool(cfg.backend, cfg.endpoints, cfg, api_key)
    bar = _progress(len(reqs), f"vlm {cfg.model}", progress)
    inflight: dict[str, asyncio.Future[Result]] = {}
    answered: dict[str, Result] = {}  # answers sent for this batch, for duplicates that come later
    n_senders = max(1, min(len(reqs), 2 * pool.size))
    to_send: asyncio.Queue[tuple[int, EncodedImage | None, str] | None] = asyncio.Queue()
    lookahead = asyncio.Semaphore(2 * pool.size)  # prepared requests not yet taken by a sender
    prepare_chat = BACKEND_CLASSES[cfg.backend].prepare_chat
    warned = [0]

    def check_schemas() -> None:
        for schema in schemas:
            check_schema(schema)

    # The schemas are checked in a worker thread while the first requests go out: the first
    # check imports jsonschema (~0.1 s), which held them up when it ran first. No answer is
    # validated, cached or returned before the check passed; a bad schema raises from
    # run_requests as before, after at most one request per slot was sent.
    schemas_checked = asyncio.ensure_future(asyncio.to_thread(check_schemas))

    def finish(i: int, res: Result) -> None:
        results[i] = res
        if res.ok:
            stats.ok += 1
        else:
            stats.failed += 1
            stats.failures[res.failure_kind or "error"] += 1
        bar.update(1)
        bar.set_postfix(hits=stats.cache_hits, failed=stats.failed, refresh=False)
        if on_result is not None:
            on_result(i, res)

    def encode_chunk(idxs: range) -> list[EncodedImage | ImageError | None]:
        out: list[EncodedImage | ImageError | None] = []
        for i in idxs:
            try:
                out.append(None if reqs[i].image is None else encode_image(reqs[i].image, cfg.image))
            except ImageError as exc:
                out.append(exc)
        return out

    async def prepare() -> None:
        """Encode, key and look up the requests in order, a chunk at a time (one worker-thread
        call and one cache query per chunk); answer hits at once, queue the rest for a slot."""
        try:
            start, size = 0, pool.size
            while start < len(reqs):
                idxs = range(start, min(len(reqs), start + size))
                start, size = idxs.stop, min(64, 2 * size)
                if any(reqs[i].image is not None for i in idxs):
                    encs = await asyncio.to_thread(encode_chunk, idxs)
                else:
                    encs = [None] * len(idxs)
                keys: dict[int, tuple[EncodedImage | None, str]] = {}
                for i, enc in zip(idxs, encs, strict=True):
                    req = reqs[i]
                    if isinstance(enc, ImageError):
                        res = Result(
                            key="",
                            status="failed",
                            text=None,
                            parsed=None,
                            failure_kind="image_error",
                            error=redact(str(enc)),
                            latency_s=None,
                            cache_hit=False,
                            endpoint=None,
                            attempts=0,
                            meta=req.meta,
                        )
                        finish(i, res)
                        continue
                    key = chat_key(cfg, req.prompt, enc.sha256 if enc else None, req.schema, req.system)
                    keys[i] = (enc, key)
                hits = cache.get_many(sorted({key for _, key in keys.values()}))
                for i, (enc, key) in keys.items():
                    cached = hits.get(key)
                    if cached is not None and not _should_resend(cfg, cached):
                        await schemas_checked
                        stats.cache_hits += 1
                        res = Result(
                            key=key,
                            status=cached.status,
                            text=cached.text,
                            parsed=cached.parsed,
                            failure_kind=cached.failure_kind,
                            error=cached.error,
                            latency_s=cached.latency_s,
                            cache_hit=True,
                            endpoint=cached.endpoint,
                            attempts=cached.attempts or 0,
                            meta=reqs[i].meta,
                        )
                        finish(i, res)
                        continue
                    await lookahead.acquire()
                    to_send.put_nowait((i, enc, key))
        finally:
            for _ in range(n_senders):
                to_send.put_nowait(None)

    async def sender() -> None:
        while (item := await to_send.get()) is not None:
            lookahead.release()
            await send(*item)

    async def send(i: int, enc: EncodedImage | None, key: str) -> None:
        req = reqs[i]
        if key in answered:  # an identical request of this batch was answered meanwhile
            stats.duplicates += 1
            finish(i, dataclasses.replace(answered[key], cache_hit=True, meta=req.meta))
            return
        if key in inflight:  # an identical request of this batch is on its way: share its answer
            stats.duplicates += 1
            first = await inflight[key]
            finish(i, dataclasses.replace(first, cache_hit=True, meta=req.meta))
            return
        fut: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        inflight[key] = fut
        stats.sent += 1
        # the body is built and serialized now, while this request still waits for a slot
        prepared = prepare_chat(
            cfg.model, req.prompt, req.system, enc, req.schema, cfg.structured_output, cfg.generation
        )

        async def op(backend: Backend) -> Any:
            return await backend.send_chat(prepared)

        def settle(out: _Outcome) -> tuple[str, str | None, Any, str | None, str | None]:
            """Validate the answer and commit it to the cache; the result is finished after this."""
            text = parsed = None
            kind, error = out.kind, out.error
            if kind is None:
                reply = out.value
                text = reply.text
                if req.schema is not None:
                    parsed, kind, error = parse_answer(text, req.schema)
                    if kind is not None and reply.finish_reason == "length":
                        kind, error = "length", f"answer cut at max_tokens ({error})"
            status = "ok" if kind is None else "failed"
            cache.put(
                key,
                status=status,
                text=text,
                parsed=parsed,
                failure_kind=kind,
                error=redact(error),
                latency_s=out.latency_s,
                endpoint=out.endpoint,
                backend=cfg.backend,
                model=cfg.model,
                attempts=out.attempts,
            )
            return status, text, parsed, kind, error

        try:
            out = await _with_retries(cfg, pool, key, op, stats, redact)
            # The slot is free again and a prepared request took it: let it reach the socket
            # before this answer is validated and committed (see _SEND_FIRST_YIELDS).
            for _ in range(_SEND_FIRST_YIELDS):
                await asyncio.sleep(0)
            await schemas_checked
            status, text, parsed, kind, error = settle(out)
            res = Result(
                key=key,
                status=status,
                text=text,
                parsed=parsed,
                failure_kind=kind,
                error=redact(error),
                latency_s=out.latency_s,
                cache_hit=False,
                endpoint=out.endpoint,
                attempts=out.attempts,
                meta=req.meta,
            )
            if kind is not None and kind in TRANSIENT_KINDS:
                warned[0] += 1
                if warned[0] <= MAX_WARNINGS:
                    log.warning(
                        "request %d failed after %d attempt(s): %s: %s", i, out.attempts, kind, res.error
                    )
                if warned[0] == MAX_WARNINGS:
                    log.warning("further failures are counted in the stats, not logged one by one")
            if not _should_resend(
                cfg, CachedResponse(key, status, text, parsed, kind, None, None, None, None)
            ):
                answered[key] = res  # what a later identical request would have found in the cache
            fut.set_result(res)
            finish(i, res)
        except BaseException as exc:
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        finally:
            inflight.pop(key, None)

    tasks = [
        schemas_checked,
        asyncio.ensure_future(prepare()),
        *(asyncio.ensure_future(sender()) for _ in range(n_senders)),
    ]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:  # after a failure: stop the rest before the cache and the clients close
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        bar.close()
        await pool.aclose()
        cache.close()
        stats.wall_s = time.perf_counter() - stats.started
        if stats_path is not None:
            from vlmrel.io import write_json

            write_json(stats_path, stats.to_dict(cfg))
    log.info(
        "VLM done: %d ok, %d failed %s, %d cache hits, %d HTTP requests in %.1fs",
        stats.ok,
        stats.failed,
        dict(stats.failures),
        stats.cache_hits,
        stats.http_requests,
        stats.wall_s,
    )
    final = [r for r in results if r is not None]
    sent = [r for r in final if r.failure_kind != "image_error"]  # unreadable images are no outage
    failed = Counter(r.failure_kind or "error" for r in sent if not r.ok)
    per_endpoint: dict[str, Counter] = {}
    for r in sent:
        if not r.ok:
            per_endpoint.setdefault(r.endpoint or "(cache)", Counter())[r.failure_kind or "error"] += 1
    _check_outage(cfg, "chat", cfg.model, len(sent), failed, per_endpoint)
    return final


def _run_sync(coro: Awaitable[T]) -> T:
    """Run ``coro`` to completion, in a helper thread when this thread already runs a loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)  # type: ignore[arg-type]
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro)  # type: ignore[arg-type]
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=target, name="vlmrel-vlm")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def run_requests(
    cfg: VLMConfig,
    requests: Iterable[Request],
    cache_path: str | os.PathLike[str] | None = None,
    stats_path: str | os.PathLike[str] | None = None,
    progress: bool = True,
    on_result: Callable[[int, Result], None] | None = None,
) -> list[Result]:
    """Answer ``requests``; results come back in input order (see :mod:`vlmrel.vlm`)."""
    return _run_sync(arun_requests(cfg, requests, cache_path, stats_path, progress, on_result))


# -- embeddings ----------------------------------------------------------------------------
async def aembed(
    cfg: VLMConfig,
    texts: Iterable[str],
    cache_path: str | os.PathLike[str] | None = None,
    stats_path: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> Any:
    """Async form of :func:`embed`."""
    import numpy as np

    if cfg.simulator.enabled:
        from .simulator import simulated

        with simulated(cfg) as sim_cfg:
            return await aembed(sim_cfg, texts, cache_path, stats_path, progress)

    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"embed: text {i} is {type(t).__name__}, not str")
    backend = cfg.embedding.backend or cfg.backend
    urls = cfg.embedding.endpoints or cfg.endpoints
    api_key = cfg.api_key()
    redact = _Redactor([api_key, *url_secrets(urls)])
    _quiet_http_loggers()
    stats = Stats(kind="embed", items=len(texts))
    keys = [embed_key(cfg, t) for t in texts]
    path = os.fspath(cache_path if cache_path is not None else cfg.cache_path)
    cache = ResponseCache(path)
    vectors: dict[str, Any] = cache.get_embeddings(sorted(set(keys)))
    stats.cache_hits = sum(1 for k in keys if k in vectors)
    unique: dict[str, str] = {}
    for k, t in zip(keys, texts, strict=True):
        if k not in vectors:
            unique.setdefault(k, t)
    stats.duplicates = len(texts) - stats.cache_hits - len(unique)
    missing = list(unique.items())
    bs = cfg.embedding.batch_size
    batches = [missing[i : i + bs] for i in range(0, len(missing), bs)]
    failed_kinds: dict[str, str] = {}
    failed_endpoint: dict[str, str] = {}
    pool = _Pool(backend, urls, cfg, api_key)
    bar = _progress(len(missing), f"embed {cfg.embedding.model}", progress and bool(missing))
    queue: Iterator[list[tuple[str, str]]] = iter(batches)

    async def one(batch: list[tuple[str, str]]) -> None:
        batch_texts = [t for _, t in batch]
        stats.sent += len(batch)

        async def op(b: Backend) -> list[list[float]]:
            vecs = await b.embed(cfg.embedding.model, batch_texts, cfg.embedding.dimensions)
            if (
                len(vecs) != len(batch_texts)
                or len({len(v) for v in vecs}) > 1
                or not vecs
                or not len(vecs[0])
            ):
                raise BackendError("malformed_response", f"{len(vecs)} vectors for {len(batch_texts)} texts")
            return vecs

        out = await _with_retries(cfg, pool, batch[0][0], op, stats, redact, cfg.embedding.model)
        if out.kind is None:
            for (k, _), vec in zip(batch, out.value, strict=True):
                arr = np.asarray(vec, dtype=np.float32)
                cache.put_embedding(k, arr, backend=backend, model=cfg.embedding.model)
                vectors[k] = arr
        else:
            log.warning("embedding batch of %d failed: %s: %s", len(batch), out.kind, out.error)
            for k, _ in batch:
                failed_kinds[k] = out.kind
                failed_endpoint[k] = out.endpoint or "?"
        bar.update(len(batch))

    async def worker() -> None:
        for batch in queue:
            await one(batch)

    try:
        await asyncio.gather(*(worker() for _ in range(max(1, min(len(batches), pool.size)))))
    finally:
        bar.close()
        await pool.aclose()
        cache.close()
        stats.wall_s = time.perf_counter() - stats.started
    dims = {v.shape[0] for v in vectors.values()}
    if len(dims) > 1:
        raise RuntimeError(
            f"embedding model {cfg.embedding.model} returned vectors of several sizes {sorted(dims)}"
        )
    stats.ok = sum(1 for k in keys if k in vectors)
    stats.failed = len(keys) - stats.ok
    for k in keys:
        if k not in vectors:
            stats.failures[failed_kinds.get(k, "error")] += 1
    if stats_path is not None:
        from vlmrel.io import write_json

        write_json(stats_path, stats.to_dict(cfg))
    per_endpoint: dict[str, Counter] = {}
    for k in keys:
        if k not in vectors:
            per_endpoint.setdefault(failed_endpoint.get(k, "?"), Counter())[failed_kinds.get(k, "error")] += 1
    _check_outage(cfg, "embed", cfg.embedding.model, len(keys), stats.failures, per_endpoint)
    if texts and not dims:
        raise RuntimeError(
            f"embedding model {cfg.embedding.model}: every request failed ({dict(stats.failures)}); nothing to return"
        )
    d = dims.pop() if dims else 0
    out = np.full((len(texts), d), np.nan, dtype=np.float32)
    for i, k in enumerate(keys):
        if k in vectors:
            out[i] = vectors[k]
    return out


def embed(
    cfg: VLMConfig,
    texts: Iterable[str],
    cache_path: str | os.PathLike[str] | None = None,
    stats_path: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> Any:
    """Embed ``texts`` -> float32 array [N, D]; rows of failed texts are NaN (see :mod:`vlmrel.vlm`)."""
    return _run_sync(aembed(cfg, texts, cache_path, stats_path, progress))
