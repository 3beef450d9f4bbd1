"""Exact MI thresholds: against brute force, sklearn's mutual_info_score, L-BFGS-B and the baseline."""

import itertools

import numpy as np
import pytest
from scipy.special import xlogy
from sklearn.metrics import mutual_info_score

from vlmrel.grounding import optimal_thresholds
from vlmrel.grounding.thresholds import (
    BASELINE_THRESHOLDS,
    bin_signal,
    brute_force_thresholds,
    candidate_cuts,
    iou_to_class,
    lbfgsb_thresholds,
    mutual_information,
    solve_partition,
    threshold_comparison,
)


def _data(seed: int, n: int, decimals: int | None, coupled: bool):
    rng = np.random.default_rng(seed)
    iou = rng.beta(2, 2, n)
    if decimals is not None:
        iou = np.round(iou, decimals)  # ties
    sig = rng.random(n) + (2 * iou if coupled else 0.0)
    return iou, sig


def _independent_brute(iou, sig, k, n_bins, binning):
    """Brute force written independently: every k-subset of midpoints, MI by sklearn."""
    if binning == "seed":  # notebook 02's compute_mutual_information, verbatim
        bins = np.digitize(sig, np.linspace(sig.min(), sig.max(), n_bins))
    else:
        bins = bin_signal(sig, n_bins, binning)
    v = np.unique(iou)
    mids = (v[:-1] + v[1:]) / 2
    best = 0.0
    for combo in itertools.combinations(mids, min(k, mids.size)):
        classes = (iou[:, None] >= np.asarray(combo)[None, :]).sum(1)
        best = max(best, mutual_info_score(classes, bins))
    return best


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("binning", ["width", "quantile", "seed"])
def test_exact_equals_brute_force(seed, binning):
    n = [12, 18, 16, 22][seed % 4]
    decimals = [1, 2, None][seed % 3]
    iou, sig = _data(seed, n, decimals, coupled=seed % 2 == 0)
    k = 1 + seed % 3
    n_bins = [3, 5, 8][seed % 3]
    t, mi = optimal_thresholds(iou, sig, k, n_bins, binning=binning)
    assert mi == pytest.approx(_independent_brute(iou, sig, k, n_bins, binning), abs=1e-12)
    assert mi == pytest.approx(brute_force_thresholds(iou, sig, k, n_bins, binning=binning)[1], abs=1e-12)
    # the returned thresholds achieve the returned MI, are k, sorted, strictly inside (0, 1)
    assert len(t) == k and np.all(np.diff(t) > 0) and t.min() > 0 and t.max() < 1
    classes = iou_to_class(iou, t)
    assert mutual_info_score(classes, bin_signal(sig, n_bins, binning)) == pytest.approx(mi, abs=1e-12)


