"""Exact histogram metrics against scikit-learn, hand computations and brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from vlmrel.anomaly import ExactAccumulator, PerImageAccumulator, exact_metrics
from vlmrel.anomaly import metrics as M


def sk_metrics(scores: np.ndarray, y: np.ndarray, level: float = 0.95) -> dict:
    fpr, tpr, _ = roc_curve(y, scores, drop_intermediate=False)
    return {
        "auroc": roc_auc_score(y, scores),
        "aupr": average_precision_score(y, scores),
        "fpr95": fpr[np.argmax(tpr >= level)],
    }


def tied_scores(rng: np.random.Generator, n: int, rate: float, step: float) -> tuple[np.ndarray, np.ndarray]:
    y = rng.random(n) < rate
    s = rng.standard_normal(n) + 1.2 * y
    return (np.round(s / step) * step).astype(np.float16), y


@pytest.mark.parametrize("seed,rate,step", [(0, 0.01, 0.25), (1, 0.3, 1.0), (2, 0.05, 0.001), (3, 0.5, 0.5)])
def test_float16_scores_with_ties_equal_sklearn(seed, rate, step):
    s, y = tied_scores(np.random.default_rng(seed), 30_000, rate, step)
    assert np.unique(s).size < s.size  # there are ties
    got, ref = exact_metrics(s, y), sk_metrics(s, y)
    for k in ("auroc", "aupr", "fpr95"):
        assert got[k] == pytest.approx(ref[k], abs=1e-6), k
    assert got["quantization"]["exact"] is True
    assert got["n_anomaly"] == int(y.sum()) and got["n_normal"] == int((~y).sum())


def test_other_tpr_level_matches_roc_curve():
    s, y = tied_scores(np.random.default_rng(5), 5000, 0.1, 0.1)
    assert exact_metrics(s, y, tpr_level=0.8)["fpr95"] == pytest.approx(
        sk_metrics(s, y, 0.8)["fpr95"], abs=1e-12
    )


def test_streaming_accumulator_equals_one_shot_and_handles_chunk_boundaries(monkeypatch):
    monkeypatch.setattr(M, "CHUNK", 1000)  # force many internal slices
    s, y = tied_scores(np.random.default_rng(7), 12_345, 0.07, 0.05)
    acc = ExactAccumulator()
    for lo in range(0, s.size, 777):
        acc.update(s[lo : lo + 777], y[lo : lo + 777])
    one = exact_metrics(s, y)
    res = acc.result()
    for k in ("auroc", "aupr", "fpr95", "n_anomaly", "n_normal"):
        assert res[k] == one[k]
    # merging two halves gives the same
    a, b = ExactAccumulator(), ExactAccumulator()
    a.update(s[:5000], y[:5000])
    b.update(s[5000:], y[5000:])
    a += b
    assert a.result()["auroc"] == one["auroc"]


def test_float16_path_reports_bounds_that_contain_the_unrounded_metrics():
    rng = np.random.default_rng(11)
    y = rng.random(20_000) < 0.05
    s = (rng.standard_normal(20_000) * 0.01 + 0.5 + 0.004 * y).astype(np.float32)  # many float16 collisions
    acc = ExactAccumulator()  # the float16 fast path rounds and bounds
    acc.update(s, y)
    got, ref = acc.result(), sk_metrics(s, y)
    q = got["quantization"]
    assert q["exact"] is False and q["auroc_max_error"] > 0
    assert abs(got["auroc"] - ref["auroc"]) <= q["auroc_max_error"] + 1e-12
    lo, hi = q["aupr_interval"]
    assert lo - 1e-9 <= ref["aupr"] <= hi + 1e-9
    lo, hi = q["fpr95_interval"]
    assert lo - 1e-12 <= ref["fpr95"] <= hi + 1e-12
    # scores that are exactly representable in float16 stay exact even when passed as float64
    exact = exact_metrics(s.astype(np.float16).astype(np.float64), y)
    assert exact["quantization"]["exact"] is True


def test_sum_ratio_matches_direct_sum():
    a = np.array([0.0, 3.0, 10.0, 1e6, 5e7])
    b = np.array([0.0, 7.0, 10.0, 3e6, 9e7])
    p = np.array([5.0, 40.0, 1.0, 1000.0, 3.0])
    direct = [
        sum((ai + i) / (bi + i) for i in range(1, int(pi) + 1)) for ai, bi, pi in zip(a, b, p, strict=True)
    ]
    np.testing.assert_allclose(M._sum_ratio(a, b, p), direct, rtol=1e-12)


def test_negative_zero_ties_with_zero_and_nan_is_an_error():
    s = np.array([-0.0, 0.0, 1.0, -1.0], dtype=np.float16)
    y = np.array([1, 0, 1, 0], dtype=bool)
    assert exact_metrics(s, y)["auroc"] == pytest.approx(roc_auc_score(y, s.astype(np.float64)))
    with pytest.raises(ValueError, match="NaN"):
        exact_metrics(np.array([0.1, np.nan], dtype=np.float32), np.array([1, 0], bool))


def test_infinite_scores_are_ordered():
    s = np.array([-np.inf, -1, 0, 2, np.inf, np.inf], dtype=np.float16)
    y = np.array([0, 0, 1, 0, 1, 0], dtype=bool)
    assert exact_metrics(s, y)["auroc"] == pytest.approx(
        roc_auc_score(y, np.clip(s.astype(float), -1e9, 1e9))
    )


def test_missing_class_gives_nan():
    r = exact_metrics(np.ones(5, np.float16), np.zeros(5, bool))
    assert math.isnan(r["auroc"]) and math.isnan(r["aupr"]) and math.isnan(r["fpr95"])


def test_best_f1_and_thresholds_against_brute_force():
    s, y = tied_scores(np.random.default_rng(3), 4000, 0.1, 0.125)
    acc = ExactAccumulator()
    acc.update(s, y)
    curve = acc.curve()
    f = s.astype(np.float64)
    best = max((2 * (y & (f >= t)).sum() / ((f >= t).sum() + y.sum()), t) for t in np.unique(f))
    got = curve.best_f1()
    assert got["f1"] == pytest.approx(best[0]) and got["threshold"] == best[1]
    for t in (-0.3, 0.0, 0.07, 1.13, 5.0, -9.0):  # also thresholds that are not float16 values
        r = curve.at_threshold(t)
        pred = f >= t
        assert (r["tp"], r["fp"]) == (int((pred & y).sum()), int((pred & ~y).sum()))


def test_per_image_convention_against_hand_computation():
    acc = PerImageAccumulator()
    # image 1: normal {0.1, 0.4}, anomaly {0.35, 0.8}: pairs (0.35>0.1), (0.35<0.4), (0.8>both) -> AUROC 3/4
    acc.update(np.array([0.1, 0.4, 0.35, 0.8], np.float16), np.array([0, 0, 1, 1], bool))
    # image 2: anomaly tied with one normal: AUROC (1 + 0.5) / 2 = 0.75; AP: ranks 0.9(A)->1, so AP = 1
    acc.update(np.array([0.9, 0.2, 0.5], np.float16), np.array([1, 0, 0], bool))
    # image 3: no anomaly -> left out; image 4: only anomaly -> left out
    acc.update(np.array([0.3, 0.6], np.float16), np.array([0, 0], bool))
    acc.update(np.array([0.3], np.float16), np.array([1], bool))
    r = acc.result()
    assert (r["n_images"], r["n_images_used"], r["n_images_no_anomaly"], r["n_images_no_normal"]) == (
        4,
        2,
        1,
        1,
    )
    # AP image 1: ranking 0.8(A) 0.4(N) 0.35(A) 0.1(N): precisions at anomalies 1/1, 2/3 -> (1 + 2/3) / 2
    assert r["auroc"] == pytest.approx((0.75 + 1.0) / 2)
    assert r["aupr"] == pytest.approx(((1 + 2 / 3) / 2 + 1.0) / 2)
    # FPR95 image 1: TPR reaches 1 at threshold 0.35, where 1 of 2 normals is above -> 0.5; image 2: 0
    assert r["fpr95"] == pytest.approx((0.5 + 0.0) / 2)


def test_valid_mask_drops_pixels():
    s, y = tied_scores(np.random.default_rng(9), 3000, 0.1, 0.1)
    valid = np.random.default_rng(10).random(3000) < 0.7
    acc = ExactAccumulator()
    acc.update(s, y, valid)
    assert acc.result()["auroc"] == pytest.approx(roc_auc_score(y[valid], s[valid]), abs=1e-12)


def test_float16_keys_are_order_preserving():
    vals = np.unique(np.random.default_rng(0).standard_normal(5000).astype(np.float16))
    keys, _ = M.float16_keys(vals)
    assert np.all(np.diff(keys.astype(np.int64)) > 0)
    np.testing.assert_array_equal(M.KEY_VALUES[keys], vals)
