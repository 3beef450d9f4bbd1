"""Loaders (parquet, classic refs pickle with the restricted unpickler), demo scenes, subsets."""

import io
import json
import os
import pickle
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlmrel.grounding.data import (
    demo_locate,
    difficulty,
    load_classic,
    load_parquet,
    make_demo_scenes,
    read_subset,
    restricted_load,
    select_subset,
    write_demo_parquet,
    write_subset,
)
from vlmrel.grounding.iou import iou
from vlmrel.grounding.perturb import Perturbation, apply_perturbation


def _png(w, h, color=(10, 20, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def _hf_shard(path, rows):
    table = pa.table(
        {
            "question_id": [r[0] for r in rows],
            "image": [{"bytes": _png(*r[1]), "path": None} for r in rows],
            "question": ["q"] * len(rows),
            "answer": [r[2] for r in rows],
            "bbox": [r[3] for r in rows],
            "file_name": ["x.jpg"] * len(rows),
        }
    )
    pq.write_table(table, path)


def test_parquet_layout_shards_in_order(tmp_path):
    d = tmp_path / "val"
    d.mkdir()
    _hf_shard(d / "val-00001-of-00002.parquet", [("q2", (40, 30), ["c"], [0, 0, 4, 3])])
    _hf_shard(
        d / "val-00000-of-00002.parquet",
        [
            ("q0", (64, 48), ["guy in plaid", "mr plaid"], [8, 4.5, 16, 20]),
            ("q1", (50, 50), ["b"], [1, 2, 3, 4]),
        ],
    )
    samples = load_parquet(d)
    assert [s.sample_id for s in samples] == ["q0", "q1", "q2"]
    assert [s.index for s in samples] == [0, 1, 2]
    s0 = samples[0]
    assert s0.expressions == ["guy in plaid", "mr plaid"] and s0.expression == "guy in plaid"
    assert s0.bbox == (8.0, 4.5, 24.0, 24.5)  # COCO xywh -> xyxy
    assert (s0.width, s0.height) == (64, 48)
    assert s0.bbox_norm == pytest.approx((8 / 64, 4.5 / 48, 24 / 64, 24.5 / 48))
    assert s0.area_fraction == pytest.approx(16 * 20 / (64 * 48))
    assert s0.image().size == (64, 48)
    only = load_parquet(d, indices=[2], keep_images=False)
    assert [s.sample_id for s in only] == ["q2"] and only[0]._image_bytes is None


def test_parquet_row_groups_subset_and_duplicate_ids(tmp_path):
    rows = [(f"q{i % 5}", (8 + i, 8), [f"e{i}"], [0, 0, 2, 2]) for i in range(12)]  # ids repeat
    table = pa.table(
        {
            "question_id": [r[0] for r in rows],
            "image": [{"bytes": _png(*r[1]), "path": None} for r in rows],
            "answer": [r[2] for r in rows],
            "bbox": [r[3] for r in rows],
        }
    )
    pq.write_table(table, tmp_path / "rg.parquet", row_group_size=3)
    sub = load_parquet(tmp_path / "rg.parquet", indices=[10, 1, 7])
    assert [s.index for s in sub] == [1, 7, 10]
    assert [s.expression for s in sub] == ["e1", "e7", "e10"] and sub[2].width == 18
    assert [s.sample_id for s in sub] == ["row000001", "row000007", "row000010"]  # ids not unique overall
    with pytest.raises(ValueError, match="beyond"):
        load_parquet(tmp_path / "rg.parquet", indices=[3, 12])


def test_parquet_errors_name_file_and_row(tmp_path):
    p = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"image": [{"bytes": _png(8, 8), "path": None}], "answer": [["x"]]}), p)
    with pytest.raises(ValueError, match=r"bad.parquet.*missing column.*bbox"):
        load_parquet(p)
    p2 = tmp_path / "bad2.parquet"
    _hf_shard(p2, [("q", (8, 8), ["x"], [1, 1, 0, 3])])
    with pytest.raises(ValueError, match=r"bad2.parquet row 0: empty bbox"):
        load_parquet(p2)
    with pytest.raises(FileNotFoundError):
        load_parquet(tmp_path / "nope.parquet")


def _classic_files(tmp_path):
    refs = [
        {
            "ref_id": 5,
            "ann_id": 100,
            "image_id": 1,
            "split": "val",
            "sent_ids": [1, 2],
            "category_id": 1,
            "file_name": "COCO_train2014_000000000001_100.jpg",
            "sentences": [{"sent": "left dog", "raw": "Left dog", "tokens": ["left", "dog"], "sent_id": 1}],
        },
        {"ref_id": 6, "ann_id": 101, "image_id": 1, "split": "train", "sentences": [{"sent": "x"}]},
        {
            "ref_id": 7,
            "ann_id": 101,
            "image_id": 1,
            "split": "val",
            "sentences": [{"sent": "cat"}, {"sent": "the cat"}],
        },
    ]
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    inst = {
        "images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "width": 40, "height": 20}],
        "annotations": [
            {"id": 100, "image_id": 1, "bbox": [2, 3, 10, 5]},
            {"id": 101, "image_id": 1, "bbox": [0, 0, 40, 20]},
        ],
    }
    (tmp_path / "instances.json").write_text(json.dumps(inst))
    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 20)).save(tmp_path / "images" / "COCO_train2014_000000000001.jpg")


