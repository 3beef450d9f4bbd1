"""Model registry, preprocessing specs and encoder loading (tiny models, fake HF caches)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vlmrel import models
from vlmrel.models import (
    REGISTRY,
    ModelNotAvailable,
    ModelSpec,
    TextTowerUnavailable,
    get_spec,
    load_encoder,
    preprocess_spec,
)

OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]


@pytest.fixture(scope="module")
def tiny_clip():
    return load_encoder("tiny_clip")


@pytest.fixture(scope="module")
def tiny_siglip():
    return load_encoder("tiny_siglip")


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    home = tmp_path / "hf_home"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home / "hub"


def _pixels(encoder, n=3, seed=0):
    s = encoder.image_size
    return np.random.default_rng(seed).standard_normal((n, 3, s, s)).astype(np.float32)


def test_registry_names_and_architectures():
    expected = {
        "clip_b32",
        "clip_l14",
        "siglip2_b16",
        "siglip2_so400m",
        "siglip2_g16",
        "effnet_lite0",
        "tiny_clip",
        "tiny_siglip",
    }
    assert set(REGISTRY) == expected
    assert (REGISTRY["effnet_lite0"].backend, REGISTRY["effnet_lite0"].arch) == (
        "timm_wheel",
        "tf_efficientnet_lite0",
    )
    assert (REGISTRY["clip_b32"].arch, REGISTRY["clip_b32"].pretrained) == ("ViT-B-32", "openai")
    assert (REGISTRY["clip_l14"].arch, REGISTRY["clip_l14"].pretrained) == ("ViT-L-14", "openai")
    assert REGISTRY["siglip2_b16"].arch == "google/siglip2-base-patch16-224"
    assert REGISTRY["siglip2_so400m"].arch == "google/siglip2-so400m-patch14-384"
    assert REGISTRY["siglip2_g16"].arch == "google/siglip2-giant-opt-patch16-384"
    assert REGISTRY["tiny_clip"].backend == "open_clip" and REGISTRY["tiny_clip"].tiny
    assert REGISTRY["tiny_siglip"].backend == "hf_siglip" and REGISTRY["tiny_siglip"].tiny
    for spec in REGISTRY.values():
        assert spec.name in REGISTRY and REGISTRY[spec.name] is spec


def test_preprocess_specs_exact_and_json_able():
    clip = preprocess_spec("clip_b32")
    assert clip == {
        "size": 224,
        "resize": "shortest_edge_center_crop",
        "interpolation": "bicubic",
        "mean": OPENAI_MEAN,
        "std": [0.26862954, 0.26130258, 0.27577711],
    }
    assert preprocess_spec("clip_l14") == clip  # they share one pixel file
    for name, size in (("siglip2_b16", 224), ("siglip2_so400m", 384), ("siglip2_g16", 384)):
        spec = preprocess_spec(name)
        assert spec == {
            "size": size,
            "resize": "squash",
            "interpolation": "bilinear",
            "mean": [0.5] * 3,
            "std": [0.5] * 3,
        }
    for name in REGISTRY:
        spec = preprocess_spec(name)
        assert json.loads(json.dumps(spec)) == spec
        assert set(spec) == {"size", "resize", "interpolation", "mean", "std"}
    # a copy: mutating it does not change the registry
    clip["size"] = 1
    assert preprocess_spec("clip_b32")["size"] == 224


def test_unknown_model_is_a_clear_value_error():
    for fn in (get_spec, preprocess_spec, load_encoder):
        with pytest.raises(ValueError, match=r"unknown model 'nope'.*clip_b32.*tiny_siglip"):
            fn("nope")


def test_models_module_imports_without_torch():
    code = (
        "import sys, vlmrel.models as m; m.preprocess_spec('clip_b32');"
        "bad = [k for k in ('torch', 'open_clip', 'transformers') if k in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", ["tiny_clip", "tiny_siglip"])
def test_tiny_encoders_work_offline_and_are_frozen(name, request):
    enc = request.getfixturevalue(name)
    x = _pixels(enc)
    feats = enc.encode_image(x)
    assert feats.dtype == torch.float32 and feats.shape == (3, enc.feature_dim)
    assert torch.isfinite(feats).all()
    # features are before L2 normalisation
    assert not torch.allclose(feats.norm(dim=-1), torch.ones(3), atol=1e-3)
    text = enc.encode_text(["a photo of a cat", "A Photo Of A Dog"])
    assert text.dtype == torch.float32 and text.shape == (2, enc.feature_dim)
    assert not torch.allclose(text[0], text[1])
    assert not enc.model.training and not enc.vision.training
    assert all(not prm.requires_grad for prm in enc.model.parameters())
    assert enc.logit_scale is not None and enc.logit_scale > 0


def test_tiny_clip_logit_scale_is_exp_of_parameter(tiny_clip):
    assert tiny_clip.logit_scale == pytest.approx(1 / 0.07, rel=1e-6)
    assert tiny_clip.logit_bias is None


@pytest.mark.parametrize("name", ["tiny_clip", "tiny_siglip"])
def test_seeded_init_is_reproducible_and_leaves_global_rng(name, request):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    again = load_encoder(name)
    assert torch.equal(before, torch.random.get_rng_state())
    first = request.getfixturevalue(name)
    x = _pixels(first)
    assert torch.equal(first.encode_image(x), again.encode_image(x))


@pytest.mark.parametrize("name", ["tiny_clip", "tiny_siglip"])
def test_bf16_encoder_tracks_fp32(name, request):
    fp32 = request.getfixturevalue(name)
    bf16 = load_encoder(name, precision="bf16")
    assert bf16.dtype == torch.bfloat16
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    x = _pixels(fp32, n=4)
    a, b = fp32.encode_image(x), bf16.encode_image(x)
    assert b.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    assert (cos > 0.995).all()


def test_bad_pixels_and_precision_are_named(tiny_clip):
    with pytest.raises(ValueError, match=r"tiny_clip.*\[B, 3, 64, 64\]"):
        tiny_clip.encode_image(np.zeros((2, 3, 32, 32), dtype=np.float32))
    with pytest.raises(ValueError, match="precision"):
        load_encoder("tiny_clip", precision="fp8")


@pytest.mark.parametrize("name", ["clip_b32", "clip_l14", "siglip2_b16", "siglip2_so400m", "siglip2_g16"])
def test_missing_pretrained_weights_name_model_and_fix(name, empty_hf_cache):
    spec = get_spec(name)
    assert not models.is_cached(name)
    with pytest.raises(ModelNotAvailable) as info:
        load_encoder(name)
    msg = str(info.value)
    assert repr(name) in msg
    assert spec.weights_repo in msg
    assert f"python -m vlmrel.models fetch {name}" in msg
    assert "hf download" in msg
    assert str(empty_hf_cache) in msg
    assert not any(empty_hf_cache.parent.rglob("*.safetensors"))  # nothing was downloaded


def _fake_snapshot(cache: Path, repo: str) -> Path:
    """A hub-cache layout: models--org--name/{refs/main, snapshots/<commit>/}."""
    root = cache / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    return snap


def test_pretrained_siglip_loads_from_local_cache_only(empty_hf_cache, tiny_siglip):
    """A cached SiglipModel snapshot (model_type 'siglip') loads offline, tokenizer included."""
    repo = "vlmrel-test/tiny-siglip"
    snap = _fake_snapshot(empty_hf_cache, repo)
    tiny_siglip.model.save_pretrained(snap)
    models._byte_tokenizer().save_pretrained(snap)
    assert json.loads((snap / "config.json").read_text())["model_type"] == "siglip"
    spec = ModelSpec(
        name="cached_siglip",
        backend="hf_siglip",
        arch=repo,
        pretrained=None,
        preprocess=preprocess_spec("tiny_siglip"),
        tiny=False,
        description="test",
        weights_repo=repo,
        weights_files=("config.json", "model.safetensors"),
    )
    enc = load_encoder(spec)
    x = _pixels(enc)
    torch.testing.assert_close(enc.encode_image(x), tiny_siglip.encode_image(x))
    torch.testing.assert_close(enc.encode_text(["a cat"]), tiny_siglip.encode_text(["a cat"]))

    # a NaFlex checkpoint (model_type siglip2) is refused with a clear reason
    cfg = json.loads((snap / "config.json").read_text())
    cfg["model_type"] = "siglip2"
    (snap / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelNotAvailable, match="NaFlex"):
        load_encoder(spec)

    # weights gone: the error names the model
    (snap / "model.safetensors").unlink()
    with pytest.raises(ModelNotAvailable, match="cached_siglip"):
        load_encoder(spec)


def test_text_tower_unavailable_names_reason(empty_hf_cache, tiny_siglip):
    repo = "vlmrel-test/no-tokenizer"
    snap = _fake_snapshot(empty_hf_cache, repo)
    tiny_siglip.model.save_pretrained(snap)
    spec = ModelSpec(
        name="no_tok",
        backend="hf_siglip",
        arch=repo,
        pretrained=None,
        preprocess=preprocess_spec("tiny_siglip"),
        tiny=False,
        description="test",
        weights_repo=repo,
    )
    enc = load_encoder(spec)
    assert enc.encode_image(_pixels(enc)).shape == (3, enc.feature_dim)
    with pytest.raises(TextTowerUnavailable, match="no_tok.*tokenizer"):
        enc.encode_text(["a cat"])


def test_open_clip_weights_resolved_from_cache(empty_hf_cache):
    snap = _fake_snapshot(empty_hf_cache, "timm/vit_base_patch32_clip_224.openai")
    (snap / "open_clip_model.safetensors").write_bytes(b"not really weights")
    assert models.is_cached("clip_b32")
    assert not models.is_cached("clip_l14")
    path = models._resolve_open_clip_weights(get_spec("clip_b32"), models.hub_cache_dir())
    assert path == snap / "open_clip_model.safetensors"
    with pytest.raises(ModelNotAvailable, match="clip_b32.*cannot load weights"):
        load_encoder("clip_b32")


def test_cli_list_and_fetch_refusal(capsys, empty_hf_cache):
    assert models.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "clip_b32" in out and "missing" in out and "tiny_clip" in out and "seeded" in out
    assert models.main(["fetch", "tiny_clip"]) == 1
    assert "nothing to fetch" in capsys.readouterr().err
