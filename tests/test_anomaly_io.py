"""Logits files: validation errors that name file and reason, ignore ids, and the logits producer."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from vlmrel.anomaly.evaluate import evaluate_segmentation
from vlmrel.anomaly.io import AnomalyInputError, LabelSpec, SegLogitsReader, write_seg_data

SPEC = LabelSpec(num_classes=4, anomaly_ids=(4,), ignore_ids=(255,))


def write_logits(path, logits, labels, **attrs):
    with h5py.File(path, "w") as f:
        f.create_dataset("logits", data=logits, chunks=(1, *logits.shape[1:]))
        f.create_dataset("labels", data=labels)
        for k, v in attrs.items():
            f.attrs[k] = v
    return path


def random_set(rng, n=3, c=4, h=8, w=10, dtype=np.float16):
    logits = rng.normal(0, 2, size=(n, c, h, w)).astype(dtype)
    labels = rng.integers(0, c, size=(n, h, w)).astype(np.uint8)
    labels[:, :2, :3] = 4  # anomaly patch
    labels[:, -1, :] = 255  # ignored row
    return logits, labels


def test_ignore_ids_are_left_out(tmp_path):
    logits, labels = random_set(np.random.default_rng(0))
    logits[:, :, -1, :] = 0  # the ignored row looks maximally anomalous: it must not count
    path = write_logits(tmp_path / "l.h5", logits, labels)
    ev = evaluate_segmentation(path, SPEC, ["maxlogit"], max_block_mb=0.001)  # one image per read
    z = logits.astype(np.float32)
    score = -z.max(axis=1)
    keep = labels != 255
    ref = roc_auc_score((labels == 4)[keep], score[keep].astype(np.float16))
    assert ev.pooled["maxlogit"]["auroc"] == pytest.approx(ref, abs=1e-12)
    assert ev.pooled["maxlogit"]["n_normal"] + ev.pooled["maxlogit"]["n_anomaly"] == int(keep.sum())


def test_class_count_mismatch_is_a_clear_error(tmp_path):
    logits, labels = random_set(np.random.default_rng(1), c=4)
    path = write_logits(tmp_path / "l.h5", logits, labels)
    with pytest.raises(AnomalyInputError, match=r"logits have 4 classes but anomaly.num_classes is 3"):
        SegLogitsReader(path, LabelSpec(3, (4,), (255,)))
    # seed 003: 14 dataset labels, a model with 13 outputs, config saying 14
    with pytest.raises(AnomalyInputError, match="trained on"):
        SegLogitsReader(path, LabelSpec(5, (5,), (255,)))


def test_anomaly_id_among_trained_classes_and_unknown_labels_are_errors(tmp_path):
    with pytest.raises(AnomalyInputError, match="among the model's 4 trained classes"):
        LabelSpec(4, (3,), ())
    logits, labels = random_set(np.random.default_rng(2))
    labels[1, 0, 0] = 17
    path = write_logits(tmp_path / "l.h5", logits, labels)
    with (
        SegLogitsReader(path, SPEC) as reader,
        pytest.raises(AnomalyInputError, match=r"image 1: label id\(s\) \[17\]"),
    ):
        list(reader)


@pytest.mark.parametrize(
    "make,needle",
    [
        (
            lambda f: (
                f.create_dataset("logits", data=np.zeros((2, 4, 8), np.float16)),
                f.create_dataset("labels", data=np.zeros((2, 4, 8), np.uint8)),
            ),
            "logits must be \\[N, C, H, W\\]",
        ),
        (
            lambda f: (
                f.create_dataset("logits", data=np.zeros((2, 4, 8, 8), np.float16)),
                f.create_dataset("labels", data=np.zeros((2, 8, 9), np.uint8)),
            ),
            "disagree",
        ),
        (
            lambda f: f.create_dataset("logits", data=np.zeros((2, 4, 8, 8), np.float16)),
            "missing dataset 'labels'",
        ),
        (
            lambda f: (
                f.create_dataset("logits", data=np.zeros((2, 4, 8, 8), np.int32)),
                f.create_dataset("labels", data=np.zeros((2, 8, 8), np.uint8)),
            ),
            "float16 or float32",
        ),
        (
            lambda f: (
                f.create_dataset("logits", data=np.zeros((2, 4, 8, 8), np.float16)),
                f.create_dataset("labels", data=np.zeros((2, 8, 8), np.float32)),
            ),
            "labels must be integers",
        ),
    ],
)
def test_wrong_shaped_files_are_clear_errors(tmp_path, make, needle):
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as f:
        make(f)
    with pytest.raises(AnomalyInputError, match=needle) as err:
        SegLogitsReader(path, SPEC)
    assert str(path) in str(err.value)


def test_truncated_file_is_a_clear_error(tmp_path):
    logits, labels = random_set(np.random.default_rng(3), n=20, h=32, w=32, dtype=np.float32)
    path = write_logits(tmp_path / "l.h5", logits, labels)
    data = path.read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(AnomalyInputError, match="truncated or corrupt") as err:
        with SegLogitsReader(cut, SPEC) as reader:
            list(reader)
    assert "cut.h5" in str(err.value)
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(AnomalyInputError, match="not a readable HDF5"):
        SegLogitsReader(tmp_path / "junk.h5", SPEC)
    with pytest.raises(AnomalyInputError, match="no such file"):
        SegLogitsReader(tmp_path / "missing.h5", SPEC)


def test_producer_writes_the_models_logits_and_checks_the_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from vlmrel.anomaly.segnet import build_model, load_model, produce_logits

    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, size=(3, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 4, size=(3, 32, 32)).astype(np.uint8)
    write_seg_data(tmp_path / "data.h5", images, labels)
    model = build_model("tiny_deeplabv3", 4, seed=7).eval()
    torch.save(model.state_dict(), tmp_path / "ck.pt")
    loaded = load_model("tiny_deeplabv3", 4, tmp_path / "ck.pt")
    produce_logits(loaded, tmp_path / "data.h5", tmp_path / "logits.h5", num_classes=4, batch_size=2)
    with h5py.File(tmp_path / "logits.h5") as f:
        got, lab = f["logits"][:], f["labels"][:]
        assert f.attrs["num_classes"] == 4
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = model((torch.from_numpy(images).float() / 255 - mean) / std)["out"].numpy()
    assert got.dtype == np.float16 and got.shape == (3, 4, 32, 32)
    np.testing.assert_allclose(got.astype(np.float32), ref, rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(lab, labels)
    # the same weights as safetensors; a checkpoint for another class count is refused by name
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "ck.safetensors"))
    load_model("tiny_deeplabv3", 4, tmp_path / "ck.safetensors")
    with pytest.raises(AnomalyInputError, match="outputs 4 classes but anomaly.num_classes is 3"):
        load_model("tiny_deeplabv3", 3, tmp_path / "ck.pt")
    with pytest.raises(AnomalyInputError, match="no 'head.weight'"):
        load_model("tinyseg", 4, tmp_path / "ck.pt")


def test_deeplabv3_resnet50_checkpoint_with_aux_classifier_loads(tmp_path):
    torch = pytest.importorskip("torch")
    from vlmrel.anomaly.segnet import build_model, load_model

    model = build_model("deeplabv3_resnet50", 13, aux_loss=True)
    torch.save(
        {"model_state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "dl.pth"
    )
    loaded = load_model("deeplabv3_resnet50", 13, tmp_path / "dl.pth")
    assert loaded.classifier[4].out_channels == 13
    with pytest.raises(AnomalyInputError, match="outputs 13 classes but anomaly.num_classes is 14"):
        load_model("deeplabv3_resnet50", 14, tmp_path / "dl.pth")
