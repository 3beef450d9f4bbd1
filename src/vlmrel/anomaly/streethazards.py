"""StreetHazards as it is distributed -> the chain's segmentation data file, streamed and validated.

The published archives unpack to (Hendrycks et al.; ``streethazards_train.tar``, ``streethazards_test.tar``)::

    train/images/training/t1-3/*.png        train/annotations/training/t1-3/*.png
    train/images/validation/t4/*.png        train/annotations/validation/t4/*.png
    test/images/test/t5/*.png               test/annotations/test/t5/*.png

``SPLITS`` holds these folders per split (config ``anomaly.streethazards.splits`` overrides them).
Every image is paired with the annotation of the same relative path. Annotation PNGs hold one
value per pixel, ``label id + label_offset`` (the files are 1-indexed: value 14 is label 13, the
anomaly).

Checks, each an ``AnomalyInputError`` naming the file and the reason: a missing or unreadable
file, an image that is not RGB-convertible, an annotation with more than one channel, a size
other than ``image_size``, label ids that are neither trained classes, anomaly ids nor ignore ids.

The output is the chain's data file (``images`` [N, 3, H, W] uint8, ``labels`` [N, H, W] uint8,
one HDF5 chunk per image), written image by image: memory holds one image, whatever the split's
size. It appears only when complete (atomic rename).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from vlmrel.anomaly.io import AnomalyInputError, LabelSpec
from vlmrel.io import atomic_path

log = logging.getLogger("vlmrel.anomaly")

SPLITS = {
    "train": {"images": "train/images/training", "annotations": "train/annotations/training"},
    "val": {"images": "train/images/validation", "annotations": "train/annotations/validation"},
    "test": {"images": "test/images/test", "annotations": "test/annotations/test"},
}
EXTENSIONS = (".png", ".jpg", ".jpeg")


def pairs(root: str | os.PathLike[str], images: str, annotations: str) -> list[tuple[Path, Path]]:
    """(image, annotation) paths of a split, sorted by relative path; unpaired images are errors."""
    img_dir, ann_dir = Path(root) / images, Path(root) / annotations
    for d, what in ((img_dir, "images"), (ann_dir, "annotations")):
        if not d.is_dir():
            raise AnomalyInputError(f"{d}: no such folder (the split's {what}; check anomaly.streethazards)")
    found = sorted(p for p in img_dir.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)
    if not found:
        raise AnomalyInputError(f"{img_dir}: no images ({', '.join(EXTENSIONS)})")
    out = []
    for img in found:
        rel = img.relative_to(img_dir)
        ann = ann_dir / rel.with_suffix(".png")
        if not ann.is_file():
            raise AnomalyInputError(f"{img}: no annotation (expected {ann})")
        out.append((img, ann))
    return out


def _open_image(path: Path):  # type: ignore[no-untyped-def]
    from PIL import Image

    try:
        im = Image.open(path)
        im.load()
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file
        raise AnomalyInputError(f"{path}: cannot be read as an image (truncated or corrupt?): {exc}") from exc
    return im


def read_pair(
    img_path: Path,
    ann_path: Path,
    *,
    image_size: Sequence[int],
    resize: Sequence[int] | None,
    label_offset: int,
    spec: LabelSpec,
) -> tuple[np.ndarray, np.ndarray]:
    """One validated pair: image [3, H, W] uint8 and labels [H, W] uint8 (after the optional resize)."""
    from PIL import Image

    h, w = int(image_size[0]), int(image_size[1])
    im = _open_image(img_path)
    ann = _open_image(ann_path)
    if im.mode not in ("RGB", "RGBA", "L", "P"):
        raise AnomalyInputError(f"{img_path}: image mode {im.mode} is not RGB-convertible")
    if ann.mode not in ("L", "P", "I", "I;16"):
        raise AnomalyInputError(
            f"{ann_path}: annotation mode {ann.mode}; expected one channel of label values"
        )
    for path, got in ((img_path, im.size), (ann_path, ann.size)):
        if got != (w, h):
            raise AnomalyInputError(
                f"{path}: size {got[0]}x{got[1]} (WxH), expected {w}x{h} (anomaly.streethazards.image_size)"
            )
    if resize:
        rh, rw = int(resize[0]), int(resize[1])
        im = im.convert("RGB").resize((rw, rh), Image.BILINEAR)
        ann = ann.resize((rw, rh), Image.NEAREST)
    rgb = np.asarray(im.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1)
    raw = np.asarray(ann).astype(np.int64) - int(label_offset)
    ids = np.unique(raw)
    bad = np.setdiff1d(ids, spec.allowed())
    if bad.size:
        raise AnomalyInputError(
            f"{ann_path}: label ids {bad.tolist()} (file values {(bad + label_offset).tolist()}) are neither "
            f"trained classes 0..{spec.num_classes - 1}, anomaly ids {list(spec.anomaly_ids)} nor ignore ids "
            f"{list(spec.ignore_ids)}; check anomaly.num_classes / anomaly_ids / ignore_ids / "
            "streethazards.label_offset"
        )
    if ids.min() < 0 or ids.max() > 255:
        raise AnomalyInputError(f"{ann_path}: label ids outside 0..255 after the offset")
    return rgb, raw.astype(np.uint8)


def import_split(
    root: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    images: str,
    annotations: str,
    image_size: Sequence[int],
    spec: LabelSpec,
    resize: Sequence[int] | None = None,
    label_offset: int = 1,
    split: str = "",
) -> dict:
    """Stream one split into ``out_path``; returns a summary (counts per label id)."""
    from tqdm import tqdm

    files = pairs(root, images, annotations)
    h, w = (int(resize[0]), int(resize[1])) if resize else (int(image_size[0]), int(image_size[1]))
    counts = np.zeros(256, dtype=np.int64)
    with atomic_path(out_path) as tmp, h5py.File(tmp, "w") as f:
        ims = f.create_dataset(
            "images",
            shape=(len(files), 3, h, w),
            dtype=np.uint8,
            chunks=(1, 3, h, w),
            compression="gzip",
            compression_opts=1,
        )
        labs = f.create_dataset(
            "labels",
            shape=(len(files), h, w),
            dtype=np.uint8,
            chunks=(1, h, w),
            compression="gzip",
            compression_opts=1,
        )
        f.create_dataset("files", data=np.array([str(p.relative_to(root)) for p, _ in files], dtype="S"))
        f.attrs.update(
            source="StreetHazards (published layout)",
            root=os.fspath(root),
            split=split,
            label_offset=int(label_offset),
            original_size=list(image_size),
        )
        for i, (img, ann) in enumerate(tqdm(files, desc=f"import {split}", unit="img", mininterval=2.0)):
            rgb, lab = read_pair(
                img, ann, image_size=image_size, resize=resize, label_offset=label_offset, spec=spec
            )
            ims[i] = rgb
            labs[i] = lab
            counts += np.bincount(lab.reshape(-1), minlength=256)
    present = {int(k): int(v) for k, v in enumerate(counts) if v}
    log.info("%s: %d images from %s, label pixels %s", split, len(files), root, present)
    return {"split": split, "n_images": len(files), "size": [h, w], "label_pixels": present}
