"""An HTTP **simulator** of VLM servers for tests, benchmarks and the demo. It is not a model.

It speaks the OpenAI API (``POST /v1/chat/completions``, ``POST /v1/embeddings``,
``GET /v1/models``) and the Ollama API (``POST /api/chat``, ``POST /api/embed``,
``GET /api/tags``, ``GET /api/version``) on 127.0.0.1 only, and answers from *metadata*,
never by looking at an image the way a model would:

- **Which image?** Every image it receives is matched against a registry by a
  perturbation-tolerant fingerprint (a 32x32 grey thumbnail, z-scored, compared by
  correlation, plus the aspect ratio). The registry holds the real photos that ship in the
  scikit-image and scikit-learn wheels (the demo images, with hand-written annotations and
  boxes) and whatever metadata files are passed with ``--metadata`` (the grounding demo
  registers its generated scenes and their true boxes that way).
- **Annotation prompts** (a schema or prompt with ``scene``/``objects``) get the
  registered annotation in the seed-004 format. Unknown images get a deterministic guess
  from their statistics (bright, unsaturated pages become documents, and so on).
- **Grounding prompts** (a schema with ``bbox_2d`` or a prompt asking for a bounding box;
  the expression is the first double-quoted phrase) get the registered box in Qwen3-VL
  relative 0-1000 coordinates (or absolute pixels with ``--coords absolute``, like
  Qwen2.5-VL), jittered by a seeded amount that grows with how far the image's statistics
  (brightness, contrast, correlation, sharpness) moved from the registered original, so
  perturbed images give worse boxes and the grounding chain gets boundary samples.
  Unknown images get the box of their most salient region.
- **Embeddings** are hashed character-trigram vectors: deterministic, and similar
  texts get similar vectors.

Answers are deterministic: the same request gets the same answer on every run.

Faults are injected with a seeded probability per kind (``timeout``, ``http_429``,
``http_500``, ``http_503``, ``http_400``, ``malformed_json``, ``schema_violation``,
``truncated``, ``malformed_body``), drawn from a generator seeded by (seed, request hash,
attempt number), where the attempt number counts how often this simulator (or the group
started together by :func:`simulated`) has seen the same request. ``--faults-max-attempt
N`` limits faults to the first N attempts. ``--max-concurrency`` caps requests handled at
once: ``--overload queue`` makes the rest wait (like vLLM and Ollama), ``reject`` answers
429/503. The simulator records requests, faults and the peak number of concurrent
requests.

Run it as ``python -m vlmrel.vlm.simulator --port 11434 --latency 0.05 --faults
http_429=0.05,timeout=0.01 --metadata scenes.json`` or in-process with
``with Simulator(...) as sim: sim.url``.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import copy
import dataclasses
import hashlib
import importlib.util
import io
import json
import math
import os
import re
import select
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

from .config import SIM_FAULTS, SimulatorConfig, VLMConfig
from .schemas import SCENES

SIM_VERSION = "1"
MATCH_MIN_CORR = 0.8
MATCH_MAX_LOG_ASPECT = 0.05


# -- registry ------------------------------------------------------------------------------
def _obj(name: str, coarse: str, main: bool, conf: float) -> dict[str, Any]:
    return {"name_free": name, "coarse_type": coarse, "is_main": main, "confidence": conf}


def _ann(
    scene: str, objects: list[dict[str, Any]], person: bool = False, animal: bool = False
) -> dict[str, Any]:
    return {
        "scene": scene,
        "has_person": person,
        "has_animal": animal,
        "is_document": scene == "document",
        "is_screenshot": scene == "screenshot",
        "objects": objects,
    }


# The demo photos shipped in the scikit-image / scikit-learn wheels: hand-written annotations
# and approximate boxes (relative 0-1000 coordinates, [x1, y1, x2, y2]).
BUILTIN: list[dict[str, Any]] = [
    {
        "file": ("skimage", "data/astronaut.png"),
        "description": "An astronaut in an orange suit smiles next to a helmet, a flag and a shuttle model.",
        "annotation": _ann(
            "people",
            [
                _obj("astronaut", "person", True, 0.96),
                _obj("space helmet", "helmet", False, 0.88),
                _obj("space shuttle model", "toy", False, 0.74),
                _obj("american flag", "flag", False, 0.81),
            ],
            person=True,
        ),
        "boxes": {
            "astronaut": [20, 20, 720, 1000],
            "woman": [20, 20, 720, 1000],
            "face": [280, 30, 520, 300],
            "helmet": [540, 660, 1000, 1000],
            "space shuttle": [680, 0, 910, 560],
            "flag": [0, 0, 190, 1000],
        },
    },
    {
        "file": ("skimage", "data/chelsea.png"),
        "description": "A close-up of a tabby cat's face with green eyes.",
        "annotation": _ann("animals", [_obj("tabby cat", "cat", True, 0.97)], animal=True),
        "boxes": {
            "cat": [0, 0, 1000, 1000],
            "cat's nose": [500, 700, 620, 860],
            "left eye": [290, 280, 450, 480],
        },
    },
    {
        "file": ("skimage", "data/coffee.png"),
        "description": "An espresso cup on a red saucer with a spoon, on a wooden table.",
        "annotation": _ann(
            "food",
            [
                _obj("espresso cup", "drink", True, 0.93),
                _obj("red saucer", "dish", False, 0.85),
                _obj("spoon", "cutlery", False, 0.72),
            ],
        ),
        "boxes": {"cup": [300, 30, 700, 570], "saucer": [120, 130, 800, 950], "spoon": [520, 560, 680, 820]},
    },
    {
        "file": ("skimage", "data/rocket.jpg"),
        "description": "A rocket on a launch pad at dusk between lightning towers.",
        "annotation": _ann(
            "other", [_obj("rocket", "vehicle", True, 0.9), _obj("launch tower", "structure", False, 0.7)]
        ),
        "boxes": {"rocket": [440, 280, 540, 960], "tower": [0, 0, 130, 1000]},
    },
    {
        "file": ("skimage", "data/motorcycle_left.png"),
        "description": "A red motorcycle parked in a garage.",
        "annotation": _ann("product", [_obj("red motorcycle", "vehicle", True, 0.94)]),
        "boxes": {"motorcycle": [0, 220, 930, 880]},
    },
    {
        "file": ("skimage", "data/motorcycle_right.png"),
        "description": "A red motorcycle parked in a garage.",
        "annotation": _ann("product", [_obj("red motorcycle", "vehicle", True, 0.94)]),
        "boxes": {"motorcycle": [0, 220, 930, 880]},
    },
    {
        "file": ("skimage", "data/camera.png"),
        "description": "A black and white photo of a man operating a camera on a tripod.",
        "annotation": _ann(
            "people",
            [_obj("cameraman", "person", True, 0.95), _obj("camera on tripod", "camera", False, 0.86)],
            person=True,
        ),
        "boxes": {
            "man": [0, 180, 650, 1000],
            "camera": [500, 290, 700, 520],
            "tripod": [540, 520, 800, 1000],
        },
    },
    {
        "file": ("skimage", "data/page.png"),
        "description": "A scanned page of printed text.",
        "annotation": _ann("document", [_obj("printed page", "document", True, 0.92)]),
        "boxes": {"text": [30, 30, 970, 970]},
    },
    {
        "file": ("skimage", "data/text.png"),
        "description": "Printed and handwritten text on paper.",
        "annotation": _ann("document", [_obj("text sample", "document", True, 0.88)]),
        "boxes": {"text": [20, 60, 980, 940]},
    },
    {
        "file": ("skimage", "data/coins.png"),
        "description": "Old coins on a dark background.",
        "annotation": _ann("product", [_obj("coins", "coin", True, 0.9)]),
        "boxes": {"coins": [40, 40, 960, 960]},
    },
    {
        "file": ("skimage", "data/horse.png"),
        "description": "The silhouette of a horse.",
        "annotation": _ann("animals", [_obj("horse silhouette", "horse", True, 0.8)], animal=True),
        "boxes": {"horse": [60, 40, 960, 960]},
    },
    {
        "file": ("skimage", "data/hubble_deep_field.jpg"),
        "description": "Galaxies in the Hubble deep field.",
        "annotation": _ann("other", [_obj("galaxies", "space", True, 0.85)]),
        "boxes": {"galaxy": [400, 350, 600, 550]},
    },
    {
        "file": ("skimage", "data/moon.png"),
        "description": "A grey close-up of the lunar surface.",
        "annotation": _ann("other", [_obj("moon surface", "space", True, 0.7)]),
        "boxes": {"crater": [350, 350, 650, 650]},
    },
    {
        "file": ("skimage", "data/logo.png"),
        "description": "The scikit-image logo.",
        "annotation": _ann("screenshot", [_obj("logo", "graphic", True, 0.8)]),
        "boxes": {"logo": [50, 50, 950, 950]},
    },
    {
        "file": ("skimage", "data/clock_motion.png"),
        "description": "A wall clock blurred by motion.",
        "annotation": _ann("product", [_obj("clock", "clock", True, 0.75)]),
        "boxes": {"clock": [150, 50, 850, 950]},
    },
    {
        "file": ("sklearn", "datasets/images/china.jpg"),
        "description": "A Chinese pagoda on a hill above a lake.",
        "annotation": _ann(
            "other", [_obj("pagoda", "building", True, 0.9), _obj("trees", "plant", False, 0.7)]
        ),
        "boxes": {
            "pagoda": [100, 60, 560, 1000],
            "temple": [100, 60, 560, 1000],
            "lake": [560, 300, 1000, 700],
        },
    },
    {
        "file": ("sklearn", "datasets/images/flower.jpg"),
        "description": "An orange dahlia flower against dark green leaves.",
        "annotation": _ann("other", [_obj("dahlia", "flower", True, 0.93)]),
        "boxes": {"flower": [260, 200, 700, 840], "dahlia": [260, 200, 700, 840]},
    },
    {
        "file": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
        "description": "A portrait of Grace Hopper in US Navy dress uniform and cap, a US flag behind her.",
        "annotation": _ann(
            "people",
            [
                _obj("naval officer", "person", True, 0.95),
                _obj("american flag", "flag", False, 0.86),
                _obj("eyeglasses", "glasses", False, 0.82),
            ],
            person=True,
        ),
        "boxes": {
            "woman": [30, 30, 1000, 1000],
            "face": [300, 230, 730, 560],
            "cap": [290, 30, 730, 300],
            "glasses": [330, 280, 700, 390],
            "flag": [0, 0, 290, 1000],
        },
    },
]


def _package_file(package: str, rel: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    return path if path.is_file() else None


@dataclass
class Fingerprint:
    """Perturbation-tolerant summary of an image."""

    z: np.ndarray  # 32x32 grey thumbnail, z-scored
    aspect: float
    mean: float
    std: float
    sharp: float  # mean absolute neighbour difference at 256 px


def fingerprint(im: Any) -> Fingerprint:
    from PIL import Image

    im = im.convert("RGB") if im.mode != "RGB" else im
    grey = im.convert("L")
    thumb = np.asarray(grey.resize((32, 32), Image.Resampling.BOX), dtype=np.float64) / 255.0
    mean, std = float(thumb.mean()), float(thumb.std())
    z = (thumb - mean) / (std if std > 1e-6 else 1.0)
    scale = 256 / max(im.size)
    mid = grey.resize(
        (max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.BOX
    )
    m = np.asarray(mid, dtype=np.float64) / 255.0
    sharp = (
        float(np.abs(np.diff(m, axis=0)).mean() + np.abs(np.diff(m, axis=1)).mean()) / 2
        if m.size > 1
        else 0.0
    )
    return Fingerprint(z=z, aspect=im.width / im.height, mean=mean, std=std, sharp=sharp)


@dataclass
class Entry:
    """One registered image: its fingerprint and what the simulator answers about it."""

    id: str
    fp: Fingerprint
    annotation: dict[str, Any] | None
    boxes: dict[str, list[float]]
    description: str


def drift(a: Fingerprint, b: Fingerprint) -> tuple[float, float]:
    """(correlation, drift): how far image ``b``'s statistics moved from the registered ``a``."""
    corr = float((a.z * b.z).mean())
    d = abs(b.mean - a.mean)
    d += 0.5 * abs(math.log(max(b.std, 1e-3) / max(a.std, 1e-3)))
    d += 2.0 * max(0.0, 1.0 - corr)
    d += 0.5 * abs(math.log(max(b.sharp, 1e-3) / max(a.sharp, 1e-3)))
    return corr, d


