"""Phase 2 analyses (exp1-exp4), exp2's synthetic images and the phase figures."""

import itertools

import numpy as np
import pytest
from PIL import Image
from scipy.stats import mannwhitneyu, spearmanr

from vlmrel.mcdo.comparisons import dropout_types, rank_stability, recipe_agreement, synthetic_separation
from vlmrel.mcdo.reliability import reliability
from vlmrel.mcdo.synthetic import (
    SYNTHETIC_KINDS,
    iter_synthetic,
    make_synthetic,
    synthetic_id,
    synthetic_seed,
)


def _scores(seed: int, k: int = 3, n: int = 40, noise: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.lognormal(size=n)[None, :] * np.exp(noise * rng.standard_normal((k, n)))


# --------------------------------------------------------------------------- exp1


def test_exp1_equal_rates_give_one_and_matches_scipy():
    s = _scores(0)
    monotone = np.tile(3 * s.mean(0) ** 2, (2, 1))  # a monotone transform of the per-image means
    same = rank_stability({0.01: s, 0.02: s.copy(), 0.05: monotone})
    np.testing.assert_allclose(same["spearman_matrix"], np.ones((3, 3)))
    assert same["spearman_offdiag"] == {"median": 1.0, "min": 1.0}
    a, b, c = _scores(1), _scores(2), _scores(3, k=5)
    res = rank_stability({0.05: c, 0.01: a, 0.02: b})
    assert res["p"] == [0.01, 0.02, 0.05]
    means = [a.mean(0), b.mean(0), c.mean(0)]
    for i, j in itertools.combinations(range(3), 2):
        assert res["spearman_matrix"][i][j] == pytest.approx(spearmanr(means[i], means[j]).statistic)
    assert res["reliability_by_p"]["0.05"]["icc"] == pytest.approx(reliability(c)["icc"])
    with pytest.raises(ValueError, match="different numbers of images"):
        rank_stability({0.01: a, 0.02: a[:, :10]})
    with pytest.raises(ValueError, match="at least 2"):
        rank_stability({0.01: a})


def test_exp1_a_repeated_rate_is_a_replicate_arm():
    a, b = _scores(4), _scores(5)
    res = rank_stability([(0.05, b), (0.01, a), (0.01, a.copy())])
    assert res["arms"] == ["0.01#1", "0.01#2", "0.05"] and res["p"] == [0.01, 0.01, 0.05]
    replicate = next(p for p in res["pairs"] if p["arm_a"] == "0.01#1" and p["arm_b"] == "0.01#2")
    assert replicate["spearman"] == 1.0 and replicate["p_a"] == replicate["p_b"] == 0.01
    other = next(p for p in res["pairs"] if p["arm_b"] == "0.05" and p["arm_a"] == "0.01#1")
    assert other["spearman"] == pytest.approx(spearmanr(a.mean(0), b.mean(0)).statistic)


# --------------------------------------------------------------------------- exp2


def test_exp2_auroc_against_mann_whitney():
    rng = np.random.default_rng(4)
    nat = rng.lognormal(size=(2, 50))
    syn = {"flat": rng.lognormal(-1, size=(2, 50)), "noise": rng.lognormal(0.5, size=30)}
    res = synthetic_separation(nat, syn)
    nm = nat.mean(0)
    for kind, s in syn.items():
        sm = np.asarray(s).reshape(-1, np.asarray(s).shape[-1]).mean(0)
        ref = mannwhitneyu(nm, sm).statistic / (nm.size * sm.size)
        assert res["kinds"][kind]["auroc"] == pytest.approx(ref)
        assert res["kinds"][kind]["separation"] == pytest.approx(max(ref, 1 - ref))
    assert res["kinds"]["flat"]["paired_fraction_natural_higher"] == pytest.approx(
        np.mean(nm > syn["flat"].mean(0))
    )
    assert res["kinds"]["noise"]["paired_fraction_natural_higher"] is None


# --------------------------------------------------------------------------- exp3 / exp4


def test_exp3_reliability_and_agreement():
    types = {"input": _scores(5, k=4), "dropconnect": _scores(6, k=4), "gaussian": _scores(7, k=4)}
    res = dropout_types(types)
    for t, s in types.items():
        assert res["reliability"][t] == reliability(s)
    means = {t: s.mean(0) for t, s in types.items()}
    assert res["spearman_matrix"][0][2] == pytest.approx(
        spearmanr(means["input"], means["gaussian"]).statistic
    )


def test_exp4_recipe_agreement():
    rng = np.random.default_rng(8)
    trace = _scores(9, k=4)
    ang = trace * np.exp(0.5 * rng.standard_normal(trace.shape))
    res = recipe_agreement({"trace_pre": trace, "angular_variance": ang})
    p = res["pairs"][0]
    ref = [spearmanr(trace[k], ang[k]).statistic for k in range(4)]
    np.testing.assert_allclose(p["spearman_per_trial"], ref)
    assert p["spearman_trial_median"] == pytest.approx(np.median(ref))
    assert p["spearman_pooled"] == pytest.approx(spearmanr(trace.ravel(), ang.ravel()).statistic)
    assert p["spearman_of_means"] == pytest.approx(spearmanr(trace.mean(0), ang.mean(0)).statistic)
    assert res["reliability"]["angular_variance"]["snr"] == pytest.approx(reliability(ang)["snr"])
    with pytest.raises(ValueError, match="different numbers of trials"):
        recipe_agreement({"a": trace, "b": ang[:2]})


# --------------------------------------------------------------------------- synthetic images


def _photo(seed: int = 0, size: tuple[int, int] = (67, 45)) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    arr = np.stack([x * 3, y * 5, (x + y) * 2], axis=-1) % 256 + rng.integers(0, 20, (size[1], size[0], 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def test_synthetic_deterministic_per_image_and_kind():
    img = _photo()
    for kind in SYNTHETIC_KINDS:
        a = np.asarray(make_synthetic(img, kind, "id1", seed=3))
        b = np.asarray(make_synthetic(img, kind, "id1", seed=3))
        np.testing.assert_array_equal(a, b)
        assert a.shape == np.asarray(img).shape or kind == "shuffle"
    for kind in ("noise", "shuffle"):
        a = np.asarray(make_synthetic(img, kind, "id1", seed=3))
        assert not np.array_equal(a, np.asarray(make_synthetic(img, kind, "id2", seed=3)))
        assert not np.array_equal(a, np.asarray(make_synthetic(img, kind, "id1", seed=4)))
    assert synthetic_seed(0, "a", "noise") != synthetic_seed(0, "a", "shuffle")
    # order independence: generating in reverse order gives the same images
    items = [("x", _photo(1)), ("y", _photo(2))]
    fwd = {sid: np.asarray(im) for sid, _, _, im in iter_synthetic(items, seed=5)}
    rev = {
        sid: np.asarray(im)
        for sid, _, _, im in iter_synthetic(items[::-1], kinds=SYNTHETIC_KINDS[::-1], seed=5)
    }
    assert fwd.keys() == rev.keys() and synthetic_id("x", "noise") in fwd
    for k in fwd:
        np.testing.assert_array_equal(fwd[k], rev[k])


def test_synthetic_kinds_content():
    img = _photo(size=(64, 48))
    arr = np.asarray(img, dtype=np.float64)
    flat = np.asarray(make_synthetic(img, "flat", "i", 0))
    np.testing.assert_array_equal(flat, np.broadcast_to(np.round(arr.reshape(-1, 3).mean(0)), flat.shape))
    noise = np.asarray(make_synthetic(img, "noise", "i", 0), dtype=np.float64)
    np.testing.assert_allclose(noise.reshape(-1, 3).mean(0), arr.reshape(-1, 3).mean(0), atol=6)
    shuf = np.asarray(make_synthetic(img, "shuffle", "i", 0, shuffle_grid=4))
    assert shuf.shape == (48, 64, 3) and not np.array_equal(shuf, np.asarray(img))

    def patches(a):
        return sorted(a[i : i + 12, j : j + 16].tobytes() for i in range(0, 48, 12) for j in range(0, 64, 16))

    assert patches(shuf) == patches(np.asarray(img))
    blur = np.asarray(make_synthetic(img, "blur", "i", 0, blur_frac=0.05), dtype=np.float64)
    assert np.abs(np.diff(blur, axis=1)).mean() < np.abs(np.diff(arr, axis=1)).mean()
    with pytest.raises(ValueError, match="unknown synthetic kind"):
        make_synthetic(img, "stripes", "i", 0)


# --------------------------------------------------------------------------- figures (smoke)


def test_phase_figures_write_pngs(tmp_path):
    from scipy.special import softmax

    from vlmrel.mcdo import figures as pf
    from vlmrel.mcdo.ambiguity import ambiguity_stats, entropy, margin
    from vlmrel.mcdo.gate import convergence_summary
    from vlmrel.mcdo.geometry import geometry_from_passes
    from vlmrel.mcdo.reliability import Trials, model_summary

    rng = np.random.default_rng(0)
    geo = [geometry_from_passes(rng.standard_normal((8, 10, 6)) + 3) for _ in range(2)]
    stacks = {k: np.stack([g[k] for g in geo]) for k in geo[0]}
    recipes = {k: stacks[k] for k in ("trace_pre", "trace_post", "angular_variance")}
    probs = softmax(rng.standard_normal((10, 5)) * 3, axis=1)
    u = rng.lognormal(size=10)
    pre = rng.lognormal(size=(3, 3, 10))
    summ = model_summary(Trials([4, 8, 16], [str(i) for i in range(10)], pre, pre, [{}]), "m", 0.01)
    s1, s2 = _scores(1, n=10), _scores(2, n=10)
    jobs = {
        "geo.png": lambda p: pf.geometry_distributions({"m": stacks}, p),
        "rec.png": lambda p: pf.recipe_agreement_scatter(recipes, p, "m", recipe_agreement(recipes)),
        "amb.png": lambda p: pf.ambiguity_scatter(
            u, entropy(probs), margin(probs), p, "m", ambiguity_stats(u, probs)
        ),
        "conv.png": lambda p: pf.convergence_curve(convergence_summary(summ), p),
        "exp1.png": lambda p: pf.rank_stability_heatmap(rank_stability({0.01: s1, 0.1: s2}), p, "m"),
        "exp2.png": lambda p: pf.synthetic_vs_natural(
            s1, {"flat": s2}, p, "m", synthetic_separation(s1, {"flat": s2})
        ),
        "exp3.png": lambda p: pf.dropout_types_figure(dropout_types({"input": s1, "gaussian": s2}), p, "m"),
    }
    for name, job in jobs.items():
        job(tmp_path / name)
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_exp4_full_model_matrix_is_symmetric_with_a_unit_diagonal():
    from vlmrel.mcdo.comparisons import model_matrix

    rng = np.random.default_rng(2)
    ids = [f"im{i}" for i in range(30)]
    base = rng.random(30)
    scores = {}
    for j, m in enumerate(["a", "b", "c"]):
        stacks = {
            "trace_pre": base + rng.normal(0, 0.2 * (j + 1), (3, 30)),
            "angular_variance": rng.random((3, 30)),
        }
        scores[m] = (ids, stacks)
    # model c lists its images in another order: matched by id
    order = rng.permutation(30)
    scores["c"] = ([ids[i] for i in order], {k: v[:, order] for k, v in scores["c"][1].items()})
    out = model_matrix(scores)
    assert out["models"] == ["a", "b", "c"] and out["n_images"] == 30
    for recipe in ("trace_pre", "angular_variance"):
        mat = np.array(out["recipes"][recipe]["spearman_matrix"])
        assert mat.shape == (3, 3)
        np.testing.assert_array_equal(mat, mat.T)
        np.testing.assert_array_equal(np.diag(mat), np.ones(3))
    mat = np.array(out["recipes"]["trace_pre"]["spearman_matrix"])
    a_mean = scores["a"][1]["trace_pre"].mean(axis=0)
    c_mean = scores["c"][1]["trace_pre"].mean(axis=0)[np.argsort(order)]
    assert mat[0, 2] == pytest.approx(spearmanr(a_mean, c_mean).statistic)
