"""The validator every response goes through.

The chains own their schemas and prompts (:mod:`vlmrel.teacher.schema`,
:mod:`vlmrel.grounding.request`) and hand them to the client in each
:class:`~vlmrel.vlm.Request`; this layer knows no chain.

:func:`parse_answer` turns a model's raw text into validated JSON or a failure kind:
``malformed_json`` (not JSON) or ``schema_violation`` (JSON that breaks the schema). A
failure is recorded as such, never turned into a label or a box.
"""

from __future__ import annotations

import json
import re
from typing import Any

_FENCE = re.compile(r"^\s*```(?:json|JSON)?\s*\n?(.*?)\n?\s*```\s*$", re.DOTALL)


def parse_answer(text: str, schema: dict[str, Any] | None) -> tuple[Any, str | None, str | None]:
    """Parse and validate ``text`` against ``schema``.

    Returns ``(parsed, failure_kind, error)``: ``parsed`` is the JSON value when valid, else
    None with ``failure_kind`` ``"malformed_json"`` or ``"schema_violation"``. A single
    surrounding Markdown code fence (common from servers without structured output) is
    tolerated; anything else must be exactly one JSON value.
    """
    import jsonschema

    m = _FENCE.match(text)
    body = m.group(1) if m else text
    try:
        value = json.loads(body)
    except (json.JSONDecodeError, ValueError) as exc:
        return None, "malformed_json", f"answer is not JSON: {exc.msg if hasattr(exc, 'msg') else exc}"
    if schema is not None:
        validator_cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        errors = sorted(validator_cls(schema).iter_errors(value), key=lambda e: list(e.absolute_path))
        if errors:
            err = errors[0]
            where = "/".join(str(p) for p in err.absolute_path) or "<root>"
            return None, "schema_violation", f"answer violates schema at {where}: {err.message}"[:500]
    return value, None, None


def check_schema(schema: dict[str, Any]) -> None:
    """Raise ``jsonschema.SchemaError`` if ``schema`` is not a valid JSON schema."""
    import jsonschema

    validator_cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    validator_cls.check_schema(schema)