def test_classic_layout(tmp_path):
    _classic_files(tmp_path)
    samples = load_classic(
        tmp_path / "refs(unc).p", tmp_path / "instances.json", tmp_path / "images", split="val"
    )
    assert [s.sample_id for s in samples] == ["ref5", "ref7"]
    assert samples[0].expressions == ["left dog"] and samples[1].expressions == ["cat", "the cat"]
    assert samples[0].bbox == (2.0, 3.0, 12.0, 8.0)
    assert samples[0].image().size == (40, 20)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    p = tmp_path / "refs(unc).p"
    p.write_bytes(pickle.dumps([{"ref_id": 1, "x": _Evil(marker)}], protocol=2))
    with pytest.raises(pickle.UnpicklingError, match=r"refs\(unc\)\.p.*refused global (posix|nt|os)\.system"):
        restricted_load(p)
    assert not marker.exists()
    # other globals (classes) are refused too; plain containers, sets and numbers pass
    p.write_bytes(pickle.dumps(Counter(a=1), protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="collections.Counter"):
        restricted_load(p)
    ok = {"a": [1, 2.5, (3, None)], "b": {4, 5}, "c": frozenset([1]), "d": True, "e": "text", "f": 2**70}
    p.write_bytes(pickle.dumps(ok, protocol=2))
    assert restricted_load(p) == ok


def test_difficulty_and_stratified_subset(tmp_path):
    assert [difficulty(f, (0.05, 0.2)) for f in (0.01, 0.05, 0.19, 0.2, 0.9)] == [
        "hard",
        "medium",
        "medium",
        "easy",
        "easy",
    ]
    with pytest.raises(ValueError):
        difficulty(0.1, (0.3, 0.2))
    rng = np.random.default_rng(0)
    diffs = rng.choice(["easy", "medium", "hard"], size=500, p=[0.5, 0.3, 0.2]).tolist()
    sub = select_subset(diffs, 99, seed=3)
    assert len(sub) == 99 == len(set(sub)) and sub == sorted(sub)
    assert Counter(diffs[i] for i in sub) == {"easy": 33, "medium": 33, "hard": 33}
    assert select_subset(diffs, 99, seed=3) == sub and select_subset(diffs, 99, seed=4) != sub
    prop = select_subset(diffs, 50, seed=0, allocation="proportional")
    n = Counter(diffs)
    exp = {d: 50 * n[d] / 500 for d in n}
    assert all(abs(Counter(diffs[i] for i in prop)[d] - exp[d]) < 1 for d in n)
    # a small stratum gives what it has, the rest is spread
    few = ["hard"] * 2 + ["easy"] * 30 + ["medium"] * 30
    c = Counter(few[i] for i in select_subset(few, 51, seed=0))
    assert c["hard"] == 2 and c["easy"] + c["medium"] == 49
    with pytest.raises(ValueError, match="requested"):
        select_subset(few, 100)


def test_subset_files(tmp_path):
    write_demo_parquet(tmp_path / "demo.parquet", 6, seed=1, size=(96, 64))
    samples = load_parquet(tmp_path / "demo.parquet")
    write_subset(tmp_path / "subset.json", "small", samples, [1, 4], seed=0)
    data = json.loads((tmp_path / "subset.json").read_text())
    assert (
        data["indices"] == [1, 4]
        and data["sample_ids"] == ["demo00001", "demo00004"]
        and data["name"] == "small"
    )
    assert read_subset(tmp_path / "subset.json") == [1, 4]
    np.save(tmp_path / "small_subset_indices.npy", np.array([3, 1, 4]))
    assert read_subset(tmp_path / "small_subset_indices.npy") == [3, 1, 4]
    np.save(tmp_path / "obj.npy", np.array([[1.5]]))
    with pytest.raises(ValueError, match="integer"):
        read_subset(tmp_path / "obj.npy")


def test_demo_scenes_have_exact_boxes_and_can_be_answered(tmp_path):
    scenes = make_demo_scenes(12, seed=5, size=(160, 120))
    assert make_demo_scenes(2, seed=5, size=(160, 120))[1]["bbox_xyxy"] == scenes[1]["bbox_xyxy"]
    fracs = []
    for sc in scenes:
        box = sc["bbox_xyxy"]
        found = demo_locate(sc["image"], sc["answer"][0])
        assert found == tuple(box)  # exact on the original image
        fracs.append((box[2] - box[0]) * (box[3] - box[1]) / (160 * 120))
        pert = apply_perturbation(
            sc["image"], Perturbation("bc", {"brightness": -0.3, "contrast": 0.7}), sample_id="x"
        )
        assert iou(demo_locate(pert, sc["answer"][1]), box) > 0.9
    assert min(fracs) < 0.05 and max(fracs) > 0.2  # every difficulty occurs
    write_demo_parquet(tmp_path / "d.parquet", 3, seed=5, size=(160, 120))
    loaded = load_parquet(tmp_path / "d.parquet")
    assert [list(s.bbox) for s in loaded] == [scenes[i]["bbox_xyxy"] for i in range(3)]
    assert np.array_equal(np.asarray(loaded[0].image()), np.asarray(scenes[0]["image"]))
