"""Reading and writing the anomaly chain's HDF5 files, with validation that names file and reason.

Files (all HDF5):

* segmentation data ``{split}.h5``: ``images`` [N, 3, H, W] uint8, ``labels`` [N, H, W] integer.
* segmentation logits: ``logits`` [N, C, H, W] float16/float32, ``labels`` [N, H, W] integer;
  attribute ``num_classes`` when written by vlmrel; optionally ``mahalanobis`` [N, H, W] float32,
  the feature-space distance HEAT uses (``vlmrel.anomaly.heat``).
* per-image logits (classification OOD): ``logits`` [N, C] float, ``ood`` [N] bool/0-1.

Logits are read a few images at a time (at most ``max_block_mb`` per read), never whole.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import h5py
import numpy as np
from tqdm import tqdm

from vlmrel.io import atomic_path


class AnomalyInputError(ValueError):
    """An input file or the configuration describing it is unusable; the message says why."""


@dataclass(frozen=True)
class LabelSpec:
    """How label ids map to roles: trained classes 0..num_classes-1, anomaly ids, ignored ids."""

    num_classes: int
    anomaly_ids: tuple[int, ...]
    ignore_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "anomaly_ids", tuple(int(i) for i in self.anomaly_ids))
        object.__setattr__(self, "ignore_ids", tuple(int(i) for i in self.ignore_ids))
        if self.num_classes < 2:
            raise AnomalyInputError(f"num_classes must be at least 2, got {self.num_classes}")
        if not self.anomaly_ids:
            raise AnomalyInputError("anomaly_ids is empty: name the label id(s) of anomalous pixels")
        trained = [i for i in self.anomaly_ids if 0 <= i < self.num_classes]
        if trained:
            raise AnomalyInputError(
                f"anomaly id(s) {trained} are among the model's {self.num_classes} trained classes "
                f"(0..{self.num_classes - 1}); an anomaly label must be one the model never learned"
            )
        both = sorted(set(self.anomaly_ids) & set(self.ignore_ids))
        if both:
            raise AnomalyInputError(f"label id(s) {both} are both anomaly and ignore ids")

    def allowed(self) -> np.ndarray:
        return np.array(sorted(set(range(self.num_classes)) | set(self.anomaly_ids) | set(self.ignore_ids)))

    def masks(self, labels: np.ndarray, where: str = "") -> tuple[np.ndarray, np.ndarray]:
        """(valid, is_anomaly) masks of a label array; unknown label ids are an error."""
        labels = np.asarray(labels)
        present = np.unique(labels)
        bad = np.setdiff1d(present, self.allowed())
        if bad.size:
            raise AnomalyInputError(
                f"{where}label id(s) {bad.tolist()} are neither trained classes (0..{self.num_classes - 1}), "
                f"anomaly ids {list(self.anomaly_ids)} nor ignore ids {list(self.ignore_ids)}; "
                "check anomaly.num_classes / anomaly_ids / ignore_ids against the dataset"
            )
        valid = ~np.isin(labels, self.ignore_ids) if self.ignore_ids else np.ones(labels.shape, dtype=bool)
        return valid, np.isin(labels, self.anomaly_ids)


def _open(path: str | os.PathLike[str]) -> h5py.File:
    if not os.path.exists(path):
        raise AnomalyInputError(f"{path}: no such file")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise AnomalyInputError(f"{path}: not a readable HDF5 file (truncated or corrupt?): {exc}") from exc


def _dataset(f: h5py.File, key: str, path: str | os.PathLike[str]) -> h5py.Dataset:
    if key not in f or not isinstance(f[key], h5py.Dataset):
        raise AnomalyInputError(f"{path}: missing dataset {key!r} (has {sorted(f.keys())})")
    return f[key]


def _read(ds: h5py.Dataset, sl: slice, path: str | os.PathLike[str]) -> np.ndarray:
    try:
        return ds[sl]
    except (OSError, ValueError, RuntimeError) as exc:
        raise AnomalyInputError(
            f"{path}: cannot read {ds.name} items {sl.start}..{sl.stop - 1} (truncated or corrupt file?): {exc}"
        ) from exc


class SegLogitsReader:
    """Validated, block-wise reader of a segmentation logits file ``logits`` [N,C,H,W] + ``labels`` [N,H,W]."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        spec: LabelSpec,
        *,
        max_block_mb: float = 256.0,
        logits_key: str = "logits",
        labels_key: str = "labels",
    ) -> None:
        self.path = os.fspath(path)
        self.spec = spec
        self._f = _open(self.path)
        try:
            self.logits = _dataset(self._f, logits_key, self.path)
            self.labels = _dataset(self._f, labels_key, self.path)
            self._validate()
            self.mahalanobis = None
            if "mahalanobis" in self._f:
                md = _dataset(self._f, "mahalanobis", self.path)
                if md.shape != self.labels.shape:
                    raise AnomalyInputError(
                        f"{self.path}: mahalanobis {md.shape} must match labels {self.labels.shape}"
                    )
                self.mahalanobis = md
        except BaseException:
            self._f.close()
            raise
        per_image = self.logits.dtype.itemsize * math.prod(self.logits.shape[1:])
        self.block = max(1, int(max_block_mb * 2**20 // per_image))

    def _validate(self) -> None:
        lg, lb, p = self.logits, self.labels, self.path
        if lg.ndim != 4:
            raise AnomalyInputError(f"{p}: logits must be [N, C, H, W], got shape {lg.shape}")
        if lb.ndim != 3:
            raise AnomalyInputError(f"{p}: labels must be [N, H, W], got shape {lb.shape}")
        if lg.dtype not in (np.float16, np.float32, np.float64):
            raise AnomalyInputError(f"{p}: logits must be float16 or float32, got {lg.dtype}")
        if not np.issubdtype(lb.dtype, np.integer):
            raise AnomalyInputError(f"{p}: labels must be integers, got {lb.dtype}")
        n, c, h, w = lg.shape
        if lb.shape != (n, h, w):
            raise AnomalyInputError(f"{p}: logits {lg.shape} and labels {lb.shape} disagree on N, H or W")
        if n == 0:
            raise AnomalyInputError(f"{p}: no images")
        if c != self.spec.num_classes:
            raise AnomalyInputError(
                f"{p}: logits have {c} classes but anomaly.num_classes is {self.spec.num_classes}. "
                "num_classes is the number of classes the model was trained on (its output channels), "
                "not the number of label ids in the dataset (which also counts anomaly ids)"
            )
        attr = self._f.attrs.get("num_classes")
        if attr is not None and int(attr) != c:
            raise AnomalyInputError(f"{p}: attribute num_classes={int(attr)} but logits have {c} channels")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.logits.shape)  # type: ignore[return-value]

    def __len__(self) -> int:
        return self.logits.shape[0]

    @property
    def has_features(self) -> bool:
        return self.mahalanobis is not None

    def __iter__(self) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """Yield ``(index, logits [C,H,W], labels [H,W], valid [H,W], is_anomaly [H,W])`` per image."""
        for item in self.iter_with_features():
            yield item[:5]

    def iter_with_features(
        self,
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]]:
        """As ``__iter__``, plus the image's ``mahalanobis`` map [H, W] (None without one)."""
        n = len(self)
        for start in range(0, n, self.block):
            sl = slice(start, min(n, start + self.block))
            lg = _read(self.logits, sl, self.path)
            lb = _read(self.labels, sl, self.path)
            md = _read(self.mahalanobis, sl, self.path) if self.mahalanobis is not None else None
            for j in range(lg.shape[0]):
                i = start + j
                valid, anomalous = self.spec.masks(lb[j], where=f"{self.path}: image {i}: ")
                yield i, lg[j], lb[j], valid, anomalous, (md[j] if md is not None else None)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> SegLogitsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def iter_image_logits(
    path: str | os.PathLike[str], num_classes: int, *, block: int = 65536, need_ood: bool = True
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Per-image logits file: yield blocks ``(logits [n, C], ood [n] bool or None)``."""
    p = os.fspath(path)
    with _open(p) as f:
        lg = _dataset(f, "logits", p)
        if lg.ndim != 2:
            raise AnomalyInputError(f"{p}: per-image logits must be [N, C], got shape {lg.shape}")
        if lg.shape[1] != num_classes:
            raise AnomalyInputError(
                f"{p}: logits have {lg.shape[1]} classes but anomaly.num_classes is {num_classes}"
            )
        ood = None
        if need_ood:
            ood = _dataset(f, "ood", p)
            if ood.shape != (lg.shape[0],):
                raise AnomalyInputError(f"{p}: ood must be [N] = [{lg.shape[0]}], got shape {ood.shape}")
        for start in range(0, lg.shape[0], block):
            sl = slice(start, min(lg.shape[0], start + block))
            flags = None
            if ood is not None:
                raw = _read(ood, sl, p)
                if not np.isin(raw, (0, 1)).all():
                    raise AnomalyInputError(f"{p}: ood flags must be 0/1 or booleans")
                flags = raw.astype(bool)
            yield _read(lg, sl, p), flags


# ---- writers ------------------------------------------------------------------------------------


def write_seg_data(
    path: str | os.PathLike[str], images: np.ndarray, labels: np.ndarray, **attrs: object
) -> None:
    """Write ``images`` [N,3,H,W] uint8 and ``labels`` [N,H,W] atomically (one chunk per image)."""
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 4 or labels.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"images {images.shape} and labels {labels.shape} do not match")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset(
            "images", data=images, chunks=(1, *images.shape[1:]), compression="gzip", compression_opts=1
        )
        f.create_dataset(
            "labels", data=labels, chunks=(1, *labels.shape[1:]), compression="gzip", compression_opts=1
        )
        for k, v in attrs.items():
            f.attrs[k] = v


class SegDataReader:
    """Reader of a segmentation data file (``images`` [N,3,H,W] uint8, ``labels`` [N,H,W])."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._f = _open(self.path)
        try:
            self.images = _dataset(self._f, "images", self.path)
            self.labels = _dataset(self._f, "labels", self.path)
            im, lb = self.images, self.labels
            if im.ndim != 4 or im.shape[1] != 3:
                raise AnomalyInputError(f"{self.path}: images must be [N, 3, H, W], got shape {im.shape}")
            if im.dtype != np.uint8:
                raise AnomalyInputError(f"{self.path}: images must be uint8, got {im.dtype}")
            if lb.shape != (im.shape[0], *im.shape[2:]):
                raise AnomalyInputError(f"{self.path}: images {im.shape} and labels {lb.shape} disagree")
            if not np.issubdtype(lb.dtype, np.integer):
                raise AnomalyInputError(f"{self.path}: labels must be integers, got {lb.dtype}")
        except BaseException:
            self._f.close()
            raise

    def __len__(self) -> int:
        return self.images.shape[0]

    def read(self, sl: slice) -> tuple[np.ndarray, np.ndarray]:
        return _read(self.images, sl, self.path), _read(self.labels, sl, self.path)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> SegDataReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _LogitsSink:
    def __init__(
        self,
        f: h5py.File,
        n: int,
        num_classes: int,
        hw: tuple[int, int],
        label_dtype: object,
        dtype: str,
        features: bool = False,
    ):
        h, w = hw
        self.logits = f.create_dataset(
            "logits", shape=(n, num_classes, h, w), dtype=dtype, chunks=(1, num_classes, h, w)
        )
        self.labels = f.create_dataset("labels", shape=(n, h, w), dtype=label_dtype, chunks=(1, h, w))
        self.mahalanobis = (
            f.create_dataset("mahalanobis", shape=(n, h, w), dtype="float32", chunks=(1, h, w))
            if features
            else None
        )
        self.n = n
        self.written = 0

    def write(self, logits: np.ndarray, labels: np.ndarray, mahalanobis: np.ndarray | None = None) -> None:
        """Append a block of images: logits [k, C, H, W], labels [k, H, W] (mahalanobis [k, H, W])."""
        sl = slice(self.written, self.written + logits.shape[0])
        with np.errstate(over="ignore"):
            self.logits[sl] = logits.astype(self.logits.dtype)
        self.labels[sl] = labels
        if (self.mahalanobis is None) != (mahalanobis is None):
            raise ValueError("mahalanobis maps must be written for every block or for none")
        if self.mahalanobis is not None:
            self.mahalanobis[sl] = np.asarray(mahalanobis, dtype=np.float32)
        self.written = sl.stop


@contextlib.contextmanager
def seg_logits_writer(
    path: str | os.PathLike[str],
    n: int,
    num_classes: int,
    hw: tuple[int, int],
    label_dtype: object,
    dtype: str = "float16",
    features: bool = False,
    **attrs: object,
) -> Iterator[_LogitsSink]:
    """Write logits [N,C,H,W] and labels block by block; the file appears only when all N are written."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["num_classes"] = num_classes
        for k, v in attrs.items():
            f.attrs[k] = v
        sink = _LogitsSink(f, n, num_classes, hw, label_dtype, dtype, features)
        yield sink
        if sink.written != n:
            raise RuntimeError(f"{path}: wrote {sink.written} of {n} images")


def write_image_logits(
    path: str | os.PathLike[str], logits: np.ndarray, ood: np.ndarray | None, **attrs: object
) -> None:
    """Per-image logits [N, C] (+ ``ood`` [N]) atomically."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("logits", data=np.asarray(logits))
        if ood is not None:
            f.create_dataset("ood", data=np.asarray(ood, dtype=bool))
        f.attrs["num_classes"] = np.asarray(logits).shape[1]
        for k, v in attrs.items():
            f.attrs[k] = v


def progress(it: Sequence | Iterator, total: int | None = None, desc: str = "") -> Iterator:
    """tqdm on stderr."""
    return tqdm(it, total=total, desc=desc, unit="img", mininterval=2.0)
