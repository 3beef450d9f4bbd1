"""vlmrel.ambiguity against scipy (softmax, expit, entropy, spearmanr, Mann-Whitney U)."""

import numpy as np
import pytest
from scipy.special import expit, softmax
from scipy.stats import entropy as scipy_entropy
from scipy.stats import mannwhitneyu, spearmanr

from vlmrel.mcdo.ambiguity import (
    DEMO_CLASS_NAMES,
    ambiguity_stats,
    entropy,
    exp5_overall_summary,
    load_class_names,
    make_prompts,
    margin,
    skipped,
    text_features_or_reason,
    zero_shot_probs,
)


def _features(seed: int, n: int = 50, c: int = 7, d: int = 16):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), rng.standard_normal((c, d))


def _cos(img, txt):
    a = img / np.linalg.norm(img, axis=1, keepdims=True)
    b = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    return a @ b.T


def test_clip_softmax_probs():
    img, txt = _features(0)
    got = zero_shot_probs(img, txt, logit_scale=100.0)
    np.testing.assert_allclose(got, softmax(100.0 * _cos(img, txt), axis=1), rtol=1e-10)
    np.testing.assert_allclose(got.sum(axis=1), 1.0)


def test_siglip_sigmoid_probs_are_normalised_odds():
    img, txt = _features(1)
    z = 10.0 * _cos(img, txt) - 10.0
    sig = expit(z)
    odds = sig / (1 - sig)
    got = zero_shot_probs(img, txt, logit_scale=10.0, logit_bias=-10.0, kind="sigmoid")
    np.testing.assert_allclose(got, odds / odds.sum(axis=1, keepdims=True), rtol=1e-9)
    norm = zero_shot_probs(img, txt, 10.0, -10.0, kind="sigmoid", sigmoid_mode="normalize")
    np.testing.assert_allclose(norm, sig / sig.sum(axis=1, keepdims=True), rtol=1e-10)
    with pytest.raises(ValueError, match="kind"):
        zero_shot_probs(img, txt, 1.0, kind="argmax")


def test_margin_and_entropy():
    rng = np.random.default_rng(2)
    p = rng.dirichlet(np.ones(6), size=40)
    p[0] = [1, 0, 0, 0, 0, 0]
    srt = np.sort(p, axis=1)
    np.testing.assert_allclose(margin(p), srt[:, -1] - srt[:, -2])
    np.testing.assert_allclose(entropy(p), scipy_entropy(p, axis=1), atol=1e-12)
    assert entropy(p)[0] == 0.0


def test_ambiguity_stats_against_scipy():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((200, 10)) * rng.uniform(0.2, 4, size=(200, 1))
    probs = softmax(logits, axis=1)
    h = scipy_entropy(probs, axis=1)
    u = np.exp(h + 0.5 * rng.standard_normal(200))
    st = ambiguity_stats(u, probs, high_entropy_quantile=0.8)
    assert st["rho_uncertainty_vs_entropy"] == pytest.approx(spearmanr(u, h).statistic)
    srt = np.sort(probs, axis=1)
    assert st["rho_uncertainty_vs_margin"] == pytest.approx(spearmanr(u, srt[:, -1] - srt[:, -2]).statistic)
    pos = h >= np.quantile(h, 0.8)
    ref_auc = mannwhitneyu(u[pos], u[~pos]).statistic / (pos.sum() * (~pos).sum())
    assert st["auroc_high_entropy"] == pytest.approx(ref_auc)
    assert st["n_high_entropy"] == pos.sum() == 40
    assert st["sanity_ok"] is (st["rho_uncertainty_vs_entropy"] > 0.3 and st["auroc_high_entropy"] > 0.6)
    with pytest.raises(ValueError, match="same images"):
        ambiguity_stats(u[:10], probs)


