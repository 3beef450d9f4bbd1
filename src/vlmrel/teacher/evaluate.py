"""Evaluate the heads' predictions against a ground truth (seed 004's eval CLI).

- **scene**: accuracy and the confusion matrix (rows: true scene, columns: predicted,
  over ``labels``); the truth's scene is the first key of its ``scene`` list;
- **attributes**: per attribute key, binary precision, recall and F1 (0 where undefined,
  as scikit-learn's ``zero_division=0``) over the records whose truth has that key;
- **objects**: top-1 and top-3 hit rates: the share of records with at least one true
  object whose k best-ranked predicted object labels contain one of them.

The truth is the audited human truth when the config names one, else the auto truth; the
result says which (``truth``). Against the auto truth the heads saw most records in
training, so a ``heldout`` block repeats the metrics on the validation split only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vlmrel.io import read_json, write_json

from .truth import read_jsonl, read_truth

log = logging.getLogger(__name__)


def confusion_matrix(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    index = {lab: k for k, lab in enumerate(labels)}
    cm = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for t, p in zip(y_true, y_pred, strict=True):
        if t in index and p in index:
            cm[index[t], index[p]] += 1
    return cm


def binary_prf(y_true: Sequence[bool], y_pred: Sequence[bool]) -> dict[str, Any]:
    t = np.asarray(y_true, dtype=bool)
    p = np.asarray(y_pred, dtype=bool)
    tp = int((t & p).sum())
    fp = int((~t & p).sum())
    fn = int((t & ~p).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "support": int(t.sum()),
        "n": int(t.size),
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }


def hit_rate(ranked: Sequence[Sequence[str]], truth: Sequence[Sequence[str]], k: int) -> float | None:
    """Share of records (with at least one true label) whose top ``k`` contains a true label."""
    pairs = [(r, set(t)) for r, t in zip(ranked, truth, strict=True) if t]
    if not pairs:
        return None
    return sum(1 for r, t in pairs if t & set(r[:k])) / len(pairs)


def metrics(
    truth: Sequence[Mapping[str, Any]],
    preds: Mapping[str, Mapping[str, Any]],
    scene_labels: Sequence[str],
    attribute_keys: Sequence[str],
) -> dict[str, Any]:
    """Scene, attribute and object metrics of ``preds`` (by image id) over ``truth`` records."""
    recs = [r for r in truth if r["image_id"] in preds]
    y_true = [r["scene"][0] if r["scene"] else "" for r in recs]
    y_pred = [preds[r["image_id"]]["scene"] for r in recs]
    labels = list(scene_labels) + sorted({s for s in y_true if s and s not in scene_labels})
    cm = confusion_matrix(y_true, y_pred, labels)
    acc = float(np.mean([t == p for t, p in zip(y_true, y_pred, strict=True)])) if recs else None
    attributes = {}
    for key in attribute_keys:
        have = [r for r in recs if isinstance(r["attributes"].get(key), bool)]
        if not have:
            continue
        attributes[key] = binary_prf(
            [r["attributes"][key] for r in have],
            [bool(preds[r["image_id"]]["attributes"][key]) for r in have],
        )
    ranked = [preds[r["image_id"]]["objects_ranked"] for r in recs]
    objs = [r["objects"] for r in recs]
    return {
        "n": len(recs),
        "scene": {"accuracy": acc, "labels": labels, "confusion_matrix": cm.tolist()},
        "attributes": attributes,
        "objects": {
            "top1_hit_rate": hit_rate(ranked, objs, 1),
            "top3_hit_rate": hit_rate(ranked, objs, 3),
            "n_with_objects": sum(1 for o in objs if o),
        },
    }


def evaluate(
    predictions_path: str | os.PathLike[str],
    truth_path: str | os.PathLike[str],
    truth_kind: str,
    card_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
) -> dict[str, Any]:
    if truth_kind not in ("human_audited", "auto"):
        raise ValueError(f"truth kind must be 'human_audited' or 'auto', got {truth_kind!r}")
    card = read_json(card_path)
    truth = read_truth(truth_path)
    preds = {p["image_id"]: p for p in read_jsonl(predictions_path)}
    scene_labels = card["labels"]["scene"]
    attr_keys = list(card["labels"]["attributes"]) + list(card["labels"]["derived_attributes"])
    result: dict[str, Any] = {
        "model": card.get("model"),
        "truth": truth_kind,
        "truth_path": os.fspath(truth_path),
        "n_truth": len(truth),
        "n_missing_predictions": sum(1 for r in truth if r["image_id"] not in preds),
        "training_data_hash": card.get("training_data_hash"),
        "derived_attributes": card["labels"]["derived_attributes"],
        **metrics(truth, preds, scene_labels, attr_keys),
    }
    if truth_kind == "auto":
        result["note"] = (
            "evaluated against the auto (VLM) truth, not audited human truth: the heads were trained on "
            "most of these records; 'heldout' holds the metrics on the validation split alone"
        )
        val = set(card.get("val_ids", []))
        result["heldout"] = metrics(
            [r for r in truth if r["image_id"] in val], preds, scene_labels, attr_keys
        )
    else:
        result["note"] = "evaluated against the audited human truth"
    write_json(out_path, result)
    log.info(
        "eval (%s truth, %d records): scene accuracy %s, object top-1 %s",
        truth_kind,
        result["n"],
        result["scene"]["accuracy"],
        result["objects"]["top1_hit_rate"],
    )
    return result