def test_mutual_information_matches_sklearn_for_a_given_partition():
    iou, sig = _data(3, 400, 3, coupled=True)
    t = [0.2, 0.45, 0.8]
    classes = (iou[:, None] >= np.asarray(t)[None, :]).sum(1)
    edges = np.linspace(sig.min(), sig.max(), 21)
    bins = np.clip(np.digitize(sig, edges[1:-1]), 0, 19)  # independent equal-width binning
    assert mutual_information(iou, sig, t, 20) == pytest.approx(mutual_info_score(classes, bins), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_exact_beats_lbfgsb_and_baseline(seed):
    iou, sig = _data(100 + seed, 1275, 3, coupled=True)
    _, mi = optimal_thresholds(iou, sig)
    _, mi_lb = lbfgsb_thresholds(iou, sig, seed=seed)
    mi_base = mutual_information(iou, sig, BASELINE_THRESHOLDS)
    assert mi >= mi_lb - 1e-12
    assert mi >= mi_base - 1e-12


def test_lbfgsb_does_not_move_from_its_start():
    """Seed defect 3: the gradient is zero almost everywhere, so L-BFGS-B returns a start point."""
    iou, sig = _data(7, 500, None, coupled=True)
    t, _ = lbfgsb_thresholds(iou, sig, n_restarts=10, seed=0)
    rng = np.random.default_rng(0)
    starts = [np.sort(rng.uniform(0.1, 0.9, 3)) for _ in range(10)]
    assert any(np.allclose(t, s) for s in starts)


def test_failures_are_dropped_not_zero():
    iou, sig = _data(5, 200, 2, coupled=True)
    iou_nan = iou.copy()
    iou_nan[:20] = np.nan
    t1, mi1 = optimal_thresholds(iou_nan, sig)
    t2, mi2 = optimal_thresholds(iou[20:], sig[20:])
    assert mi1 == pytest.approx(mi2) and np.allclose(t1, t2)
    zero = iou.copy()
    zero[:20] = 0.0
    assert optimal_thresholds(zero, sig)[1] != pytest.approx(mi1)


def test_degenerate_inputs():
    # a constant signal has no information
    t, mi = optimal_thresholds(np.array([0.1, 0.5, 0.9, 0.3]), np.ones(4))
    assert mi == 0.0 and len(t) == 3
    # fewer distinct IoUs than thresholds: padded thresholds keep the partition and its MI
    iou = np.array([0.2, 0.2, 0.7, 0.7])
    sig = np.array([0.0, 0.1, 0.9, 1.0])
    t, mi = optimal_thresholds(iou, sig, k=3, n_bins=2)
    assert mi == pytest.approx(np.log(2))
    assert mutual_information(iou, sig, t, 2) == pytest.approx(mi)
    assert len(t) == 3 and np.all(np.diff(t) > 0)
    # IoUs covering exactly 0 and 1
    iou = np.array([0.0, 0.0, 1.0, 1.0])
    t, mi = optimal_thresholds(iou, sig, k=3, n_bins=2)
    assert mi == pytest.approx(np.log(2)) and mutual_information(iou, sig, t, 2) == pytest.approx(mi)
    with pytest.raises(ValueError, match="IoU values must lie"):
        optimal_thresholds(np.array([1.5]), np.array([0.0]))


def test_candidate_cuts_are_midpoints():
    assert candidate_cuts(np.array([0.5, 0.1, 0.5, 0.3, np.nan])).tolist() == pytest.approx([0.2, 0.4])


def test_comparison_entry():
    iou, sig = _data(9, 300, 2, coupled=True)
    entry = threshold_comparison(iou, sig, k=3, n_bins=10)
    assert entry["mi_units"] == "nats" and entry["n_pairs"] == 300
    assert entry["exact"]["mi"] >= entry["lbfgsb"]["mi"] - 1e-12
    assert entry["exact"]["mi"] >= entry["baseline"]["mi"] - 1e-12
    assert entry["baseline"]["thresholds"] == [0.3, 0.5, 0.7]


@pytest.mark.parametrize("seed", range(40))
def test_exact_with_few_signal_values(seed):
    """Few distinct signal values make many adjacent IoU groups proportional (merged before the DP)."""
    rng = np.random.default_rng(500 + seed)
    n = int(rng.integers(4, 16))
    iou = np.round(rng.random(n), 1)
    sig = rng.integers(0, 3, n).astype(float)
    k = int(rng.integers(1, 5))
    t, mi = optimal_thresholds(iou, sig, k, 3)
    assert mi == pytest.approx(_independent_brute(iou, sig, k, 3, "width"), abs=1e-12)
    assert mutual_information(iou, sig, t, 3) == pytest.approx(mi, abs=1e-12)
    assert len(t) == k and np.all(np.diff(t) > 0) and 0 < t.min() and t.max() < 1


def _reference_partition(counts: np.ndarray, r: int) -> float:
    """Plain DP written independently: max of sum_classes [sum c log c - |c| log |c|] over r cuts."""
    cum = np.vstack([np.zeros((1, counts.shape[1])), np.cumsum(counts, 0)])
    m = counts.shape[0]
    best = np.full((r + 2, m + 1), -np.inf)
    best[0, 0] = 0.0
    for j in range(1, m + 1):
        d = cum[j] - cum[:j]
        g = xlogy(d, d).sum(1) - xlogy(d.sum(1), d.sum(1))
        for seg in range(1, r + 2):
            best[seg, j] = np.max(best[seg - 1, :j] + g)
    return float(best[r + 1, m])


@pytest.mark.parametrize("seed", range(30))
def test_branch_and_bound_equals_plain_dp(seed):
    """The branch and bound (used above 256 blocks) finds the plain DP's optimum, with few or many
    cells, ties, singletons or multi-count blocks, and 1..4 cuts."""
    rng = np.random.default_rng(2000 + seed)
    m = int(rng.integers(8, 300))
    n_bins = int(rng.integers(2, 9))
    if seed % 3 == 0:  # one observation per block, as distinct IoUs give
        counts = np.eye(n_bins, dtype=np.int64)[rng.integers(0, n_bins, m)]
    else:  # a drifting bin distribution, several observations per block
        drift = np.linspace(0, 1, m)[:, None] * rng.random(n_bins)[None, :] + rng.random(n_bins)
        counts = np.stack([rng.multinomial(int(rng.integers(1, 4)), p / p.sum()) for p in drift])
    r = min(int(rng.integers(1, 5)), m - 1)
    ref = _reference_partition(counts, r)
    for n_cells in (2, 7, 32):
        value, cuts = solve_partition(counts, r, method="bnb", n_cells=n_cells)
        assert value == pytest.approx(ref, rel=1e-12, abs=1e-9)
        assert len(cuts) == r and cuts == sorted(set(cuts)) and 0 < cuts[0] and cuts[-1] < m
        # the cuts achieve the value
        edges = [0, *cuts, m]
        seg = np.add.reduceat(counts, edges[:-1], axis=0)
        got = float(xlogy(seg, seg).sum() - xlogy(seg.sum(1), seg.sum(1)).sum())
        assert got == pytest.approx(value, rel=1e-12, abs=1e-9)
    assert solve_partition(counts, r, method="dp")[0] == pytest.approx(ref, rel=1e-12, abs=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_exact_on_hundreds_of_distinct_ious(seed):
    """Continuous IoUs (every value distinct, the branch and bound's case) against the plain DP."""
    iou, sig = _data(40 + seed, 700, None, coupled=seed % 2 == 0)
    bins = bin_signal(sig, 20)
    order = np.argsort(iou)
    counts = np.eye(20, dtype=np.int64)[bins[order]]
    n_b = counts.sum(0)
    h = float(xlogy(700, 700) - xlogy(n_b, n_b).sum())
    t, mi = optimal_thresholds(iou, sig, 3, 20)
    assert mi == pytest.approx((_reference_partition(counts, 3) + h) / 700, abs=1e-12)
    assert mutual_info_score(iou_to_class(iou, t), bins) == pytest.approx(mi, abs=1e-12)


@pytest.mark.parametrize("n_bins", [2, 3, 5, 20])
def test_seed_binning_is_np_digitize_exactly(n_bins):
    """binning="seed" is notebook 02's np.digitize(s, linspace(min, max, n_bins)): n_bins + 1 labels,
    label 0 empty, the maximum alone in the last."""
    from vlmrel.grounding.thresholds import n_bin_labels

    rng = np.random.default_rng(n_bins)
    for sig in (rng.random(200), np.round(rng.normal(size=300), 1), np.full(7, 0.25), np.array([0.0, 1.0])):
        got = bin_signal(sig, n_bins, "seed")
        want = np.digitize(sig, np.linspace(sig.min(), sig.max(), n_bins))
        np.testing.assert_array_equal(got, want)
        assert got.min() >= 0 and got.max() < n_bin_labels(n_bins, "seed") == n_bins + 1
    sig = np.array([0.0, 0.1, 0.5, 0.99, 1.0])
    assert bin_signal(sig, 3, "seed").tolist() == [1, 1, 2, 2, 3]  # only the maximum in label 3
    assert bin_signal(sig, 3, "width").tolist() == [0, 0, 1, 2, 2]
    # the seed's MI for a partition, reproduced
    iou = rng.random(5)
    want_mi = mutual_info_score(
        iou_to_class(iou, BASELINE_THRESHOLDS), np.digitize(sig, np.linspace(0, 1, 3))
    )
    assert mutual_information(iou, sig, BASELINE_THRESHOLDS, 3, "seed") == pytest.approx(want_mi, abs=1e-15)


@pytest.mark.parametrize("seed", range(2))
def test_seed_binning_exact_on_hundreds_of_distinct_ious(seed):
    """The branch-and-bound path with binning="seed" (21 labels for n_bins=20) against the plain DP."""
    iou, sig = _data(60 + seed, 500, None, coupled=seed == 0)
    bins = np.digitize(sig, np.linspace(sig.min(), sig.max(), 20))
    order = np.argsort(iou)
    counts = np.eye(21, dtype=np.int64)[bins[order]]
    n_b = counts.sum(0)
    h = float(xlogy(500, 500) - xlogy(n_b, n_b).sum())
    t, mi = optimal_thresholds(iou, sig, 3, 20, binning="seed")
    assert mi == pytest.approx((_reference_partition(counts, 3) + h) / 500, abs=1e-12)
    assert mutual_info_score(iou_to_class(iou, t), bins) == pytest.approx(mi, abs=1e-12)
