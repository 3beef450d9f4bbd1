"""The ``vlm:`` config section as frozen dataclasses, validated key by key.

``VLMConfig.from_dict(cfg["vlm"])`` fills defaults, rejects unknown keys and wrong types
with a message naming the key, and returns an immutable object that the client layer
takes everywhere. The defaults here are the single source of truth; the JSON schema
``config/schemas/vlm.yaml`` documents the same keys and a test keeps the two in sync.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

BACKENDS = ("ollama", "openai")
STRUCTURED_OUTPUT = ("json_schema", "json_object", "none")
IMAGE_FORMATS = ("jpeg", "png")
#: failure kinds a Result can carry (see ``vlmrel.vlm`` docstring)
FAILURE_KINDS = (
    "timeout",
    "connection",
    "truncated",
    "malformed_response",
    "http_429",
    "http_5xx",
    "http_404",
    "http_408",
    "http_auth",
    "http_4xx",
    "malformed_json",
    "schema_violation",
    "length",
    "image_error",
    "error",
)
#: kinds retried (with backoff) inside one run: transient transport or server trouble
RETRYABLE_KINDS = frozenset(
    {"timeout", "connection", "truncated", "malformed_response", "http_429", "http_5xx", "http_408"}
)
#: kinds that say something about the answer to *this* request, so a re-run returns them from
#: the cache unless ``vlm.retry_failed`` lists them: the answer was not JSON, broke the schema
#: or was cut at max_tokens, or the server rejected the request itself (a 4xx other than
#: 401/403, 404, 408 and 429)
PERMANENT_KINDS = frozenset({"malformed_json", "schema_violation", "length", "http_4xx"})
#: kinds a re-run sends again by default: the server or the way to it was the trouble, not the
#: request (unreachable, timed out, overloaded, 5xx after the last retry, a 404 for a model not
#: pulled yet, a refused API key); ``image_error`` is never cached (nothing was sent)
TRANSIENT_KINDS = frozenset(set(FAILURE_KINDS) - PERMANENT_KINDS - {"image_error"})
SIM_FAULTS = (
    "timeout",
    "http_429",
    "http_500",
    "http_503",
    "http_400",
    "malformed_json",
    "schema_violation",
    "truncated",
    "malformed_body",
)


class ConfigError(ValueError):
    """A ``vlm:`` config value is missing, unknown or of the wrong type."""


def _check_type(where: str, value: Any, types: tuple[type, ...], nullable: bool = False) -> None:
    if value is None and nullable:
        return
    # bool is an int subclass: reject it where a number is expected
    if isinstance(value, bool) and bool not in types:
        raise ConfigError(f"{where}: expected {'/'.join(t.__name__ for t in types)}, got bool {value!r}")
    if not isinstance(value, types):
        names = "/".join(t.__name__ for t in types) + (" or null" if nullable else "")
        raise ConfigError(f"{where}: expected {names}, got {type(value).__name__} {value!r}")


def _build(cls: type, data: dict[str, Any] | None, where: str) -> Any:
    """Instantiate dataclass ``cls`` from ``data``, naming unknown keys and bad types."""
    data = dict(data or {})
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}"
        )
    return cls(**data)


@dataclass(frozen=True)
class ImageConfig:
    """How images are prepared before sending: downscaled to a pixel budget, encoded once."""

    max_pixels: int = 1003520  # 1280 * 28 * 28, the usual Qwen-VL budget
    format: str = "jpeg"
    quality: int = 90

    def __post_init__(self) -> None:
        _check_type("vlm.image.max_pixels", self.max_pixels, (int,))
        if self.max_pixels < 64:
            raise ConfigError(f"vlm.image.max_pixels: must be >= 64, got {self.max_pixels}")
        if self.format not in IMAGE_FORMATS:
            raise ConfigError(f"vlm.image.format: {self.format!r} is not one of {IMAGE_FORMATS}")
        _check_type("vlm.image.quality", self.quality, (int,))
        if not 1 <= self.quality <= 100:
            raise ConfigError(f"vlm.image.quality: must be in 1..100, got {self.quality}")


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling parameters sent with every chat request (and part of the cache key)."""

    temperature: float = 0.0
    top_p: float | None = None
    max_tokens: int | None = 1024
    seed: int | None = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_type("vlm.generation.temperature", self.temperature, (int, float))
        if self.temperature < 0:
            raise ConfigError(f"vlm.generation.temperature: must be >= 0, got {self.temperature}")
        _check_type("vlm.generation.top_p", self.top_p, (int, float), nullable=True)
        _check_type("vlm.generation.max_tokens", self.max_tokens, (int,), nullable=True)
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"vlm.generation.max_tokens: must be >= 1, got {self.max_tokens}")
        _check_type("vlm.generation.seed", self.seed, (int,), nullable=True)
        _check_type("vlm.generation.extra", self.extra, (dict,))

    def key_dict(self) -> dict[str, Any]:
        return {
            "temperature": float(self.temperature),
            "top_p": None if self.top_p is None else float(self.top_p),
            "max_tokens": self.max_tokens,
            "seed": self.seed,
            "extra": self.extra,
        }


