"""Parse a VLM's answer into a box, or say why it cannot be one (seed defect 1: no [0,0,0,0]).

Coordinate conventions are a per-model setting (seed defect 9), never guessed from the numbers:

* ``rel1000``: relative 0..1000 coordinates (Qwen3-VL);
* ``abs_resized``: pixels of the model's smart-resized input (Qwen2.5-VL), see :func:`smart_resize`;
* ``norm1``: relative 0..1 coordinates.

The returned box is ``(x1, y1, x2, y2)`` normalised to [0, 1] of the image, so IoU against a
ground-truth box normalised the same way equals the IoU in original-image pixels.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

COORDS = ("rel1000", "abs_resized", "norm1")
FAILURE_KINDS = ("no_json", "too_few_numbers", "degenerate_box", "out_of_range")
"""What :func:`parse_bbox` can fail with: no JSON box in the text; a box with fewer than 4 numbers;
``x1 >= x2`` or ``y1 >= y2``; a coordinate outside the convention's range (or not finite)."""

BOX_KEYS = ("bbox_2d", "bbox", "box", "box_2d")

# notebooks 02/03's Qwen3-VL prompt, as a str.format template (``{expression}``; braces doubled)
QWEN3_PROMPT = (
    'Where is "{expression}" in this image? Output the bounding box in format: '
    '{{"bbox_2d": [x_min, y_min, x_max, y_max]}} using coordinates 0-1000.'
)


def build_prompt(template: str, expression: str) -> str:
    """The prompt for one expression from a config template holding ``{expression}``."""
    if "{expression}" not in template:
        raise ValueError("grounding.prompt: the template must contain {expression}")
    try:
        return template.format(expression=expression)
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"grounding.prompt: bad template ({exc}); write literal braces as {{{{ }}}}"
        ) from exc


# Qwen2.5-VL's image processor defaults (preprocessor_config.json): patch 14 x merge 2
QWEN25_FACTOR = 28
QWEN25_MIN_PIXELS = 56 * 56
QWEN25_MAX_PIXELS = 28 * 28 * 16384


@dataclass(frozen=True)
class SmartResize:
    """Parameters of Qwen2.5-VL's ``smart_resize`` (the model's input size for ``abs_resized``)."""

    factor: int = QWEN25_FACTOR
    min_pixels: int = QWEN25_MIN_PIXELS
    max_pixels: int = QWEN25_MAX_PIXELS


def smart_resize(width: int, height: int, spec: SmartResize = SmartResize()) -> tuple[int, int]:
    """``(width, height)`` of the image Qwen2.5-VL actually sees (its processor's ``smart_resize``).

    Both sides are rounded to multiples of ``factor`` with the area kept within
    ``[min_pixels, max_pixels]`` and the aspect ratio as close as possible.
    """
    f = spec.factor
    if max(width, height) / min(width, height) > 200:
        raise ValueError(f"aspect ratio of {width}x{height} exceeds 200, which Qwen2.5-VL rejects")
    h_bar = max(f, round(height / f) * f)
    w_bar = max(f, round(width / f) * f)
    if h_bar * w_bar > spec.max_pixels:
        beta = math.sqrt((height * width) / spec.max_pixels)
        h_bar = max(f, math.floor(height / beta / f) * f)
        w_bar = max(f, math.floor(width / beta / f) * f)
    elif h_bar * w_bar < spec.min_pixels:
        beta = math.sqrt(spec.min_pixels / (height * width))
        h_bar = math.ceil(height * beta / f) * f
        w_bar = math.ceil(width * beta / f) * f
    return int(w_bar), int(h_bar)


@dataclass(frozen=True)
class ParsedBox:
    """The outcome of parsing one answer: ``box`` (normalised x1, y1, x2, y2) or ``failure``."""

    box: tuple[float, float, float, float] | None
    failure: str | None = None
    detail: str = ""
    raw_numbers: tuple[float, ...] = ()

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def status(self) -> str:
        return "ok" if self.ok else "parse_failed"

    def to_pixels(self, image_size: tuple[int, int]) -> tuple[float, float, float, float] | None:
        """The box in pixels of an image of ``(width, height)``."""
        if self.box is None:
            return None
        w, h = image_size
        x1, y1, x2, y2 = self.box
        return (x1 * w, y1 * h, x2 * w, y2 * h)


