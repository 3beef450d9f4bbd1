"""Annotations -> ground truth (seed 004's mapping rules), and the human-review sample.

A ground-truth record has the seed's format::

    {"image_id": "...", "scene": ["scene.product"],
     "attributes": {"attr.has_person": false, ...},
     "objects": ["object.electronics.peripheral.keyboard"]}

Rules (seed 004, ``qwen_to_ground_truth.py``):

- the scene string maps through ``scene_map`` (``product -> scene.product``,
  ``people``/``selfie`` -> ``scene.people``, ...); anything unexpected becomes
  ``scene_other`` (``scene.other``);
- booleans map through ``attribute_map`` (``has_person -> attr.has_person``, ...);
- ``objects[*].coarse_type`` maps through ``object_map``, only for objects with
  ``is_main`` true (unless ``include_non_main``) and ``confidence >= min_object_confidence``
  (default 0.7); unmapped types are dropped, duplicates kept once, in answer order.

Only successful annotations become truth: a failed request (any failure kind) is counted
in the stats and never turned into a label.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmrel.io import atomic_path, write_json

log = logging.getLogger(__name__)

#: seed 004's tables
SEED_SCENE_MAP: dict[str, str] = {
    "product": "scene.product",
    "food": "scene.food",
    "people": "scene.people",
    "selfie": "scene.people",
    "animals": "scene.animals",
    "document": "scene.document",
    "screenshot": "scene.screenshot",
}
SEED_ATTRIBUTE_MAP: dict[str, str] = {
    "has_person": "attr.has_person",
    "has_animal": "attr.has_animal",
    "is_document": "attr.is_document",
    "is_screenshot": "attr.is_screenshot",
}
SEED_OBJECT_MAP: dict[str, str] = {
    "keyboard": "object.electronics.peripheral.keyboard",
    "mouse": "object.electronics.peripheral.mouse",
    "monitor": "object.electronics.display.monitor",
    "phone": "object.electronics.phone",
    "laptop": "object.electronics.laptop",
    "tablet": "object.electronics.tablet",
    "food": "object.food",
    "drink": "object.drink",
    "dessert": "object.food.dessert",
}


class TruthError(ValueError):
    """A raw or ground-truth file is malformed; the message names the file and line."""


@dataclass(frozen=True)
class TruthMapping:
    """The mapping tables and thresholds (config ``teacher.ground_truth``)."""

    scene_map: dict[str, str] = field(default_factory=lambda: dict(SEED_SCENE_MAP))
    scene_other: str = "scene.other"
    attribute_map: dict[str, str] = field(default_factory=lambda: dict(SEED_ATTRIBUTE_MAP))
    object_map: dict[str, str] = field(default_factory=lambda: dict(SEED_OBJECT_MAP))
    min_object_confidence: float = 0.7
    include_non_main: bool = False

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> TruthMapping:
        d = dict(d or {})
        names = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(
                f"teacher.ground_truth: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}"
            )
        m = cls(**d)
        if not 0 <= float(m.min_object_confidence) <= 1:
            raise ValueError(
                f"teacher.ground_truth.min_object_confidence: must be in [0, 1], got {m.min_object_confidence}"
            )
        return m

    @property
    def scene_labels(self) -> list[str]:
        """Every scene key the mapping can produce (sorted, ``scene_other`` included)."""
        return sorted({*self.scene_map.values(), self.scene_other})

    @property
    def attribute_labels(self) -> list[str]:
        return sorted(set(self.attribute_map.values()))

    @property
    def object_labels(self) -> list[str]:
        return sorted(set(self.object_map.values()))


def _key(text: Any) -> str:
    return str(text).strip().casefold()


def map_annotation(image_id: str, annotation: Mapping[str, Any], m: TruthMapping) -> dict[str, Any]:
    """One validated annotation -> one ground-truth record (the seed's rules)."""
    scene_maps = {_key(k): v for k, v in m.scene_map.items()}
    object_maps = {_key(k): v for k, v in m.object_map.items()}
    scene = scene_maps.get(_key(annotation.get("scene", "")), m.scene_other)
    attributes = {
        key: bool(annotation[field_])
        for field_, key in m.attribute_map.items()
        if isinstance(annotation.get(field_), bool)
    }
    objects: list[str] = []
    for obj in annotation.get("objects") or []:
        if not (m.include_non_main or obj.get("is_main") is True):
            continue
        conf = obj.get("confidence")
        if not isinstance(conf, int | float) or isinstance(conf, bool) or conf < m.min_object_confidence:
            continue
        label = object_maps.get(_key(obj.get("coarse_type", "")))
        if label is not None and label not in objects:
            objects.append(label)
    return {
        "image_id": image_id,
        "scene": [scene],
        "attributes": dict(sorted(attributes.items())),
        "objects": objects,
    }


# -- jsonl ---------------------------------------------------------------------------------
def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Records of a JSONL file; a bad line raises :class:`TruthError` naming file and line."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{str(p)!r} does not exist")
    out = []
    with open(p, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TruthError(f"{p}: line {n} is not JSON: {exc.msg}") from exc
            if not isinstance(rec, dict):
                raise TruthError(f"{p}: line {n} is not a JSON object")
            out.append(rec)
    return out


def write_jsonl(path: str | os.PathLike[str], records: Iterable[Mapping[str, Any]]) -> None:
    """One compact, key-sorted JSON object per line, written atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec, sort_keys=True, ensure_ascii=False) + "\n")


def read_truth(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Ground truth as JSON (a list) or JSONL, like the seed's eval CLI; records are checked."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"ground truth {str(p)!r} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
        records = data if isinstance(data, list) else None
    except json.JSONDecodeError:
        records = None
    if records is None:
        records = read_jsonl(p)
    for n, rec in enumerate(records):
        if not isinstance(rec, dict) or not isinstance(rec.get("image_id"), str):
            raise TruthError(f"ground truth {p}: record {n} has no string 'image_id'")
        scene = rec.get("scene")
        if isinstance(scene, str):
            rec["scene"] = [scene]
        elif not (isinstance(scene, list) and all(isinstance(s, str) for s in scene)):
            raise TruthError(
                f"ground truth {p}: record {n} ({rec['image_id']}): 'scene' must be a list of keys"
            )
        if not isinstance(rec.get("attributes", {}), dict):
            raise TruthError(
                f"ground truth {p}: record {n} ({rec['image_id']}): 'attributes' must be a mapping"
            )
        if not isinstance(rec.get("objects", []), list):
            raise TruthError(f"ground truth {p}: record {n} ({rec['image_id']}): 'objects' must be a list")
        rec.setdefault("attributes", {})
        rec.setdefault("objects", [])
    ids = Counter(r["image_id"] for r in records)
    dup = [i for i, c in ids.items() if c > 1]
    if dup:
        raise TruthError(f"ground truth {p}: image_id {dup[0]!r} appears {ids[dup[0]]} times")
    return records


# -- raw -> truth --------------------------------------------------------------------------
def raw_to_truth(raw: list[dict[str, Any]], m: TruthMapping) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Map every successful annotation; count failures by kind (they never become labels)."""
    records: list[dict[str, Any]] = []
    failures: Counter[str] = Counter()
    scenes: Counter[str] = Counter()
    objects: Counter[str] = Counter()
    unmapped_scenes: Counter[str] = Counter()
    for rec in raw:
        if rec.get("status") != "ok":
            failures[(rec.get("failure") or {}).get("kind", "error")] += 1
            continue
        ann = rec.get("annotation")
        if not isinstance(ann, dict):
            raise TruthError(f"raw record {rec.get('image_id')!r}: status ok but no annotation")
        if _key(ann.get("scene", "")) not in {_key(k) for k in m.scene_map}:
            unmapped_scenes[str(ann.get("scene"))] += 1
        gt = map_annotation(rec["image_id"], ann, m)
        records.append(gt)
        scenes[gt["scene"][0]] += 1
        objects.update(gt["objects"])
    stats = {
        "n_raw": len(raw),
        "n_truth": len(records),
        "n_failed": sum(failures.values()),
        "failures_by_kind": dict(sorted(failures.items())),
        "scene_counts": dict(sorted(scenes.items())),
        "object_counts": dict(sorted(objects.items())),
        "scenes_mapped_to_other": dict(sorted(unmapped_scenes.items())),
        "min_object_confidence": m.min_object_confidence,
        "include_non_main": m.include_non_main,
    }
    return records, stats


def build_ground_truth(
    raw_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    stats_path: str | os.PathLike[str],
    mapping: Mapping[str, Any] | TruthMapping | None = None,
) -> dict[str, Any]:
    m = mapping if isinstance(mapping, TruthMapping) else TruthMapping.from_dict(mapping)
    records, stats = raw_to_truth(read_jsonl(raw_path), m)
    write_jsonl(out_path, records)
    write_json(stats_path, stats)
    log.info(
        "ground truth: %d records from %d annotations (%d failed: %s)",
        stats["n_truth"],
        stats["n_raw"],
        stats["n_failed"],
        stats["failures_by_kind"],
    )
    return stats


# -- human-review sample -------------------------------------------------------------------
def sample_records(records: list[dict[str, Any]], size: int, seed: int) -> list[dict[str, Any]]:
    """A seeded sample of ``size`` records, bounded by the total (seed 004's review sample).

    Uses its own ``random.Random(seed)`` (never the global generator): the same records,
    size and seed give the same sample on every run.
    """
    if isinstance(size, bool) or int(size) < 0:
        raise ValueError(f"teacher.human.size: must be a non-negative integer, got {size!r}")
    k = min(int(size), len(records))
    return random.Random(seed).sample(records, k)


def write_human_sample(
    truth_path: str | os.PathLike[str], out_path: str | os.PathLike[str], size: int, seed: int
) -> list[dict[str, Any]]:
    sample = sample_records(read_truth(truth_path), size, seed)
    with atomic_path(out_path) as tmp:
        tmp.write_text(json.dumps(sample, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    log.info("human sample: %d records (size %d, seed %d)", len(sample), size, seed)
    return sample
