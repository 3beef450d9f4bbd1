"""RefCOCO-family samples from local files, generated demo scenes, and seeded stratified subsets.

Sources
-------
* ``load_parquet(path)``: the Hugging Face parquet layout the seeds used (``lmms-lab/RefCOCO``,
  val split, 8,811 rows): ``question_id``, ``image`` (struct of ``bytes``/``path``), ``answer``
  (the referring expressions), ``bbox`` (COCO ``[x, y, w, h]`` pixels). ``path`` is a file or a
  folder of shards; shards are read in name order so row ``i`` is the seeds' ``dataset[i]``.
* ``load_classic(refs, instances, images_dir)``: ``refs(unc).p`` + ``instances.json`` + COCO
  images. The pickle is read by :class:`RestrictedUnpickler`, which admits only plain containers,
  strings and numbers and refuses any global (so no code can run while reading it).
* ``write_demo_parquet(path, n, seed)``: generated scenes of coloured shapes with referring
  expressions and exact boxes, in the same parquet layout (so the demo runs the real loader);
  :func:`demo_locate` finds the named object again, so an HTTP simulator can answer.

A sample's image is decoded only when asked for (:meth:`RefSample.image`).

Difficulty is the box's area fraction of the image: ``hard`` below the first threshold, ``medium``
below the second, ``easy`` otherwise. :func:`select_subset` draws a seeded subset stratified by
difficulty and :func:`write_subset` saves it as indices (JSON), so a subset is named and reused;
:func:`read_subset` also reads the seeds' ``.npy`` index files (without pickle).
"""

from __future__ import annotations

import colorsys
import io
import json
import os
import pickle
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vlmrel.io import atomic_path, write_json

DIFFICULTIES = ("easy", "medium", "hard")
DEFAULT_COLUMNS = {"id": "question_id", "image": "image", "expressions": "answer", "bbox": "bbox"}


@dataclass
class RefSample:
    """One referring expression target: ``bbox`` is ``(x1, y1, x2, y2)`` in original-image pixels."""

    index: int
    sample_id: str
    expressions: list[str]
    bbox: tuple[float, float, float, float]
    width: int
    height: int
    source: str = ""
    _image_bytes: bytes | None = field(default=None, repr=False)
    _image_path: Path | None = field(default=None, repr=False)

    @property
    def expression(self) -> str:
        """The first expression (the seeds used ``expressions[0]``)."""
        return self.expressions[0]

    @property
    def bbox_norm(self) -> tuple[float, float, float, float]:
        x1, y1, x2, y2 = self.bbox
        return (x1 / self.width, y1 / self.height, x2 / self.width, y2 / self.height)

    @property
    def area_fraction(self) -> float:
        x1, y1, x2, y2 = self.bbox
        return max(0.0, x2 - x1) * max(0.0, y2 - y1) / float(self.width * self.height)

    def image(self) -> Image.Image:
        """The RGB image, decoded now."""
        try:
            if self._image_bytes is not None:
                img = Image.open(io.BytesIO(self._image_bytes))
            elif self._image_path is not None:
                img = Image.open(self._image_path)
            else:
                raise ValueError("no image bytes or path")
            return img.convert("RGB")
        except Exception as exc:
            where = self._image_path or self.source
            raise ValueError(
                f"sample {self.sample_id} (row {self.index}, {where}): cannot read image: {exc}"
            ) from exc


def difficulty(area_fraction: float, thresholds: Sequence[float] = (0.05, 0.2)) -> str:
    """``hard`` if the box covers less than ``thresholds[0]`` of the image, ``medium`` below ``[1]``, else ``easy``."""
    lo, hi = thresholds
    if not 0 < lo < hi < 1:
        raise ValueError(f"difficulty thresholds must satisfy 0 < lo < hi < 1, got {list(thresholds)}")
    return "hard" if area_fraction < lo else ("medium" if area_fraction < hi else "easy")


# ----------------------------------------------------------------------------------- parquet


def _parquet_files(path: str | os.PathLike[str]) -> list[Path]:
    p = Path(path)
    if p.is_dir():
        files = sorted(p.glob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"{p}: no *.parquet files in this folder")
        return files
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such parquet file or folder")
    return [p]


def _expressions(value, where: str) -> list[str]:
    if isinstance(value, str):
        out = [value]
    elif value is None:
        out = []
    else:
        out = [str(v) for v in value if v is not None and str(v).strip()]
    if not out:
        raise ValueError(f"{where}: no referring expression")
    return out


