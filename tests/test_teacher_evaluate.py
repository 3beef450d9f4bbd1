"""Evaluation metrics match scikit-learn; hit rates; eval.json says which truth it used."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, precision_recall_fscore_support
from sklearn.metrics import confusion_matrix as sk_confusion

from vlmrel.io import write_json
from vlmrel.teacher.evaluate import binary_prf, confusion_matrix, evaluate, hit_rate, metrics
from vlmrel.teacher.truth import write_jsonl

LABELS = ["scene.a", "scene.b", "scene.c", "scene.d"]
ATTRS = ["attr.x", "attr.y", "attr.rare"]


def random_case(seed: int, n: int = 200):
    rng = np.random.default_rng(seed)
    truth, preds = [], {}
    for k in range(n):
        iid = f"i{k}"
        t_attr = {"attr.x": bool(rng.random() < 0.5), "attr.y": bool(rng.random() < 0.2), "attr.rare": False}
        truth.append(
            {
                "image_id": iid,
                "scene": [LABELS[rng.integers(0, 4)]],
                "attributes": t_attr,
                "objects": list(
                    rng.choice(["o1", "o2", "o3", "o4", "o5"], size=rng.integers(0, 3), replace=False)
                ),
            }
        )
        preds[iid] = {
            "image_id": iid,
            "scene": LABELS[rng.integers(0, 4)] if rng.random() < 0.5 else truth[-1]["scene"][0],
            "attributes": {a: bool(rng.random() < 0.4) for a in ATTRS},
            "objects_ranked": list(rng.permutation(["o1", "o2", "o3", "o4", "o5"])),
        }
    return truth, preds


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scene_and_attribute_metrics_match_sklearn(seed):
    truth, preds = random_case(seed)
    m = metrics(truth, preds, LABELS, ATTRS)
    y_true = [t["scene"][0] for t in truth]
    y_pred = [preds[t["image_id"]]["scene"] for t in truth]
    assert m["scene"]["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert np.array_equal(
        np.array(m["scene"]["confusion_matrix"]), sk_confusion(y_true, y_pred, labels=LABELS)
    )
    for a in ATTRS:
        t = [r["attributes"][a] for r in truth]
        p = [preds[r["image_id"]]["attributes"][a] for r in truth]
        prec, rec, f1, _ = precision_recall_fscore_support(t, p, average="binary", zero_division=0)
        got = m["attributes"][a]
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((prec, rec, f1))
        assert got["support"] == sum(t)


def test_binary_prf_edge_cases_match_sklearn():
    for t, p in [([0, 0, 0], [0, 0, 0]), ([1, 1], [0, 0]), ([0, 0], [1, 1]), ([1, 0, 1], [1, 1, 1])]:
        got = binary_prf([bool(v) for v in t], [bool(v) for v in p])
        prec, rec, f1, _ = precision_recall_fscore_support(t, p, average="binary", zero_division=0)
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((prec, rec, f1))


def test_confusion_matrix_ignores_unknown_labels_like_sklearn():
    t, p = ["a", "b", "z", "a"], ["a", "a", "a", "z"]
    assert np.array_equal(confusion_matrix(t, p, ["a", "b"]), sk_confusion(t, p, labels=["a", "b"]))


def test_hit_rates():
    ranked = [["o1", "o2", "o3"], ["o2", "o1", "o3"], ["o3", "o2", "o1"], ["o1", "o2", "o3"]]
    truth = [["o1"], ["o1"], ["o4"], []]  # the last has no true object: not counted
    assert hit_rate(ranked, truth, 1) == pytest.approx(1 / 3)
    assert hit_rate(ranked, truth, 3) == pytest.approx(2 / 3)
    assert hit_rate(ranked, [[], [], [], []], 1) is None


def _card(tmp_path, val_ids=()):
    card = {
        "model": "m",
        "labels": {
            "scene": LABELS,
            "attributes": ["attr.x", "attr.y"],
            "derived_attributes": {"attr.rare": "scene.d"},
            "objects": ["o1", "o2"],
        },
        "val_ids": list(val_ids),
        "training_data_hash": "h",
    }
    write_json(tmp_path / "card.json", card)
    return tmp_path / "card.json"


def test_evaluate_says_which_truth(tmp_path):
    truth, preds = random_case(5, n=40)
    write_jsonl(tmp_path / "pred.jsonl", preds.values())
    write_jsonl(tmp_path / "auto.jsonl", truth)
    (tmp_path / "human.json").write_text(json.dumps(truth[:10]))
    card = _card(tmp_path, val_ids=[t["image_id"] for t in truth[:8]])
    auto = evaluate(tmp_path / "pred.jsonl", tmp_path / "auto.jsonl", "auto", card, tmp_path / "e1.json")
    assert auto["truth"] == "auto" and auto["n"] == 40 and auto["heldout"]["n"] == 8
    assert "auto" in auto["note"]
    human = evaluate(
        tmp_path / "pred.jsonl", tmp_path / "human.json", "human_audited", card, tmp_path / "e2.json"
    )
    assert human["truth"] == "human_audited" and human["n"] == 10 and "heldout" not in human
    assert json.loads((tmp_path / "e2.json").read_text())["truth"] == "human_audited"
    with pytest.raises(ValueError, match="truth kind"):
        evaluate(tmp_path / "pred.jsonl", tmp_path / "auto.jsonl", "guess", card, tmp_path / "e3.json")


def test_records_without_prediction_are_counted(tmp_path):
    truth, preds = random_case(6, n=10)
    del preds["i0"], preds["i1"]
    write_jsonl(tmp_path / "pred.jsonl", preds.values())
    write_jsonl(tmp_path / "auto.jsonl", truth)
    ev = evaluate(
        tmp_path / "pred.jsonl", tmp_path / "auto.jsonl", "auto", _card(tmp_path), tmp_path / "e.json"
    )
    assert ev["n"] == 8 and ev["n_missing_predictions"] == 2