class Registry:
    """Images the simulator knows: the built-in demo photos plus metadata files."""

    def __init__(self, metadata: tuple[str, ...] | list[str] = (), builtin: bool = True) -> None:
        self.entries: list[Entry] = []
        self._builtin = builtin
        self._builtin_loaded = not builtin
        self._lock = threading.Lock()
        for path in metadata:
            self.load_metadata(path)

    def _ensure_builtin(self) -> None:
        with self._lock:
            if self._builtin_loaded:
                return
            from PIL import Image

            for spec in BUILTIN:
                path = _package_file(*spec["file"])
                if path is None:
                    continue
                with Image.open(path) as im:
                    im.load()
                    fp = fingerprint(_flatten(im))
                self.entries.append(
                    Entry(
                        path.stem,
                        fp,
                        copy.deepcopy(spec["annotation"]),
                        dict(spec["boxes"]),
                        spec["description"],
                    )
                )
            self._builtin_loaded = True

    def load_metadata(self, path: str | os.PathLike[str]) -> None:
        """Register the images of a metadata JSON file (see :func:`write_metadata` for the format)."""
        from PIL import Image

        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"simulator metadata {path}: cannot read ({exc})") from exc
        items = data.get("images") if isinstance(data, dict) else data
        if not isinstance(items, list):
            raise ValueError(f"simulator metadata {path}: expected a list under 'images'")
        for n, item in enumerate(items):
            if not isinstance(item, dict) or "path" not in item:
                raise ValueError(f"simulator metadata {path}: item {n} needs a 'path'")
            img_path = Path(item["path"])
            if not img_path.is_absolute():
                img_path = path.parent / img_path
            try:
                with Image.open(img_path) as im:
                    im.load()
                    fp = fingerprint(_flatten(im))
            except OSError as exc:
                raise ValueError(
                    f"simulator metadata {path}: item {n}: cannot read image {img_path} ({exc})"
                ) from exc
            boxes = {}
            for expr, box in (item.get("boxes") or {}).items():
                if not (isinstance(box, list) and len(box) == 4):
                    raise ValueError(
                        f"simulator metadata {path}: item {n}: box of {expr!r} must be [x1, y1, x2, y2]"
                    )
                boxes[_norm(expr)] = [float(v) for v in box]
            self.entries.append(
                Entry(
                    str(item.get("id", img_path.stem)),
                    fp,
                    item.get("annotation"),
                    boxes,
                    str(item.get("description", "")),
                )
            )

    def match(self, fp: Fingerprint, expression: str | None = None) -> tuple[Entry | None, float]:
        """Best registered entry for ``fp`` (preferring entries that know ``expression``) and the drift."""
        self._ensure_builtin()
        best: tuple[float, float, Entry] | None = None
        for entry in self.entries:
            if abs(math.log(fp.aspect / entry.fp.aspect)) > MATCH_MAX_LOG_ASPECT:
                continue
            corr, d = drift(entry.fp, fp)
            if corr < MATCH_MIN_CORR:
                continue
            knows = expression is not None and _lookup_box(entry, expression, exact=True) is not None
            score = corr + (1.0 if knows else 0.0)
            if best is None or score > best[0]:
                best = (score, d, entry)
        if best is None:
            return None, 0.0
        return best[2], best[1]


