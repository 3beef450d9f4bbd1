"""Phase 4: exp10 (text-encoder MC dropout) and exp11 (concrete-dropout proxy, a rate search)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from vlmrel.mcdo import concrete, text
from vlmrel.mcdo.dropout import inject_dropout
from vlmrel.mcdo.reliability import icc1
from vlmrel.models import load_encoder


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def encoders():
    return {name: load_encoder(name) for name in ("tiny_clip", "tiny_siglip")}


# ---- exp10 -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny_clip", "tiny_siglip"])
def test_text_dropout_leaves_image_embeddings_bit_identical(name, encoders):
    enc = encoders[name]
    x = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    prompts = ["a photo of a cat", "something", "a detailed close-up photo of a dog in natural lighting"]
    img, txt = enc.encode_image(x), enc.encode_text(prompts)
    vision_ids = {id(m) for m in enc.vision.modules()}
    assert not vision_ids & {id(m) for m in enc.text.modules()}  # the towers share no module
    with inject_dropout(enc.text, 0.1, torch.Generator().manual_seed(0), "output") as inj:
        assert inj.targets and any(isinstance(m, nn.Linear) for m in enc.text.modules())
        noisy_txt = enc.encode_text(prompts)
        assert all(inj.calls[t] >= 1 for t in inj.targets), inj.calls
        assert torch.equal(enc.encode_image(x), img)  # bit-identical while the text tower is noisy
    assert not torch.allclose(noisy_txt, txt)
    trace = text.text_trial(enc, prompts, p=0.05, seed=1, trial=0, T=4, kind="output", batch_size=2, progress=False)
    assert trace.shape == (3,) and np.all(trace > 0)
    assert torch.equal(enc.encode_image(x), img) and torch.equal(enc.encode_text(prompts), txt)


def test_specificity_counts_close_up_and_follows_the_seed_rule():
    assert text.words("A detailed close-up photo") == ["a", "detailed", "close-up", "photo"]
    p = "a detailed close-up photo of a cat in natural lighting"
    # 10 words, positives: detailed, close-up, photo, natural, lighting
    raw = 0.6 * 10 / 20 + 0.08 * 5
    assert text.specificity(p) == pytest.approx(min(1.0, (raw + 0.25) / 1.25))
    raw = 0.6 * 6 / 20 - 0.10 * 2  # "something that might be a dog": 6 words, negatives something, might
    assert text.specificity("something that might be a dog") == pytest.approx((raw + 0.25) / 1.25)
    assert text.specificity("something thing object unknown item") == 0.0  # clipped
    assert text.specificity("a {}".replace("{}", "cat")) < text.specificity(p)


def test_prompt_bank_and_seeded_sample(tmp_path):
    bank = text.prompt_bank(["cat", "dog"])
    assert len(bank) == 7 + 2 * 4 and bank[0] == ("generic", "an object")
    assert ("specific", "a detailed close-up photo of a dog in natural lighting") in bank
    a = text.sample_prompts(["cat", "dog", "car"], 10, seed=5)
    assert a == text.sample_prompts(["cat", "dog", "car"], 10, seed=5) and len(a) == 10
    assert a != text.sample_prompts(["cat", "dog", "car"], 10, seed=6)
    assert text.sample_prompts(["cat", "dog"], 100, seed=5) == bank
    f = tmp_path / "prompts.tsv"
    f.write_text("generic\tan object\nphoto\ta photo of a cat\n# comment\n\nmine\ta cat on a mat\n")
    assert text.sample_prompts(["x", "y"], 2, 0, f) == [
        ("generic", "an object"),
        ("photo", "a photo of a cat"),
        ("mine", "a cat on a mat"),
    ]
    f.write_text("no tab here\n")
    with pytest.raises(ValueError, match="style<TAB>prompt"):
        text.read_prompt_file(f)


def test_partial_spearman_matches_pingouin():
    pingouin = pytest.importorskip("pingouin")
    import pandas as pd

    rng = np.random.default_rng(3)
    z = rng.random(80)
    x = z + rng.normal(0, 0.3, 80)
    y = z**2 + rng.normal(0, 0.3, 80)
    ref = pingouin.partial_corr(pd.DataFrame({"x": x, "y": y, "z": z}), x="x", y="y", covar="z", method="spearman")
    assert text.partial_spearman(x, y, z) == pytest.approx(float(ref["r"].iloc[0]), abs=1e-10)


def test_text_summary_statistics():
    prompts = [p for _, p in text.prompt_bank(["cat", "dog", "car", "tree", "cup"])]
    styles = [s for s, _ in text.prompt_bank(["cat", "dog", "car", "tree", "cup"])]
    spec = np.array([text.specificity(p) for p in prompts])
    rng = np.random.default_rng(0)
    scores = (1.5 - spec) + rng.normal(0, 0.05, (3, len(prompts)))
    s = text.text_summary(styles, prompts, scores)
    assert s["rho_score_vs_neg_specificity"] == pytest.approx(spearmanr(scores.mean(0), -spec).statistic)
    assert s["rho_score_vs_neg_specificity"] > 0.8 and s["auroc_low_specificity"] > 0.8
    assert set(s["by_style"]) == {"generic", "simple", "photo", "specific", "ambiguous"}
    assert s["by_style"]["generic"]["n"] == 7 and s["reliability"]["n_trials"] == 3


# ---- exp11 -------------------------------------------------------------------------------------------


def test_layer_groups_by_block_with_an_outside_group():
    targets = [f"encoder.layers.{b}.mlp.fc1" for b in range(6)] + ["head.mlp.fc1", "head.attention.in_proj"]
    groups, assign = concrete.layer_groups(targets, 3)
    assert groups == ["g0", "g1", "g2", "outside"]
    assert [assign[f"encoder.layers.{b}.mlp.fc1"] for b in range(6)] == ["g0", "g0", "g1", "g1", "g2", "g2"]
    assert assign["head.mlp.fc1"] == "outside"  # not block 1 ("fc1")
    groups, _ = concrete.layer_groups([f"t.resblocks.{b}.c_fc" for b in range(2)], 4)
    assert groups == ["g0", "g1"]  # no more groups than blocks, no empty outside group


def test_candidates_are_the_uniform_rate_then_seeded_log_uniform_vectors():
    r = concrete.candidate_rates(3, 0.01, 50, 0.001, 0.1, seed=4)
    assert r.shape == (51, 3) and np.all(r[0] == 0.01)
    assert np.all((r[1:] >= 0.001) & (r[1:] <= 0.1))
    assert np.array_equal(r, concrete.candidate_rates(3, 0.01, 50, 0.001, 0.1, seed=4))
    logs = np.log10(r[1:]).ravel()
    assert abs(logs.mean() + 2) < 0.15  # log-uniform on [-3, -1]


def test_per_group_rates_reach_only_their_targets(encoders):
    enc = encoders["tiny_clip"]
    x = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32)
    base = enc.encode_image(x)
    with inject_dropout(enc.vision, 0.0, torch.Generator()) as probe:
        targets = list(probe.targets)
    _, assign = concrete.layer_groups(targets, 2)
    off = {t: (0.0 if assign[t] == "g1" else 0.2) for t in targets}
    with inject_dropout(enc.vision, 0.0, torch.Generator().manual_seed(0), "output", rates=off):
        assert not torch.equal(enc.encode_image(x), base)
    zero = dict.fromkeys(targets, 0.0)
    with inject_dropout(enc.vision, 0.0, torch.Generator().manual_seed(0), "output", rates=zero):
        assert torch.equal(enc.encode_image(x), base)


def test_exp11_reports_search_and_heldout_objectives_separately():
    rng = np.random.default_rng(7)
    n, k = 60, 2
    margin, entropy, sens = rng.random(n), rng.random(n), rng.random(n)
    truth = entropy - margin
    rates = concrete.candidate_rates(2, 0.01, 4, 0.001, 0.1, seed=1)
    noise = [3.0, 0.1, 1.0, 5.0, 2.0]
    scores = np.stack([truth + rng.normal(0, s, (k, n)) for s in noise])
    mask = concrete.split_images(n, 0.5, seed=2)
    assert mask.sum() == 30 and np.array_equal(mask, concrete.split_images(n, 0.5, seed=2))
    arrays = {
        "rates": rates,
        "scores": scores,
        "search": mask,
        "groups": np.array(["g0", "g1"]),
        "margin": margin,
        "entropy": entropy,
        "prompt_sensitivity": sens,
    }
    s = concrete.search_summary(arrays, top=3)

    def direct(c, m):
        u = scores[c][:, m].mean(0)
        r = [
            spearmanr(u, -margin[m]).statistic,
            spearmanr(u, entropy[m]).statistic,
            spearmanr(u, sens[m]).statistic,
        ]
        return r[0] + r[1] + 0.5 * r[2] + 0.1 * icc1(scores[c][:, m])

    search = [direct(c, mask) for c in range(5)]
    best = int(np.argmax(search))
    assert s["chosen"]["candidate"] == best == 1
    assert s["objective_search"] == pytest.approx(search[best])
    assert s["objective_heldout"] == pytest.approx(direct(best, ~mask))
    assert s["uniform_objective_heldout"] == pytest.approx(direct(0, ~mask))
    assert s["chosen"]["search"]["objective"] != s["chosen"]["heldout"]["objective"]
    assert s["n_search"] + s["n_heldout"] == n
    assert s["best_rates"] == {"g0": rates[best][0], "g1": rates[best][1]}
    assert [t["candidate"] for t in s["top"]] == list(np.argsort(-np.array(search), kind="stable")[:3])
    assert s["uniform"]["uniform"] is True and s["uniform"]["rates"] == {"g0": 0.01, "g1": 0.01}