_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.S)
_KEY_ARRAY = re.compile(r'["\']?(?:bbox_2d|bbox|box_2d|box)["\']?\s*:\s*\[([^\]\[]*)\]')
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _json_values(text: str) -> list:
    """Every JSON object/array that decodes, scanning left to right (code fences first)."""
    decoder = json.JSONDecoder()
    out = []
    chunks = _FENCE.findall(text) + [text]
    for chunk in chunks:
        i = 0
        while i < len(chunk):
            ch = chunk[i]
            if ch in "{[":
                try:
                    value, end = decoder.raw_decode(chunk, i)
                except ValueError:
                    i += 1
                    continue
                out.append(value)
                i = end
            else:
                i += 1
    return out


def _find_box(value) -> list | None:
    """The first box-like list in a decoded JSON value: under a box key, or a bare list of numbers."""
    if isinstance(value, dict):
        for key in BOX_KEYS:
            if key in value and isinstance(value[key], list):
                return value[key]
        for v in value.values():
            found = _find_box(v)
            if found is not None:
                return found
        return None
    if isinstance(value, list):
        if value and all(isinstance(x, int | float) and not isinstance(x, bool) for x in value):
            return value
        for v in value:
            if isinstance(v, dict | list):
                found = _find_box(v)
                if found is not None:
                    return found
    return None


def _as_numbers(items: list) -> list[float]:
    nums = []
    for x in items:
        if isinstance(x, bool):
            continue
        if isinstance(x, int | float):
            nums.append(float(x))
        elif isinstance(x, str) and _NUMBER.fullmatch(x.strip()):
            nums.append(float(x))
    return nums


def _extract_numbers(text: str) -> list[float] | None:
    for value in _json_values(text):
        box = _find_box(value)
        if box is not None:
            return _as_numbers(box)
    m = _KEY_ARRAY.search(text)  # a box key with an array in otherwise broken JSON (e.g. cut off)
    if m:
        return [float(x) for x in _NUMBER.findall(m.group(1))]
    return None


def parse_bbox(
    text: str | None,
    coords: str,
    image_size: tuple[int, int],
    *,
    resize: SmartResize | None = None,
) -> ParsedBox:
    """Parse ``text`` into a box normalised to [0, 1] of an image of ``image_size = (width, height)``.

    ``coords`` is the model's convention (``rel1000``, ``abs_resized``, ``norm1``); for
    ``abs_resized`` the model's input size comes from :func:`smart_resize` of ``image_size``
    (``resize`` overrides Qwen2.5-VL's defaults). The box is the first JSON value holding a
    ``bbox_2d`` (or ``bbox``/``box``) list, or a bare list of numbers; the first 4 numbers are used.
    Never clips and never invents a box: a failure carries its kind (:data:`FAILURE_KINDS`).
    """
    if coords not in COORDS:
        raise ValueError(f"unknown coordinate convention {coords!r}; choose one of {COORDS}")
    width, height = image_size
    if width <= 0 or height <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if not text or not text.strip():
        return ParsedBox(None, "no_json", "empty answer")
    nums = _extract_numbers(text)
    if nums is None:
        return ParsedBox(None, "no_json", "no JSON box in the answer")
    if len(nums) < 4:
        return ParsedBox(None, "too_few_numbers", f"{len(nums)} numbers in the box", tuple(nums))
    x1, y1, x2, y2 = nums[:4]
    raw = tuple(nums[:4])
    if not all(math.isfinite(v) for v in raw):
        return ParsedBox(None, "out_of_range", "non-finite coordinate", raw)
    if x1 >= x2 or y1 >= y2:
        return ParsedBox(None, "degenerate_box", f"x1>=x2 or y1>=y2 in {list(raw)}", raw)
    if coords == "rel1000":
        sx = sy = 1000.0
    elif coords == "norm1":
        sx = sy = 1.0
    else:
        rw, rh = smart_resize(width, height, resize or SmartResize())
        sx, sy = float(rw), float(rh)
    if min(x1, y1) < 0 or x2 > sx or y2 > sy:
        return ParsedBox(None, "out_of_range", f"{list(raw)} outside [0,{sx:g}]x[0,{sy:g}] ({coords})", raw)
    return ParsedBox((x1 / sx, y1 / sy, x2 / sx, y2 / sy), None, "", raw)
