"""StreetHazards importer on a generated folder in the published layout, and its errors."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from PIL import Image

from vlmrel.anomaly import streethazards as SH
from vlmrel.anomaly.io import AnomalyInputError, LabelSpec, SegDataReader

SPEC = LabelSpec(num_classes=13, anomaly_ids=(13,), ignore_ids=())
SIZE = (24, 40)  # H, W


def make_layout(root, n_train=3, n_val=2, n_test=4, seed=0):
    """images/annotations per split as the archives unpack them (1-indexed annotation values)."""
    rng = np.random.default_rng(seed)
    made = {}
    for split, n, sub in (("train", n_train, "t1-3"), ("val", n_val, "t4"), ("test", n_test, "t5")):
        img_dir = root / SH.SPLITS[split]["images"] / sub
        ann_dir = root / SH.SPLITS[split]["annotations"] / sub
        img_dir.mkdir(parents=True)
        ann_dir.mkdir(parents=True)
        made[split] = []
        for i in range(n):
            rgb = rng.integers(0, 256, size=(*SIZE, 3), dtype=np.uint8)
            top = 14 if split == "test" else 13  # the anomaly (file value 14) only in test
            lab = rng.integers(1, top + 1, size=SIZE).astype(np.uint8)
            Image.fromarray(rgb).save(img_dir / f"{i:03d}.png")
            Image.fromarray(lab).save(ann_dir / f"{i:03d}.png")
            made[split].append((rgb, lab))
    return made


def run(root, out, split, **kw):
    return SH.import_split(
        root, out, **SH.SPLITS[split], image_size=SIZE, spec=SPEC, label_offset=1, split=split, **kw
    )


def test_imports_every_split_in_file_order(tmp_path):
    made = make_layout(tmp_path / "sh")
    for split in ("train", "val", "test"):
        summary = run(tmp_path / "sh", tmp_path / f"{split}.h5", split)
        assert summary["n_images"] == len(made[split])
        with SegDataReader(tmp_path / f"{split}.h5") as r:
            images, labels = r.read(slice(0, len(r)))
        for k, (rgb, lab) in enumerate(made[split]):
            np.testing.assert_array_equal(images[k], rgb.transpose(2, 0, 1))
            np.testing.assert_array_equal(labels[k], lab - 1)  # 1-indexed files -> label ids
    assert 13 in summary["label_pixels"]  # the anomaly id, test split


def test_resize_uses_nearest_labels(tmp_path):
    make_layout(tmp_path / "sh", n_test=1)
    run(tmp_path / "sh", tmp_path / "t.h5", "test", resize=(12, 20))
    with SegDataReader(tmp_path / "t.h5") as r:
        images, labels = r.read(slice(0, 1))
    assert images.shape == (1, 3, 12, 20) and labels.max() <= 13


def test_memory_does_not_grow_with_the_split(tmp_path):
    make_layout(tmp_path / "a", n_test=2, seed=1)
    make_layout(tmp_path / "b", n_test=24, seed=2)
    peaks = []
    for name in ("a", "b"):
        tracemalloc.start()
        run(tmp_path / name, tmp_path / f"{name}.h5", "test")
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 1.5 * peaks[0] + 200_000  # 12x the images, about the same peak


@pytest.mark.parametrize(
    "damage,needle",
    [
        ("truncate_image", "cannot be read as an image"),
        ("garbage_annotation", "cannot be read as an image"),
        ("wrong_size", "size 40x23"),
        ("bad_label", "label ids [20]"),
        ("rgb_annotation", "annotation mode RGB"),
        ("missing_annotation", "no annotation"),
    ],
)
def test_a_bad_file_stops_with_its_name_and_the_reason(tmp_path, damage, needle):
    make_layout(tmp_path / "sh", n_test=3)
    img = tmp_path / "sh" / SH.SPLITS["test"]["images"] / "t5" / "001.png"
    ann = tmp_path / "sh" / SH.SPLITS["test"]["annotations"] / "t5" / "001.png"
    bad = img
    if damage == "truncate_image":
        img.write_bytes(img.read_bytes()[:60])
    elif damage == "garbage_annotation":
        ann.write_bytes(b"not a png at all")
        bad = ann
    elif damage == "wrong_size":
        Image.fromarray(np.zeros((SIZE[0] - 1, SIZE[1], 3), np.uint8)).save(img)
    elif damage == "bad_label":
        Image.fromarray(np.full(SIZE, 21, np.uint8)).save(ann)
        bad = ann
    elif damage == "rgb_annotation":
        Image.fromarray(np.ones((*SIZE, 3), np.uint8)).save(ann)
        bad = ann
    elif damage == "missing_annotation":
        ann.unlink()
    out = tmp_path / "test.h5"
    with pytest.raises(AnomalyInputError) as err:
        run(tmp_path / "sh", out, "test")
    assert str(bad) in str(err.value) and needle in str(err.value)
    assert not out.exists()  # no partial file


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(AnomalyInputError, match="no such folder"):
        run(tmp_path / "nothing", tmp_path / "x.h5", "val")
