"""Preprocessed pixel tensors: one HDF5 file per preprocessing, shared by every model that uses it.

A preprocessing *spec* is a JSON-able dict::

    {"size": 224, "resize": "shortest_edge_center_crop" | "squash",
     "interpolation": "bicubic" | "bilinear", "mean": [r, g, b], "std": [r, g, b]}

:func:`preprocess` reproduces open_clip's eval transform (shortest edge resize with
Pillow, center crop, ``ToTensor``, ``Normalize``) and the Hugging Face SigLIP image
processor (squash resize) with Pillow and numpy only. :func:`write_pixels` streams the
accepted images of a manifest into ``pixels/{preproc_key}.h5`` chunk by chunk;
:class:`PixelFile` / :func:`iter_batches` read it back in bounded memory.

h5py is imported inside functions so the Snakefile can import :func:`preproc_key` cheaply.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

SPEC_KEYS = ("size", "resize", "interpolation", "mean", "std")
RESIZE_MODES = {"shortest_edge_center_crop": "crop", "squash": "squash"}
INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}

#: Upper bound on the bytes of one HDF5 chunk of ``pixels`` (rows x 3 x S x S float32).
_MAX_H5_CHUNK_BYTES = 8 * 1024 * 1024


class PixelFileError(ValueError):
    """A pixel file that is missing, truncated, or not shaped as :func:`write_pixels` writes it."""


# --------------------------------------------------------------------------- spec


def validate_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Check a preprocessing spec and return it normalised (ints and floats, lists of 3 floats)."""
    if not isinstance(spec, Mapping):
        raise TypeError(f"preprocessing spec must be a mapping, got {type(spec).__name__}")
    missing = [k for k in SPEC_KEYS if k not in spec]
    extra = sorted(set(spec) - set(SPEC_KEYS))
    if missing or extra:
        raise ValueError(f"preprocessing spec {dict(spec)!r}: missing keys {missing}, unknown keys {extra}")
    size = spec["size"]
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
        raise ValueError(f"preprocessing spec: 'size' must be a positive integer, got {size!r}")
    if spec["resize"] not in RESIZE_MODES:
        raise ValueError(
            f"preprocessing spec: 'resize' must be one of {sorted(RESIZE_MODES)}, got {spec['resize']!r}"
        )
    if spec["interpolation"] not in INTERPOLATIONS:
        raise ValueError(
            f"preprocessing spec: 'interpolation' must be one of {sorted(INTERPOLATIONS)}, "
            f"got {spec['interpolation']!r}"
        )
    out: dict[str, Any] = {
        "size": int(size),
        "resize": spec["resize"],
        "interpolation": spec["interpolation"],
    }
    for key in ("mean", "std"):
        vals = spec[key]
        try:
            vals = [float(v) for v in vals]
        except (TypeError, ValueError):
            raise ValueError(f"preprocessing spec: {key!r} must be 3 numbers, got {vals!r}") from None
        if len(vals) != 3 or not all(math.isfinite(v) for v in vals):
            raise ValueError(f"preprocessing spec: {key!r} must be 3 finite numbers, got {vals!r}")
        if key == "std" and any(v <= 0 for v in vals):
            raise ValueError(f"preprocessing spec: 'std' must be positive, got {vals!r}")
        out[key] = vals
    return out


def canonical_spec_json(spec: Mapping[str, Any]) -> str:
    """The spec as compact, key-sorted JSON (what :func:`preproc_key` hashes)."""
    return json.dumps(validate_spec(spec), sort_keys=True, separators=(",", ":"))


def preproc_key(spec: Mapping[str, Any]) -> str:
    """A stable, readable file key: ``crop224-1a2b3c4d`` / ``squash384-...``.

    The hex part is the first 8 digits of the SHA-256 of :func:`canonical_spec_json`, so
    equal specs (e.g. two CLIP models) share one key and any difference gives another.
    """
    s = validate_spec(spec)
    digest = hashlib.sha256(canonical_spec_json(s).encode()).hexdigest()[:8]
    return f"{RESIZE_MODES[s['resize']]}{s['size']}-{digest}"


# --------------------------------------------------------------------------- preprocessing


