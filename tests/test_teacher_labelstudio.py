"""Label Studio tasks export, labelling config, and import of an export as audited truth."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from vlmrel.teacher.labelstudio import import_export, label_config, load_audited, tasks_for
from vlmrel.teacher.truth import TruthError, TruthMapping, read_truth

ATTRS = TruthMapping().attribute_labels


def rec(iid, scene="scene.food", person=False, objects=()):
    return {
        "image_id": iid,
        "scene": [scene],
        "attributes": {"attr.has_person": person, "attr.has_animal": False, "attr.is_document": False},
        "objects": list(objects),
    }


def annotated(task, result, cancelled=False, updated="2026-01-01T00:00:00Z"):
    return {**task, "annotations": [{"result": result, "was_cancelled": cancelled, "updated_at": updated}]}


def test_label_config_is_xml_with_every_label():
    m = TruthMapping()
    root = ET.fromstring(label_config(m))
    names = {c.get("name"): [ch.get("value") for ch in c] for c in root.iter("Choices")}
    assert names["scene"] == m.scene_labels and names["attributes"] == m.attribute_labels
    assert names["objects"] == m.object_labels
    assert root.find("Image").get("value") == "$image"


def test_tasks_carry_the_auto_truth_as_prediction():
    tasks = tasks_for(
        [rec("a", person=True, objects=["object.food"])], {"a": "x/a.jpg"}, "/data/local-files/?d="
    )
    t = tasks[0]
    assert t["data"] == {"image": "/data/local-files/?d=x/a.jpg", "image_id": "a", "rel_path": "x/a.jpg"}
    res = {r["from_name"]: r["value"]["choices"] for r in t["predictions"][0]["result"]}
    assert res == {"scene": ["scene.food"], "attributes": ["attr.has_person"], "objects": ["object.food"]}
    with pytest.raises(TruthError, match="not in the manifest"):
        tasks_for([rec("b")], {"a": "x/a.jpg"}, "")


def test_import_round_trip_with_corrections():
    tasks = tasks_for([rec("a"), rec("b"), rec("c"), rec("d")], {k: f"{k}.jpg" for k in "abcd"}, "")

    def res(scene, attrs, objs):
        return [
            {"from_name": "scene", "to_name": "image", "type": "choices", "value": {"choices": [scene]}},
            {"from_name": "attributes", "to_name": "image", "type": "choices", "value": {"choices": attrs}},
            {"from_name": "objects", "to_name": "image", "type": "choices", "value": {"choices": objs}},
        ]

    export = [
        annotated(tasks[0], res("scene.product", ["attr.has_person"], ["object.electronics.phone"])),
        {**tasks[1], "annotations": []},  # never annotated
        {
            **tasks[2],
            "annotations": [  # the latest annotation that was not cancelled wins
                {"result": res("scene.people", [], []), "updated_at": "2026-01-02T00:00:00Z"},
                {
                    "result": res("scene.animals", ["attr.has_animal"], []),
                    "updated_at": "2026-01-03T00:00:00Z",
                },
                {
                    "result": res("scene.other", [], []),
                    "updated_at": "2026-01-04T00:00:00Z",
                    "was_cancelled": True,
                },
            ],
        },
        annotated(
            tasks[3], [{"from_name": "objects", "type": "choices", "value": {"choices": []}}]
        ),  # no scene
    ]
    records, skipped = import_export(export, ATTRS)
    assert skipped == {"no_annotation": 1, "no_scene": 1}
    assert records[0] == {
        "image_id": "a",
        "scene": ["scene.product"],
        "attributes": {a: a == "attr.has_person" for a in sorted(ATTRS)},
        "objects": ["object.electronics.phone"],
    }
    assert records[1]["scene"] == ["scene.animals"] and records[1]["attributes"]["attr.has_animal"] is True


def test_import_errors_name_the_task():
    with pytest.raises(TruthError, match="task 0 has no data.image_id"):
        import_export([{"data": {}, "annotations": []}], ATTRS)
    bad = [
        {
            "data": {"image_id": "a"},
            "annotations": [
                {
                    "result": [
                        {"from_name": "scene", "value": {"choices": ["scene.food"]}},
                        {"from_name": "attributes", "value": {"choices": ["attr.typo"]}},
                    ]
                }
            ],
        }
    ]
    with pytest.raises(TruthError, match=r"task 0 \(a\).*attr.typo"):
        import_export(bad, ATTRS)


def test_load_audited_accepts_export_or_truth_file(tmp_path):
    m = TruthMapping()
    export = [
        annotated({"data": {"image_id": "a"}}, [{"from_name": "scene", "value": {"choices": ["scene.food"]}}])
    ]
    (tmp_path / "export.json").write_text(json.dumps(export))
    info = load_audited(tmp_path / "export.json", tmp_path / "out1.json", m)
    assert info["format"] == "label_studio" and read_truth(tmp_path / "out1.json")[0]["scene"] == [
        "scene.food"
    ]
    (tmp_path / "fixed.json").write_text(json.dumps([rec("z")]))
    info = load_audited(tmp_path / "fixed.json", tmp_path / "out2.json", m)
    assert info["format"] == "ground_truth" and read_truth(tmp_path / "out2.json") == [rec("z")]
    with pytest.raises(FileNotFoundError, match="teacher.human.audited"):
        load_audited(tmp_path / "missing.json", tmp_path / "out3.json", m)
