"""What the grounding chain asks the VLM: the box schema and the prompt, written once here.

The prompt is notebooks 02/03's Qwen3-VL prompt (:data:`vlmrel.grounding.parse.QWEN3_PROMPT`,
also the default of ``grounding.prompt`` in ``config/schemas/grounding.yaml``), filled in by
:func:`vlmrel.grounding.parse.build_prompt`; the schema asks for a Qwen3-VL style box. The
VLM layer (:mod:`vlmrel.vlm`) only carries them to the server.
"""

from __future__ import annotations

from typing import Any

from vlmrel.grounding.parse import QWEN3_PROMPT, build_prompt

GROUNDING_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["bbox_2d"],
    "properties": {
        "bbox_2d": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4},
        "label": {"type": "string"},
    },
}


def grounding_prompt(expression: str, template: str = QWEN3_PROMPT) -> str:
    """The prompt for ``expression`` (seed 000's Qwen3-VL prompt unless ``template`` is given)."""
    return build_prompt(template, expression)
