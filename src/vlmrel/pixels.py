"""Preprocessed pixel tensors: one HDF5 file per preprocessing, shared by every model that uses it.

A preprocessing *spec* is a JSON-able dict::

    {"size": 224, "resize": "shortest_edge_center_crop" | "squash",
     "interpolation": "bicubic" | "bilinear", "mean": [r, g, b], "std": [r, g, b],
     "storage": "uint8"}

(``storage`` is optional in a model's spec and defaults to ``"uint8"``; :func:`preproc_key`
hashes it, so files of another storage have another key.)

:func:`preprocess` reproduces open_clip's eval transform (shortest edge resize with
Pillow, center crop, ``ToTensor``, ``Normalize``) and the Hugging Face SigLIP image
processor (squash resize) with Pillow and numpy only. It is two steps: :func:`raw_pixels`
(the resized, cropped RGB values as uint8 [3, S, S]) and :func:`to_float32` (``x / 255``, then
``(x - mean) / std`` in float32), the one numpy normalisation; the encoder's ``prepare``
(:mod:`vlmrel.models`) does the same operations in the same order and dtype on its device, so
both give bit-for-bit equal float32 values.

:func:`write_pixels` streams the accepted images of a manifest into ``pixels/{preproc_key}.h5``
chunk by chunk, storing the uint8 values (a quarter of float32's bytes: 150,528 bytes per image
at 224 px); :class:`PixelFile` / :func:`iter_batches` read them back in bounded memory, as uint8
(``raw=True``, for an encoder) or normalised float32. :func:`prefetch_batches` is the trials'
loader: a background thread reads the next batches while the current one is computed.

h5py is imported inside functions so the Snakefile can import :func:`preproc_key` cheaply.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

SPEC_KEYS = ("size", "resize", "interpolation", "mean", "std")
#: Optional spec keys and their defaults (filled in by :func:`validate_spec`, so hashed by the key).
SPEC_DEFAULTS: dict[str, Any] = {"storage": "uint8"}
#: How pixel files store their values: the dtype of dataset ``pixels``.
STORAGES = {"uint8": np.uint8}
RESIZE_MODES = {"shortest_edge_center_crop": "crop", "squash": "squash"}
INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}

#: Upper bound on the bytes of one HDF5 chunk of ``pixels`` (rows x 3 x S x S uint8): 32 rows at
#: 224 px (4.8 MB), 11 at 384 px; a batch read touches few chunks and the two-chunk cache holds them.
_MAX_H5_CHUNK_BYTES = 5 * 1024 * 1024
#: Rows per HDF5 chunk at most (the trials' usual batch size, and the writer's default block).
H5_CHUNK_ROWS = 32


class PixelFileError(ValueError):
    """A pixel file that is missing, truncated, or not shaped as :func:`write_pixels` writes it."""


# --------------------------------------------------------------------------- spec


def validate_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Check a preprocessing spec and return it normalised (ints and floats, lists of 3 floats)."""
    if not isinstance(spec, Mapping):
        raise TypeError(f"preprocessing spec must be a mapping, got {type(spec).__name__}")
    missing = [k for k in SPEC_KEYS if k not in spec]
    extra = sorted(set(spec) - set(SPEC_KEYS) - set(SPEC_DEFAULTS))
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
    storage = spec.get("storage", SPEC_DEFAULTS["storage"])
    if storage not in STORAGES:
        raise ValueError(f"preprocessing spec: 'storage' must be one of {sorted(STORAGES)}, got {storage!r}")
    out["storage"] = storage
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
    Equals ``to_float32(raw_pixels(img, spec), spec)``.
    """
    return to_float32(raw_pixels(img, spec), spec)


def raw_pixels(img: Image.Image, spec: Mapping[str, Any]) -> np.ndarray:
    """One image at the model's input size as uint8 [3, S, S] (what a pixel file stores)."""
    return image_array(resize_to_spec(img, spec))


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


def image_array(img: Image.Image) -> np.ndarray:
    """An RGB image as uint8 [3, H, W] (channels first, contiguous)."""
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def normalise(img: Image.Image, spec: Mapping[str, Any]) -> np.ndarray:
    """An S x S RGB image as float32 [3, S, S]: ``x/255``, then ``(x - mean) / std``."""
    return to_float32(image_array(img), spec)


