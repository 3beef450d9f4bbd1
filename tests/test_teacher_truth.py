"""Seed 004's mapping, thresholds and review sampling."""

from __future__ import annotations

import json
import random

import pytest

from vlmrel.teacher.truth import (
    SEED_OBJECT_MAP,
    SEED_SCENE_MAP,
    TruthError,
    TruthMapping,
    build_ground_truth,
    map_annotation,
    raw_to_truth,
    read_jsonl,
    read_truth,
    sample_records,
    write_human_sample,
    write_jsonl,
)


def obj(coarse, main=True, conf=0.9, name="x"):
    return {"name_free": name, "coarse_type": coarse, "is_main": main, "confidence": conf}


def ann(scene="product", objects=(), person=False, animal=False, doc=False, shot=False):
    return {
        "scene": scene,
        "has_person": person,
        "has_animal": animal,
        "is_document": doc,
        "is_screenshot": shot,
        "objects": list(objects),
    }


def test_defaults_are_the_seed_tables():
    m = TruthMapping()
    assert m.scene_map == SEED_SCENE_MAP and m.object_map == SEED_OBJECT_MAP
    assert m.min_object_confidence == 0.7 and m.include_non_main is False
    assert m.scene_other == "scene.other"


@pytest.mark.parametrize(
    "scene,key",
    [
        ("product", "scene.product"),
        ("food", "scene.food"),
        ("people", "scene.people"),
        ("selfie", "scene.people"),
        ("animals", "scene.animals"),
        ("document", "scene.document"),
        ("screenshot", "scene.screenshot"),
        ("other", "scene.other"),
        ("landscape", "scene.other"),
        ("", "scene.other"),
        (" Food ", "scene.food"),
    ],
)
def test_scene_mapping(scene, key):
    assert map_annotation("a", ann(scene=scene), TruthMapping())["scene"] == [key]


def test_seed_example_record():
    a = ann(scene="product", objects=[obj("keyboard", True, 0.92, "mechanical keyboard")])
    rec = map_annotation("8f14e45fceea167a5a36dedd4bea2543", a, TruthMapping())
    assert rec == {
        "image_id": "8f14e45fceea167a5a36dedd4bea2543",
        "scene": ["scene.product"],
        "attributes": {
            "attr.has_animal": False,
            "attr.has_person": False,
            "attr.is_document": False,
            "attr.is_screenshot": False,
        },
        "objects": ["object.electronics.peripheral.keyboard"],
    }


def test_booleans_map_to_attributes():
    rec = map_annotation("a", ann(person=True, animal=True, doc=False, shot=True), TruthMapping())
    assert rec["attributes"] == {
        "attr.has_person": True,
        "attr.has_animal": True,
        "attr.is_document": False,
        "attr.is_screenshot": True,
    }


def test_object_threshold_main_and_unmapped():
    objects = [
        obj("keyboard", True, 0.7),  # at the threshold: kept (>=)
        obj("mouse", True, 0.69999),  # below: dropped
        obj("monitor", False, 0.99),  # not main: dropped by default
        obj("spaceship", True, 0.99),  # unmapped: dropped
        obj("Keyboard", True, 0.95),  # duplicate label: kept once
        obj("phone", True, 1.0),
    ]
    rec = map_annotation("a", ann(objects=objects), TruthMapping())
    assert rec["objects"] == ["object.electronics.peripheral.keyboard", "object.electronics.phone"]
    rec = map_annotation("a", ann(objects=objects), TruthMapping(include_non_main=True))
    assert rec["objects"] == [
        "object.electronics.peripheral.keyboard",
        "object.electronics.display.monitor",
        "object.electronics.phone",
    ]
    rec = map_annotation("a", ann(objects=objects), TruthMapping(min_object_confidence=0.5))
    assert "object.electronics.peripheral.mouse" in rec["objects"]


def test_mapping_from_config_rejects_unknown_keys_and_bad_threshold():
    with pytest.raises(ValueError, match="unknown key.*min_confidence"):
        TruthMapping.from_dict({"min_confidence": 0.5})
    with pytest.raises(ValueError, match="min_object_confidence"):
        TruthMapping.from_dict({"min_object_confidence": 1.5})


def test_failures_never_become_labels(tmp_path):
    raw = [
        {
            "image_id": "a",
            "rel_path": "a.jpg",
            "status": "ok",
            "annotation": ann(scene="food", objects=[obj("food")]),
        },
        {
            "image_id": "b",
            "rel_path": "b.jpg",
            "status": "failed",
            "failure": {"kind": "malformed_json", "error": "x"},
        },
        {
            "image_id": "c",
            "rel_path": "c.jpg",
            "status": "failed",
            "failure": {"kind": "schema_violation", "error": "y"},
        },
        {
            "image_id": "d",
            "rel_path": "d.jpg",
            "status": "failed",
            "failure": {"kind": "malformed_json", "error": "z"},
        },
    ]
    write_jsonl(tmp_path / "raw.jsonl", raw)
    stats = build_ground_truth(tmp_path / "raw.jsonl", tmp_path / "gt.jsonl", tmp_path / "s.json", {})
    gt = read_jsonl(tmp_path / "gt.jsonl")
    assert [g["image_id"] for g in gt] == ["a"]
    assert stats["failures_by_kind"] == {"malformed_json": 2, "schema_violation": 1}
    assert stats["n_failed"] == 3 and stats["n_truth"] == 1
    assert json.loads((tmp_path / "s.json").read_text())["scene_counts"] == {"scene.food": 1}


def test_ok_record_without_annotation_is_an_error():
    with pytest.raises(TruthError, match="'x'.*no annotation"):
        raw_to_truth([{"image_id": "x", "status": "ok"}], TruthMapping())


def test_sample_is_seeded_bounded_and_uses_no_global_rng():
    records = [{"image_id": f"i{k}", "scene": ["scene.other"]} for k in range(50)]
    random.seed(1)
    a = sample_records(records, 10, seed=42)
    random.seed(2)
    b = sample_records(records, 10, seed=42)
    assert a == b == random.Random(42).sample(records, 10)
    assert len({r["image_id"] for r in a}) == 10
    assert sample_records(records, 10, seed=43) != a
    assert len(sample_records(records, 1000, seed=42)) == 50  # bounded by the total
    assert sample_records(records, 0, seed=42) == []
    with pytest.raises(ValueError, match="size"):
        sample_records(records, -1, seed=0)


def test_human_sample_file_is_a_json_list(tmp_path):
    recs = [{"image_id": f"i{k}", "scene": ["scene.food"], "attributes": {}, "objects": []} for k in range(5)]
    write_jsonl(tmp_path / "gt.jsonl", recs)
    sample = write_human_sample(tmp_path / "gt.jsonl", tmp_path / "h.json", 3, 7)
    assert json.loads((tmp_path / "h.json").read_text()) == sample
    assert len(sample) == 3
    assert read_truth(tmp_path / "h.json") == sample  # JSON list and JSONL both read


def test_read_truth_errors_name_the_file(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"image_id": "a", "scene": ["scene.food"]}\nnot json\n')
    with pytest.raises(TruthError, match="bad.jsonl: line 2"):
        read_truth(p)
    p.write_text('[{"image_id": "a", "scene": 3}]')
    with pytest.raises(TruthError, match="'scene' must be a list"):
        read_truth(p)
    p.write_text('[{"image_id": "a", "scene": ["s"]}, {"image_id": "a", "scene": ["s"]}]')
    with pytest.raises(TruthError, match="appears 2 times"):
        read_truth(p)
