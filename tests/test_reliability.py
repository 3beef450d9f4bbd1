"""vlmrel.reliability against pingouin (ICC1), scipy (Spearman) and the seed's status boundaries."""

import itertools
import math

import numpy as np
import pandas as pd
import pingouin as pg
import pytest
from scipy.stats import spearmanr

from vlmrel.mcdo.reliability import icc1, pairwise_spearman, reliability, snr, status


def _scores(seed: int, k: int = 5, n: int = 40, noise: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    truth = rng.lognormal(size=n)
    return truth[None, :] + noise * rng.standard_normal((k, n))


def _pingouin_icc1(scores: np.ndarray) -> float:
    k, n = scores.shape
    long = pd.DataFrame(
        {
            "image": np.tile(np.arange(n), k),
            "trial": np.repeat(np.arange(k), n),
            "score": scores.ravel(),
        }
    )
    table = pg.intraclass_corr(data=long, targets="image", raters="trial", ratings="score")
    return float(table.set_index("Type").loc["ICC(1,1)", "ICC"])


@pytest.mark.parametrize("seed,k,noise", [(0, 2, 0.1), (1, 5, 0.3), (2, 10, 1.5), (3, 3, 5.0)])
def test_icc1_matches_pingouin(seed, k, noise):
    scores = _scores(seed, k=k, noise=noise)
    assert icc1(scores) == pytest.approx(_pingouin_icc1(scores), abs=1e-10)


def test_pairwise_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(7)
    scores = rng.integers(0, 6, size=(4, 30)).astype(float)  # many ties
    expected = [spearmanr(scores[i], scores[j]).statistic for i, j in itertools.combinations(range(4), 2)]
    np.testing.assert_allclose(pairwise_spearman(scores), expected, atol=1e-12)
    assert reliability(scores)["spearman_median"] == pytest.approx(np.median(expected), abs=1e-12)


def test_snr_definition():
    scores = _scores(4, k=6)
    between = np.var(scores.mean(axis=0), ddof=1)
    within = np.mean(np.var(scores, axis=0, ddof=1))
    assert snr(scores) == pytest.approx(between / within)


@pytest.mark.parametrize(
    "icc,snr_value,rho,expected",
    [
        (0.75, 2.0, 0.8, "usable"),  # every threshold inclusive
        (0.7499, 2.0, 0.8, "marginal"),  # ICC short of usable
        (0.9, 1.999, 0.9, "marginal"),
        (0.9, 5.0, 0.7999, "marginal"),
        (0.0, 1.0, 0.6, "marginal"),  # marginal needs no ICC
        (0.9, 0.999, 0.9, "failed"),
        (0.9, 5.0, 0.5999, "failed"),
        (math.nan, 5.0, 0.9, "insufficient_trials"),
    ],
)
def test_status_boundaries(icc, snr_value, rho, expected):
    assert status(icc, snr_value, rho, k=3) == expected


def test_single_trial_is_insufficient():
    result = reliability(_scores(5, k=1))
    assert result["status"] == "insufficient_trials"
    assert math.isnan(result["icc"]) and math.isnan(result["snr"]) and math.isnan(result["spearman_median"])


def test_constant_scores_are_insufficient_not_an_error():
    result = reliability(np.ones((3, 10)))
    assert result["status"] == "insufficient_trials"


def test_reliable_and_noisy_scores_get_the_expected_status():
    assert reliability(_scores(6, k=8, noise=0.01))["status"] == "usable"
    assert reliability(_scores(6, k=8, noise=50.0))["status"] == "failed"


def test_rejects_bad_shapes_and_nan():
    with pytest.raises(ValueError, match="K trials"):
        reliability(np.ones(5))
    bad = _scores(0)
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        reliability(bad)