def write_metadata(path: str | os.PathLike[str], images: list[dict[str, Any]]) -> None:
    """Write a simulator metadata file.

    Each image is ``{"id": str, "path": str (absolute or relative to the file), "boxes":
    {expression: [x1, y1, x2, y2] in relative 0-1000 coordinates}, "annotation": {seed-004
    annotation} (optional), "description": str (optional)}``.
    """
    from vlmrel.io import write_json

    write_json(path, {"simulator": "vlmrel-sim", "version": SIM_VERSION, "images": images})


def _flatten(im: Any) -> Any:
    from PIL import Image

    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    if im.mode.startswith("I") or im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.round().astype(np.uint8)).convert("RGB")
    return im.convert("RGB")


def _norm(text: str) -> str:
    return " ".join(re.findall(r"[\w']+", text.casefold()))


def _lookup_box(entry: Entry, expression: str, exact: bool = False) -> list[float] | None:
    key = _norm(expression)
    if key in entry.boxes:
        return entry.boxes[key]
    words = set(key.split()) - {"the", "a", "an", "of", "in", "on", "left", "right"}
    best, best_score = None, 0.0
    for name, box in entry.boxes.items():
        names = set(name.split())
        score = len(words & names) / max(1, len(names))
        if score > best_score:
            best, best_score = box, score
    if exact and best_score < 1.0:
        return None
    return best


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


