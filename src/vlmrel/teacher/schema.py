"""What the teacher asks the VLM: seed 004's scenes, annotation schema and JSON-only prompt.

The chain owns its request; the VLM layer (:mod:`vlmrel.vlm`) only carries it: the schema
goes to the server as structured output and every answer is validated against it.
"""

from __future__ import annotations

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
