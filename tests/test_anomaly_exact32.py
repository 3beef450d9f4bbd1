"""Exact metrics of float32 scores (coarse pass + refinement passes) against scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from vlmrel.anomaly import PerImageAccumulator, exact_metrics
from vlmrel.anomaly import exact32 as E


def sk_metrics(scores: np.ndarray, y: np.ndarray, level: float = 0.95) -> dict:
    fpr, tpr, _ = roc_curve(y, scores, drop_intermediate=False)
    return {
        "auroc": roc_auc_score(y, scores),
        "aupr": average_precision_score(y, scores),
        "fpr95": fpr[np.argmax(tpr >= level)],
    }


def assert_equal_sklearn(got: dict, s: np.ndarray, y: np.ndarray, level: float = 0.95) -> None:
    ref = sk_metrics(s, y, level)
    for k in ("auroc", "aupr", "fpr95"):
        assert abs(got[k] - ref[k]) <= 1e-9, (k, got[k], ref[k])


def ulp_ties(rng: np.random.Generator, n: int, rate: float) -> tuple[np.ndarray, np.ndarray]:
    """Coarse values shared by both labels, anomalies one ulp above, below or on the normals."""
    y = rng.random(n) < rate
    base = (np.round(rng.standard_normal(n) * 8) / 8 + 0.6 * y).astype(np.float32)
    shift = rng.integers(-1, 2, n)
    s = base.copy()
    s[y & (shift > 0)] = np.nextafter(base[y & (shift > 0)], np.float32(np.inf))
    s[y & (shift < 0)] = np.nextafter(base[y & (shift < 0)], np.float32(-np.inf))
    return s, y


@pytest.mark.parametrize("seed,rate", [(0, 0.01), (1, 0.3), (2, 0.5), (3, 0.05)])
def test_one_ulp_apart_across_labels_equals_sklearn(seed, rate):
    s, y = ulp_ties(np.random.default_rng(seed), 40_000, rate)
    assert np.unique(s).size < s.size and not np.array_equal(s.astype(np.float16).astype(np.float32), s)
    got = exact_metrics(s, y)
    assert_equal_sklearn(got, s, y)
    assert got["quantization"] == {**got["quantization"], "exact": True, "score_precision": "float32"}
    passes = E.exact_metrics_float32(s, y, method="passes", max_refine_mb=0.2)
    assert passes["passes"] > 1
    for k in ("auroc", "aupr", "fpr95", "n_anomaly", "n_normal"):
        assert passes[k] == pytest.approx(got[k], abs=1e-12), k


@pytest.mark.parametrize("max_refine_mb", [0.002, 0.01, 0.1, 1.0, 512.0])
def test_many_refinement_passes_give_the_same_result(max_refine_mb):
    rng = np.random.default_rng(4)
    y = rng.random(30_000) < 0.1
    s = (rng.standard_normal(30_000) + y).astype(np.float32)
    got = E.exact_metrics_float32(s, y, max_refine_mb=max_refine_mb, method="passes")
    assert_equal_sklearn(got, s, y)
    if max_refine_mb == 0.002:  # 4 bytes per pixel of a sparse bin: ~60 groups
        assert got["passes"] > 20  # a tiny budget: many passes, the same answer
    if max_refine_mb == 512.0:
        assert got["passes"] == 2


@pytest.mark.parametrize("max_refine_mb", [0.2, 64.0])
def test_dense_and_sparse_bins_together(max_refine_mb):
    # a narrow range puts ~200,000 pixels in each of two coarse bins, the tails leave sparse
    # bins; a small budget counts the full bins in uint16 tables and splits them over passes
    rng = np.random.default_rng(12)
    y = rng.random(400_000) < 0.2
    s = (1.0 + 0.002 * rng.standard_normal(400_000) + 0.001 * y).astype(np.float32)
    s[:2000] = rng.standard_normal(2000).astype(np.float32) * 5
    acc = E.Float32Exact(max_refine_mb=max_refine_mb)
    acc.update(s, y)
    groups = acc.plan()
    refined = acc.refined_bins()
    if max_refine_mb < 1:
        assert acc._dense_bin[refined].sum() == 2 and groups > 1
    else:  # every pixel's low key fits the budget: one pass, no tables
        assert not acc._dense_bin.any() and groups == 1
    for g in range(groups):
        acc.start_group(g)
        acc.refine(s, y)
        acc.finish_group()
    assert_equal_sklearn(acc.result(), s, y)
    assert_equal_sklearn(E.exact_metrics_float32(s, y, method="passes"), s, y)


@pytest.mark.parametrize("layout", ["dense", "sparse", "auto"])
def test_table_cells_past_65536_pixels(monkeypatch, layout):
    # a uint16 table cell wraps every 65,536 pixels; the wraps are logged and added back
    monkeypatch.setattr(E, "LAYOUT", layout)  # "dense": every refined bin in a uint16 table
    one = np.float32(1.0)
    up1 = np.nextafter(one, np.float32(2))
    up2 = np.nextafter(up1, np.float32(2))
    parts = [  # (value, normals, anomalies): all in the coarse bin of 1.0
        (one, 70_000, 300),
        (up1, 511, 70_001),
        (up2, 256, 257),
    ]
    s = np.concatenate([np.full(n + p, v, np.float32) for v, n, p in parts])
    y = np.concatenate([np.r_[np.zeros(n, bool), np.ones(p, bool)] for _, n, p in parts])
    rng = np.random.default_rng(3)
    s = np.r_[s, (1 + rng.random(5000) / 64).astype(np.float32), rng.standard_normal(5000).astype(np.float32)]
    y = np.r_[y, rng.random(10_000) < 0.3]
    order = rng.permutation(s.size)
    s, y = s[order], y[order]
    acc = E.Float32Exact(max_refine_mb=0.2)  # "auto": too small for all pixels, the full bin dense
    acc.update(s, y)
    acc.plan()
    assert acc._dense_bin[acc.refined_bins()].any() == (layout != "sparse")
    got = E.exact_metrics_float32(s, y, method="passes", max_refine_mb=0.2)
    assert_equal_sklearn(got, s, y)
    ref = E._sorted_metrics(s, y, 0.95)  # the numpy reference: one sort of all keys
    for k in ("auroc", "aupr", "fpr95", "n_anomaly", "n_normal"):
        assert got[k] == pytest.approx(ref[k], abs=1e-12), k


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("layout", ["dense", "sparse", "auto"])
def test_kernels_equal_the_numpy_sort_reference(monkeypatch, seed, layout):
    monkeypatch.setattr(E, "LAYOUT", layout)
    rng = np.random.default_rng(seed)
    s, y = ulp_ties(rng, 60_000, [0.02, 0.3, 0.7][seed])
    s[: 20_000] = (rng.standard_normal(20_000) * 10.0 ** rng.integers(-30, 30, 20_000)).astype(np.float32)
    ref = E._sorted_metrics(s, y, 0.9)
    for mb in (0.05, 4.0):
        got = E.exact_metrics_float32(s, y, tpr_level=0.9, method="passes", max_refine_mb=mb)
        for k in ("auroc", "aupr", "fpr95", "n_anomaly", "n_normal"):
            assert got[k] == pytest.approx(ref[k], abs=1e-12), (k, mb)
    assert_equal_sklearn(got, s, y, 0.9)


def test_coarse_kernel_counts_equal_numpy(monkeypatch):
    monkeypatch.setattr(E, "CHUNK", 999)  # float64 input is converted piece by piece
    rng = np.random.default_rng(9)
    s = rng.standard_normal(10_000) * 10.0 ** rng.integers(-40, 40, 10_000)
    s[:4] = [0.0, -0.0, np.inf, -np.inf]
    y = rng.random(10_000) < 0.4
    valid = rng.random(10_000) < 0.9
    acc = E.Float32Exact()
    acc.update(s.reshape(100, 100), y.reshape(100, 100), valid.reshape(100, 100))
    keys, lossless = E.float32_keys(s[valid])
    expect = np.bincount((keys >> 16).astype(np.int64) * 2 + y[valid], minlength=2 * E.NBINS)
    np.testing.assert_array_equal(acc.coarse, expect)
    assert not lossless and not acc.lossless  # float64 values float32 cannot hold
    acc32 = E.Float32Exact()
    with np.errstate(over="ignore"):  # beyond float32's range: +-inf, as the conversion above
        acc32.update(s.astype(np.float32), y, valid)
    np.testing.assert_array_equal(acc32.coarse, expect)
    assert acc32.lossless


@pytest.mark.parametrize("method", ["sort", "passes"])
def test_constant_scores(method):
    y = np.r_[np.ones(7, bool), np.zeros(13, bool)]
    s = np.full(20, 0.3, np.float32)
    got = E.exact_metrics_float32(s, y, method=method)
    assert_equal_sklearn(got, s, y)
    assert got["auroc"] == 0.5 and got["fpr95"] == 1.0


@pytest.mark.parametrize("method", ["sort", "passes"])
def test_single_class(method):
    s = np.random.default_rng(0).standard_normal(100).astype(np.float32)
    only_normal = E.exact_metrics_float32(s, np.zeros(100, bool), method=method)
    assert (
        math.isnan(only_normal["auroc"])
        and math.isnan(only_normal["aupr"])
        and math.isnan(only_normal["fpr95"])
    )
    only_anomaly = E.exact_metrics_float32(s, np.ones(100, bool), method=method)
    assert math.isnan(only_anomaly["auroc"]) and only_anomaly["aupr"] == 1.0
    assert only_anomaly["aupr"] == average_precision_score(np.ones(100, bool), s)


@pytest.mark.parametrize("method", ["sort", "passes"])
def test_anomaly_only_bins_below_normals_need_their_ties(method):
    # two anomalies tied vs one ulp apart in a bin of anomalies only, below a normal: AP differs
    top = np.float32(5.0)
    a = np.float32(1.0)
    for second in (a, np.nextafter(a, np.float32(2))):
        s = np.array([top, a, second, -3.0], np.float32)
        y = np.array([0, 1, 1, 0], bool)
        assert_equal_sklearn(E.exact_metrics_float32(s, y, method=method), s, y)


@pytest.mark.parametrize("method", ["sort", "passes"])
def test_signed_zero_infinities_and_nan(method):
    s = np.array([-0.0, 0.0, np.inf, -np.inf, 1e-45, -1e-45, 3.4e38], np.float32)
    y = np.array([1, 0, 0, 1, 1, 0, 1], bool)
    got = E.exact_metrics_float32(s, y, method=method)
    assert_equal_sklearn(got, np.clip(s.astype(np.float64), -1e300, 1e300), y)
    with pytest.raises(ValueError, match="NaN"):
        E.exact_metrics_float32(np.array([0.1, np.nan], np.float32), np.array([1, 0], bool))


def test_keys_are_order_preserving():
    v = np.unique(np.random.default_rng(1).standard_normal(5000).astype(np.float32) * 1e3)
    keys, lossless = E.float32_keys(v)
    assert lossless and np.all(np.diff(keys.astype(np.int64)) > 0)


def test_streamed_chunks_and_valid_mask_equal_in_memory(monkeypatch):
    monkeypatch.setattr(E, "CHUNK", 1000)
    s, y = ulp_ties(np.random.default_rng(7), 12_345, 0.07)
    valid = np.random.default_rng(8).random(s.size) < 0.8
    parts = [(s[lo : lo + 777], y[lo : lo + 777], valid[lo : lo + 777]) for lo in range(0, s.size, 777)]
    got = E.exact_metrics_passes(lambda: parts, tpr_level=0.9, max_refine_mb=1.0)
    assert_equal_sklearn(got, s[valid], y[valid], 0.9)


@pytest.mark.parametrize("n_refine", [0.5, 2])
@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_refinement_on_other_data_is_an_error(monkeypatch, n_refine, layout):
    monkeypatch.setattr(E, "LAYOUT", layout)
    rng = np.random.default_rng(2)
    s = rng.standard_normal(1000).astype(np.float32)
    y = rng.random(1000) < 0.3
    acc = E.Float32Exact()
    acc.update(s, y)
    acc.start_group(0)
    if n_refine == 2:  # twice the pixels
        acc.refine(s, y)
        acc.refine(s, y)
    else:
        acc.refine(s[:500], y[:500])
    with pytest.raises(RuntimeError, match="other data"):
        acc.finish_group()


def test_nan_outside_the_valid_mask_is_ignored():
    s, y = ulp_ties(np.random.default_rng(11), 50_000, 0.1)
    valid = np.random.default_rng(12).random(s.size) < 0.7
    s_nan = s.copy()
    s_nan[~valid] = np.nan
    got = E.exact_metrics_float32(s_nan, y, valid, method="passes")
    assert_equal_sklearn(got, s[valid], y[valid])


def test_nan_is_refused_by_the_passes():
    s = np.array([0.1, np.nan, 0.3], np.float32)
    y = np.array([1, 0, 0], bool)
    with pytest.raises(ValueError, match="NaN"):
        E.exact_metrics_float32(s, y, method="passes")
    acc = E.Float32Exact()
    acc.update(np.array([0.1, 0.1], np.float32), np.array([1, 0], bool))
    acc.start_group(0)
    acc.refine(np.array([0.1, np.nan], np.float32), np.array([1, 0], bool))
    with pytest.raises(ValueError, match="NaN"):
        acc.finish_group()


def test_per_image_accumulator_is_exact_for_float32():
    s, y = ulp_ties(np.random.default_rng(5), 5000, 0.2)
    acc = PerImageAccumulator()
    m = acc.update(s, y)
    assert_equal_sklearn(m, s, y)