def test_text_tower_skips_with_reason():
    feats, reason = text_features_or_reason(None, ["a", "b"])
    assert feats is None and "no text tower" in reason

    def broken(prompts):
        raise NotImplementedError("tokenizer missing (sentencepiece)")

    feats, reason = text_features_or_reason(broken, ["a", "b"])
    assert feats is None and "sentencepiece" in reason
    feats, reason = text_features_or_reason(lambda ps: np.ones((len(ps), 4)), ["a", "b"])
    assert reason is None and feats.shape == (2, 4)
    feats, reason = text_features_or_reason(lambda ps: np.ones((1, 4)), ["a", "b"])
    assert feats is None and "shape" in reason
    summary = exp5_overall_summary(
        {"tiny_clip": {"rho_uncertainty_vs_entropy": 0.5, "sanity_ok": True}, "x": skipped("no text tower")},
        {"prompt_template": "a photo of a {}."},
    )
    assert summary["evaluated"] == ["tiny_clip"] and summary["skipped"] == {"x": "no text tower"}
    assert summary["any_sanity_ok"] is True


def test_class_names_and_prompts(tmp_path):
    assert load_class_names("demo") == list(DEMO_CLASS_NAMES)
    f = tmp_path / "classes.txt"
    f.write_text("# comment\ncat\n\ndog\n")
    assert load_class_names(str(f)) == ["cat", "dog"]
    with pytest.raises(ValueError, match="duplicate"):
        load_class_names(["cat", "cat"])
    with pytest.raises(ValueError, match="neither"):
        load_class_names("no_such_file.txt")
    assert make_prompts(["cat", "dog"], "a photo of a {}.") == ["a photo of a cat.", "a photo of a dog."]
    with pytest.raises(ValueError, match="placeholder"):
        make_prompts(["cat"], "a photo")


def test_prompt_sensitivity_equals_a_direct_computation():
    from vlmrel.mcdo.ambiguity import (
        SENSITIVITY_TEMPLATES,
        prompt_sensitivity,
        sensitivity_stats,
        template_max_probs,
    )

    rng = np.random.default_rng(4)
    names = ["cat", "dog", "car", "tree"]
    img = rng.standard_normal((30, 8))
    bank = {}

    def encode_text(prompts):
        for p in prompts:
            bank.setdefault(p, rng.standard_normal(8))
        return np.stack([bank[p] for p in prompts])

    got = prompt_sensitivity(template_max_probs(img, encode_text, names, 50.0))
    maxima = []
    for t in SENSITIVITY_TEMPLATES:
        txt = np.stack([bank[t.replace("{}", n)] for n in names])
        maxima.append(softmax(50.0 * _cos(img, txt), axis=1).max(axis=1))
    m = np.stack(maxima, axis=1)
    direct = ((m - m.mean(axis=1, keepdims=True)) ** 2).sum(axis=1) / (m.shape[1] - 1)
    np.testing.assert_allclose(got, direct, rtol=1e-12, atol=1e-15)
    assert set(bank) == {t.replace("{}", n) for t in SENSITIVITY_TEMPLATES for n in names}
    u = rng.random(30)
    s = sensitivity_stats(u, got)
    assert s["rho_uncertainty_vs_prompt_sensitivity"] == pytest.approx(spearmanr(u, direct).statistic)


def test_wordnet_folders_map_to_imagenet_names_and_labels(tmp_path):
    from open_clip import IMAGENET_CLASSNAMES

    from vlmrel.mcdo.imagenet import folder_labels, imagenet_wnids

    wnids = imagenet_wnids()
    assert wnids[0] == "n01440764" and wnids[-1] == "n15075141" and wnids == sorted(wnids)
    names = list(IMAGENET_CLASSNAMES)
    got, labels = folder_labels(
        ["n01440764/a.JPEG", "x/n15075141/b.JPEG", "flat.jpg", "goldfish/c.jpg", "n99999999/d.JPEG"], names
    )
    assert got == ["tench", "toilet paper", "", "goldfish", ""]
    assert labels == [0, 999, -1, 1, -1]
    cmap = tmp_path / "map.tsv"
    cmap.write_text("n00000001\tcat\nn00000002\tdog\n")
    assert folder_labels(["n00000002/x.png"], ["cat", "dog"], cmap) == (["dog"], [1])
    cmap.write_text("n00000001 cat\n")
    with pytest.raises(ValueError, match="wnid<TAB>"):
        folder_labels(["n00000001/x.png"], ["cat", "dog"], cmap)