def _degrade_annotation(
    ann: dict[str, Any], d: float, sens: float, rng: np.random.Generator
) -> dict[str, Any]:
    ann = copy.deepcopy(ann)
    p_flip = min(0.9, sens * max(0.0, d - 0.05) * 1.5)
    if rng.random() < p_flip:
        others = [s for s in SCENES if s != ann.get("scene")]
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


# -- server --------------------------------------------------------------------------------
class _Shared:
    """State shared by a group of simulators started together (attempt counters)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.attempts: Counter = Counter()

    def next_attempt(self, key: str) -> int:
        with self.lock:
            n = self.attempts[key]
            self.attempts[key] += 1
            return n


@dataclass
class _Counters:
    requests: Counter = field(default_factory=Counter)
    faults: Counter = field(default_factory=Counter)
    completed: int = 0
    disconnected: int = 0
    overloaded: int = 0
    inflight: int = 0
    peak_inflight: int = 0
    processing: int = 0
    peak_processing: int = 0


class Simulator:
    """A simulated VLM server on 127.0.0.1 (a simulator, not a model); a context manager.

    ``sim.url`` is the Ollama base URL, ``sim.openai_url`` the OpenAI one (``.../v1``);
    ``sim.stats()`` returns counters (requests by path, faults, peak concurrency).
    """

    def __init__(
        self,
        config: SimulatorConfig | None = None,
        port: int = 0,
        require_api_key: str | None = None,
        shared: _Shared | None = None,
        builtin_registry: bool = True,
        echo_auth: bool = False,
    ) -> None:
        self.config = config or SimulatorConfig(enabled=True)
        self.registry = Registry(self.config.metadata, builtin=builtin_registry)
        self.shared = shared or _Shared()
        self._require_key = require_api_key
        self._echo_auth = echo_auth  # tests only: echo a wrong Authorization header, as some proxies do
        self._lock = threading.Lock()
        self._counters = _Counters()
        self._slots = (
            threading.Semaphore(self.config.max_concurrency) if self.config.max_concurrency else None
        )
        self._stopping = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _make_handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_url(self) -> str:
        return f"{self.url}/v1"

    def base_url(self, backend: str) -> str:
        return self.openai_url if backend == "openai" else self.url

    def start(self) -> Simulator:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:  # shutdown() waits for serve_forever, which never ran otherwise
            self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            c = self._counters
            return {
                "requests": sum(c.requests.values()),
                "requests_by_path": dict(c.requests),
                "faults": dict(c.faults),
                "completed": c.completed,
                "disconnected": c.disconnected,
                "overloaded": c.overloaded,
                "peak_concurrency": c.peak_inflight,
                "peak_processing": c.peak_processing,
            }

    def reset_stats(self) -> None:
        with self._lock:
            self._counters = _Counters()

    # -- request handling (runs in server threads) -----------------------------------------
    def _enter(self, path: str) -> None:
        with self._lock:
            c = self._counters
            c.requests[path] += 1
            c.inflight += 1
            c.peak_inflight = max(c.peak_inflight, c.inflight)

    def _leave(self) -> None:
        with self._lock:
            self._counters.inflight -= 1

    def _count(self, what: str, fault: str | None = None) -> None:
        with self._lock:
            if fault is not None:
                self._counters.faults[fault] += 1
            if what == "completed":
                self._counters.completed += 1
            elif what == "disconnected":
                self._counters.disconnected += 1
            elif what == "overloaded":
                self._counters.overloaded += 1

    def _processing(self, delta: int) -> None:
        with self._lock:
            c = self._counters
            c.processing += delta
            c.peak_processing = max(c.peak_processing, c.processing)

    def draw_fault(self, key: str, attempt: int) -> str | None:
        cfg = self.config
        if not cfg.faults or (cfg.faults_max_attempt is not None and attempt >= cfg.faults_max_attempt):
            return None
        u = np.random.default_rng([cfg.seed, _seed_of(key), attempt]).random()
        acc = 0.0
        for kind in SIM_FAULTS:
            acc += float(cfg.faults.get(kind, 0.0))
            if u < acc:
                return kind
        return None

    def answer_chat(self, prompt: str, image_bytes: bytes | None, schema: dict[str, Any] | None) -> Any:
        """The deterministic answer (a JSON value, or a string for free-text prompts)."""
        from PIL import Image

        cfg = self.config
        task = _task(prompt, schema)
        im = None
        if image_bytes is not None:
            im = Image.open(io.BytesIO(image_bytes))
            im.load()
            im = _flatten(im)
        expression = _expression(prompt) if task == "grounding" else None
        fp = fingerprint(im) if im is not None else None
        entry, d = self.registry.match(fp, expression) if fp is not None else (None, 0.0)
        rng = np.random.default_rng(
            [cfg.seed, _seed_of(prompt, hashlib.sha256(image_bytes or b"").hexdigest())]
        )
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
                ann = _degrade_annotation(entry.annotation, d, cfg.grounding_sensitivity, rng)
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

    def embed_texts(self, texts: list[str]) -> list[list[float]]:
        dim = self.config.embedding_dim
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


def _make_handler(sim: Simulator) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "vlmrel-simulator/" + SIM_VERSION

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: the simulator keeps counters instead of an access log."""
            return

        # -- plumbing ------------------------------------------------------------------------
        def setup(self) -> None:
            super().setup()
            # headers and body go out in separate writes: without TCP_NODELAY, Nagle's algorithm
            # and delayed ACKs add ~40 ms to every keep-alive response
            with contextlib.suppress(OSError):
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def _disconnected(self) -> bool:
            try:
                r, _, _ = select.select([self.connection], [], [], 0)
                if not r:
                    return False
                return self.connection.recv(1, socket.MSG_PEEK) == b""
            except (OSError, ValueError):
                return True

        def _wait(self, seconds: float) -> bool:
            """Sleep ``seconds``; False as soon as the client goes away or the server stops."""
            end = time.monotonic() + seconds
            while True:
                left = end - time.monotonic()
                if left <= 0:
                    return True
                if self._disconnected() or sim._stopping.is_set():
                    return False
                time.sleep(min(0.02, left))

        def _send(
            self, status: int, body: bytes, content_type: str = "application/json", truncate: bool = False
        ) -> None:
            self._sent = True
            sim._leave()
            try:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                if truncate:
                    self.send_header("Connection", "close")
                self.end_headers()
                if truncate:
                    self.wfile.write(body[: max(1, len(body) // 2)])
                    self.wfile.flush()
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                else:
                    self.wfile.write(body)
            except OSError:
                self.close_connection = True

        def _json(self, status: int, obj: Any, truncate: bool = False) -> None:
            self._send(status, json.dumps(obj).encode(), truncate=truncate)

        def _error(self, status: int, message: str, api: str) -> None:
            if api == "openai":
                etype = {
                    400: "invalid_request_error",
                    401: "authentication_error",
                    429: "rate_limit_error",
                }.get(status, "server_error")
                self._json(status, {"error": {"message": message, "type": etype, "code": status}})
            else:
                self._json(status, {"error": message})

        def _read_body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length > 0 else b""

        # -- routes --------------------------------------------------------------------------
        def do_GET(self) -> None:
            sim._enter(self.path)
            if self.path in ("/", "/health"):
                self._send(200, b"vlmrel simulator is running (a simulator, not a model)\n", "text/plain")
            elif self.path == "/api/version":
                self._json(200, {"version": f"vlmrel-sim-{SIM_VERSION}"})
            elif self.path == "/api/tags":
                self._json(200, {"models": [{"name": "vlmrel-sim", "model": "vlmrel-sim", "details": {}}]})
            elif self.path == "/v1/models":
                self._json(
                    200,
                    {
                        "object": "list",
                        "data": [{"id": "vlmrel-sim", "object": "model", "owned_by": "vlmrel"}],
                    },
                )
            else:
                self._error(404, f"no route {self.path}", "ollama")

        def do_POST(self) -> None:
            path = self.path.split("?")[0]
            raw = self._read_body()
            sim._enter(path)
            routes = {
                "/v1/chat/completions": ("openai", "chat"),
                "/v1/embeddings": ("openai", "embed"),
                "/api/chat": ("ollama", "chat"),
                "/api/embed": ("ollama", "embed"),
            }
            if path not in routes:
                self._error(404, f"no route {path}", "ollama")
                return
            api, what = routes[path]
            if sim._require_key is not None:
                auth = self.headers.get("Authorization") or ""
                if auth != f"Bearer {sim._require_key}":
                    got = f" (got {auth!r})" if sim._echo_auth else ""
                    self._error(401, f"invalid or missing API key{got}", api)
                    return
            try:
                body = json.loads(raw or b"{}")
                if not isinstance(body, dict):
                    raise ValueError("body is not a JSON object")
            except ValueError as exc:
                self._error(400, f"invalid JSON body: {exc}", api)
                return
            key = hashlib.sha256(
                path.encode() + b"\n" + json.dumps(body, sort_keys=True).encode()
            ).hexdigest()
            attempt = sim.shared.next_attempt(key)
            fault = sim.draw_fault(key, attempt)
            if fault is not None:
                sim._count("fault", fault)
            # concurrency limit
            if sim._slots is not None:
                if sim.config.overload == "reject":
                    if not sim._slots.acquire(blocking=False):
                        sim._count("overloaded")
                        self._error(sim.config.overload_status, "server busy", api)
                        return
                else:
                    while not sim._slots.acquire(timeout=0.02):
                        if self._disconnected() or sim._stopping.is_set():
                            sim._leave()
                            sim._count("disconnected")
                            self.close_connection = True
                            return
            sim._processing(+1)
            self._sent = False
            try:
                self._handle(api, what, body, fault, key, attempt)
            except Exception as exc:  # a simulator bug must not hang the client
                if not self._sent:
                    self._error(500, f"simulator error: {type(exc).__name__}: {exc}", api)
                raise
            finally:
                sim._processing(-1)
                if sim._slots is not None:
                    sim._slots.release()

        def _handle(
            self, api: str, what: str, body: dict[str, Any], fault: str | None, key: str, attempt: int
        ) -> None:
            cfg = sim.config
            rng = np.random.default_rng([cfg.seed, _seed_of(key), attempt, 1])
            latency = (
                cfg.latency_s + abs(rng.normal(0, cfg.latency_jitter_s))
                if cfg.latency_jitter_s
                else cfg.latency_s
            )
            if fault == "timeout":
                self._wait(cfg.hang_s)
                self._sent = True
                sim._leave()
                sim._count("disconnected")
                self.close_connection = True
                return
            if not self._wait(latency):
                self._sent = True
                sim._leave()
                sim._count("disconnected")
                self.close_connection = True
                return
            if fault in ("http_429", "http_500", "http_503", "http_400"):
                status = int(fault[-3:])
                self._error(status, f"simulated fault {fault}", api)
                return
            try:
                if what == "embed":
                    payload = self._embed(api, body)
                else:
                    payload = self._chat(api, body, fault)
            except _BadRequest as exc:
                self._error(400, str(exc), api)
                return
            if fault == "malformed_body":
                self._send(200, b'{"choices": [{"message": {"content": "oops', truncate=False)
                sim._count("completed")
                return
            self._json(200, payload, truncate=fault == "truncated")
            sim._count("completed")

        def _embed(self, api: str, body: dict[str, Any]) -> dict[str, Any]:
            inp = body.get("input")
            texts = [inp] if isinstance(inp, str) else inp
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise _BadRequest("'input' must be a string or a list of strings")
            vecs = sim.embed_texts(texts)
            model = body.get("model", "vlmrel-sim")
            if api == "ollama":
                return {
                    "model": model,
                    "embeddings": vecs,
                    "total_duration": 0,
                    "load_duration": 0,
                    "prompt_eval_count": sum(len(t.split()) for t in texts),
                }
            if body.get("encoding_format") == "base64":
                data = [
                    {
                        "object": "embedding",
                        "index": i,
                        "embedding": base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode(),
                    }
                    for i, v in enumerate(vecs)
                ]
            else:
                data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vecs)]
            n = sum(len(t.split()) for t in texts)
            return {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": n, "total_tokens": n},
            }

        def _chat(self, api: str, body: dict[str, Any], fault: str | None) -> dict[str, Any]:
            prompt, image, schema = _parse_chat(api, body)
            try:
                answer = sim.answer_chat(prompt, image, schema)
            except OSError as exc:
                raise _BadRequest(f"cannot decode image: {exc}") from exc
            if fault == "schema_violation":
                answer = _violate(answer, schema)
            text = answer if isinstance(answer, str) else json.dumps(answer)
            if fault == "malformed_json":
                text = text[: max(1, len(text) // 2)]
            model = body.get("model", "vlmrel-sim")
            if api == "ollama":
                return {
                    "model": model,
                    "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "message": {"role": "assistant", "content": text},
                    "done": True,
                    "done_reason": "stop",
                    "total_duration": int(sim.config.latency_s * 1e9),
                    "eval_count": len(text.split()),
                }
            return {
                "id": "chatcmpl-sim-" + hashlib.sha256(text.encode()).hexdigest()[:12],
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                ],
                "usage": {
                    "prompt_tokens": len(prompt.split()),
                    "completion_tokens": len(text.split()),
                    "total_tokens": len(prompt.split()) + len(text.split()),
                },
            }

    return Handler


class _BadRequest(ValueError):
    pass


def _decode_b64(data: str) -> bytes:
    if data.startswith("data:"):
        data = data.split(",", 1)[1] if "," in data else ""
    try:
        return base64.b64decode(data, validate=False)
    except (binascii.Error, ValueError) as exc:
        raise _BadRequest(f"image is not base64: {exc}") from exc


def _parse_chat(api: str, body: dict[str, Any]) -> tuple[str, bytes | None, dict[str, Any] | None]:
    """(prompt text, first image bytes, response schema) of a chat request of either API."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("'messages' must be a non-empty list")
    texts: list[str] = []
    image: bytes | None = None
    for msg in messages:
        if not isinstance(msg, dict) or msg.get("role") != "user":
            continue
        content = msg.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for part in content:
                if not isinstance(part, dict):
                    continue
                if part.get("type") == "text":
                    texts.append(str(part.get("text", "")))
                elif part.get("type") == "image_url" and image is None:
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    if not isinstance(url, str) or not url.startswith("data:"):
                        raise _BadRequest("only data: URLs are supported for images")
                    image = _decode_b64(url)
        for img in msg.get("images") or []:
            if image is None and isinstance(img, str):
                image = _decode_b64(img)
    schema = None
    if api == "ollama":
        fmt = body.get("format")
        schema = fmt if isinstance(fmt, dict) else None
    else:
        rf = body.get("response_format")
        if isinstance(rf, dict) and rf.get("type") == "json_schema":
            js = rf.get("json_schema") or {}
            schema = js.get("schema") if isinstance(js, dict) else None
    return "\n".join(texts), image, schema


# -- group helper used by the client layer -------------------------------------------------
def simulator_salt(sim_cfg: SimulatorConfig) -> str:
    """Hash of everything that changes the simulator's answers (for the cache key)."""
    d = dataclasses.asdict(sim_cfg)
    parts: dict[str, Any] = {
        "version": SIM_VERSION,
        **{
            k: d[k]
            for k in (
                "seed",
                "faults",
                "faults_max_attempt",
                "coords",
                "grounding_sensitivity",
                "embedding_dim",
            )
        },
        "metadata": [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in sim_cfg.metadata],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


@contextlib.contextmanager
def simulated(cfg: VLMConfig) -> Iterator[VLMConfig]:
    """Start ``cfg.simulator.instances`` simulators; yield ``cfg`` pointed at them.

    The yielded config has the simulator disabled (it *is* the endpoints now), the
    embedding endpoints cleared (they default to the chat ones) and ``cache_salt``
    extended with :func:`simulator_salt`, so simulated answers never mix with real ones
    nor with answers of a differently configured simulator.
    """
    shared = _Shared()
    sims = [Simulator(cfg.simulator, shared=shared).start() for _ in range(cfg.simulator.instances)]
    try:
        urls = [s.base_url(cfg.backend) for s in sims]
        emb_backend = cfg.embedding.backend or cfg.backend
        emb = dataclasses.asdict(cfg.embedding)
        emb["endpoints"] = [s.base_url(emb_backend) for s in sims]
        sim = dataclasses.asdict(cfg.simulator)
        sim["enabled"] = False
        salt = f"{cfg.cache_salt}|sim:{simulator_salt(cfg.simulator)}"
        yield cfg.replace(endpoints=urls, embedding=emb, simulator=sim, cache_salt=salt)
    finally:
        for s in sims:
            s.stop()


# -- command line --------------------------------------------------------------------------
def _parse_faults(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        kind, _, p = item.partition("=")
        try:
            out[kind.strip()] = float(p)
        except ValueError:
            raise argparse.ArgumentTypeError(f"fault {item!r}: expected KIND=PROBABILITY") from None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vlmrel.vlm.simulator",
        description="vlmrel VLM server SIMULATOR (not a model): OpenAI and Ollama APIs on 127.0.0.1, "
        "deterministic answers from image metadata, fault injection.",
    )
    parser.add_argument("--port", type=int, default=11434, help="port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per answer")
    parser.add_argument(
        "--latency-jitter", type=float, default=0.0, help="sd of extra |normal| latency, seconds"
    )
    parser.add_argument("--max-concurrency", type=int, default=None, help="requests handled at once")
    parser.add_argument("--overload", choices=["queue", "reject"], default="queue")
    parser.add_argument("--overload-status", type=int, choices=[429, 503], default=503)
    parser.add_argument(
        "--faults",
        type=_parse_faults,
        default={},
        help="e.g. http_429=0.05,timeout=0.01; kinds: " + ", ".join(SIM_FAULTS),
    )
    parser.add_argument(
        "--faults-max-attempt", type=int, default=None, help="inject faults only in the first N attempts"
    )
    parser.add_argument("--hang", type=float, default=600.0, help="seconds a 'timeout' fault hangs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--metadata", action="append", default=[], help="metadata JSON (repeatable)")
    parser.add_argument("--coords", choices=["relative_1000", "absolute"], default="relative_1000")
    parser.add_argument("--grounding-sensitivity", type=float, default=1.0)
    parser.add_argument("--embedding-dim", type=int, default=64)
    parser.add_argument(
        "--require-api-key-env", default=None, help="env variable holding the key clients must send"
    )
    args = parser.parse_args(argv)
    cfg = SimulatorConfig(
        enabled=True,
        latency_s=args.latency,
        latency_jitter_s=args.latency_jitter,
        max_concurrency=args.max_concurrency,
        overload=args.overload,
        overload_status=args.overload_status,
        faults=args.faults,
        faults_max_attempt=args.faults_max_attempt,
        hang_s=args.hang,
        seed=args.seed,
        metadata=tuple(args.metadata),
        coords=args.coords,
        grounding_sensitivity=args.grounding_sensitivity,
        embedding_dim=args.embedding_dim,
    )
    key = os.environ.get(args.require_api_key_env) if args.require_api_key_env else None
    sim = Simulator(cfg, port=args.port, require_api_key=key)
    print(
        f"vlmrel simulator (a simulator, not a model) on {sim.url} (Ollama) and {sim.openai_url} (OpenAI); Ctrl-C stops",
        file=sys.stderr,
        flush=True,
    )
    try:
        sim._server.serve_forever(poll_interval=0.1)
    except KeyboardInterrupt:
        pass
    finally:
        sim._server.server_close()
        print(json.dumps(sim.stats()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
