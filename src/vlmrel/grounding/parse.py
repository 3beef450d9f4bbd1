"""Parse a VLM's answer into a box, or say why it cannot be one (seed defect 1: no [0,0,0,0]).

Coordinate conventions are a per-model setting (seed defect 9), never guessed from the numbers:

* ``rel1000``: relative 0..1000 coordinates (Qwen3-VL);
* ``abs_resized``: pixels of the model's smart-resized input (Qwen2.5-VL), see :func:`smart_resize`;
* ``norm1``: relative 0..1 coordinates.

The returned box is ``(x1, y1, x2, y2)`` normalised to [0, 1] of the image, so IoU against a
ground-truth box normalised the same way equals the IoU in original-image pixels.

Answers as servers return them (tests in ``tests/test_grounding_parse.py`` cite where each format
was published):

* JSON inside ```` ```json ```` fences, with prose around it, or a bare JSON object/list;
* a list of objects ``[{"bbox_2d": [x1, y1, x2, y2], "label": "..."}, ...]``. **Which box is taken**
  when several come back: the first whose ``label`` equals the referring expression (case,
  surrounding whitespace and punctuation ignored), else the first box. :attr:`ParsedBox.n_boxes`
  records how many came back and :attr:`ParsedBox.choice` how one was chosen (``only``,
  ``label_match``, ``first``);
* reasoning: ``<think>...</think>`` blocks are removed before the box is looked for (a box drafted
  while reasoning is not the answer); a lone ``</think>`` (vLLM serving Qwen3-VL-Thinking: the
  opening tag is in the chat template) ends the reasoning; an unclosed ``<think>`` with nothing
  before it is the failure ``unfinished_thinking`` (cut off while reasoning). Ollama returns the
  reasoning in a separate ``thinking`` field (``message.thinking`` of ``/api/chat``,
  ``thinking`` of ``/api/generate``): pass it as ``thinking=`` or pass the reply object itself; the
  box is read from the content only, and an empty content beside a non-empty ``thinking`` is the
  failure ``thinking_only``.

Qwen2.5-VL's resize rule (``abs_resized``): the model answers in pixels of the image its processor
actually fed it, :func:`smart_resize` of the original ``(width, height)``: both sides rounded to the
nearest multiple of ``factor`` (28 = patch 14 x merge 2), then, if the area leaves
``[min_pixels, max_pixels]``, both scaled by ``beta = sqrt(area / max_pixels)`` (floored to the
factor) or ``sqrt(min_pixels / area)`` (ceiled). The box maps back with separate x and y scales,
``x / w_resized`` and ``y / h_resized`` (a non-square image's two scales differ). ``factor``,
``min_pixels`` and ``max_pixels`` are config (``grounding.coords.smart_resize``), because a server
may run the processor with other limits (e.g. ``--max-pixels``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

COORDS = ("rel1000", "abs_resized", "norm1")
FAILURE_KINDS = (
    "no_json",
    "too_few_numbers",
    "degenerate_box",
    "out_of_range",
    "thinking_only",
    "unfinished_thinking",
)
"""What :func:`parse_bbox` can fail with: no JSON box in the text; a box with fewer than 4 numbers;
``x1 >= x2`` or ``y1 >= y2``; a coordinate outside the convention's range (or not finite); an empty
answer beside a non-empty reasoning field (Ollama's ``thinking``); an answer cut off inside an
unclosed ``<think>`` block."""
BOX_CHOICES = ("only", "label_match", "first")

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
    n_boxes: int = 0  # boxes in the answer (several: see the module docstring for which is taken)
    choice: str = ""  # "only", "label_match" or "first" (empty when there was no box)
    thinking: bool = False  # the answer carried reasoning (<think> block or a thinking field)

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


def _is_numbers(value) -> bool:
    return bool(value) and all(isinstance(x, int | float) and not isinstance(x, bool) for x in value)


def _find_boxes(value) -> list[tuple[list, str | None]]:
    """Every box in a decoded JSON value, in order, with its label: lists under a box key (the
    object's ``label`` beside it), or a bare list of numbers."""
    out: list[tuple[list, str | None]] = []
    if isinstance(value, dict):
        for key in BOX_KEYS:
            if key in value and isinstance(value[key], list):
                label = value.get("label")
                out.append((value[key], label if isinstance(label, str) else None))
                return out
        for v in value.values():
            out.extend(_find_boxes(v))
        return out
    if isinstance(value, list):
        if _is_numbers(value):
            return [(value, None)]
        for v in value:
            if isinstance(v, dict | list):
                out.extend(_find_boxes(v))
    return out


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


def _norm_label(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _choose(boxes: list[tuple[list, str | None]], expression: str | None) -> tuple[list, str]:
    """The box taken among several: the first whose label equals the expression, else the first."""
    if len(boxes) == 1:
        return boxes[0][0], "only"
    if expression:
        want = _norm_label(expression)
        for items, label in boxes:
            if label is not None and _norm_label(label) == want:
                return items, "label_match"
    return boxes[0][0], "first"


def _extract_numbers(text: str, expression: str | None = None) -> tuple[list[float] | None, int, str]:
    """The chosen box's numbers (None: no box), how many boxes the answer held, and the choice."""
    for value in _json_values(text):
        boxes = _find_boxes(value)
        if boxes:
            items, choice = _choose(boxes, expression)
            return _as_numbers(items), len(boxes), choice
    m = _KEY_ARRAY.search(text)  # a box key with an array in otherwise broken JSON (e.g. cut off)
    if m:
        return [float(x) for x in _NUMBER.findall(m.group(1))], 1, "only"
    return None, 0, ""


_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.S | re.I)


def split_thinking(text: str) -> tuple[str, str, bool]:
    """``(answer, reasoning, unfinished)`` of a text that may hold ``<think>`` reasoning.

    Closed ``<think>...</think>`` blocks are reasoning; text up to a lone ``</think>`` is reasoning
    (the opening tag was in the chat template); an unclosed ``<think>`` makes the rest reasoning
    and ``unfinished`` true.
    """
    reasoning = [m.group(0)[7:-8] for m in _THINK_BLOCK.finditer(text)]
    rest = _THINK_BLOCK.sub("", text)
    low = rest.lower()
    if "</think>" in low:
        cut = low.rindex("</think>")
        reasoning.append(rest[:cut])
        rest = rest[cut + len("</think>") :]
        low = rest.lower()
    unfinished = False
    if "<think>" in low:
        cut = low.index("<think>")
        reasoning.append(rest[cut + len("<think>") :])
        rest, unfinished = rest[:cut], True
    return rest, "\n".join(r.strip() for r in reasoning if r.strip()), unfinished


def answer_parts(answer) -> tuple[str | None, str | None]:
    """``(content, thinking)`` of an answer: a string, or an Ollama reply as JSON or a mapping.

    Accepted replies: an ``/api/chat`` message ``{"content", "thinking"}``, a whole ``/api/chat``
    response ``{"message": {...}}``, an ``/api/generate`` response ``{"response", "thinking"}``.
    A string that is not such a reply is the content itself.
    """
    if answer is None:
        return None, None
    if isinstance(answer, str):
        stripped = answer.strip()
        if not (stripped.startswith("{") and '"thinking"' in stripped):
            return answer, None
        try:
            obj = json.loads(stripped)
        except ValueError:
            return answer, None
        if not isinstance(obj, Mapping) or not ({"message", "response", "content"} & set(obj)):
            return answer, None
        answer = obj
    if isinstance(answer, Mapping):
        msg = answer.get("message") if isinstance(answer.get("message"), Mapping) else answer
        content = msg.get("content", answer.get("response"))
        thinking = msg.get("thinking", answer.get("thinking"))
        return (
            content if isinstance(content, str) else None,
            thinking if isinstance(thinking, str) else None,
        )
    raise TypeError(f"an answer is a string or an Ollama reply mapping, not {type(answer).__name__}")


def parse_bbox(
    text,
    coords: str,
    image_size: tuple[int, int],
    *,
    resize: SmartResize | None = None,
    expression: str | None = None,
    thinking: str | None = None,
) -> ParsedBox:
    """Parse an answer into a box normalised to [0, 1] of an image of ``image_size = (width, height)``.

    ``text`` is the answer's text, or an Ollama reply (see :func:`answer_parts`); ``thinking`` is a
    separate reasoning field (Ollama's). ``coords`` is the model's convention (``rel1000``,
    ``abs_resized``, ``norm1``); for ``abs_resized`` the model's input size comes from
    :func:`smart_resize` of ``image_size`` (``resize`` overrides Qwen2.5-VL's defaults). Reasoning
    is removed first; the box is then the first JSON value holding a ``bbox_2d`` (or
    ``bbox``/``box``) list, or a bare list of numbers; of several boxes the one labelled with
    ``expression``, else the first (module docstring); its first 4 numbers are used. Never clips and
    never invents a box: a failure carries its kind (:data:`FAILURE_KINDS`).
    """
    if coords not in COORDS:
        raise ValueError(f"unknown coordinate convention {coords!r}; choose one of {COORDS}")
    width, height = image_size
    if width <= 0 or height <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    content, field = answer_parts(text)
    field = thinking if thinking is not None else field
    has_field = bool(field and field.strip())
    answer, reasoning, unfinished = split_thinking(content or "")
    had = has_field or bool(reasoning) or unfinished
    if not answer.strip():
        if unfinished:
            return ParsedBox(None, "unfinished_thinking", "cut off inside <think> (no answer)", thinking=True)
        if had:
            return ParsedBox(None, "thinking_only", "reasoning but an empty answer", thinking=True)
        return ParsedBox(None, "no_json", "empty answer")
    nums, n_boxes, choice = _extract_numbers(answer, expression)
    info = {"n_boxes": n_boxes, "choice": choice, "thinking": had}
    if nums is None:
        return ParsedBox(None, "no_json", "no JSON box in the answer", **info)
    if len(nums) < 4:
        return ParsedBox(None, "too_few_numbers", f"{len(nums)} numbers in the box", tuple(nums), **info)
    x1, y1, x2, y2 = nums[:4]
    raw = tuple(nums[:4])
    if not all(math.isfinite(v) for v in raw):
        return ParsedBox(None, "out_of_range", "non-finite coordinate", raw, **info)
    if x1 >= x2 or y1 >= y2:
        return ParsedBox(None, "degenerate_box", f"x1>=x2 or y1>=y2 in {list(raw)}", raw, **info)
    if coords == "rel1000":
        sx = sy = 1000.0
    elif coords == "norm1":
        sx = sy = 1.0
    else:
        rw, rh = smart_resize(width, height, resize or SmartResize())
        sx, sy = float(rw), float(rh)
    if min(x1, y1) < 0 or x2 > sx or y2 > sy:
        return ParsedBox(
            None, "out_of_range", f"{list(raw)} outside [0,{sx:g}]x[0,{sy:g}] ({coords})", raw, **info
        )
    return ParsedBox((x1 / sx, y1 / sy, x2 / sx, y2 / sy), None, "", raw, **info)
