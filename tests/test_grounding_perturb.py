"""Perturbation grid: seed presets, magnitude = the seed's L2 norm, per-(sample, perturbation) noise."""

import importlib.util
import math

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from vlmrel.grounding import perturb
from vlmrel.grounding.perturb import (
    Perturbation,
    apply_perturbation,
    available_corruptions,
    build_grid,
    corrupt,
    derive_seed,
)


def _image(seed=0, w=64, h=48):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def seed_magnitude(brightness=0, contrast=1.0, blur=0, noise=0):
    """Notebook 02's perturbation_magnitude, verbatim."""
    return np.sqrt(brightness**2 + (contrast - 1) ** 2 + blur**2 + noise**2)


def test_presets_match_the_seeds():
    g5 = build_grid({"brightness_contrast": "5x5"})
    seed5 = [(b, c) for b in [-0.2, -0.1, 0, 0.1, 0.2] for c in [0.8, 0.9, 1.0, 1.1, 1.2]]
    assert [(p.params["brightness"], p.params["contrast"]) for p in g5] == seed5
    assert min(p.magnitude for p in g5) == 0.0
    assert max(p.magnitude for p in g5) == pytest.approx(0.283, abs=5e-4)  # notebook 02's printed range
    g10 = build_grid({"brightness_contrast": "10x10"})
    seed10 = [(b, c) for b in np.linspace(-0.3, 0.3, 10) for c in np.linspace(0.7, 1.3, 10)]
    got = np.array([(p.params["brightness"], p.params["contrast"]) for p in g10])
    assert np.allclose(got, np.array(seed10), atol=1e-12)
    assert len({p.id for p in g10}) == 100


def test_magnitude_is_the_seeds_l2_norm():
    grid = build_grid(
        {
            "brightness_contrast": {"brightness": [-0.3, 0.15], "contrast": [0.7, 1.25]},
            "blur": [0.5, 2.0],
            "noise": [0.05],
        }
    )
    for p in grid:
        assert p.magnitude == pytest.approx(seed_magnitude(**p.params))
    combo = Perturbation("combo", {"brightness": 0.1, "contrast": 0.9, "blur": 1.0, "noise": 0.02})
    assert combo.magnitude == pytest.approx(math.sqrt(0.01 + 0.01 + 1 + 0.0004))
    assert Perturbation("corruption", {"corruption": "fog", "severity": 3}).magnitude == pytest.approx(0.6)


def test_ids_are_stable_and_duplicates_rejected():
    p = Perturbation("bc", {"brightness": -0.2, "contrast": 0.8})
    assert p.id == "bc_bm0.2000_cp0.8000"
    assert p.to_dict()["params"] == {"brightness": -0.2, "contrast": 0.8}
    with pytest.raises(ValueError, match="duplicate"):
        build_grid({"blur": [1.0, 1.0]})
    with pytest.raises(ValueError, match="unknown preset"):
        build_grid({"brightness_contrast": "3x3"})


def test_brightness_contrast_blur_follow_pil_like_the_seed():
    img = _image()
    p = Perturbation("combo", {"brightness": 0.2, "contrast": 0.8, "blur": 1.5})
    out = apply_perturbation(img, p, sample_id="s", seed=0)
    ref = ImageEnhance.Brightness(img).enhance(1.2)
    ref = ImageEnhance.Contrast(ref).enhance(0.8).filter(ImageFilter.GaussianBlur(radius=1.5))
    assert np.array_equal(np.asarray(out), np.asarray(ref))


def test_noise_is_seeded_per_sample_and_perturbation_regardless_of_order():
    images = {f"s{i}": _image(i) for i in range(3)}
    grid = build_grid({"noise": [0.02, 0.1], "brightness_contrast": {"brightness": [0.1], "contrast": [1.0]}})
    state_before = np.random.get_state()[1].copy()  # noqa: NPY002 - checking the global RNG is untouched
    pairs = [(s, p) for s in images for p in grid]
    forward = {(s, p.id): np.asarray(apply_perturbation(images[s], p, sample_id=s, seed=7)) for s, p in pairs}
    order = np.random.default_rng(1).permutation(len(pairs))
    backward = {}
    for i in order:
        s, p = pairs[i]
        backward[(s, p.id)] = np.asarray(apply_perturbation(images[s], p, sample_id=s, seed=7))
    assert all(np.array_equal(forward[k], backward[k]) for k in forward)
    assert np.array_equal(np.random.get_state()[1], state_before)  # noqa: NPY002
    # different sample, perturbation or run seed -> different noise
    noisy = next(p for p in grid if p.family == "noise")
    a = forward[("s0", noisy.id)].astype(int) - np.asarray(images["s0"]).astype(int)
    same_img_other_id = np.asarray(apply_perturbation(images["s0"], noisy, sample_id="s1", seed=7)).astype(
        int
    )
    assert not np.array_equal(a, same_img_other_id - np.asarray(images["s0"]).astype(int))
    assert not np.array_equal(
        forward[("s0", noisy.id)], np.asarray(apply_perturbation(images["s0"], noisy, sample_id="s0", seed=8))
    )
    # the noise has the requested standard deviation (fraction of 255), before clipping
    flat = _image(0, 200, 200).convert("L").convert("RGB")
    gray = Image.new("RGB", flat.size, (128, 128, 128))
    d = np.asarray(apply_perturbation(gray, noisy, sample_id="x", seed=0)).astype(float) - 128
    assert d.std() == pytest.approx(0.02 * 255, rel=0.1)


def test_derive_seed_is_stable():
    assert derive_seed(0, "a", "b") == derive_seed(0, "a", "b")
    assert len({derive_seed(0, "a", "b"), derive_seed(0, "b", "a"), derive_seed(1, "a", "b")}) == 3
    assert 0 <= derive_seed(0, "a", "b") < 2**63


def test_corruptions_deterministic_and_clear_errors():
    img = _image(0, 64, 64)
    names = available_corruptions()
    assert "gaussian_noise" in names and "fog" not in names
    for name in ("gaussian_noise", "impulse_noise", "motion_blur"):
        a = np.asarray(corrupt(img, name, 3, seed=11))
        b = np.asarray(corrupt(img, name, 3, seed=11))
        c = np.asarray(corrupt(img, name, 3, seed=12))
        assert a.shape == (64, 64, 3) and np.array_equal(a, b) and not np.array_equal(a, c)
    p = Perturbation("corruption", {"corruption": "shot_noise", "severity": 2})
    assert np.array_equal(
        np.asarray(apply_perturbation(img, p, sample_id="s", seed=1)),
        np.asarray(apply_perturbation(img, p, sample_id="s", seed=1)),
    )
    with pytest.raises(RuntimeError, match="imagecorruptions.*fog|fog.*imagecorruptions"):
        corrupt(img, "fog", 1, seed=0)
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(img, "rain", 1, seed=0)
    with pytest.raises(ValueError, match="severity"):
        build_grid({"corruptions": {"names": ["snow"], "severities": [6]}})


def test_missing_corruption_package_names_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "imagecorruptions" else real(n, *a)
    )
    with pytest.raises(ImportError, match="imagecorruptions"):
        perturb._corruptions_module.__wrapped__()
    # the other families still work
    out = apply_perturbation(_image(), Perturbation("noise", {"noise": 0.05}), sample_id="s")
    assert out.size == (64, 48)
