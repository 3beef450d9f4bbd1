"""The chains own what they ask the VLM (issue 11): the grounding prompt is written once, the
teacher's schema and scenes live in the teacher, and the stand-in server answers from the request."""

from __future__ import annotations

import io

import jsonschema
import numpy as np
import yaml
from PIL import Image

from vlmrel import vlm
from vlmrel.grounding.parse import QWEN3_PROMPT, build_prompt
from vlmrel.grounding.request import GROUNDING_SCHEMA, grounding_prompt
from vlmrel.teacher.schema import ANNOTATION_SCHEMA, SCENES, annotation_prompt
from vlmrel.vlm.config import SimulatorConfig
from vlmrel.vlm.simulator import Simulator
from wfutil import REPO


def test_grounding_prompt_written_once():
    schema = yaml.safe_load((REPO / "config" / "schemas" / "grounding.yaml").read_text())
    defaults = []

    def walk(node):
        if isinstance(node, dict):
            if "prompt" in node.get("properties", {}):
                defaults.append(node["properties"]["prompt"].get("default"))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    assert defaults == [QWEN3_PROMPT]  # the config default is the chain's prompt, verbatim
    assert grounding_prompt("the red disc") == build_prompt(QWEN3_PROMPT, "the red disc")
    assert '"the red disc"' in grounding_prompt("the red disc") and "0-1000" in grounding_prompt("x")
    for name in ("ANNOTATION_SCHEMA", "GROUNDING_SCHEMA", "SCENES", "annotation_prompt", "grounding_prompt"):
        assert not hasattr(vlm, name), name


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_simulator_answers_from_the_request_schema():
    with Simulator(SimulatorConfig(enabled=True, latency_s=0.0, grounding_sensitivity=5.0)) as sim:
        for seed in range(6):
            ans = sim.answer_chat(annotation_prompt(), _png(seed), ANNOTATION_SCHEMA)
            jsonschema.validate(ans, ANNOTATION_SCHEMA)
            assert ans["scene"] in SCENES
        # another chain's schema: a narrower scene enum and no objects; the answer follows it
        other = {
            "type": "object",
            "additionalProperties": False,
            "required": ["scene", "has_person"],
            "properties": {
                "scene": {"type": "string", "enum": ["indoor", "outdoor"]},
                "has_person": {"type": "boolean"},
            },
        }
        for seed in range(6):
            ans = sim.answer_chat("Describe the scene as JSON.", _png(seed), other)
            jsonschema.validate(ans, other)
        box = sim.answer_chat(grounding_prompt("the thing"), _png(1), GROUNDING_SCHEMA)
        jsonschema.validate(box, GROUNDING_SCHEMA)
