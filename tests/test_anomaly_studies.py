"""Streaming evaluation, threshold and subsampling studies, classification OOD, demo data."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from vlmrel.anomaly import exact_metrics, synthetic
from vlmrel.anomaly.evaluate import evaluate_classification, evaluate_segmentation, sml_stats
from vlmrel.anomaly.io import LabelSpec, write_image_logits
from vlmrel.anomaly.metrics import ExactAccumulator
from vlmrel.anomaly.scores import compute_scores
from vlmrel.anomaly.studies import (
    comparison_markdown,
    comparison_rows,
    subsampling_study,
    threshold_sensitivity,
)

SPEC = LabelSpec(num_classes=3, anomaly_ids=(3,), ignore_ids=(255,))


@pytest.fixture(scope="module")
def logits_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    n, c, h, w = 6, 3, 16, 16
    labels = rng.integers(0, c, size=(n, h, w)).astype(np.uint8)
    labels[:4, 3:7, 3:8] = 3  # anomalies in 4 of 6 images
    labels[:, 0, :] = 255
    logits = rng.normal(0, 1, size=(n, c, h, w))
    onehot = np.eye(c)[np.minimum(labels, c - 1)].transpose(0, 3, 1, 2)
    logits += 3 * onehot * (labels < c)[:, None]  # confident on known pixels
    path = tmp_path_factory.mktemp("an") / "test.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("logits", data=logits.astype(np.float16))
        f.create_dataset("labels", data=labels)
    return path, logits.astype(np.float16), labels


def test_streamed_pooled_metrics_equal_all_pixels_at_once(logits_file):
    path, logits, labels = logits_file
    ev = evaluate_segmentation(path, SPEC, ["msp", "maxlogit", "energy", "entropy"], temperature=2.0)
    keep = labels != 255
    scores = compute_scores(logits, ["msp", "maxlogit", "energy", "entropy"], axis=1, temperature=2.0)
    y = (labels == 3)[keep]
    for m, s in scores.items():
        whole = exact_metrics(s[keep], y)
        for k in ("auroc", "aupr", "fpr95"):
            assert ev.pooled[m][k] == pytest.approx(whole[k], abs=1e-12), (m, k)  # summation order
        # exact for the float32 scores themselves, not their float16 rounding
        assert ev.pooled[m]["auroc"] == pytest.approx(roc_auc_score(y, s[keep]), abs=1e-9)
        assert ev.pooled[m]["aupr"] == pytest.approx(average_precision_score(y, s[keep]), abs=1e-9)
        assert ev.pooled[m]["quantization"]["exact"]
    q = ev.per_image["maxlogit"]
    assert (q["n_images"], q["n_images_used"], q["n_images_no_anomaly"]) == (6, 4, 2)
    per = [roc_auc_score((labels[i] == 3)[keep[i]], -logits[i].max(0)[keep[i]]) for i in range(4)]
    assert q["auroc"] == pytest.approx(np.mean(per), abs=1e-12)
    assert ev.pooled["maxlogit"]["quantization"]["exact"]  # -max of float16 logits is a float16 value


def test_sml_uses_validation_statistics(logits_file):
    path, logits, labels = logits_file
    stats = sml_stats(path, SPEC)
    ev = evaluate_segmentation(path, SPEC, ["sml"], sml=stats)
    keep = labels != 255
    s = compute_scores(logits, ["sml"], axis=1, sml=stats)["sml"][keep]
    assert ev.pooled["sml"]["auroc"] == pytest.approx(
        roc_auc_score((labels == 3)[keep], s.astype(np.float16)), abs=1e-9
    )


def test_threshold_sensitivity_against_direct_counts():
    rng = np.random.default_rng(1)
    y = rng.random(5000) < 0.1
    s = (rng.standard_normal(5000) - 2 + 1.5 * y).astype(np.float16)
    acc = ExactAccumulator()
    acc.update(s, y)
    study = threshold_sensitivity(acc.counts, (-0.5, 0.0, 0.25))
    t = study["best"]["threshold"]
    assert study["scale"] == abs(t)
    f = s.astype(np.float64)
    for row, o in zip(study["rows"], (-0.5, 0.0, 0.25), strict=True):
        pred = f >= t + o * abs(t)
        tp = (pred & y).sum()
        assert row["precision"] == pytest.approx(tp / pred.sum())
        assert row["recall"] == pytest.approx(tp / y.sum())
        assert row["f1"] == pytest.approx(2 * tp / (pred.sum() + y.sum()))
    assert study["rows"][1]["delta_f1"] == 0.0


def test_subsampling_full_ratio_is_exact_and_trials_are_seeded(logits_file):
    path, _, _ = logits_file
    kw = dict(ratios=[0.1, 0.5, 1.0], trials=3, seed=4)
    rows, summary = subsampling_study(path, SPEC, ["maxlogit"], **kw)
    rows2, _ = subsampling_study(path, SPEC, ["maxlogit"], **kw)
    assert rows == rows2
    full = [s for s in summary if s["ratio"] == 1.0][0]
    assert full["auroc_mean"] == pytest.approx(full["auroc_exact"]) and full["auroc_std"] == 0.0
    n_all = full["n_pixels_mean"]
    half = [s for s in summary if s["ratio"] == 0.5][0]
    assert 0.4 * n_all < half["n_pixels_mean"] < 0.6 * n_all
    other, _ = subsampling_study(path, SPEC, ["maxlogit"], ratios=[0.1, 0.5, 1.0], trials=3, seed=5)
    assert [r["auroc"] for r in other if r["ratio"] == 0.1] != [r["auroc"] for r in rows if r["ratio"] == 0.1]


def test_comparison_table_lists_every_method(logits_file):
    path, _, _ = logits_file
    ev = evaluate_segmentation(path, SPEC, ["msp", "energy"])
    metrics = ev.summary()
    thresholds = {m: threshold_sensitivity(c) for m, c in zip(ev.methods, ev.counts, strict=True)}
    rows = comparison_rows(metrics, thresholds)
    assert [r["method"] for r in rows] == ["msp", "energy"]
    md = comparison_markdown(rows, metrics)
    assert "| MSP |" in md and "| Energy |" in md and "2 without anomaly pixels" in md


def test_classification_ood_against_sklearn(tmp_path):
    rng = np.random.default_rng(2)
    ood = rng.random(400) < 0.3
    z = rng.normal(0, 1, size=(400, 5)) + 4 * np.eye(5)[rng.integers(0, 5, 400)] * (~ood)[:, None]
    write_image_logits(tmp_path / "test.h5", z.astype(np.float32), ood)
    write_image_logits(tmp_path / "val.h5", z[~ood].astype(np.float32), None)
    out = evaluate_classification(
        tmp_path / "test.h5", 5, ["msp", "energy", "sml"], val_path=tmp_path / "val.h5"
    )
    s = compute_scores(z.astype(np.float32), ["msp"], axis=1)["msp"]
    assert out["pooled"]["msp"]["auroc"] == pytest.approx(roc_auc_score(ood, s.astype(np.float16)), abs=1e-9)
    with pytest.raises(ValueError, match="classes"):
        evaluate_classification(tmp_path / "test.h5", 4, ["msp"])


def test_synthetic_scenes_are_seeded_and_labelled():
    a_img, a_lab = synthetic.make_split("test", 6, seed=1, size=48, anomaly_fraction=0.5)
    b_img, b_lab = synthetic.make_split("test", 6, seed=1, size=48, anomaly_fraction=0.5)
    np.testing.assert_array_equal(a_img, b_img)
    has = [(lab == synthetic.ANOMALY_ID).any() for lab in a_lab]
    assert sum(has) == 3
    assert set(np.unique(a_lab)) <= {0, 1, 2, 3, 4, synthetic.ANOMALY_ID, synthetic.IGNORE_ID}
    _, train_lab = synthetic.make_split("train", 5, seed=1, size=48)
    assert not (train_lab == synthetic.ANOMALY_ID).any()