def _resize_shortest_center_crop(img: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    # torchvision Resize(int): the short side becomes `size`, the long side int(size * long / short)
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), resample)
    # torchvision CenterCrop: offsets int(round((dim - crop) / 2))
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def preprocess(img: Image.Image, spec: Mapping[str, Any]) -> np.ndarray:
    """One image to a float32 array [3, S, S], normalised with the spec's mean and std.

    ``shortest_edge_center_crop`` equals open_clip's ``image_transform(S, is_train=False)``
    (Pillow resize of the short side to S, center crop, ``x/255``, ``(x-mean)/std`` in
    float32); ``squash`` resizes straight to S x S with Pillow (the SigLIP processors).
    """
    return normalise(resize_to_spec(img, spec), spec)


def resize_to_spec(img: Image.Image, spec: Mapping[str, Any]) -> Image.Image:
    """The RGB image at the model's input size (resized and cropped, or squashed), not normalised:
    the step after which a degradation that must survive the crop is applied (mcdo exp7)."""
    from vlmrel.images import to_rgb

    s = validate_spec(spec)
    size, resample = s["size"], INTERPOLATIONS[s["interpolation"]]
    img = to_rgb(img)
    if s["resize"] == "squash":
        return img if img.size == (size, size) else img.resize((size, size), resample)
    return _resize_shortest_center_crop(img, size, resample)


def normalise(img: Image.Image, spec: Mapping[str, Any]) -> np.ndarray:
    """An S x S RGB image as float32 [3, S, S]: ``x/255``, then ``(x - mean) / std``."""
    s = validate_spec(spec)
    x = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
    mean = np.asarray(s["mean"], dtype=np.float32)
    std = np.asarray(s["std"], dtype=np.float32)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


# --------------------------------------------------------------------------- writing


def _write_chunk(ds: Any, start: int, block: np.ndarray) -> None:
    ds[start : start + len(block)] = block


def iter_manifest_images(
    manifest_tsv: str | os.PathLike[str], root: str | os.PathLike[str]
) -> tuple[list[str], Iterator[Image.Image]]:
    """The ``ok`` image ids of a manifest, in order, and a generator decoding their images.

    Each file's content hash is checked against its manifest image_id, so an image changed
    since the manifest was built is an error, not silently different pixels.
    """
    from vlmrel.images import ImageRejected, content_id, decode_rgb, read_manifest

    rows = read_manifest(manifest_tsv, ok_only=True)
    if len(rows) == 0:
        raise ValueError(
            f"manifest {os.fspath(manifest_tsv)!r} has no images with status 'ok'; nothing to preprocess"
        )
    ids = rows["image_id"].tolist()
    rels = rows["rel_path"].tolist()
    root_p = Path(root)

    def images() -> Iterator[Image.Image]:
        for image_id, rel in zip(ids, rels, strict=True):
            path = root_p / rel
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise FileNotFoundError(
                    f"image {str(path)!r} listed in the manifest cannot be read: {exc}"
                ) from exc
            if content_id(data) != image_id:
                raise ValueError(
                    f"image {str(path)!r} changed since the manifest {os.fspath(manifest_tsv)!r} was built "
                    f"(content hash {content_id(data)} != image_id {image_id}); rebuild the manifest"
                )
            try:
                yield decode_rgb(data, str(path), None)  # vetted by the manifest (same bytes)
            except ImageRejected as exc:
                raise ValueError(f"image accepted by the manifest no longer decodes: {exc}") from exc

    return ids, images()


