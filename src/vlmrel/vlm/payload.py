"""Image payloads: downscale to the model's pixel budget and encode once.

A VLM resizes every image to its own pixel budget anyway, so sending a full-size PNG
only costs bandwidth and server time. ``encode_image`` applies the EXIF orientation,
converts to RGB (transparency composited on white), shrinks the image so that
``width * height <= max_pixels`` keeping the aspect ratio (never enlarging), and encodes
it once as JPEG or PNG. The mode conversion is :func:`vlmrel.images.to_rgb`, shared with
the pixel files. The cache key hashes these encoded bytes, so the same pixels
reach the same key whatever file format they came from, and a change of budget or
quality is a new key.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ImageConfig


class ImageError(ValueError):
    """An image could not be read or encoded; the message names the source."""


@dataclass(frozen=True)
class EncodedImage:
    """Encoded image bytes ready to send; build it with :func:`encode_image`."""

    data: bytes
    mime: str
    width: int
    height: int
    sha256: str

    @functools.cached_property
    def b64(self) -> str:
        """Base64 of ``data``, computed once."""
        return base64.b64encode(self.data).decode("ascii")

    def data_url(self) -> str:
        return f"data:{self.mime};base64,{self.b64}"


def fit_pixel_budget(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """Largest size with the same aspect ratio and ``w * h <= max_pixels`` (never larger than the input)."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    w, h = max(1, int(width * scale)), max(1, int(height * scale))
    while w * h > max_pixels:  # floating point rounding guard
        if w >= h:
            w -= 1
        else:
            h -= 1
    return w, h


def _describe(source: Any) -> str:
    if isinstance(source, str | os.PathLike):
        return os.fspath(source)
    if isinstance(source, bytes | bytearray):
        return f"<{len(source)} bytes>"
    return f"<{type(source).__name__}>"


def load_image(source: Any) -> Any:
    """Open ``source`` (path, encoded bytes, PIL image or HxWx3 uint8 array), EXIF orientation applied."""
    from PIL import Image, ImageOps

    try:
        if isinstance(source, Image.Image):
            return ImageOps.exif_transpose(source)
        if isinstance(source, str | os.PathLike):
            with Image.open(Path(source)) as im:
                im.load()
                return ImageOps.exif_transpose(im)
        if isinstance(source, bytes | bytearray | memoryview):
            with Image.open(io.BytesIO(bytes(source))) as im:
                im.load()
                return ImageOps.exif_transpose(im)
        if hasattr(source, "__array_interface__"):
            import numpy as np

            arr = np.asarray(source)
            if arr.dtype != np.uint8:
                raise ImageError(f"image array must be uint8, got {arr.dtype}")
            return Image.fromarray(arr)
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"cannot read image {_describe(source)}: {exc}") from exc
    raise ImageError(f"unsupported image source type {type(source).__name__}")


def _to_rgb(im: Any) -> Any:
    """8-bit RGB by :func:`vlmrel.images.to_rgb`, the conversion the pixel files use too.

    One function for both, so a model sees the same pixels through the VLM payload and
    through the pixel tensors: 16-bit greyscale is scaled (65535 -> 255, a uniform 40000
    becomes 156), never stretched min..max; transparency is composited on white. An image
    that is RGB already is returned as is (what ``to_rgb`` does too) without importing
    :mod:`vlmrel.images`, whose pandas import cost the first request ~0.4 s.
    """
    if im.mode == "RGB" and "transparency" not in im.info:
        return im
    from vlmrel.images import to_rgb

    return to_rgb(im)


def encode_image(source: Any, image_cfg: ImageConfig | None = None) -> EncodedImage:
    """Downscale ``source`` to ``image_cfg.max_pixels`` and encode it once (JPEG or PNG).

    An :class:`EncodedImage` is returned unchanged, so callers can encode an image once and
    reuse it across many requests (e.g. one image, many referring expressions).
    """
    if isinstance(source, EncodedImage):
        return source
    from PIL import Image

    cfg = image_cfg or ImageConfig()
    im = load_image(source)
    try:
        im = _to_rgb(im)
        size = fit_pixel_budget(im.width, im.height, cfg.max_pixels)
        if size != im.size:
            im = im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
        buf = io.BytesIO()
        if cfg.format == "jpeg":
            im.save(buf, format="JPEG", quality=cfg.quality, optimize=False, progressive=False, subsampling=0)
            mime = "image/jpeg"
        else:
            im.save(buf, format="PNG", optimize=False, compress_level=6)
            mime = "image/png"
    except Exception as exc:
        raise ImageError(f"cannot encode image {_describe(source)}: {exc}") from exc
    data = buf.getvalue()
    return EncodedImage(
        data=data, mime=mime, width=im.width, height=im.height, sha256=hashlib.sha256(data).hexdigest()
    )