def _bbox_xyxy(value, fmt: str, where: str) -> tuple[float, float, float, float]:
    if value is None or len(value) < 4:
        raise ValueError(f"{where}: bbox {value!r} has fewer than 4 numbers")
    a, b, c, d = (float(v) for v in list(value)[:4])
    box = (a, b, a + c, b + d) if fmt == "xywh" else (a, b, c, d)
    if not (box[2] > box[0] and box[3] > box[1]):
        raise ValueError(f"{where}: empty bbox {list(value)} ({fmt})")
    return box


def _parquet_sample(
    data: dict,
    j: int,
    i: int,
    f: Path,
    cols: Mapping[str, str],
    bbox_format: str,
    keep_images: bool,
    use_ids: bool,
) -> RefSample:
    where = f"{f.name} row {i}"
    img = data[cols["image"]][j]
    blob = img.get("bytes") if isinstance(img, dict) else img
    ipath = img.get("path") if isinstance(img, dict) else None
    if blob is None and ipath:
        cand = Path(ipath) if Path(ipath).is_absolute() else f.parent / ipath
        blob = cand.read_bytes() if cand.exists() else None
    if blob is None:
        raise ValueError(f"{where}: image has neither bytes nor a readable path")
    if "width" in data and "height" in data:
        w, h = int(data["width"][j]), int(data["height"][j])
    else:
        try:
            with Image.open(io.BytesIO(blob)) as im:
                w, h = im.size
        except Exception as exc:
            raise ValueError(f"{where}: cannot read the image header: {exc}") from exc
    return RefSample(
        index=i,
        sample_id=str(data[cols["id"]][j]) if use_ids else f"row{i:06d}",
        expressions=_expressions(data[cols["expressions"]][j], where),
        bbox=_bbox_xyxy(data[cols["bbox"]][j], bbox_format, where),
        width=w,
        height=h,
        source=str(f),
        _image_bytes=blob if keep_images else None,
    )


def load_parquet(
    path: str | os.PathLike[str],
    *,
    columns: Mapping[str, str] | None = None,
    bbox_format: str = "xywh",
    indices: Iterable[int] | None = None,
    keep_images: bool = True,
) -> list[RefSample]:
    """Samples from a parquet file or folder of shards (HF layout); row order is the dataset index.

    ``columns`` maps ``id``/``image``/``expressions``/``bbox`` to column names (defaults: the
    lmms-lab RefCOCO names). ``indices`` keeps only those rows (row groups without any are not
    read; samples come back in row order); ``keep_images=False`` keeps no
    image bytes (enough for difficulty and subset selection; sizes come from the image headers or
    from ``width``/``height`` columns when present).
    """
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    if bbox_format not in ("xywh", "xyxy"):
        raise ValueError(f"bbox_format must be 'xywh' or 'xyxy', got {bbox_format!r}")
    cols = {**DEFAULT_COLUMNS, **(columns or {})}
    wanted = None if indices is None else set(int(i) for i in indices)
    samples: list[RefSample] = []
    row = 0
    files = _parquet_files(path)
    # ids must identify samples everywhere (they seed the noise): if the id column is missing or not
    # unique over the whole dataset, every sample is named by its row instead
    ids_all: list = []
    for f in files:
        pf = pq.ParquetFile(f)
        if cols["id"] not in pf.schema_arrow.names:
            ids_all = []
            break
        ids_all += pf.read(columns=[cols["id"]]).column(0).to_pylist()
    use_ids = bool(ids_all) and None not in ids_all and len(set(map(str, ids_all))) == len(ids_all)
    bar = tqdm(
        total=len(wanted) if wanted is not None else None, desc="read parquet", unit="row", leave=False
    )
    for f in files:
        pf = pq.ParquetFile(f)
        names = set(pf.schema_arrow.names)
        missing = [cols[k] for k in ("image", "expressions", "bbox") if cols[k] not in names]
        if missing:
            raise ValueError(f"{f}: missing column(s) {missing}; has {sorted(names)}")
        read = [c for c in (cols["id"], cols["image"], cols["expressions"], cols["bbox"]) if c in names]
        read += [c for c in ("width", "height") if c in names]
        for rg in range(pf.num_row_groups):
            n_rg = pf.metadata.row_group(rg).num_rows
            if wanted is not None and not any(row <= i < row + n_rg for i in wanted):
                row += n_rg  # no wanted row in this row group: skip reading it
                continue
            for batch in pf.iter_batches(batch_size=256, row_groups=[rg], columns=read):
                data = batch.to_pydict()
                for j in range(batch.num_rows):
                    i = row + j
                    if wanted is not None and i not in wanted:
                        continue
                    bar.update(1)
                    samples.append(_parquet_sample(data, j, i, f, cols, bbox_format, keep_images, use_ids))
                row += batch.num_rows
    bar.close()
    if wanted is not None and len(samples) != len(wanted):
        absent = sorted(wanted - {s.index for s in samples})
        raise ValueError(f"{path}: indices {absent[:10]} are beyond the dataset's {row} rows")
    return samples


