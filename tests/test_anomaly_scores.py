"""Every anomaly score against its direct formula (scipy), and the SML statistics against numpy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import logsumexp, softmax

from vlmrel.anomaly.scores import STATELESS, SMLStats, SMLStatsAccumulator, compute_scores


@pytest.fixture
def logits():
    return np.random.default_rng(0).normal(0, 3, size=(6, 9, 11)).astype(np.float64)  # [C, H, W]


def test_scores_against_direct_formulas(logits):
    C = logits.shape[0]
    stats = SMLStats(np.linspace(1, 2, C), np.linspace(0.5, 1.5, C), np.full(C, 10))
    got = compute_scores(logits, STATELESS, axis=0, temperature=2.5, sml=stats)
    p = softmax(logits, axis=0)
    k = logits.argmax(axis=0)
    np.testing.assert_allclose(got["msp"], -p.max(axis=0), rtol=1e-12)
    np.testing.assert_allclose(got["maxlogit"], -logits.max(axis=0), rtol=1e-12)
    np.testing.assert_allclose(got["energy"], -2.5 * logsumexp(logits / 2.5, axis=0), rtol=1e-12)
    np.testing.assert_allclose(got["entropy"], -(p * np.log(p)).sum(axis=0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got["sml"], -(logits.max(axis=0) - stats.mean[k]) / stats.std[k], rtol=1e-12)


def test_per_image_logits_use_the_class_axis(logits):
    z = logits.reshape(6, -1).T  # [N, C]
    a = compute_scores(z, ("msp", "energy", "entropy", "maxlogit"), axis=1)
    b = compute_scores(logits, ("msp", "energy", "entropy", "maxlogit"), axis=0)
    for m in a:
        np.testing.assert_allclose(a[m], b[m].reshape(-1), rtol=1e-12)


def test_float32_and_large_logits_stay_finite_and_close():
    z32 = (np.random.default_rng(1).normal(0, 3, size=(5, 64)) + 2000.0).astype(np.float32)
    got = compute_scores(z32, ("msp", "energy", "entropy"), axis=0)
    z = z32.astype(np.float64)  # the reference sees the same (float32-rounded) logits
    np.testing.assert_allclose(got["msp"], -softmax(z, axis=0).max(axis=0), rtol=1e-5)
    np.testing.assert_allclose(got["energy"], -logsumexp(z, axis=0), rtol=1e-6)
    assert got["msp"].dtype == np.float32 and np.isfinite(got["entropy"]).all()


def test_sign_convention_higher_is_more_anomalous():
    confident = np.array([10.0, 0.0, 0.0, 0.0])[:, None]
    unsure = np.array([1.0, 0.9, 0.8, 0.7])[:, None]
    stats = SMLStats(np.zeros(4), np.ones(4), np.full(4, 5))
    a = compute_scores(confident, STATELESS, sml=stats)
    b = compute_scores(unsure, STATELESS, sml=stats)
    for m in STATELESS:
        assert b[m][0] > a[m][0], m


def test_sml_statistics_match_numpy_per_class():
    rng = np.random.default_rng(2)
    acc = SMLStatsAccumulator(4)
    blocks = [rng.normal(0, 1, size=(4, 7, 7)) + 1000.0 for _ in range(5)]  # large offset: stable merge
    valid = [rng.random((7, 7)) < 0.8 for _ in range(5)]
    for z, v in zip(blocks, valid, strict=True):
        acc.update(z, axis=0, valid=v)
    st = acc.result()
    ml = np.concatenate([z.max(0)[v] for z, v in zip(blocks, valid, strict=True)])
    pr = np.concatenate([z.argmax(0)[v] for z, v in zip(blocks, valid, strict=True)])
    for c in range(4):
        sel = ml[pr == c]
        if sel.size >= 2:
            assert st.mean[c] == pytest.approx(sel.mean(), rel=1e-12)
            assert st.std[c] == pytest.approx(sel.std(ddof=1), rel=1e-8)
            assert st.count[c] == sel.size


def test_sml_classes_without_pixels_fall_back_to_pooled():
    acc = SMLStatsAccumulator(3)
    z = np.zeros((3, 10))
    z[0] = np.linspace(1, 2, 10)  # class 0 always predicted
    acc.update(z, axis=0)
    st = acc.result()
    assert st.fallback == [1, 2]
    assert st.mean[1] == pytest.approx(1.5) and st.std[2] == pytest.approx(np.linspace(1, 2, 10).std(ddof=1))


def test_bad_requests_are_errors(logits):
    with pytest.raises(ValueError, match="unknown"):
        compute_scores(logits, ["maxlogits"])
    with pytest.raises(ValueError, match="validation"):
        compute_scores(logits, ["sml"])
    with pytest.raises(ValueError, match="temperature"):
        compute_scores(logits, ["energy"], temperature=0)
    with pytest.raises(ValueError, match="classes"):
        compute_scores(logits, ["sml"], sml=SMLStats(np.zeros(3), np.ones(3), np.ones(3)))
