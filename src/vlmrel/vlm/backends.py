"""Backend adapters over the official ``ollama`` and ``openai`` Python clients.

Each adapter wraps one client pointed at one base URL, always with an explicit timeout
(the ``ollama`` client's default is none, and requests have hung for hours) and with the
client's own retries off (``max_retries=0``): retries, backoff and failover belong to
:mod:`vlmrel.vlm.client`. Errors are mapped to failure kinds by :func:`classify_error`.

- ``ollama``: ``POST {base}/api/chat`` with the image as base64 in ``images``, the JSON
  schema as ``format`` and sampling parameters as ``options``; ``/api/embed``.
- ``openai``: any OpenAI-compatible server (vLLM, llama.cpp server, LM Studio, OpenAI):
  ``POST {base}/chat/completions`` with the image as a ``data:`` URL and the schema as
  ``response_format={"type": "json_schema", ...}``; ``/embeddings``. The base URL
  includes the ``/v1`` prefix, as in the ``openai`` client. The chat body is serialized
  by :meth:`~OpenAIBackend.prepare_chat` before a slot is free and sent with the client's
  own ``post`` (the documented way to send a prepared body: same HTTP stack, timeouts and
  errors as ``chat.completions.create``, without its per-call walk over the parameters,
  which took ~2 ms a request); the reply is read from the JSON as is.

A request is sent in two steps, so that the client can do the CPU work before a server
slot is free: ``prepared = BackendClass.prepare_chat(...)`` (a static method: no I/O, no
client, the same for every endpoint) and ``await backend.send_chat(prepared)``.
``chat(...)`` does both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .config import GenerationConfig
from .payload import EncodedImage


@dataclass(frozen=True)
class ChatReply:
    """The model's raw answer text and why generation stopped (``stop``, ``length``, ...)."""

    text: str
    finish_reason: str | None


def _with_thinking(message: Any) -> str:
    """An Ollama message's answer text, its separate ``thinking`` field (thinking models) kept in
    front as a ``<think>...</think>`` block, the form other servers return it in, so that the
    answer parsers see it (a reply that is only thinking is a named failure there, not an empty
    answer)."""
    content = getattr(message, "content", None) or ""
    thinking = getattr(message, "thinking", None)
    return f"<think>{thinking}</think>{content}" if thinking else content