# ----------------------------------------------------------------------------------- classic


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for ``refs(unc).p`` that admits only plain containers, strings and numbers.

    Dicts, lists, tuples, strings, bytes, ints, floats, bools and None need no global; sets,
    frozensets and complex numbers are the only globals allowed. Anything else (a class, a
    function such as ``os.system``) raises :class:`pickle.UnpicklingError` before it is called.
    """

    ALLOWED = {
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "complex"),
        ("__builtin__", "set"),
        ("__builtin__", "frozenset"),
        ("__builtin__", "complex"),
    }

    def find_class(self, module: str, name: str):  # noqa: D102
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refused global {module}.{name}: only plain containers and numbers may be unpickled"
        )

    def persistent_load(self, pid):  # noqa: D102
        raise pickle.UnpicklingError(
            "refused persistent id: only plain containers and numbers may be unpickled"
        )


def restricted_load(path: str | os.PathLike[str]):
    """Read a pickle with :class:`RestrictedUnpickler`; errors name the file."""
    try:
        with open(path, "rb") as fh:
            return RestrictedUnpickler(fh, encoding="utf-8").load()
    except pickle.UnpicklingError as exc:
        raise pickle.UnpicklingError(f"{path}: {exc}") from exc
    except (EOFError, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a readable refs pickle: {exc}") from exc


def load_classic(
    refs_path: str | os.PathLike[str],
    instances_path: str | os.PathLike[str],
    images_dir: str | os.PathLike[str],
    *,
    split: str = "val",
) -> list[RefSample]:
    """Samples of ``split`` from ``refs(unc).p`` + ``instances.json`` + a folder of COCO images.

    One sample per ref, in the pickle's order; expressions are the ref's sentences (``sent``),
    the box is its annotation's COCO ``[x, y, w, h]``; the id is ``ref{ref_id}``.
    """
    refs = restricted_load(refs_path)
    if not isinstance(refs, list):
        raise ValueError(f"{refs_path}: expected a list of refs, got {type(refs).__name__}")
    with open(instances_path, encoding="utf-8") as fh:
        inst = json.load(fh)
    try:
        images = {int(im["id"]): im for im in inst["images"]}
        anns = {int(a["id"]): a for a in inst["annotations"]}
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{instances_path}: not a COCO instances file ({exc})") from exc
    images_dir = Path(images_dir)
    samples = []
    for ref in refs:
        if not isinstance(ref, dict) or ref.get("split") != split:
            continue
        where = f"{refs_path} ref {ref.get('ref_id')}"
        ann = anns.get(int(ref["ann_id"]))
        im = images.get(int(ref["image_id"]))
        if ann is None or im is None:
            raise ValueError(
                f"{where}: annotation {ref.get('ann_id')} or image {ref.get('image_id')} not in {instances_path}"
            )
        sents = [s.get("sent") or s.get("raw") for s in ref.get("sentences", []) if isinstance(s, dict)]
        samples.append(
            RefSample(
                index=len(samples),
                sample_id=f"ref{int(ref['ref_id'])}",
                expressions=_expressions(sents, where),
                bbox=_bbox_xyxy(ann["bbox"], "xywh", where),
                width=int(im["width"]),
                height=int(im["height"]),
                source=str(refs_path),
                _image_path=images_dir / im["file_name"],
            )
        )
    if not samples:
        raise ValueError(f"{refs_path}: no refs in split {split!r}")
    return samples


# -------------------------------------------------------------------------------------- demo

# saturated colours with hues at least 30 degrees apart, so a colour word identifies an object
DEMO_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (235, 130, 20),
    "yellow": (225, 215, 25),
    "green": (30, 170, 40),
    "cyan": (20, 200, 210),
    "blue": (35, 60, 220),
    "purple": (140, 40, 200),
    "magenta": (220, 30, 170),
}
DEMO_SHAPES = ("square", "circle", "triangle")


def _demo_scene(rng: np.random.Generator, size: tuple[int, int]) -> tuple[Image.Image, list[dict]]:
    w, h = size
    base = rng.integers(150, 215)
    yy, xx = np.mgrid[0:h, 0:w]
    bg = base + 25 * (xx / w - 0.5) + rng.normal(0, 4, (h, w))
    canvas = Image.fromarray(np.clip(np.repeat(bg[:, :, None], 3, 2), 0, 255).astype(np.uint8))
    n_obj = int(rng.integers(2, 5))
    colors = rng.choice(list(DEMO_COLORS), size=n_obj, replace=False)
    objects: list[dict] = []
    taken = np.zeros((h, w), bool)
    # the target (first object) covers a box area fraction drawn evenly from the three default
    # difficulty ranges; distractors are smaller (log-uniform)
    lo, hi = [(0.006, 0.05), (0.05, 0.2), (0.2, 0.45)][int(rng.integers(3))]
    for o, color in enumerate(colors):
        for _ in range(50):
            frac = rng.uniform(lo, hi) if o == 0 else np.exp(rng.uniform(np.log(0.004), np.log(0.08)))
            area = frac * w * h
            aspect = rng.uniform(0.6, 1.6)
            bw = int(np.clip(np.sqrt(area * aspect), 8, 0.9 * w))
            bh = int(np.clip(np.sqrt(area / aspect), 8, 0.9 * h))
            x0 = int(rng.integers(0, w - bw))
            y0 = int(rng.integers(0, h - bh))
            if not taken[max(0, y0 - 3) : y0 + bh + 3, max(0, x0 - 3) : x0 + bw + 3].any():
                break
        else:
            continue
        shape = str(rng.choice(DEMO_SHAPES))
        mask_img = Image.new("L", (w, h), 0)
        d = ImageDraw.Draw(mask_img)
        box = [x0, y0, x0 + bw - 1, y0 + bh - 1]
        if shape == "square":
            d.rectangle(box, fill=255)
        elif shape == "circle":
            d.ellipse(box, fill=255)
        else:
            d.polygon([(x0, y0 + bh - 1), (x0 + (bw - 1) / 2, y0), (x0 + bw - 1, y0 + bh - 1)], fill=255)
        mask = np.asarray(mask_img) > 0
        ys, xs = np.nonzero(mask)
        canvas.paste(Image.new("RGB", (w, h), DEMO_COLORS[str(color)]), (0, 0), mask_img)
        taken |= mask
        objects.append(
            {
                "color": str(color),
                "shape": shape,
                "bbox": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
            }
        )
    return canvas, objects


def _demo_expressions(obj: dict, width: int) -> list[str]:
    cx = (obj["bbox"][0] + obj["bbox"][2]) / 2
    side = "left" if cx < width / 2 else "right"
    return [f"the {obj['color']} {obj['shape']}", f"{obj['color']} {obj['shape']} on the {side}"]


def make_demo_scenes(n: int, seed: int = 0, size: tuple[int, int] = (320, 240)) -> list[dict]:
    """``n`` scenes: ``{question_id, image (PIL), answer, bbox_xyxy, objects, target}``, seeded per scene."""
    scenes = []
    for i in range(n):
        rng = np.random.default_rng([int(seed), i])
        while True:
            img, objects = _demo_scene(rng, size)
            if len(objects) >= 2:
                break
        t = 0
        scenes.append(
            {
                "question_id": f"demo{i:05d}",
                "image": img,
                "answer": _demo_expressions(objects[t], size[0]),
                "bbox_xyxy": objects[t]["bbox"],
                "objects": objects,
                "target": t,
            }
        )
    return scenes


def write_demo_parquet(
    path: str | os.PathLike[str], n: int, seed: int = 0, size: tuple[int, int] = (320, 240)
) -> None:
    """Write ``n`` demo scenes in the HF RefCOCO parquet layout (PNG bytes, COCO xywh boxes), atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = {
        k: []
        for k in (
            "question_id",
            "image",
            "question",
            "answer",
            "bbox",
            "file_name",
            "width",
            "height",
            "objects",
        )
    }
    for sc in make_demo_scenes(n, seed, size):
        buf = io.BytesIO()
        sc["image"].save(buf, format="PNG")
        x1, y1, x2, y2 = sc["bbox_xyxy"]
        rows["question_id"].append(sc["question_id"])
        rows["image"].append({"bytes": buf.getvalue(), "path": f"{sc['question_id']}.png"})
        rows["question"].append("Locate the object the expression refers to.")
        rows["answer"].append(sc["answer"])
        rows["bbox"].append([float(x1), float(y1), float(x2 - x1), float(y2 - y1)])
        rows["file_name"].append(f"{sc['question_id']}.png")
        rows["width"].append(size[0])
        rows["height"].append(size[1])
        rows["objects"].append(json.dumps(sc["objects"]))
    table = pa.table(rows)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def demo_locate(
    image: Image.Image, expression: str, min_saturation: float = 0.35
) -> tuple[int, int, int, int] | None:
    """The pixel box of the demo object whose colour the expression names, or None.

    Hue survives brightness/contrast changes, so this finds the object in perturbed demo images
    too (what a simulated VLM answers): the box of the largest connected region of that hue.
    """
    words = expression.lower().replace(",", " ").split()
    color = next((c for c in DEMO_COLORS if c in words), None)
    if color is None:
        return None
    target_h = colorsys.rgb_to_hsv(*(v / 255 for v in DEMO_COLORS[color]))[0]
    hsv = np.asarray(image.convert("HSV"), dtype=float) / 255.0
    dh = np.abs(hsv[..., 0] - target_h)
    dh = np.minimum(dh, 1 - dh)
    mask = (dh < 15 / 360) & (hsv[..., 1] > min_saturation) & (hsv[..., 2] > 0.12)
    from scipy import ndimage

    labels, n = ndimage.label(mask)
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    ys, xs = np.nonzero(labels == 1 + int(np.argmax(sizes)))
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