def to_float32(raw: np.ndarray, spec: Mapping[str, Any]) -> np.ndarray:
    """uint8 pixels [..., 3, H, W] as normalised float32: ``x / 255``, then ``(x - mean) / std``
    per channel, every step in float32 (open_clip's ``ToTensor`` + ``Normalize``).

    The one numpy normalisation; ``vlmrel.models.Encoder.prepare`` runs the same operations on
    the model's device and gives bit-for-bit equal values.
    """
    s = validate_spec(spec)
    raw = np.asarray(raw)
    if raw.dtype != np.uint8 or raw.ndim < 3 or raw.shape[-3] != 3:
        raise ValueError(f"pixels must be uint8 [..., 3, H, W], got {raw.dtype} {list(raw.shape)}")
    x = raw.astype(np.float32) / np.float32(255.0)
    mean = np.asarray(s["mean"], dtype=np.float32)[:, None, None]
    std = np.asarray(s["std"], dtype=np.float32)[:, None, None]
    return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


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
    compression: str | None = None,
) -> Path:
    """Preprocess ``images`` (one per id, in order) into ``out_h5``, ``chunk_size`` at a time.

    Datasets: ``pixels`` [N, 3, S, S] uint8 (the resized, cropped RGB values, :func:`raw_pixels`;
    HDF5-chunked along N: at most :data:`H5_CHUNK_ROWS` rows and ``_MAX_H5_CHUNK_BYTES`` per
    chunk) and ``image_id`` [N] (UTF-8 strings); attrs ``spec`` (JSON, with its ``storage``),
    ``preproc_key``, ``n_images``, ``vlmrel_version``. ``compression`` (None, ``"lzf"`` or
    ``"gzip"``) is an HDF5 filter, transparent to readers; the default None reads fastest.
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
    if compression not in (None, "lzf", "gzip"):
        raise ValueError(f"compression must be None, 'lzf' or 'gzip', got {compression!r}")
    size = s["size"]
    dtype = STORAGES[s["storage"]]
    row_bytes = 3 * size * size * np.dtype(dtype).itemsize
    h5_rows = max(1, min(chunk_size, H5_CHUNK_ROWS, n, _MAX_H5_CHUNK_BYTES // row_bytes))
    image_iter = iter(images)

    # a chunk cache that holds the chunks a block straddles, so no chunk is written twice
    with atomic_path(out_h5) as tmp, h5py.File(tmp, "w", rdcc_nbytes=4 * _MAX_H5_CHUNK_BYTES) as f:
        ds = f.create_dataset(
            "pixels",
            shape=(n, 3, size, size),
            dtype=dtype,
            chunks=(h5_rows, 3, size, size),
            compression=compression,
        )
        f.create_dataset("image_id", data=np.array(ids, dtype=object), dtype=h5py.string_dtype("utf-8"))
        f.attrs["spec"] = json.dumps(s, sort_keys=True)
        f.attrs["preproc_key"] = key
        f.attrs["n_images"] = n
        f.attrs["vlmrel_version"] = vlmrel.__version__
        bar = tqdm(total=n, desc=f"pixels {key}", unit="img", disable=not progress, mininterval=1.0)
        block = np.empty((min(chunk_size, n), 3, size, size), dtype=dtype)
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            for j in range(stop - start):
                try:
                    img = next(image_iter)
                except StopIteration:
                    raise ValueError(
                        f"{n} image ids but only {start + j} images for {os.fspath(out_h5)!r}"
                    ) from None
                block[j] = raw_pixels(img, s)
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

    Opening checks the file: it must exist, be readable HDF5, have a known ``storage`` in its
    ``spec`` (a file written before pixels were stored as uint8 has none and is refused as
    stale), and hold ``pixels`` [N,3,S,S] of that storage's dtype and ``image_id`` [N]
    consistent with its ``spec`` and ``n_images`` attrs; otherwise a :class:`PixelFileError`
    names the file and the problem.
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
            raw_spec = json.loads(f.attrs["spec"])
        except (ValueError, TypeError) as exc:
            raise self._fail(f"attribute 'spec' is not JSON: {exc}") from exc
        storage = raw_spec.get("storage") if isinstance(raw_spec, dict) else None
        if storage is None:
            raise self._fail(
                f"its spec names no pixel storage: written by an older vlmrel, which stored float32 "
                f"(this one stores {sorted(STORAGES)}); the file is stale: delete it and rerun its pixels job"
            )
        if storage not in STORAGES:
            raise self._fail(
                f"unknown pixel storage {storage!r} in its spec (this vlmrel reads {sorted(STORAGES)}); "
                "written by another vlmrel version? delete it and rerun its pixels job"
            )
        try:
            self.spec: dict[str, Any] = validate_spec(raw_spec)
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
        self.storage: str = storage
        if px.dtype != STORAGES[storage]:
            raise self._fail(f"dataset 'pixels' has dtype {px.dtype}, expected {storage} (its storage)")
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
        """Pixels of the given rows, in the given order (repeats allowed), normalised:
        float32 [len, 3, S, S] (:func:`to_float32` of :meth:`read_raw`)."""
        return to_float32(self.read_raw(indices), self.spec)

    def read_raw(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """The stored values of the given rows, in the given order (repeats allowed): uint8 [len, 3, S, S]."""
        idx = self._index(indices)
        try:
            if idx.size == 0:
                return np.empty((0, 3, self.size, self.size), dtype=self._px.dtype)
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
        self, batch_size: int, indices: Sequence[int] | np.ndarray | None = None, raw: bool = False
    ) -> Iterator[tuple[list[str], np.ndarray]]:
        """Yield ``(image_ids, pixels)`` batches of at most ``batch_size`` rows, in order: float32
        normalised pixels, or with ``raw`` the stored uint8 values (for ``Encoder.prepare``)."""
        if isinstance(batch_size, bool) or int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        batch_size = int(batch_size)
        idx = np.arange(self.n_images) if indices is None else self._index(indices)
        ids = self.image_ids
        for start in range(0, idx.size, batch_size):
            part = idx[start : start + batch_size]
            yield [ids[i] for i in part], (self.read_raw(part) if raw else self.read(part))


def iter_batches(
    h5_path: str | os.PathLike[str],
    batch_size: int,
    indices: Sequence[int] | np.ndarray | None = None,
    raw: bool = False,
) -> Iterator[tuple[list[str], np.ndarray]]:
    """Stream ``(image_ids, pixels float32 [b,3,S,S])`` batches from a pixel file (with ``raw``:
    the stored uint8 values, which ``Encoder.prepare`` normalises on the model's device).

    ``indices`` (rows, any order) restricts and orders the stream; memory follows
    ``batch_size``, not the file size.
    """
    with PixelFile(h5_path) as pf:
        yield from pf.iter_batches(batch_size, indices, raw=raw)


# --------------------------------------------------------------------------- loader


def prefetch(
    items: Callable[[], Iterable[Any]], depth: int = 2, name: str = "vlmrel-prefetch"
) -> Iterator[Any]:
    """Iterate ``items()`` in a background thread, at most ``depth`` items ahead of the consumer.

    Order is preserved; an exception raised by ``items()`` is raised to the consumer at the
    point the stream reached it (after the items before it). When the consumer stops early
    (``break``, an exception, ``close()`` or the generator being dropped) the thread is told to
    stop, the iterator it was reading is closed (closing its file) and the thread is joined: no
    thread outlives the stream. The thread starts on the first ``next()``.
    """
    if isinstance(depth, bool) or int(depth) < 1:
        raise ValueError(f"prefetch depth must be a positive integer, got {depth!r}")
    slots: queue.Queue[tuple[int, Any]] = queue.Queue(maxsize=int(depth))
    stop = threading.Event()

    def put(entry: tuple[int, Any]) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        it = iter(())
        try:
            it = iter(items())
            for item in it:
                if not put((0, item)):
                    return
            put((1, None))
        except BaseException as exc:  # handed to the consumer, raised there
            put((2, exc))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=work, name=name, daemon=True)
    thread.start()
    try:
        while True:
            kind, value = slots.get()
            if kind == 0:
                yield value
            elif kind == 1:
                return
            else:
                raise value
    finally:
        stop.set()
        thread.join()


def prefetch_batches(
    h5_path: str | os.PathLike[str],
    batch_size: int,
    indices: Sequence[int] | np.ndarray | None = None,
    *,
    device: Any = None,
    depth: int = 2,
    raw: bool = True,
) -> Iterator[tuple[list[str], Any]]:
    """:func:`iter_batches` read ahead by a background thread (:func:`prefetch`): the next
    ``depth`` batches are read from HDF5 while the current one is computed. The trials' loader.

    Batches are the stored uint8 values by default (``raw``), for ``Encoder.prepare``, which
    normalises them on the model's device. With a CUDA ``device`` each batch is a torch tensor in
    pinned host memory, so ``prepare`` copies it with ``non_blocking=True``. Same batches, same
    order as :func:`iter_batches`; read errors name the file.
    """
    pin = False
    if device is not None:
        import torch

        pin = torch.device(device).type == "cuda" and torch.cuda.is_available()

    def items() -> Iterator[tuple[list[str], Any]]:
        for ids, px in iter_batches(h5_path, batch_size, indices, raw=raw):
            if pin:
                import torch

                px = torch.from_numpy(px).pin_memory()
            yield ids, px

    return prefetch(items, depth, name=f"vlmrel-prefetch {Path(h5_path).name}")


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
    """The pixel file's metadata: ``spec``, ``preproc_key``, ``n_images``, ``size``, ``shape``, ``storage``,
    ``vlmrel_version``."""
    with PixelFile(h5_path) as pf:
        return {
            "path": str(pf.path),
            "spec": pf.spec,
            "preproc_key": pf.preproc_key,
            "n_images": pf.n_images,
            "size": pf.size,
            "shape": list(pf.shape),
            "storage": pf.storage,
            "vlmrel_version": pf.vlmrel_version,
        }
