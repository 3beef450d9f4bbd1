"""Config validation errors in a few lines: the key path, the offending value, the message.

Snakemake's ``validate`` raises a ``WorkflowError`` whose text holds the whole JSON schema
(hundreds of lines for vlmrel's). :func:`short_error` finds the underlying
``jsonschema.ValidationError`` and says only what is wrong and where::

    config.vlm.bogus_key: unknown key (value: 3); allowed keys here: api_key_env, backend, ...
    config.mcdo.exp0.T: expected array, got 'ten' ('ten' is not of type 'array')
"""

from __future__ import annotations

import json
from typing import Any

MAX_VALUE_CHARS = 120


class ConfigInvalid(ValueError):
    """The workflow config does not match ``config/schema.yaml``; the message is a few lines."""


def _value(v: Any) -> str:
    try:
        text = json.dumps(v, default=str)
    except (TypeError, ValueError):
        text = repr(v)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 3] + "..."


def key_path(parts: Any) -> str:
    """``config.a.b[2].c`` for the path ``('a', 'b', 2, 'c')``."""
    out = "config"
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def describe(error: Any) -> str:
    """A few lines for one ``jsonschema.ValidationError`` (never the schema itself)."""
    path = key_path(error.absolute_path)
    if error.validator in ("additionalProperties", "unevaluatedProperties") and isinstance(
        error.instance, dict
    ):
        import re

        named = re.findall(r"'([^']+)'", error.message.split("(", 1)[-1])
        extra = [k for k in error.instance if str(k) in named] or [
            k for k in error.instance if k not in ((error.schema or {}).get("properties") or {})
        ]
        lines = [
            f"{key_path([*error.absolute_path, k])}: unknown key (value: {_value(error.instance[k])})"
            for k in extra
        ]
        props = sorted((error.schema or {}).get("properties") or {})
        if props:
            lines.append(f"  allowed keys in {path}: {', '.join(props)}")
        return "\n".join(lines)
    message = error.message
    if len(message) > 300:
        message = message[:297] + "..."
    return f"{path}: {message} (value: {_value(error.instance)})"


def short_error(exc: BaseException) -> str | None:
    """The short text for a validation failure wrapped in ``exc`` (None if it holds none)."""
    import jsonschema

    seen: set[int] = set()
    stack: list[Any] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, jsonschema.ValidationError):
            return describe(e)
        if isinstance(e, BaseException):
            stack.extend([e.__cause__, e.__context__, *[a for a in e.args if isinstance(a, BaseException)]])
    return None
