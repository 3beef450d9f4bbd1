"""Which image is this? Fingerprints of registered images and the registry that matches them.

The registry holds the demo photos (:mod:`.demo`) and whatever metadata files are passed
(:func:`write_metadata` writes one: the grounding demo registers its generated scenes and
their true boxes that way). Matching is by a perturbation-tolerant fingerprint, so a
perturbed image is recognised and the drift says how far it moved.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .demo import BUILTIN

SIM_VERSION = "1"
MATCH_MIN_CORR = 0.8
MATCH_MAX_LOG_ASPECT = 0.05


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
