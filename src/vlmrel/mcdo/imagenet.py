"""ImageNet WordNet-id folders as class names and labels (seed 002 defect: prompts "a photo of a n01440764").

ImageNet's images sit in folders named by WordNet id (``n01440764/ILSVRC2012_val_00000293.JPEG``).
The standard class index is the position of the id in the *sorted* list of the 1000 ids; open_clip's
``IMAGENET_CLASSNAMES`` holds the readable names in that same index order. The sorted id list comes
from timm (``timm/data/_info/imagenet_synsets.txt``, installed with timm); torchvision and open_clip
ship no id list. Without timm, or for another dataset, give a map file: one ``wnid<TAB>class name``
line per class (config ``mcdo.<exp>.class_map``); its line order is the label order.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

WNID = re.compile(r"^n\d{8}$")


def is_wnid(name: str) -> bool:
    return bool(WNID.match(name))


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids in the standard (sorted) label order, from timm."""
    try:
        from importlib.resources import files

        text = files("timm.data").joinpath("_info/imagenet_synsets.txt").read_text(encoding="utf-8")
    except (ImportError, FileNotFoundError, ModuleNotFoundError) as exc:
        raise ValueError(
            "the ImageNet WordNet-id list ships with timm (timm/data/_info/imagenet_synsets.txt), which is "
            f"not available ({exc}); give a class_map file of 'wnid<TAB>class name' lines instead"
        ) from exc
    wnids = text.split()
    if len(wnids) != 1000 or wnids != sorted(wnids):
        raise ValueError("timm's imagenet_synsets.txt is not the sorted list of 1000 ImageNet ids")
    return wnids


def wnid_names(class_map: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """WordNet id -> class name: from ``class_map`` (``wnid<TAB>name`` lines), else ImageNet-1k's."""
    if class_map is not None:
        out: dict[str, str] = {}
        for i, line in enumerate(Path(class_map).read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.split("\t")
            if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
                raise ValueError(f"{class_map}:{i}: expected 'wnid<TAB>class name', got {line!r}")
            out[parts[0].strip()] = parts[1].strip()
        return out
    from open_clip import IMAGENET_CLASSNAMES

    return dict(zip(imagenet_wnids(), IMAGENET_CLASSNAMES, strict=True))


def folder_labels(
    rel_paths: Sequence[str], class_names: Sequence[str], class_map: str | os.PathLike[str] | None = None
) -> tuple[list[str], list[int]]:
    """Each image's true class from its parent folder: (class name or '', label index into
    ``class_names`` or -1). A WordNet-id folder is mapped to its name first; a folder that is already a
    class name counts as is; anything else is unlabelled."""
    index = {n: i for i, n in enumerate(class_names)}
    mapping: dict[str, str] | None = None
    names, labels = [], []
    for rel in rel_paths:
        folder = PurePosixPath(str(rel)).parent.name
        if is_wnid(folder):
            if mapping is None:
                mapping = wnid_names(class_map)
            folder = mapping.get(folder, "")
        label = index.get(folder, -1)
        names.append(folder if label >= 0 else "")
        labels.append(label)
    return names, labels