def write_pixel_images(
    ids: Sequence[str],
    images: Iterable[Image.Image],
    spec: Mapping[str, Any],
    out_h5: str | os.PathLike[str],
    chunk_size: int = 32,
    progress: bool = True,
) -> Path:
    """Preprocess ``images`` (one per id, in order) into ``out_h5``, ``chunk_size`` at a time.

    Datasets: ``pixels`` [N, 3, S, S] float32 (HDF5-chunked along N) and ``image_id`` [N]
    (UTF-8 strings); attrs ``spec`` (JSON), ``preproc_key``, ``n_images``, ``vlmrel_version``.
    Memory does not grow with N. The file appears atomically; on any error no partial output
    is left.
    """
    import h5py
    from tqdm.auto import tqdm

    import vlmrel
    from vlmrel.io import atomic_path

    if isinstance(chunk_size, bool) or int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    chunk_size = int(chunk_size)
    s = validate_spec(spec)
    key = preproc_key(s)
    ids = [str(i) for i in ids]
    n = len(ids)
    if n == 0:
        raise ValueError(f"no images to write to {os.fspath(out_h5)!r}")
    size = s["size"]
    row_bytes = 3 * size * size * 4
    h5_rows = max(1, min(chunk_size, n, _MAX_H5_CHUNK_BYTES // row_bytes))
    image_iter = iter(images)

    with atomic_path(out_h5) as tmp, h5py.File(tmp, "w") as f:
        ds = f.create_dataset(
            "pixels", shape=(n, 3, size, size), dtype="float32", chunks=(h5_rows, 3, size, size)
        )
        f.create_dataset("image_id", data=np.array(ids, dtype=object), dtype=h5py.string_dtype("utf-8"))
        f.attrs["spec"] = json.dumps(s, sort_keys=True)
        f.attrs["preproc_key"] = key
        f.attrs["n_images"] = n
        f.attrs["vlmrel_version"] = vlmrel.__version__
        bar = tqdm(total=n, desc=f"pixels {key}", unit="img", disable=not progress, mininterval=1.0)
        block = np.empty((min(chunk_size, n), 3, size, size), dtype=np.float32)
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            for j in range(stop - start):
                try:
                    img = next(image_iter)
                except StopIteration:
                    raise ValueError(
                        f"{n} image ids but only {start + j} images for {os.fspath(out_h5)!r}"
                    ) from None
                block[j] = preprocess(img, s)
                bar.update(1)
            _write_chunk(ds, start, block[: stop - start])
        bar.close()
    log.info("wrote %d images to %s (%s)", n, out_h5, key)
    return Path(out_h5)


def write_pixels(
    manifest_tsv: str | os.PathLike[str],
    root: str | os.PathLike[str],
    spec: Mapping[str, Any],
    out_h5: str | os.PathLike[str],
    chunk_size: int = 32,
    progress: bool = True,
) -> Path:
    """Preprocess every ``ok`` image of the manifest, in manifest order, into ``out_h5``
    (see ``write_pixel_images`` for the file layout)."""
    ids, images = iter_manifest_images(manifest_tsv, root)
    return write_pixel_images(ids, images, spec, out_h5, chunk_size=chunk_size, progress=progress)


# --------------------------------------------------------------------------- reading


class PixelFile:
    """Read access to a pixel file written by :func:`write_pixels` (use as a context manager).

    Opening checks the file: it must exist, be readable HDF5, and hold ``pixels`` [N,3,S,S]
    and ``image_id`` [N] consistent with its ``spec`` and ``n_images`` attrs; otherwise a
    :class:`PixelFileError` names the file and the problem.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        import h5py

        self.path = Path(path)
        if not self.path.is_file():
            raise PixelFileError(f"pixel file {str(self.path)!r} does not exist")
        try:
            # a cache of two HDF5 chunks keeps batch reads that straddle chunk borders cheap; no file
            # locking: pixel files are immutable once renamed into place, and locks fail on some NFS
            self._f = h5py.File(
                self.path, "r", rdcc_nbytes=2 * _MAX_H5_CHUNK_BYTES + (1 << 20), locking=False
            )
        except OSError as exc:
            raise PixelFileError(
                f"pixel file {str(self.path)!r} is not readable HDF5 (truncated or corrupt?): {exc}"
            ) from exc
        try:
            self._check()
        except BaseException:
            self._f.close()
            raise
        self._ids: list[str] | None = None

    def _fail(self, what: str) -> PixelFileError:
        return PixelFileError(f"pixel file {str(self.path)!r}: {what}")

    def _check(self) -> None:
        f = self._f
        for name in ("pixels", "image_id"):
            if name not in f:
                raise self._fail(f"dataset {name!r} is missing")
        for name in ("spec", "preproc_key", "n_images"):
            if name not in f.attrs:
                raise self._fail(f"attribute {name!r} is missing")
        try:
            self.spec: dict[str, Any] = validate_spec(json.loads(f.attrs["spec"]))
        except (ValueError, TypeError) as exc:
            raise self._fail(f"attribute 'spec' is not a valid preprocessing spec: {exc}") from exc
        self.size: int = self.spec["size"]
        self.preproc_key: str = str(f.attrs["preproc_key"])
        self.n_images: int = int(f.attrs["n_images"])
        self.vlmrel_version: str = str(f.attrs.get("vlmrel_version", ""))
        px, ids = f["pixels"], f["image_id"]
        want = (self.n_images, 3, self.size, self.size)
        if px.shape != want:
            raise self._fail(f"dataset 'pixels' has shape {px.shape}, expected {want}")
        if px.dtype != np.float32:
            raise self._fail(f"dataset 'pixels' has dtype {px.dtype}, expected float32")
        if ids.shape != (self.n_images,):
            raise self._fail(f"dataset 'image_id' has shape {ids.shape}, expected ({self.n_images},)")
        self._px = px

    def __len__(self) -> int:
        return self.n_images

    def __enter__(self) -> PixelFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.n_images, 3, self.size, self.size)

    @property
    def image_ids(self) -> list[str]:
        if self._ids is None:
            try:
                self._ids = [str(x) for x in self._f["image_id"].asstr()[...]]
            except OSError as exc:
                raise self._fail(f"cannot read 'image_id' (truncated or corrupt?): {exc}") from exc
        return self._ids

    def _index(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        idx = np.asarray(indices)
        if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
            raise IndexError(f"pixel file {str(self.path)!r}: indices must be a 1-D sequence of integers")
        idx = idx.astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_images):
            raise IndexError(
                f"pixel file {str(self.path)!r}: index out of range [0, {self.n_images}) "
                f"(got min {idx.min()}, max {idx.max()})"
            )
        return idx

    def read(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Pixels of the given rows, in the given order (repeats allowed): float32 [len, 3, S, S]."""
        idx = self._index(indices)
        try:
            if idx.size == 0:
                return np.empty((0, 3, self.size, self.size), dtype=np.float32)
            if idx.size == 1 or np.all(np.diff(idx) == 1):
                return self._px[int(idx[0]) : int(idx[-1]) + 1]
            uniq, inverse = np.unique(idx, return_inverse=True)
            if uniq.size == uniq[-1] - uniq[0] + 1:  # a contiguous run, possibly shuffled
                block = self._px[int(uniq[0]) : int(uniq[-1]) + 1]
            else:
                block = self._px[uniq]  # h5py fancy indexing needs increasing, unique indices
            return block[inverse]
        except OSError as exc:
            raise self._fail(f"cannot read 'pixels' (truncated or corrupt?): {exc}") from exc

    def iter_batches(
        self, batch_size: int, indices: Sequence[int] | np.ndarray | None = None
    ) -> Iterator[tuple[list[str], np.ndarray]]:
        """Yield ``(image_ids, pixels)`` batches of at most ``batch_size`` rows, in order."""
        if isinstance(batch_size, bool) or int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        batch_size = int(batch_size)
        idx = np.arange(self.n_images) if indices is None else self._index(indices)
        ids = self.image_ids
        for start in range(0, idx.size, batch_size):
            part = idx[start : start + batch_size]
            yield [ids[i] for i in part], self.read(part)


def iter_batches(
    h5_path: str | os.PathLike[str], batch_size: int, indices: Sequence[int] | np.ndarray | None = None
) -> Iterator[tuple[list[str], np.ndarray]]:
    """Stream ``(image_ids, pixels float32 [b,3,S,S])`` batches from a pixel file.

    ``indices`` (rows, any order) restricts and orders the stream; memory follows
    ``batch_size``, not the file size.
    """
    with PixelFile(h5_path) as pf:
        yield from pf.iter_batches(batch_size, indices)


def images_to_use(h5_path: str | os.PathLike[str], num_images: int | None) -> int:
    """How many of the pixel file's images a job uses: its first ``num_images`` (None: all of them).
    Fewer accepted images than asked is logged as a warning, not an error."""
    total = read_pixel_meta(h5_path)["n_images"]
    if num_images is None:
        return total
    n = min(int(num_images), total)
    if n < num_images:
        log.warning("num_images=%d asked, only %d accepted images in %s", num_images, n, h5_path)
    return n


def read_pixel_meta(h5_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The pixel file's metadata: ``spec``, ``preproc_key``, ``n_images``, ``size``, ``shape``, ``vlmrel_version``."""
    with PixelFile(h5_path) as pf:
        return {
            "path": str(pf.path),
            "spec": pf.spec,
            "preproc_key": pf.preproc_key,
            "n_images": pf.n_images,
            "size": pf.size,
            "shape": list(pf.shape),
            "vlmrel_version": pf.vlmrel_version,
        }