class BackendError(Exception):
    """A request failed; ``kind`` is a failure kind, ``retry_after`` a server hint in seconds."""

    def __init__(self, kind: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after


def _status_kind(status: int) -> str:
    if status == 429:
        return "http_429"
    if 500 <= status <= 599:
        return "http_5xx"
    if status == 404:  # Ollama and OpenAI-compatible servers: model not found (not pulled yet)
        return "http_404"
    if status == 408:
        return "http_408"
    if status in (401, 403):
        return "http_auth"
    if 400 <= status <= 499:
        return "http_4xx"
    return "error"


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen and len(seen) < 10:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def _names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def _retry_after(headers: Any) -> float | None:
    try:
        value = headers.get("retry-after") if headers is not None else None
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def classify_error(exc: BaseException) -> tuple[str, str, float | None]:
    """Map an exception from either client to ``(failure_kind, message, retry_after_s)``.

    Works on class names through the cause chain, so it covers ``httpx`` (used by
    ``ollama``) and ``httpx2`` (used by recent ``openai``) alike.
    """
    if isinstance(exc, BackendError):
        return exc.kind, str(exc), exc.retry_after
    message = f"{type(exc).__name__}: {exc}"
    cause = exc.__cause__
    if cause is not None and str(cause):
        message += f" (cause: {type(cause).__name__}: {cause})"
    for e in _chain(exc):
        names = _names(e)
        status = getattr(e, "status_code", None)
        if ("ResponseError" in names or "APIStatusError" in names) and isinstance(status, int) and status > 0:
            response = getattr(e, "response", None)
            return _status_kind(status), message, _retry_after(getattr(response, "headers", None))
    for e in _chain(exc):
        names = _names(e)
        text = str(e).lower()
        if names & {"TimeoutError", "TimeoutException", "APITimeoutError", "ReadTimeout", "ConnectTimeout"}:
            return "timeout", message, None
        if "RemoteProtocolError" in names and ("incomplete" in text or "complete message body" in text):
            return "truncated", message, None
        if "APIResponseValidationError" in names or names & {"JSONDecodeError", "ValidationError"}:
            return "malformed_response", message, None
    for e in _chain(exc):
        names = _names(e)
        if names & {
            "TransportError",
            "NetworkError",
            "RemoteProtocolError",
            "ConnectionError",
            "APIConnectionError",
        }:
            return "connection", message, None
        if "OSError" in names:
            return "connection", message, None
    return "error", message, None


class Backend:
    """Common interface: ``chat``, ``embed``, ``aclose``; one instance per endpoint."""

    name = "base"

    def __init__(
        self, base_url: str, api_key: str | None, timeout_s: float, connect_timeout_s: float
    ) -> None:
        self.base_url = base_url
        self.timeout_s = float(timeout_s)
        self.connect_timeout_s = float(min(connect_timeout_s, timeout_s))

    async def chat(
        self,
        model: str,
        prompt: str,
        system: str | None,
        image: EncodedImage | None,
        schema: dict[str, Any] | None,
        structured_output: str,
        gen: GenerationConfig,
    ) -> ChatReply:
        raise NotImplementedError

    @staticmethod
    def prepare_chat(
        model: str,
        prompt: str,
        system: str | None,
        image: EncodedImage | None,
        schema: dict[str, Any] | None,
        structured_output: str,
        gen: GenerationConfig,
    ) -> Any:
        """Everything about a chat request that needs no server (by default, the arguments)."""
        return (model, prompt, system, image, schema, structured_output, gen)

    async def send_chat(self, prepared: Any) -> ChatReply:
        """Send a request made by :meth:`prepare_chat` (of any instance of this class)."""
        return await self.chat(*prepared)

    async def embed(self, model: str, texts: list[str], dimensions: int | None) -> list[list[float]]:
        raise NotImplementedError

    async def aclose(self) -> None:
        return None


class OllamaBackend(Backend):
    """``ollama.AsyncClient(host=base_url, timeout=httpx.Timeout(...))``."""

    name = "ollama"

    def __init__(
        self, base_url: str, api_key: str | None, timeout_s: float, connect_timeout_s: float
    ) -> None:
        super().__init__(base_url, api_key, timeout_s, connect_timeout_s)
        import httpx
        import ollama

        headers = {"authorization": f"Bearer {api_key}"} if api_key else None
        self._client = ollama.AsyncClient(
            host=base_url,
            timeout=httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s),
            headers=headers,
        )

    async def chat(
        self,
        model: str,
        prompt: str,
        system: str | None,
        image: EncodedImage | None,
        schema: dict[str, Any] | None,
        structured_output: str,
        gen: GenerationConfig,
    ) -> ChatReply:
        messages: list[dict[str, Any]] = []
        if system:
            messages.append({"role": "system", "content": system})
        user: dict[str, Any] = {"role": "user", "content": prompt}
        if image is not None:
            user["images"] = [image.data]  # the client sends bytes as base64
        messages.append(user)
        fmt: Any = None
        if schema is not None and structured_output == "json_schema":
            fmt = schema
        elif schema is not None and structured_output == "json_object":
            fmt = "json"
        options: dict[str, Any] = {"temperature": float(gen.temperature)}
        if gen.top_p is not None:
            options["top_p"] = float(gen.top_p)
        if gen.max_tokens is not None:
            options["num_predict"] = int(gen.max_tokens)
        if gen.seed is not None:
            options["seed"] = int(gen.seed)
        options.update(gen.extra)
        resp = await self._client.chat(
            model=model, messages=messages, format=fmt, options=options, stream=False
        )
        return ChatReply(text=_with_thinking(resp.message), finish_reason=getattr(resp, "done_reason", None))

    async def embed(self, model: str, texts: list[str], dimensions: int | None) -> list[list[float]]:
        resp = await self._client.embed(model=model, input=texts, dimensions=dimensions)
        return [list(v) for v in resp.embeddings]

    async def aclose(self) -> None:
        await self._client.close()


