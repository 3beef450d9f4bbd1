"""Answer schemas, reference prompts and the validator every response goes through.

``ANNOTATION_SCHEMA`` is the teacher annotation of seed 004 (scene, has_person,
has_animal, is_document, is_screenshot, objects[name_free, coarse_type, is_main,
confidence]); ``GROUNDING_SCHEMA`` is a Qwen3-VL style box ``{"bbox_2d": [x1, y1, x2,
y2]}``. The chains may use their own schemas; the simulator answers any object schema
with these fields.

:func:`parse_answer` turns a model's raw text into validated JSON or a failure kind:
``malformed_json`` (not JSON) or ``schema_violation`` (JSON that breaks the schema). A
failure is recorded as such, never turned into a label or a box.
"""

from __future__ import annotations

import json
import re
from typing import Any

SCENES = ("product", "food", "people", "selfie", "animals", "document", "screenshot", "other")

ANNOTATION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["scene", "has_person", "has_animal", "is_document", "is_screenshot", "objects"],
    "properties": {
        "scene": {"type": "string", "enum": list(SCENES)},
        "has_person": {"type": "boolean"},
        "has_animal": {"type": "boolean"},
        "is_document": {"type": "boolean"},
        "is_screenshot": {"type": "boolean"},
        "objects": {
            "type": "array",
            "maxItems": 10,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name_free", "coarse_type", "is_main", "confidence"],
                "properties": {
                    "name_free": {"type": "string"},
                    "coarse_type": {"type": "string"},
                    "is_main": {"type": "boolean"},
                    "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                },
            },
        },
    },
}

GROUNDING_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["bbox_2d"],
    "properties": {
        "bbox_2d": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4},
        "label": {"type": "string"},
    },
}

ANNOTATION_PROMPT = (
    "You annotate photos. Answer with JSON only, no prose. Fields: scene (one of "
    + ", ".join(SCENES)
    + "), has_person, has_animal, is_document, is_screenshot (booleans), and objects: a list of up to 10 "
    "visible objects, each with name_free (a short free-text name), coarse_type (one word such as keyboard, "
    "phone, food, drink, person, cat, vehicle), is_main (true for the main subject) and confidence (0 to 1)."
)


def annotation_prompt() -> str:
    """The teacher annotation prompt (seed 004), JSON only."""
    return ANNOTATION_PROMPT


def grounding_prompt(expression: str) -> str:
    """Seed 000's Qwen3-VL grounding prompt: a box for ``expression`` in relative 0-1000 coordinates."""
    return (
        f'Where is "{expression}" in this image? Output the bounding box in format: '
        '{"bbox_2d": [x_min, y_min, x_max, y_max]} using coordinates 0-1000.'
    )


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