@dataclass(frozen=True)
class EmbeddingConfig:
    """Text embeddings (the grounding chain's semantic drift); backend/endpoints default to the chat ones."""

    model: str = "qwen3-embedding:0.6b"
    backend: str | None = None
    endpoints: tuple[str, ...] | None = None
    dimensions: int | None = None
    batch_size: int = 32

    def __post_init__(self) -> None:
        _check_type("vlm.embedding.model", self.model, (str,))
        if self.backend is not None and self.backend not in BACKENDS:
            raise ConfigError(f"vlm.embedding.backend: {self.backend!r} is not one of {BACKENDS}")
        if self.endpoints is not None:
            object.__setattr__(self, "endpoints", _endpoints("vlm.embedding.endpoints", self.endpoints))
        _check_type("vlm.embedding.dimensions", self.dimensions, (int,), nullable=True)
        _check_type("vlm.embedding.batch_size", self.batch_size, (int,))
        if self.batch_size < 1:
            raise ConfigError(f"vlm.embedding.batch_size: must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class SimulatorConfig:
    """In-process HTTP simulator (a simulator, not a model) that replaces the endpoints when enabled."""

    enabled: bool = False
    instances: int = 1
    latency_s: float = 0.05
    latency_jitter_s: float = 0.0
    max_concurrency: int | None = None
    overload: str = "queue"
    overload_status: int = 503
    faults: dict[str, float] = field(default_factory=dict)
    faults_max_attempt: int | None = None
    hang_s: float = 600.0
    seed: int = 0
    metadata: tuple[str, ...] = ()
    coords: str = "relative_1000"
    grounding_sensitivity: float = 1.0
    embedding_dim: int = 64

    def __post_init__(self) -> None:
        _check_type("vlm.simulator.enabled", self.enabled, (bool,))
        _check_type("vlm.simulator.instances", self.instances, (int,))
        if self.instances < 1:
            raise ConfigError(f"vlm.simulator.instances: must be >= 1, got {self.instances}")
        _check_type("vlm.simulator.latency_s", self.latency_s, (int, float))
        _check_type("vlm.simulator.latency_jitter_s", self.latency_jitter_s, (int, float))
        _check_type("vlm.simulator.max_concurrency", self.max_concurrency, (int,), nullable=True)
        if self.overload not in ("queue", "reject"):
            raise ConfigError(f"vlm.simulator.overload: {self.overload!r} is not 'queue' or 'reject'")
        if self.overload_status not in (429, 503):
            raise ConfigError(
                f"vlm.simulator.overload_status: must be 429 or 503, got {self.overload_status}"
            )
        _check_type("vlm.simulator.faults", self.faults, (dict,))
        for kind, p in self.faults.items():
            if kind not in SIM_FAULTS:
                raise ConfigError(
                    f"vlm.simulator.faults: unknown fault {kind!r}; allowed: {', '.join(SIM_FAULTS)}"
                )
            _check_type(f"vlm.simulator.faults.{kind}", p, (int, float))
            if not 0 <= p <= 1:
                raise ConfigError(f"vlm.simulator.faults.{kind}: probability must be in [0, 1], got {p}")
        if sum(self.faults.values()) > 1 + 1e-9:
            raise ConfigError(f"vlm.simulator.faults: probabilities sum to {sum(self.faults.values())} > 1")
        _check_type("vlm.simulator.faults_max_attempt", self.faults_max_attempt, (int,), nullable=True)
        _check_type("vlm.simulator.hang_s", self.hang_s, (int, float))
        _check_type("vlm.simulator.seed", self.seed, (int,))
        if isinstance(self.metadata, str):
            object.__setattr__(self, "metadata", (self.metadata,))
        object.__setattr__(self, "metadata", tuple(os.fspath(p) for p in self.metadata))
        if self.coords not in ("relative_1000", "absolute"):
            raise ConfigError(f"vlm.simulator.coords: {self.coords!r} is not 'relative_1000' or 'absolute'")
        _check_type("vlm.simulator.grounding_sensitivity", self.grounding_sensitivity, (int, float))
        _check_type("vlm.simulator.embedding_dim", self.embedding_dim, (int,))


def redact_url(url: str) -> str:
    """``url`` with its password and query values replaced by ``***``; scheme, user, host, port
    and path (the endpoint's identity) stay, so a changed endpoint still changes the view."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    if parts.username is not None:
        netloc = f"{parts.username}{':***' if parts.password is not None else ''}@{netloc}"
    query = "&".join(f"{kv.split('=', 1)[0]}=***" for kv in parts.query.split("&") if kv)
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def redacted(section: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``vlm:`` section as rule params may carry it: every endpoint URL through
    :func:`redact_url`, so no password or token reaches ``.snakemake/metadata``.

    Jobs get the full section at run time with :func:`runtime_section`. An API key never is
    in the section (only the name of its environment variable, ``api_key_env``).
    """
    out = json.loads(json.dumps(dict(section or {}), default=list))
    for holder in (out, out.get("embedding")):
        if isinstance(holder, dict) and holder.get("endpoints"):
            eps = holder["endpoints"]
            holder["endpoints"] = (
                redact_url(eps) if isinstance(eps, str) else [redact_url(str(u)) for u in eps]
            )
    return out


def runtime_section(view: Mapping[str, Any] | None, section: Mapping[str, Any] | None) -> dict[str, Any]:
    """The full ``vlm:`` section for a job whose params hold ``view`` (= ``redacted(section)``).

    ``section`` is the workflow config's (``snakemake.config["vlm"]``), read when the job runs;
    an empty ``view`` (a rule that needs no VLM) gives ``{}``.
    """
    if not view:
        return {}
    full = json.loads(json.dumps(dict(section or {}), default=list))
    if json.dumps(redacted(full), sort_keys=True) != json.dumps(dict(view), sort_keys=True, default=list):
        raise ConfigError(
            "vlm: the job's params do not match the config's vlm section (the config changed after "
            "the workflow was planned?); re-run snakemake"
        )
    return full


def _endpoints(where: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not value:
        raise ConfigError(f"{where}: expected a non-empty list of base URLs, got {value!r}")
    out = []
    for url in value:
        _check_type(where, url, (str,))
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"{where}: {url!r} is not an http(s) URL")
        out.append(url.rstrip("/"))
    return tuple(out)


@dataclass(frozen=True)
class VLMConfig:
    """Everything the client layer needs: backend, model, endpoints, retries, cache, payload, sampling."""

    backend: str = "ollama"
    model: str = "qwen3-vl:8b"
    endpoints: tuple[str, ...] = ("http://127.0.0.1:11434",)
    api_key_env: str | None = None
    concurrency: int = 1
    timeout_s: float = 300.0
    connect_timeout_s: float = 10.0
    retries: int = 4
    backoff_s: float = 1.0
    backoff_max_s: float = 60.0
    structured_output: str = "json_schema"
    cache_path: str = ".vlmrel-cache/vlm.sqlite"
    cache_salt: str = ""
    retry_failed: tuple[str, ...] = ()
    max_failure_share: float = 0.5
    image: ImageConfig = field(default_factory=ImageConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    simulator: SimulatorConfig = field(default_factory=SimulatorConfig)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"vlm.backend: {self.backend!r} is not one of {BACKENDS}")
        _check_type("vlm.model", self.model, (str,))
        if not self.model:
            raise ConfigError("vlm.model: must not be empty")
        object.__setattr__(self, "endpoints", _endpoints("vlm.endpoints", self.endpoints))
        _check_type("vlm.api_key_env", self.api_key_env, (str,), nullable=True)
        _check_type("vlm.concurrency", self.concurrency, (int,))
        if self.concurrency < 1:
            raise ConfigError(f"vlm.concurrency: must be >= 1, got {self.concurrency}")
        for name in ("timeout_s", "connect_timeout_s", "backoff_s", "backoff_max_s"):
            value = getattr(self, name)
            _check_type(f"vlm.{name}", value, (int, float))
            if value < 0 or (name.endswith("timeout_s") and value == 0):
                raise ConfigError(f"vlm.{name}: must be positive, got {value}")
        _check_type("vlm.retries", self.retries, (int,))
        if self.retries < 0:
            raise ConfigError(f"vlm.retries: must be >= 0, got {self.retries}")
        if self.structured_output not in STRUCTURED_OUTPUT:
            raise ConfigError(
                f"vlm.structured_output: {self.structured_output!r} is not one of {STRUCTURED_OUTPUT}"
            )
        _check_type("vlm.cache_path", self.cache_path, (str, os.PathLike))
        object.__setattr__(self, "cache_path", os.fspath(self.cache_path))
        _check_type("vlm.cache_salt", self.cache_salt, (str,))
        retry_failed = (
            (self.retry_failed,) if isinstance(self.retry_failed, str) else tuple(self.retry_failed)
        )
        for kind in retry_failed:
            if kind != "all" and kind not in FAILURE_KINDS:
                raise ConfigError(
                    f"vlm.retry_failed: unknown failure kind {kind!r}; allowed: all, {', '.join(FAILURE_KINDS)}"
                )
        object.__setattr__(self, "retry_failed", retry_failed)
        _check_type("vlm.max_failure_share", self.max_failure_share, (int, float))
        if not 0 <= self.max_failure_share <= 1:
            raise ConfigError(f"vlm.max_failure_share: must be in [0, 1], got {self.max_failure_share}")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> VLMConfig:
        """Build from the ``vlm:`` mapping of the workflow config (missing keys take defaults)."""
        data = dict(data or {})
        nested = {
            "image": ImageConfig,
            "generation": GenerationConfig,
            "embedding": EmbeddingConfig,
            "simulator": SimulatorConfig,
        }
        for key, sub in nested.items():
            if key in data and not isinstance(data[key], sub):
                if data[key] is not None and not isinstance(data[key], dict):
                    raise ConfigError(f"vlm.{key}: expected a mapping, got {type(data[key]).__name__}")
                data[key] = _build(sub, data[key], f"vlm.{key}")
        return _build(cls, data, "vlm")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists); round-trips through ``from_dict``."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def replace(self, **changes: Any) -> VLMConfig:
        """A copy with some top-level fields changed (nested sections accept dicts)."""
        merged = self.to_dict()
        merged.update(
            {k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v) for k, v in changes.items()}
        )
        return VLMConfig.from_dict(merged)

    def with_sim_metadata(self, *paths: str | os.PathLike[str]) -> VLMConfig:
        """A copy whose simulator also loads these metadata files (e.g. generated scenes' boxes)."""
        sim = dataclasses.asdict(self.simulator)
        sim["metadata"] = list(self.simulator.metadata) + [os.fspath(p) for p in paths]
        return self.replace(simulator=sim)

    def api_key(self) -> str | None:
        """The API key from the environment variable named by ``api_key_env`` (never stored or logged)."""
        if self.api_key_env is None:
            return None
        value = os.environ.get(self.api_key_env)
        if not value:
            raise ConfigError(
                f"vlm.api_key_env: environment variable {self.api_key_env} is not set (it should hold the API key)"
            )
        return value

    def fingerprint(self) -> str:
        """Short hash of the whole config, for logs; holds no secret (only the variable's name)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
