"""What the stand-in server answers, from what the request carries: the prompt, the image and
the JSON schema of ``format`` / ``response_format`` (a grounding schema asks for ``bbox_2d``,
an annotation schema for ``scene`` and ``objects``; enums and required keys shape the answer),
plus the registered images' metadata. No chain is imported: like a real server, it knows
only the request.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import re
from typing import Any

import numpy as np

from ..config import SimulatorConfig
from .demo import DEMO_SCENES, _ann, _obj
from .registry import Registry, _flatten, _lookup_box, fingerprint


# -- answers -------------------------------------------------------------------------------
def _seed_of(*parts: Any) -> int:
    return int(hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:15], 16)


def _expression(prompt: str) -> str:
    m = re.search(r'"([^"]{1,200})"', prompt) or re.search(r"<ref>(.*?)</ref>", prompt)
    return (m.group(1) if m else prompt).strip()


def _schema_props(schema: dict[str, Any] | None) -> dict[str, Any]:
    if not isinstance(schema, dict):
        return {}
    if schema.get("type") == "array" and isinstance(schema.get("items"), dict):
        return schema["items"].get("properties", {}) or {}
    return schema.get("properties", {}) or {}


def _task(prompt: str, schema: dict[str, Any] | None) -> str:
    props = _schema_props(schema)
    if "bbox_2d" in props or "bbox" in props:
        return "grounding"
    if "scene" in props or "objects" in props:
        return "annotation"
    low = prompt.lower()
    if "bounding box" in low or "bbox" in low:
        return "grounding"
    if "scene" in low and "json" in low:
        return "annotation"
    return "text"


def _salient_box(im: Any) -> list[float]:
    """Box of the most salient blob: pixels far from the median colour, connected to the farthest one."""
    from PIL import Image

    n = 64
    arr = np.asarray(im.convert("RGB").resize((n, n), Image.Resampling.BOX), dtype=np.float64) / 255.0
    dev = np.linalg.norm(arr - np.median(arr.reshape(-1, 3), axis=0), axis=2)
    peak = np.unravel_index(int(np.argmax(dev)), dev.shape)
    thresh = 0.5 * (float(dev.max()) + float(np.median(dev)))
    mask = dev >= thresh
    if dev.max() - np.median(dev) < 0.05:
        return [250.0, 250.0, 750.0, 750.0]
    seen = np.zeros_like(mask)
    stack = [peak]
    seen[peak] = True
    ys, xs = [], []
    while stack:
        y, x = stack.pop()
        ys.append(y)
        xs.append(x)
        for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            yy, xx = y + dy, x + dx
            if 0 <= yy < n and 0 <= xx < n and mask[yy, xx] and not seen[yy, xx]:
                seen[yy, xx] = True
                stack.append((yy, xx))
    return [min(xs) / n * 1000, min(ys) / n * 1000, (max(xs) + 1) / n * 1000, (max(ys) + 1) / n * 1000]


def _jitter_box(box: list[float], s: float, rng: np.random.Generator) -> list[float]:
    x1, y1, x2, y2 = box
    w, h = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
    cx = (x1 + x2) / 2 + rng.normal(0, s) * w
    cy = (y1 + y2) / 2 + rng.normal(0, s) * h
    w *= math.exp(rng.normal(0, s))
    h *= math.exp(rng.normal(0, s))
    out = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
    out = [min(1000.0, max(0.0, v)) for v in out]
    if out[2] - out[0] < 2:
        out[2] = min(1000.0, out[0] + 2)
    if out[3] - out[1] < 2:
        out[3] = min(1000.0, out[1] + 2)
    return out


def _unknown_annotation(im: Any, rng: np.random.Generator) -> dict[str, Any]:
    from PIL import Image

    arr = np.asarray(im.convert("RGB").resize((32, 32), Image.Resampling.BOX), dtype=np.float64) / 255.0
    sat = float((arr.max(axis=2) - arr.min(axis=2)).mean())
    bright = float(arr.mean())
    white = float((arr.min(axis=2) > 0.75).mean())
    if white > 0.5 and sat < 0.08:
        return _ann("document", [_obj("page", "document", True, round(0.6 + 0.3 * white, 3))])
    flat = float((np.abs(np.diff(arr, axis=1)).max(axis=2) < 0.01).mean())
    if flat > 0.6:
        return _ann("screenshot", [_obj("screen", "screen", True, round(0.5 + 0.4 * flat, 3))])
    scene = ["product", "food", "people", "animals", "other"][int(rng.integers(5))]
    coarse = {
        "product": "object",
        "food": "food",
        "people": "person",
        "animals": "animal",
        "other": "object",
    }[scene]
    conf = round(float(0.4 + 0.5 * rng.random() * (0.5 + sat) * (0.5 + bright)), 3)
    return _ann(
        scene,
        [_obj(f"{coarse} in view", coarse, True, min(conf, 0.99))],
        person=scene == "people",
        animal=scene == "animals",
    )


def _scenes(schema: dict[str, Any] | None) -> tuple[str, ...]:
    """The scenes an answer may take: the ``scene`` enum of the request's schema, else the demo's."""
    enum = (_schema_props(schema).get("scene") or {}).get("enum")
    return tuple(enum) if isinstance(enum, list) and enum else DEMO_SCENES


def _degrade_annotation(
    ann: dict[str, Any],
    d: float,
    sens: float,
    rng: np.random.Generator,
    scenes: tuple[str, ...] = DEMO_SCENES,
) -> dict[str, Any]:
    ann = copy.deepcopy(ann)
    p_flip = min(0.9, sens * max(0.0, d - 0.05) * 1.5)
    if rng.random() < p_flip:
        others = [s for s in scenes if s != ann.get("scene")]
        ann["scene"] = others[int(rng.integers(len(others)))]
    for obj in ann.get("objects", []):
        if isinstance(obj, dict) and "confidence" in obj:
            obj["confidence"] = round(float(obj["confidence"]) * math.exp(-sens * d), 3)
    if ann.get("objects") and rng.random() < p_flip:
        ann["objects"] = ann["objects"][:1]
    return ann


def _conform(value: Any, schema: dict[str, Any] | None) -> Any:
    """Shape a canned answer to ``schema``: drop unknown properties, respect enums, fill required."""
    if not isinstance(schema, dict):
        return value
    typ = schema.get("type")
    if typ == "array" and isinstance(value, list):
        return [_conform(v, schema.get("items")) for v in value][: schema.get("maxItems", len(value))]
    if typ == "object" and isinstance(value, dict):
        props = schema.get("properties", {}) or {}
        out = {
            k: _conform(v, props.get(k))
            for k, v in value.items()
            if k in props or schema.get("additionalProperties", True) is not False
        }
        for k in schema.get("required", []):
            if k not in out:
                out[k] = _default_for(props.get(k, {}))
        return out
    if "enum" in schema and value not in schema["enum"]:
        return "other" if "other" in schema["enum"] else schema["enum"][0]
    return value


def _default_for(schema: dict[str, Any]) -> Any:
    if "enum" in schema:
        return schema["enum"][0]
    return {"string": "", "boolean": False, "number": 0.0, "integer": 0, "array": [], "object": {}}.get(
        schema.get("type"), None
    )


def _violate(answer: Any, schema: dict[str, Any] | None) -> Any:
    """A deliberately schema-violating variant of ``answer``."""
    if isinstance(answer, dict) and "bbox_2d" in answer:
        return {**answer, "bbox_2d": answer["bbox_2d"][:3]}
    if isinstance(answer, dict) and answer:
        bad = dict(answer)
        for k, v in bad.items():
            if isinstance(v, bool):
                bad[k] = "yes" if v else "no"
                return bad
        bad.pop(next(iter(bad)))
        return bad
    if isinstance(answer, list):
        return {"unexpected": answer}
    return {"value": answer}


def answer_chat(
    cfg: SimulatorConfig,
    registry: Registry,
    prompt: str,
    image_bytes: bytes | None,
    schema: dict[str, Any] | None,
) -> Any:
    """The deterministic answer to one chat request (a JSON value, or a string for free-text prompts).

    The task is read off the request (:func:`_task`: the schema's properties, else the prompt);
    the image is matched in ``registry``; the answer is shaped to ``schema`` (:func:`_conform`)."""
    from PIL import Image

    task = _task(prompt, schema)
    im = None
    if image_bytes is not None:
        im = Image.open(io.BytesIO(image_bytes))
        im.load()
        im = _flatten(im)
    expression = _expression(prompt) if task == "grounding" else None
    fp = fingerprint(im) if im is not None else None
    entry, d = registry.match(fp, expression) if fp is not None else (None, 0.0)
    rng = np.random.default_rng([cfg.seed, _seed_of(prompt, hashlib.sha256(image_bytes or b"").hexdigest())])
    if task == "grounding":
        box = _lookup_box(entry, expression or "") if entry is not None else None
        if box is None:
            box = _salient_box(im) if im is not None else [250.0, 250.0, 750.0, 750.0]
            s = 0.05
        else:
            s = 0.02 + 0.5 * cfg.grounding_sensitivity * d
        box = _jitter_box(box, s, rng)
        if cfg.coords == "absolute" and im is not None:
            coords = [
                box[0] * im.width / 1000,
                box[1] * im.height / 1000,
                box[2] * im.width / 1000,
                box[3] * im.height / 1000,
            ]
        else:
            coords = box
        answer: Any = {"bbox_2d": [int(round(v)) for v in coords], "label": expression or ""}
        if isinstance(schema, dict) and schema.get("type") == "array":
            answer = [answer]
        return _conform(answer, schema) if schema else {"bbox_2d": answer["bbox_2d"]}
    if task == "annotation":
        if entry is not None and entry.annotation is not None:
            ann = _degrade_annotation(entry.annotation, d, cfg.grounding_sensitivity, rng, _scenes(schema))
        elif im is not None:
            ann = _unknown_annotation(im, rng)
        else:
            ann = _ann("other", [])
        return _conform(ann, schema)
    if schema is not None:
        return _conform({}, schema)
    if entry is not None and entry.description:
        return entry.description
    return "An image." if im is not None else "I am a simulator, not a model."


def embed_texts(cfg: SimulatorConfig, texts: list[str]) -> list[list[float]]:
    """Hashed character-trigram vectors: deterministic, similar texts get similar vectors."""
    dim = cfg.embedding_dim
    out = []
    for text in texts:
        vec = np.zeros(dim)
        norm = f"  {text.casefold()}  "
        grams = [norm[i : i + 3] for i in range(len(norm) - 2)] + norm.split()
        for g in grams:
            h = int(hashlib.blake2b(g.encode(), digest_size=8).hexdigest(), 16)
            vec[h % dim] += 1.0 if (h >> 32) & 1 else -1.0
        n = np.linalg.norm(vec)
        out.append((vec / n if n > 0 else vec).tolist())
    return out
