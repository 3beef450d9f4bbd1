"""anomaly.image_ood: generated OOD images and the per-group exact metrics (no network needed)."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from vlmrel.anomaly.image_ood import GENERATED_KINDS, evaluate, generated_image


def test_generated_images_are_seeded_and_distinct():
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    for kind in GENERATED_KINDS:
        a = np.asarray(generated_image(kind, 0, 5, photo))
        assert a.shape == (256, 256, 3) and a.dtype == np.uint8
        assert np.array_equal(a, np.asarray(generated_image(kind, 0, 5, photo)))
        assert not np.array_equal(a, np.asarray(generated_image(kind, 1, 5, photo)))
    # shuffled patches keep the photo's pixels, rearranged
    src = np.asarray(photo.resize((256, 256), Image.Resampling.BICUBIC))
    shuffled = np.asarray(generated_image("shuffle", 0, 5, photo))
    assert np.array_equal(np.sort(src, axis=None), np.sort(shuffled, axis=None))
    with pytest.raises(ValueError, match="unknown generated OOD kind 'blur'"):
        generated_image("blur", 0, 5)


def _write(path, logits, groups):
    with h5py.File(path, "w") as f:
        f["logits"] = np.asarray(logits, dtype=np.float32)
        f["ood"] = np.array([g != "photo" for g in groups])
        f.create_dataset(
            "image_id",
            data=np.array([f"i{k}" for k in range(len(groups))], dtype=object),
            dtype=h5py.string_dtype("utf-8"),
        )
        f.create_dataset("group", data=np.array(groups, dtype=object), dtype=h5py.string_dtype("utf-8"))
        f.create_dataset(
            "class_names", data=np.array(["a", "b", "c"], dtype=object), dtype=h5py.string_dtype("utf-8")
        )
        f.attrs["model"] = "fake"


def test_evaluate_pooled_and_per_group(tmp_path):
    # photos are confident, noise is flat (perfectly separated), textures overlap the photos
    photos = [[8, 0, 0], [0, 7, 0], [0, 0, 6], [5, 0, 0]]
    noise = [[0.1, 0, 0], [0, 0.2, 0]]
    texture = [[6.5, 0, 0], [0.3, 0, 0]]
    _write(tmp_path / "l.h5", photos + noise + texture, ["photo"] * 4 + ["noise"] * 2 + ["texture"] * 2)
    out = evaluate(tmp_path / "l.h5", tmp_path / "m.json", tmp_path / "p.tsv", methods=["msp", "maxlogit"])
    assert out["by_group"]["noise"]["msp"]["auroc"] == 1.0
    # texture 0.3 is below every photo (4 of 4 pairs), 6.5 below two of them (8, 7): 6 of 8 pairs
    assert out["by_group"]["texture"]["maxlogit"]["auroc"] == pytest.approx(0.75)
    assert out["pooled"]["msp"]["n_anomaly"] == 4 and out["pooled"]["msp"]["n_normal"] == 4
    assert out["n_images"] == {"photo": 4, "noise": 2, "texture": 2}
    assert json.loads((tmp_path / "m.json").read_text())["model"] == "fake"
    table = pd.read_csv(tmp_path / "p.tsv", sep="\t")
    assert list(table["top1"][:3]) == ["a", "b", "c"] and table["ood"].sum() == 4
    with pytest.raises(ValueError, match="sml"):
        evaluate(tmp_path / "l.h5", tmp_path / "m.json", tmp_path / "p.tsv", methods=["sml"])
