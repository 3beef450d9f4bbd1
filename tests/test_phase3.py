"""mcdo Phase 3 (seed 002, section 9): exp6 ridge leverage and last-layer Laplace, exp7 degradations
and ablation, exp8 semantic decomposition, exp9 MOT association; numbers against direct references."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vlmrel.mcdo import aleatoric, laplace, mot, semantic
from vlmrel.mcdo.targets import score_vs_targets

# ---- exp6 ---------------------------------------------------------------------------------------


def test_ridge_leverage_is_the_full_quadratic_form():
    rng = np.random.default_rng(0)
    n, d, c, lam = 60, 7, 4, 1.0
    X = rng.normal(size=(n, d)) + rng.normal(size=d)  # correlated dimensions: A^-1 is far from diagonal
    y = rng.integers(0, c, size=n)
    score, sigma2 = laplace.ridge_leverage(X, y, c, lam)

    x = X / np.linalg.norm(X, axis=1, keepdims=True)
    a_inv = np.linalg.inv(x.T @ x + lam * np.eye(d))
    Y = np.eye(c)[y]
    W = a_inv @ x.T @ Y
    s2 = np.mean((1.0 - np.sum(x * W[:, y].T, axis=1)) ** 2)
    direct = np.array([s2 * xi @ a_inv @ xi for xi in x])
    np.testing.assert_allclose(sigma2, s2, rtol=1e-10)
    np.testing.assert_allclose(score, direct, rtol=1e-10)
    seed_bug = s2 * (x**2 @ np.diag(a_inv))  # the seed's diag(A^-1) * x^2
    assert not np.allclose(score, seed_bug, rtol=1e-3)


@pytest.mark.parametrize("link_approx", ["probit", "mc"])
def test_laplace_entropy_is_lower_on_class_centres_than_between_classes(link_approx):
    rng = np.random.default_rng(1)
    d, c, scale = 8, 3, 10.0
    centres = np.eye(d)[:c]
    fit_x = np.repeat(centres, 30, axis=0) + 0.15 * rng.normal(size=(c * 30, d))
    fit_x /= np.linalg.norm(fit_x, axis=1, keepdims=True)
    fit_y = np.repeat(np.arange(c), 30)
    between = np.array([centres[0] + centres[1], centres[1] + centres[2], centres[0] + centres[2]]) / np.sqrt(
        2
    )
    ent, info = laplace.last_layer_laplace(
        scale * centres,
        None,
        fit_x,
        fit_y,
        np.concatenate([centres, between]),
        hessian_structure="kron",
        link_approx=link_approx,
    )
    assert info["prior_precision"] > 0 and info["n_fit"] == c * 30
    assert ent[:c].max() < ent[c:].min(), ent


def test_fit_split_is_seeded_by_image_id_and_leaves_images_to_score():
    ids = [f"img{i}" for i in range(50)]
    fit = laplace.fit_split(ids, 42, 0.2)
    assert fit.sum() == 10
    again = laplace.fit_split(ids[::-1], 42, 0.2)
    assert set(np.asarray(ids)[fit]) == set(
        np.asarray(ids[::-1])[again]
    )  # an image's split ignores the order
    assert laplace.fit_split(ids[:4], 42, 0.9).sum() == 1  # at least 3 images stay scored


def test_score_vs_targets_orients_margin_and_entropy():
    rng = np.random.default_rng(2)
    entropy = rng.random(200)
    margin = 1 - entropy
    out = score_vs_targets(
        entropy + 0.01 * rng.random(200), {"margin": margin, "entropy": entropy, "prompt_sensitivity": None}
    )
    assert out["rho_neg_margin"] > 0.9 and out["rho_entropy"] > 0.9
    assert out["auroc_low_margin"] > 0.9 and out["auroc_high_entropy"] > 0.9
    assert "rho_prompt_sensitivity" not in out


# ---- exp7 ---------------------------------------------------------------------------------------


def _textures(n: int, size: int = 32) -> list[Image.Image]:
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _sharpness(img: Image.Image) -> float:
    a = np.asarray(img, dtype=np.float64)
    return float(np.abs(np.diff(a, axis=0)).mean() + np.abs(np.diff(a, axis=1)).mean())


def test_the_ablation_finds_a_model_that_responds_to_blur_and_not_one_that_ignores_it():
    images = _textures(40)
    rng = np.random.default_rng(4)

    def responds(img):  # uncertainty grows as the image loses detail
        return 1.0 / (1.0 + _sharpness(img)) * (1.0 + 0.01 * rng.normal())

    def ignores(i):  # a per-image level and measurement noise: no function of the pixels
        return 1.0 + 0.1 * i + 0.01 * rng.normal()

    blurred = [aleatoric.degrade(img, "blur5", seed=0, image_id=str(i)) for i, img in enumerate(images)]
    stats = aleatoric.ablation_stats(
        np.array([responds(m) for m in images]), np.array([responds(m) for m in blurred])
    )
    assert (
        stats["wilcoxon_p_greater"] < 0.01
        and stats["pct_rose"] == 100.0
        and stats["mean_relative_change"] > 0
    )
    null = aleatoric.ablation_stats(
        np.array([ignores(i) for i in range(40)]), np.array([ignores(i) for i in range(40)])
    )
    assert null["wilcoxon_p_greater"] > 0.01 and 20 <= null["pct_rose"] <= 80


def test_the_occluder_survives_the_crop_and_is_placed_by_seed_and_image_id():
    from vlmrel.pixels import resize_to_spec

    spec = {"size": 32, "resize": "shortest_edge_center_crop", "interpolation": "bicubic",
            "mean": [0.5] * 3, "std": [0.5] * 3}  # fmt: skip
    img = Image.new("RGB", (80, 40), (255, 255, 255))
    base = resize_to_spec(img, spec)
    out = np.asarray(aleatoric.degrade(base, "occlude25", seed=1, image_id="a"))
    assert out.shape == (32, 32, 3)
    assert (out.sum(axis=2) == 0).mean() == pytest.approx(0.25, abs=0.02)  # after the crop: all of it
    again = np.asarray(aleatoric.degrade(base, "occlude25", seed=1, image_id="a"))
    other = np.asarray(aleatoric.degrade(base, "occlude25", seed=1, image_id="b"))
    assert np.array_equal(out, again) and not np.array_equal(out, other)
    with pytest.raises(ValueError, match="sharpen3"):
        aleatoric.parse_version("sharpen3")


def test_aleatoric_variance_is_the_mean_per_dimension_sample_variance():
    f = np.random.default_rng(5).normal(size=(6, 4, 9))
    direct = np.array([np.mean(np.var(f[i], axis=0, ddof=1)) for i in range(6)])
    np.testing.assert_allclose(aleatoric.aleatoric_variance(f), direct)


# ---- exp8 ---------------------------------------------------------------------------------------


def test_parallel_plus_orthogonal_is_the_trace_of_the_pass_covariance():
    rng = np.random.default_rng(6)
    t, b, d, p = 12, 5, 16, 6
    passes = rng.normal(size=(t, b, d)) * rng.random(d) + 3.0
    text = rng.normal(size=(p, d))
    basis = semantic.text_basis(text)
    assert basis.shape == (d, p - 1)  # centred: one direction fewer than prompts
    np.testing.assert_allclose(basis.T @ basis, np.eye(p - 1), atol=1e-12)
    m = semantic.pass_metrics(passes, basis, text / np.linalg.norm(text, axis=1, keepdims=True))
    for i in range(b):
        cov = np.cov(passes[:, i, :], rowvar=False, ddof=1)
        trace = np.trace(cov) * (t - 1) / t / d  # divisor T, per dimension
        assert m["parallel"][i] + m["orthogonal"][i] == pytest.approx(trace, rel=1e-10)
        assert m["trace"][i] == pytest.approx(trace, rel=1e-10)
        assert m["anisotropy"][i] == pytest.approx(np.linalg.eigvalsh(cov)[-1] / np.trace(cov), rel=1e-8)
    assert np.all((m["parallel_fraction"] > 0) & (m["parallel_fraction"] < 1))


def test_variance_inside_the_prompt_span_gives_parallel_fraction_one():
    rng = np.random.default_rng(7)
    d, p = 10, 4
    text = rng.normal(size=(p, d))
    basis = semantic.text_basis(text)
    passes = 5.0 + (rng.normal(size=(20, 3, basis.shape[1])) @ basis.T)
    m = semantic.pass_metrics(passes, basis, text / np.linalg.norm(text, axis=1, keepdims=True))
    np.testing.assert_allclose(m["parallel_fraction"], 1.0, atol=1e-10)


# ---- exp9 ---------------------------------------------------------------------------------------


def _idf1(data: dict, mode: str) -> float:
    summary, _ = mot.evaluate(mot.parse_frames(data), alpha=1.0, beta=1.0, gate_cost=3.0)
    return summary["metrics"][mode]["idf1"], summary


def test_adaptive_association_helps_only_when_uncertainty_marks_the_noisy_detections():
    marked, summary = _idf1(mot.demo_sequence(seed=42), "adaptive")
    base = summary["metrics"]["baseline"]["idf1"]
    assert marked > base
    assert summary["improvement_over_baseline"]["adaptive"]["idf1"] == pytest.approx(marked - base)
    assert summary["modes"] == ["baseline", "adaptive", "oracle"] and summary["skipped_modes"] == ["laplace"]
    shuffled, s2 = _idf1(mot.demo_sequence(seed=42, shuffle_uncertainty=True), "adaptive")
    assert s2["metrics"]["baseline"]["idf1"] == base  # same costs, only the uncertainties moved
    assert shuffled <= base


def test_gating_leaves_impossible_pairs_unmatched():
    cost = np.array([[0.1, 50.0], [50.0, np.nan]])
    assert mot.associate(cost, gate_cost=3.0) == [(0, 0)]


@pytest.mark.parametrize(
    "mutate,needle",
    [
        (lambda f: f[3].update(motion_cost=[[0.0]]), "frame 3: field 'motion_cost'"),
        (lambda f: f[2].pop("appearance_cost"), "frame 2: missing field 'appearance_cost'"),
        (
            lambda f: f[1]["detections"][0].update(uncertainty=-1),
            "frame 1: field 'detections'[0].uncertainty",
        ),
        (lambda f: f[0]["tracks"][1].pop("gt_id"), "frame 0: field 'tracks'[1]: missing ['gt_id']"),
        (
            lambda f: f[4]["detections"][2].pop("oracle_uncertainty"),
            "frame 4: field 'detections'[2].oracle_uncertainty",
        ),
    ],
)
def test_a_malformed_cost_json_names_the_frame_and_the_field(tmp_path, mutate, needle):
    data = mot.demo_sequence(seed=0, n_frames=6)
    mutate(data["frames"])
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(data))
    with pytest.raises(mot.CostFileError) as err:
        frames = mot.read_cost_json(path)
        mot.available_modes(frames)
    assert needle in str(err.value)
