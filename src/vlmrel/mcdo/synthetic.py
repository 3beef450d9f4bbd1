"""exp2: synthetic baseline images generated from the natural ones (seed 002, section 8e).

Each kind keeps the natural image's size, so the model's preprocessing treats both alike:

- ``noise``: i.i.d. Gaussian pixels with the image's per-channel mean and standard deviation,
  rounded and clipped to 0..255 (same first two moments, no structure);
- ``flat``: every pixel the image's mean colour (no information at all);
- ``blur``: Gaussian blur with radius ``blur_frac`` times the image's shorter side (structure
  kept, detail removed; relative so that it survives the model's resize);
- ``shuffle``: the image cut into a ``shuffle_grid`` x ``shuffle_grid`` grid of patches (the
  image cropped to a multiple of the grid) and the patches permuted (local statistics kept,
  global layout destroyed); never the identity permutation.

Random kinds draw from ``np.random.default_rng(synthetic_seed(seed, image_id, kind))``: the same
(seed, image, kind) always gives the same image, whatever else is generated and in which order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageFilter

SYNTHETIC_KINDS = ("noise", "flat", "blur", "shuffle")


def synthetic_seed(seed: int, image_id: str, kind: str) -> int:
    """A 64-bit seed from (config seed, image id, kind) via SHA-256; independent of call order."""
    digest = hashlib.sha256(f"vlmrel.synthetic|{int(seed)}|{image_id}|{kind}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def synthetic_id(image_id: str, kind: str) -> str:
    """The id of a synthetic image: ``{image_id}__{kind}``."""
    return f"{image_id}__{kind}"


def make_synthetic(
    image: Image.Image,
    kind: str,
    image_id: str,
    seed: int,
    *,
    blur_frac: float = 0.02,
    shuffle_grid: int = 4,
) -> Image.Image:
    """One synthetic RGB image of ``kind`` derived from the natural ``image`` (see module docstring)."""
    rgb = image.convert("RGB")
    arr = np.asarray(rgb, dtype=np.float64)
    h, w = arr.shape[:2]
    if kind == "flat":
        mean = np.round(arr.reshape(-1, 3).mean(axis=0)).astype(np.uint8)
        return Image.fromarray(np.broadcast_to(mean, (h, w, 3)).copy(), "RGB")
    if kind == "noise":
        rng = np.random.default_rng(synthetic_seed(seed, image_id, kind))
        flat = arr.reshape(-1, 3)
        mean, std = flat.mean(axis=0), flat.std(axis=0)
        noise = rng.standard_normal((h, w, 3)) * std + mean
        return Image.fromarray(np.clip(np.round(noise), 0, 255).astype(np.uint8), "RGB")
    if kind == "blur":
        if blur_frac <= 0:
            raise ValueError(f"blur_frac must be > 0, got {blur_frac}")
        return rgb.filter(ImageFilter.GaussianBlur(radius=blur_frac * min(h, w)))
    if kind == "shuffle":
        g = int(shuffle_grid)
        if g < 2 or h < g or w < g:
            raise ValueError(f"shuffle_grid must be >= 2 and fit the image {w}x{h}, got {shuffle_grid}")
        ph, pw = h // g, w // g
        crop = np.asarray(rgb, dtype=np.uint8)[: ph * g, : pw * g]
        patches = crop.reshape(g, ph, g, pw, 3).transpose(0, 2, 1, 3, 4).reshape(g * g, ph, pw, 3)
        rng = np.random.default_rng(synthetic_seed(seed, image_id, kind))
        perm = rng.permutation(g * g)
        while np.all(perm == np.arange(g * g)):
            perm = rng.permutation(g * g)
        out = patches[perm].reshape(g, g, ph, pw, 3).transpose(0, 2, 1, 3, 4).reshape(ph * g, pw * g, 3)
        return Image.fromarray(np.ascontiguousarray(out), "RGB")
    raise ValueError(f"unknown synthetic kind {kind!r}; expected one of {SYNTHETIC_KINDS}")


def iter_synthetic(
    items: Iterable[tuple[str, Image.Image]],
    kinds: Sequence[str] = SYNTHETIC_KINDS,
    seed: int = 0,
    *,
    blur_frac: float = 0.02,
    shuffle_grid: int = 4,
) -> Iterator[tuple[str, str, str, Image.Image]]:
    """For each (image_id, natural image) and kind: (synthetic id, kind, source id, image)."""
    unknown = [k for k in kinds if k not in SYNTHETIC_KINDS]
    if unknown:
        raise ValueError(f"unknown synthetic kinds {unknown}; expected a subset of {SYNTHETIC_KINDS}")
    for image_id, image in items:
        for kind in kinds:
            img = make_synthetic(image, kind, image_id, seed, blur_frac=blur_frac, shuffle_grid=shuffle_grid)
            yield synthetic_id(image_id, kind), kind, image_id, img