class OpenAIBackend(Backend):
    """``openai.AsyncOpenAI(base_url=..., api_key=..., timeout=..., max_retries=0)``."""

    name = "openai"

    def __init__(
        self, base_url: str, api_key: str | None, timeout_s: float, connect_timeout_s: float
    ) -> None:
        super().__init__(base_url, api_key, timeout_s, connect_timeout_s)
        import openai

        # Local servers (vLLM, llama.cpp) accept any key; the client insists on one.
        self._client = openai.AsyncOpenAI(
            base_url=base_url,
            api_key=api_key or "EMPTY",
            timeout=openai.Timeout(self.timeout_s, connect=self.connect_timeout_s),
            max_retries=0,
        )

    async def chat(
        self,
        model: str,
        prompt: str,
        system: str | None,
        image: EncodedImage | None,
        schema: dict[str, Any] | None,
        structured_output: str,
        gen: GenerationConfig,
    ) -> ChatReply:
        return await self.send_chat(
            self.prepare_chat(model, prompt, system, image, schema, structured_output, gen)
        )

    @staticmethod
    def prepare_chat(
        model: str,
        prompt: str,
        system: str | None,
        image: EncodedImage | None,
        schema: dict[str, Any] | None,
        structured_output: str,
        gen: GenerationConfig,
    ) -> bytes:
        """The JSON body of ``POST /chat/completions`` (``gen.extra`` merged in, as ``extra_body`` is)."""
        messages: list[dict[str, Any]] = []
        if system:
            messages.append({"role": "system", "content": system})
        if image is not None:
            content: Any = [
                {"type": "image_url", "image_url": {"url": image.data_url()}},
                {"type": "text", "text": prompt},
            ]
        else:
            content = prompt
        messages.append({"role": "user", "content": content})
        body: dict[str, Any] = {"model": model, "messages": messages, "temperature": float(gen.temperature)}
        if gen.top_p is not None:
            body["top_p"] = float(gen.top_p)
        if gen.max_tokens is not None:
            body["max_tokens"] = int(gen.max_tokens)
        if gen.seed is not None:
            body["seed"] = int(gen.seed)
        if schema is not None and structured_output == "json_schema":
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": schema, "strict": True},
            }
        elif schema is not None and structured_output == "json_object":
            body["response_format"] = {"type": "json_object"}
        body.update(gen.extra)
        return json.dumps(body, ensure_ascii=False).encode("utf-8")

    async def send_chat(self, prepared: bytes) -> ChatReply:
        resp = await self._client.post("/chat/completions", content=prepared, cast_to=object)
        return _openai_reply(resp)

    async def embed(self, model: str, texts: list[str], dimensions: int | None) -> list[list[float]]:
        kwargs: dict[str, Any] = {"model": model, "input": texts, "encoding_format": "float"}
        if dimensions is not None:
            kwargs["dimensions"] = dimensions
        resp = await self._client.embeddings.create(**kwargs)
        if isinstance(resp, str | bytes) or getattr(resp, "data", None) is None:
            raise BackendError("malformed_response", f"embedding response has no data: {str(resp)[:200]!r}")
        data = sorted(resp.data, key=lambda d: d.index)
        return [list(d.embedding) for d in data]

    async def aclose(self) -> None:
        await self._client.close()


def _openai_reply(resp: Any) -> ChatReply:
    """The answer text and finish reason of a chat completion's JSON; BackendError if it has none."""
    choices = resp.get("choices") if isinstance(resp, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise BackendError("malformed_response", f"response has no choices: {str(resp)[:200]!r}")
    choice = choices[0]
    message = choice.get("message")
    text = message.get("content") if isinstance(message, dict) else None
    if not isinstance(text, str):
        raise BackendError("malformed_response", "response choice has no message content")
    reason = choice.get("finish_reason")
    return ChatReply(text=text, finish_reason=reason if isinstance(reason, str) else None)


BACKEND_CLASSES: dict[str, type[Backend]] = {"ollama": OllamaBackend, "openai": OpenAIBackend}


def make_backend(
    backend: str, base_url: str, api_key: str | None, timeout_s: float, connect_timeout_s: float
) -> Backend:
    """Instantiate the adapter for ``backend`` on ``base_url``."""
    try:
        cls = BACKEND_CLASSES[backend]
    except KeyError:
        raise ValueError(
            f"unknown VLM backend {backend!r}; choose one of {', '.join(BACKEND_CLASSES)}"
        ) from None
    return cls(base_url, api_key, timeout_s, connect_timeout_s)
