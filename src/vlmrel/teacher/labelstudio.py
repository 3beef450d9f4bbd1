"""Label Studio: tasks for the human-review sample, the labelling config, and import of an export.

Annotators review the seeded sample in Label Studio. :func:`export_tasks` writes one task
per sampled record (``data.image``: ``image_url_prefix + rel_path``, plus ``image_id`` and
``rel_path``) pre-annotated with the auto truth as a *prediction*, so annotators correct
rather than start from nothing; :func:`label_config` is the matching labelling interface
(single-choice ``scene``, multi-choice ``attributes`` and ``objects``).

:func:`import_export` reads a Label Studio JSON export (``[{"data": ..., "annotations":
[{"result": [...], "was_cancelled": ..., "updated_at": ...}]}]``) and returns audited
records in the seed's ground-truth format: per task the latest annotation that was not
cancelled; attributes checked are true, the others false. Tasks without an annotation or a
scene are left out and counted. :func:`load_audited` accepts either such an export or a
file already in the seed's format (a hand-corrected ``human_sample.json``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

from vlmrel.io import atomic_path

from .truth import TruthError, TruthMapping, read_truth

log = logging.getLogger(__name__)

MODEL_VERSION = "vlmrel-auto-truth"


def label_config(mapping: TruthMapping) -> str:
    """Label Studio labelling config (XML) for scene, attributes and objects."""

    def choices(name: str, values: Sequence[str], single: bool) -> str:
        opts = "\n".join(f"    <Choice value={quoteattr(v)}/>" for v in values)
        kind = "single" if single else "multiple"
        return f'  <Choices name="{name}" toName="image" choice="{kind}" showInline="true">\n{opts}\n  </Choices>'

    return "\n".join(
        [
            "<View>",
            '  <Image name="image" value="$image" zoom="true"/>',
            '  <Header value="Scene"/>',
            choices("scene", mapping.scene_labels, True),
            '  <Header value="Attributes (checked means true)"/>',
            choices("attributes", mapping.attribute_labels, False),
            '  <Header value="Objects (main subjects)"/>',
            choices("objects", mapping.object_labels, False),
            "</View>",
            "",
        ]
    )


def _result(name: str, values: list[str]) -> dict[str, Any]:
    return {"from_name": name, "to_name": "image", "type": "choices", "value": {"choices": values}}


def tasks_for(
    records: Sequence[Mapping[str, Any]], rel_paths: Mapping[str, str], image_url_prefix: str
) -> list[dict[str, Any]]:
    tasks = []
    for rec in records:
        iid = rec["image_id"]
        if iid not in rel_paths:
            raise TruthError(f"Label Studio tasks: image {iid!r} is not in the manifest")
        attrs_true = [k for k, v in sorted(rec.get("attributes", {}).items()) if v]
        tasks.append(
            {
                "data": {
                    "image": image_url_prefix + rel_paths[iid],
                    "image_id": iid,
                    "rel_path": rel_paths[iid],
                },
                "predictions": [
                    {
                        "model_version": MODEL_VERSION,
                        "result": [
                            _result("scene", list(rec["scene"][:1])),
                            _result("attributes", attrs_true),
                            _result("objects", list(rec.get("objects", []))),
                        ],
                    }
                ],
            }
        )
    return tasks


def export_tasks(
    sample_path: str | os.PathLike[str],
    manifest_path: str | os.PathLike[str],
    tasks_path: str | os.PathLike[str],
    config_path: str | os.PathLike[str],
    mapping: TruthMapping,
    image_url_prefix: str,
) -> int:
    from vlmrel.images import read_manifest

    df = read_manifest(manifest_path)
    rel = dict(zip(df["image_id"], df["rel_path"], strict=True))
    tasks = tasks_for(read_truth(sample_path), rel, image_url_prefix)
    with atomic_path(tasks_path) as tmp:
        tmp.write_text(json.dumps(tasks, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with atomic_path(config_path) as tmp:
        tmp.write_text(label_config(mapping), encoding="utf-8")
    return len(tasks)


def _choices(result: Sequence[Mapping[str, Any]], name: str) -> list[str] | None:
    for item in result:
        if item.get("from_name") == name and item.get("type", "choices") == "choices":
            values = (item.get("value") or {}).get("choices")
            if isinstance(values, list):
                return [str(v) for v in values]
    return None


def _latest(annotations: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    done = [a for a in annotations if isinstance(a, Mapping) and not a.get("was_cancelled")]
    if not done:
        return None
    return max(
        enumerate(done), key=lambda p: (str(p[1].get("updated_at") or p[1].get("created_at") or ""), p[0])
    )[1]


def import_export(
    data: Any, attribute_labels: Sequence[str], source: str = "<export>"
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Label Studio JSON export -> audited truth records and counts of what was skipped."""
    if not isinstance(data, list):
        raise TruthError(f"Label Studio export {source}: expected a JSON list of tasks")
    out: list[dict[str, Any]] = []
    skipped = {"no_annotation": 0, "no_scene": 0}
    seen: set[str] = set()
    for n, task in enumerate(data):
        if not isinstance(task, Mapping):
            raise TruthError(f"Label Studio export {source}: task {n} is not an object")
        iid = (task.get("data") or {}).get("image_id")
        if not isinstance(iid, str):
            raise TruthError(f"Label Studio export {source}: task {n} has no data.image_id")
        ann = _latest(task.get("annotations") or [])
        if ann is None:
            skipped["no_annotation"] += 1
            continue
        result = ann.get("result") or []
        scene = _choices(result, "scene")
        if not scene:
            skipped["no_scene"] += 1
            continue
        if iid in seen:
            raise TruthError(f"Label Studio export {source}: image_id {iid!r} appears in more than one task")
        seen.add(iid)
        checked = set(_choices(result, "attributes") or [])
        unknown = checked - set(attribute_labels)
        if unknown:
            raise TruthError(
                f"Label Studio export {source}: task {n} ({iid}) checks unknown attribute(s) {sorted(unknown)}"
            )
        out.append(
            {
                "image_id": iid,
                "scene": scene[:1],
                "attributes": {a: a in checked for a in sorted(attribute_labels)},
                "objects": _choices(result, "objects") or [],
            }
        )
    return out, skipped


def is_label_studio_export(data: Any) -> bool:
    return isinstance(data, list) and any(isinstance(t, Mapping) and "annotations" in t for t in data)


def load_audited(
    path: str | os.PathLike[str], out_path: str | os.PathLike[str], mapping: TruthMapping
) -> dict[str, Any]:
    """Audited truth from a Label Studio export or a seed-format file, written as a JSON list."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"teacher.human.audited: {str(p)!r} does not exist")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        data = None
    if is_label_studio_export(data):
        records, skipped = import_export(data, mapping.attribute_labels, str(p))
        fmt = "label_studio"
    else:
        records, skipped, fmt = read_truth(p), {}, "ground_truth"
    if not records:
        raise TruthError(f"teacher.human.audited: {str(p)!r} holds no usable audited record")
    with atomic_path(out_path) as tmp:
        tmp.write_text(json.dumps(records, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    log.info("audited truth from %s (%s): %d records, skipped %s", p, fmt, len(records), skipped)
    return {"format": fmt, "n": len(records), "skipped": skipped}