# ------------------------------------------------------------------------------------ subsets


def select_subset(
    difficulties: Sequence[str], n: int, seed: int = 0, *, allocation: str = "equal"
) -> list[int]:
    """A seeded subset of positions, stratified by difficulty; sorted.

    ``allocation="equal"`` gives each difficulty ``n // 3`` (the seeds' 51 = 3 x 17 and
    99 = 3 x 33), ``"proportional"`` follows the strata sizes (largest remainders); a stratum
    with too few samples gives all it has and the rest is spread over the others.
    """
    diffs = np.asarray(difficulties)
    if n > diffs.size:
        raise ValueError(f"subset of {n} requested from {diffs.size} samples")
    if allocation not in ("equal", "proportional"):
        raise ValueError(f"allocation must be 'equal' or 'proportional', got {allocation!r}")
    unknown = sorted(set(diffs.tolist()) - set(DIFFICULTIES))
    if unknown:
        raise ValueError(f"unknown difficulty labels {unknown}; expected {DIFFICULTIES}")
    strata = {d: np.flatnonzero(diffs == d) for d in DIFFICULTIES}
    sizes = {d: len(v) for d, v in strata.items()}
    if allocation == "equal":
        share = {d: n // 3 + (1 if i < n % 3 else 0) for i, d in enumerate(DIFFICULTIES)}
    else:
        raw = {d: n * sizes[d] / diffs.size for d in DIFFICULTIES}
        share = {d: int(np.floor(raw[d])) for d in DIFFICULTIES}
        for d in sorted(DIFFICULTIES, key=lambda d: raw[d] - share[d], reverse=True)[
            : n - sum(share.values())
        ]:
            share[d] += 1
    take = {d: min(share[d], sizes[d]) for d in DIFFICULTIES}
    left = n - sum(take.values())
    while left > 0:  # redistribute what small strata could not give
        room = [d for d in DIFFICULTIES if take[d] < sizes[d]]
        for d in room[:left]:
            take[d] += 1
            left -= 1
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(strata[d], size=take[d], replace=False) for d in DIFFICULTIES if take[d] > 0]
    return sorted(int(i) for i in np.concatenate(chosen)) if chosen else []


def write_subset(
    path: str | os.PathLike[str], name: str, samples: Sequence[RefSample], positions: Sequence[int], **meta
) -> None:
    """Save a subset as dataset indices (plus ids and difficulty counts), atomically, as JSON."""
    chosen = [samples[p] for p in positions]
    write_json(
        path,
        {
            "name": name,
            "n": len(chosen),
            "indices": [s.index for s in chosen],
            "sample_ids": [s.sample_id for s in chosen],
            **meta,
        },
    )


def read_subset(path: str | os.PathLike[str]) -> list[int]:
    """Dataset indices of a saved subset: our JSON, or the seeds' ``.npy`` (read without pickle)."""
    p = Path(path)
    if p.suffix == ".npy":
        arr = np.load(p, allow_pickle=False)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{p}: expected a 1-D integer array of indices, got {arr.dtype} {arr.shape}")
        return [int(i) for i in arr]
    with open(p, encoding="utf-8") as fh:
        data = json.load(fh)
    if "indices" not in data:
        raise ValueError(f"{p}: no 'indices' key")
    return [int(i) for i in data["indices"]]
