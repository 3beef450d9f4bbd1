"""The VLM client layer: every request to a vision-language model goes through here.

Usage::

    from vlmrel import vlm
    from vlmrel.teacher.schema import ANNOTATION_SCHEMA, annotation_prompt   # a chain's own request

    cfg = vlm.VLMConfig.from_dict(config["vlm"])          # validates keys, fills defaults
    reqs = [vlm.Request(prompt=annotation_prompt(), image=path,
                        schema=ANNOTATION_SCHEMA, meta={"image_id": iid}) for iid, path in items]
    results = vlm.run_requests(cfg, reqs, stats_path="results/x/vlm_stats.json")
    for r in results:           # same order as reqs
        if r.ok: use(r.parsed)  # validated JSON
        else: record(r.failure_kind, r.error)   # never a label

    vectors = vlm.embed(cfg, texts)   # float32 [N, D]; NaN rows where a text failed

Backends (``vlm.backend``): ``ollama`` (official ``ollama`` client, ``/api/chat``, images
as base64, schema as ``format``) and ``openai`` (official ``openai`` client, any
OpenAI-compatible server: vLLM, llama.cpp server, LM Studio, OpenAI; image as a
``data:`` URL, schema as ``response_format`` json_schema, or ``json_object``/``none``
via ``vlm.structured_output`` for servers without it). Every request has a timeout
(``timeout_s``), and the clients' own retries are off.

Guarantees of :func:`run_requests`:

- **Endpoints and concurrency.** ``vlm.endpoints`` lists base URLs; each gets
  ``vlm.concurrency`` slots (Ollama serves Qwen3-VL one request at a time, so scale out
  with several servers, not slots). Requests go round robin over free slots, never more at
  once than the slots. They are prepared in input order ahead of the slots (image encoded
  in a worker thread a chunk at a time, key, one cache query per chunk, request body
  serialized), so a freed slot is taken at once by a ready request; an answer is validated
  and committed after the request that took its slot is on the wire. With 8 slots of a
  0.2 s server this keeps the slots ~0.95 busy over 400 requests
  (``python -m vlmrel.bench vlm``).
- **Retries.** Timeouts, connection errors, truncated bodies, unparsable HTTP bodies,
  429 and 5xx are retried up to ``retries`` times with exponential backoff and jitter
  (``backoff_s * 2**attempt``, at most ``backoff_max_s``, times U(0.5, 1); a 429's
  Retry-After is honoured), possibly on another endpoint. Other 4xx are not retried.
- **Validation.** With a ``schema``, the answer must be JSON that validates (one
  surrounding Markdown code fence is tolerated). Otherwise the result is a recorded
  failure: ``malformed_json``, ``schema_violation`` or ``length`` (cut at max_tokens).
- **Cache.** Every finished result, answer or failure, is committed at once to the
  SQLite (WAL) cache at ``vlm.cache_path`` (keep it outside Snakemake's outputs), keyed by
  a hash of backend, model, system and user prompt, the *encoded* image bytes, schema,
  structured-output mode, generation parameters and ``cache_salt``. ``kill -9`` loses
  only requests in flight (at most two per slot: one on the wire, and one whose reply came
  and freed the slot but which was not yet committed, since the next request is sent
  first); a re-run sends only what is missing, plus cached failures of
  a *transient* kind (:data:`TRANSIENT_KINDS`: timeout, connection, truncated,
  malformed_response, http_429, http_5xx, http_404, http_408, http_auth, error), plus
  cached *permanent* failures (:data:`PERMANENT_KINDS`: malformed_json,
  schema_violation, length, http_4xx) whose kind is listed in ``vlm.retry_failed``
  (``all`` for every kind). Identical requests within a batch are sent once.
- **Outages fail loudly.** When more than ``vlm.max_failure_share`` (default 0.5) of a
  batch failed (image errors aside), :class:`VLMOutage` is raised after the cache and the
  stats are written, naming the endpoints (without credentials), the failure kinds and
  counts, so the job exits non-zero instead of passing on a run with no answers. The
  first connection error and the first 404 of each endpoint are logged at WARNING with
  the endpoint and the model.
- **Images** are downscaled to ``vlm.image.max_pixels`` and encoded once
  (``vlm.image.format``, JPEG by default); see :func:`encode_image` to share one
  encoding between many prompts.
- **Stats.** A tqdm bar on stderr, and with ``stats_path`` a JSON of items, cache hits,
  HTTP requests, retries, failures by kind (final and per attempt), latency p50/p95 and
  per-endpoint counts.
- **Secrets.** The API key is read from the environment variable named by
  ``vlm.api_key_env`` and is never written to logs, the cache, stats or results (error
  texts are redacted; endpoints are shown without user info or query). Rules pass
  :func:`redacted` ``(config["vlm"])`` as params (endpoint passwords and query values
  replaced by ``***``), and jobs read the full section at run time with
  :func:`runtime_section`, so no secret reaches ``.snakemake/metadata``.

Failure kinds: ``timeout``, ``connection``, ``truncated`` (HTTP body cut short),
``malformed_response`` (HTTP body not the API's JSON), ``http_429``, ``http_5xx``,
``http_404`` (model not found), ``http_408``, ``http_auth`` (401/403), ``http_4xx`` (any other 4xx), ``malformed_json``, ``schema_violation``, ``length``, ``image_error``
(image unreadable; nothing sent, nothing cached), ``error`` (anything else).

Simulator: with ``vlm.simulator.enabled`` the calls above start in-process HTTP
simulators (:mod:`vlmrel.vlm.simulator`, a simulator, not a model) and point the
configured backend at them; the demo uses this. ``cfg.with_sim_metadata(path)`` adds a
metadata file (generated scenes and their true boxes).
"""

from __future__ import annotations

from .cache import ResponseCache
from .client import (
    Request,
    Result,
    Stats,
    VLMOutage,
    aembed,
    arun_requests,
    chat_key,
    embed,
    embed_key,
    run_requests,
)
from .config import (
    FAILURE_KINDS,
    PERMANENT_KINDS,
    RETRYABLE_KINDS,
    TRANSIENT_KINDS,
    ConfigError,
    EmbeddingConfig,
    GenerationConfig,
    ImageConfig,
    SimulatorConfig,
    VLMConfig,
    redacted,
    runtime_section,
)
from .payload import EncodedImage, ImageError, encode_image, fit_pixel_budget
from .schemas import parse_answer

__all__ = [
    "FAILURE_KINDS",
    "PERMANENT_KINDS",
    "RETRYABLE_KINDS",
    "TRANSIENT_KINDS",
    "ConfigError",
    "EmbeddingConfig",
    "EncodedImage",
    "GenerationConfig",
    "ImageConfig",
    "ImageError",
    "Request",
    "ResponseCache",
    "Result",
    "SimulatorConfig",
    "Stats",
    "VLMConfig",
    "VLMOutage",
    "aembed",
    "arun_requests",
    "chat_key",
    "embed",
    "embed_key",
    "encode_image",
    "fit_pixel_budget",
    "parse_answer",
    "redacted",
    "run_requests",
    "runtime_section",
]
