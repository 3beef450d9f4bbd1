"""Image sources, robust decoding to 8-bit RGB, and the image manifest.

Three pieces, all free of torch so the Snakefile can import this module at DAG-parse time:

- sources: :func:`materialize_demo` copies real photos that ship inside the installed
  scikit-image, scikit-learn and matplotlib wheels (never downloaded); :func:`list_images` lists a
  folder, optionally as a seeded subset.
- decoding: :func:`load_rgb` fully decodes one file into an RGB ``PIL.Image`` with EXIF
  orientation applied, or raises :class:`ImageRejected` with a short reason.
- the manifest: :func:`build_manifest` decodes every file once, records its content hash,
  size after orientation and ``ok``/``rejected`` status with the reason, and goes on past
  bad files; :func:`read_manifest` reads it back.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import shutil
import struct
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from vlmrel.io import atomic_path

log = logging.getLogger(__name__)

#: Images with more pixels than this are rejected as decompression bombs (2x Pillow's warning limit).
DEFAULT_MAX_PIXELS = 178_956_970

#: Columns of ``manifest.tsv``, in order.
MANIFEST_COLUMNS = ["image_id", "rel_path", "width", "height", "status", "reason"]

# Real photographs (and real microscopy / astronomy / scanned images) shipped inside the wheels.
# Synthetic images (chessboards, colour wheel, phantom, logo, binary horse silhouette), the
# multi-page TIFFs, the GIF, the npy/npz arrays and the XML cascade are deliberately left out.
_SKIMAGE_DEMO = (
    "astronaut.png",
    "brick.png",
    "camera.png",
    "cell.png",
    "chelsea.png",
    "clock_motion.png",
    "coffee.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "microaneurysms.png",
    "moon.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "page.png",
    "retina.jpg",
    "rocket.jpg",
    "text.png",
)
_SKLEARN_DEMO = ("china.jpg", "flower.jpg")
# matplotlib's sample data: the one real photograph (the others are plots, logos, arrays).
_MATPLOTLIB_DEMO = ("grace_hopper.jpg",)
# Licences (each wheel's own documentation: skimage/data/_fetchers.py, sklearn/datasets/images/
# README.txt): scikit-image's photos are CC0 or public domain (astronaut, hubble_deep_field, rocket:
# NASA / SpaceX public domain; brick, grass, gravel: CC0Textures; camera, chelsea, coffee, clock,
# microaneurysms, retina, cell: CC0; coins, text, ihc, moon, page, motorcycle: "no known copyright
# restrictions"); scikit-learn's china.jpg and flower.jpg are CC BY 2.0 (Flickr: danielbuechele,
# vultilion); matplotlib's grace_hopper.jpg is a US Navy photograph (1984), public domain. No AGPL
# or non-commercial asset is used. (imgaug's quokka.jpg is not here: imgaug is not a dependency.)


class ImageRejected(ValueError):
    """A file that cannot be used as an image; ``reason`` is a short human-readable string."""

    def __init__(self, reason: str, path: str | os.PathLike[str] | None = None) -> None:
        self.reason = reason
        self.path = None if path is None else os.fspath(path)
        super().__init__(f"{self.path}: {reason}" if self.path else reason)


# --------------------------------------------------------------------------- sources


def _demo_sources() -> list[tuple[str, Path]]:
    """(destination name, source path) of every demo photo, in a fixed order."""
    import matplotlib
    import skimage
    import sklearn

    sk_dir = Path(skimage.__file__).resolve().parent / "data"
    skl_dir = Path(sklearn.__file__).resolve().parent / "datasets" / "images"
    mpl_dir = Path(matplotlib.get_data_path()).resolve() / "sample_data"
    out = [(f"skimage_{name}", sk_dir / name) for name in _SKIMAGE_DEMO]
    out += [(f"sklearn_{name}", skl_dir / name) for name in _SKLEARN_DEMO]
    out += [(f"matplotlib_{name}", mpl_dir / name) for name in _MATPLOTLIB_DEMO]
    return out


def materialize_demo(dest_dir: str | os.PathLike[str]) -> list[Path]:
    """Copy the demo photos bundled in the scikit-image / scikit-learn / matplotlib wheels into ``dest_dir``.

    Files are located through the packages' ``__file__`` (nothing is downloaded) and named
    ``skimage_<name>`` / ``sklearn_<name>`` / ``matplotlib_<name>``; each copy is atomic. Returns the written paths,
    sorted. A photo missing from the installed wheel is skipped with a warning; if none is
    found the error names the directories searched.
    """
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    missing: list[str] = []
    for name, src in _demo_sources():
        if not src.is_file():
            missing.append(str(src))
            continue
        target = dest / name
        with atomic_path(target) as tmp:
            shutil.copyfile(src, tmp)
        written.append(target)
    for m in missing:
        log.warning("demo image not found in the installed wheel, skipped: %s", m)
    if not written:
        raise FileNotFoundError(
            "no demo images found in the installed scikit-image / scikit-learn / matplotlib wheels; looked for: "
            + ", ".join(missing)
        )
    return sorted(written)


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def list_images(
    root: str | os.PathLike[str],
    glob: str = "**/*",
    limit: int | None = None,
    seed: int = 0,
    include_hidden: bool = False,
) -> list[Path]:
    """Files under ``root`` matching ``glob``, sorted by relative path.

    Hidden files and anything inside hidden folders (a leading ``.``: ``.DS_Store``, ``.git``,
    half-written temporaries) are skipped unless ``include_hidden``. With ``limit`` smaller
    than the number of files, a subset drawn with ``np.random.default_rng(seed)`` is
    returned (still sorted). Files are not opened here: bad ones are rejected by the manifest.
    """
    root_p = Path(root)
    if not root_p.exists():
        raise FileNotFoundError(f"image folder {str(root_p)!r} does not exist")
    if not root_p.is_dir():
        raise NotADirectoryError(f"image source {str(root_p)!r} is not a folder")
    if limit is not None and (isinstance(limit, bool) or int(limit) != limit or limit < 1):
        raise ValueError(f"images limit must be a positive integer or None, got {limit!r}")
    files = []
    for p in root_p.glob(glob):
        rel = p.relative_to(root_p)
        if not include_hidden and any(part.startswith(".") for part in rel.parts):
            continue
        if p.is_file():
            files.append(p)
    files.sort(key=lambda p: _rel(p, root_p))
    if limit is not None and limit < len(files):
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(len(files), size=int(limit), replace=False))
        files = [files[i] for i in keep]
    return files


# --------------------------------------------------------------------------- decoding


@contextlib.contextmanager
def _strict_pil() -> Iterator[None]:
    """Decode strictly: truncated data raises and bomb warnings are errors.

    Pillow's own bomb limit is lifted for the duration because :func:`decode_rgb` checks the
    header dimensions against ``max_pixels`` itself (with a clearer message) before decoding.
    """
    old_trunc, old_max = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = old_trunc, old_max


def _short(exc: BaseException) -> str:
    msg = re.sub(r"\s+", " ", str(exc)).strip() or type(exc).__name__
    return msg[:200]


def _scale_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Map a high-bit-depth single-channel array to uint8 by scaling (never clipping)."""
    a = arr.astype(np.float64)
    if mode.startswith("I;16"):
        scaled = a / 257.0  # 65535 -> 255
    elif mode == "I" and a.size and a.min() >= 0 and a.max() <= 65535:
        scaled = a / 257.0  # 16-bit samples held in a 32-bit container (e.g. some PNG/TIFF)
    elif mode == "F" and a.size and np.nanmin(a) >= 0 and np.nanmax(a) <= 1:
        scaled = a * 255.0
    else:  # arbitrary range: stretch min..max to 0..255
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(np.nan_to_num(scaled, nan=0.0)), 0, 255).astype(np.uint8)


def _on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    Transparency (alpha channels, palette or ``tRNS`` transparency) is composited on white;
    16-bit and 32-bit greyscale are scaled to 0..255 (65535 -> 255), not clipped; CMYK and
    YCbCr use Pillow's conversions. Raises :class:`ImageRejected` for a mode with no RGB
    conversion.
    """
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or (
        "transparency" in img.info and mode in ("P", "L", "RGB")
    ):
        return _on_white(img)
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_scale_to_uint8(np.asarray(img), mode), mode="L").convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageRejected(f"unsupported image mode {mode}: {_short(exc)}") from exc


def decode_rgb(data: bytes, name: str, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Fully decode ``data`` to an RGB image with EXIF orientation applied, or raise ImageRejected.

    ``max_pixels=None`` skips the bomb check (only for bytes already vetted by the manifest).
    """
    if len(data) == 0:
        raise ImageRejected("zero-byte file", name)
    with _strict_pil():
        try:
            try:
                img = Image.open(io.BytesIO(data))
            except UnidentifiedImageError as exc:
                raise ImageRejected("unsupported or unrecognised image format", name) from exc
            width, height = img.size
            if width <= 0 or height <= 0:
                raise ImageRejected(f"invalid image size {width}x{height}", name)
            if max_pixels is not None and width * height > max_pixels:
                raise ImageRejected(
                    f"decompression bomb: {width}x{height} pixels exceeds max_pixels={max_pixels}", name
                )
            # verify() checks structure and checksums (PNG CRCs, missing chunks) without decoding;
            # it invalidates the object, so the image is reopened for the real, full decode.
            img.verify()
            img = Image.open(io.BytesIO(data))
            img.load()
        except ImageRejected:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageRejected(f"decompression bomb: {_short(exc)}", name) from exc
        except MemoryError as exc:
            raise ImageRejected("decompression bomb: out of memory while decoding", name) from exc
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error) as exc:
            msg = _short(exc)
            if "truncat" in msg.lower() or isinstance(exc, EOFError):
                raise ImageRejected(f"truncated image data: {msg}", name) from exc
            raise ImageRejected(f"corrupt image data: {msg}", name) from exc
        try:
            img = ImageOps.exif_transpose(img)
        except Exception as exc:  # a broken EXIF block must not lose an otherwise good photo
            log.warning("%s: EXIF orientation ignored (%s)", name, _short(exc))
        try:
            return to_rgb(img)
        except ImageRejected as exc:
            raise ImageRejected(exc.reason, name) from exc


def load_rgb(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``path`` fully into an 8-bit RGB ``PIL.Image`` with EXIF orientation applied.

    Raises :class:`ImageRejected` (with ``.reason`` and ``.path``) for zero-byte files,
    unrecognised formats, truncated or corrupt data and images whose header claims more than
    ``max_pixels`` pixels (checked before decoding). See :func:`to_rgb` for mode handling.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ImageRejected(f"unreadable file: {_short(exc)}", p) from exc
    return decode_rgb(data, str(p), max_pixels)


# --------------------------------------------------------------------------- manifest


def content_id(data: bytes) -> str:
    """The manifest's image_id: the first 16 hex digits of the SHA-256 of the file bytes."""
    return hashlib.sha256(data).hexdigest()[:16]


def _manifest_rows(root: Path, rels: Sequence[str], max_pixels: int) -> Iterable[dict]:
    from tqdm.auto import tqdm

    first_with: dict[str, str] = {}  # full sha256 -> rel_path of its first occurrence
    sizes: dict[str, tuple[int | None, int | None]] = {}
    for rel in tqdm(rels, desc="manifest", unit="img", mininterval=1.0):
        row: dict = {"image_id": "", "rel_path": rel, "width": None, "height": None}
        try:
            data = (root / rel).read_bytes()
        except OSError as exc:
            yield {**row, "status": "rejected", "reason": f"unreadable file: {_short(exc)}"}
            continue
        digest = hashlib.sha256(data).hexdigest()
        row["image_id"] = digest[:16]
        if digest in first_with:
            w, h = sizes[digest]
            yield {
                **row,
                "width": w,
                "height": h,
                "status": "rejected",
                "reason": f"duplicate of {first_with[digest]}",
            }
            continue
        first_with[digest] = rel
        try:
            img = decode_rgb(data, rel, max_pixels)
        except ImageRejected as exc:
            sizes[digest] = (None, None)
            yield {**row, "status": "rejected", "reason": exc.reason}
            continue
        sizes[digest] = img.size
        yield {**row, "width": img.size[0], "height": img.size[1], "status": "ok", "reason": ""}


def build_manifest(
    root: str | os.PathLike[str],
    paths: Iterable[str | os.PathLike[str]],
    out_tsv: str | os.PathLike[str],
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> pd.DataFrame:
    """Decode every file in ``paths`` (under ``root``) once and write the manifest TSV atomically.

    Columns: ``image_id`` (content hash), ``rel_path`` (POSIX, relative to ``root``),
    ``width``/``height`` (after EXIF orientation), ``status`` (``ok``/``rejected``) and
    ``reason`` (empty for ok). Rows are sorted by ``rel_path``; a byte-identical copy of an
    earlier file is rejected as ``duplicate of <rel_path>``. Bad files never stop the run.
    """
    root_p = Path(root)
    if not root_p.is_dir():
        raise FileNotFoundError(f"image folder {str(root_p)!r} does not exist or is not a folder")
    if int(max_pixels) < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels!r}")
    rels = []
    root_abs = root_p.resolve()
    for p in paths:
        # paths as list_images returns them: absolute, or relative to the working directory
        pp = Path(p).resolve()
        try:
            rels.append(_rel(pp, root_abs))
        except ValueError:
            raise ValueError(f"image {str(pp)!r} is not inside the image folder {str(root_p)!r}") from None
    rels = sorted(set(rels))
    df = pd.DataFrame(list(_manifest_rows(root_p, rels, int(max_pixels))), columns=MANIFEST_COLUMNS)
    df["width"] = df["width"].astype("Int64")
    df["height"] = df["height"].astype("Int64")
    with atomic_path(out_tsv) as tmp:
        df.to_csv(tmp, sep="\t", index=False, lineterminator="\n")
    n_bad = int((df["status"] != "ok").sum())
    log.info("manifest %s: %d files, %d ok, %d rejected", out_tsv, len(df), len(df) - n_bad, n_bad)
    return df


def read_manifest(path: str | os.PathLike[str], ok_only: bool = True) -> pd.DataFrame:
    """Read ``manifest.tsv``; with ``ok_only`` keep only accepted rows (in manifest order).

    Every column is read as text (no ``NA`` guessing on file names); ``width``/``height``
    become nullable integers. A missing file or wrong columns raise an error naming the file.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"manifest {str(p)!r} does not exist")
    try:
        df = pd.read_csv(p, sep="\t", dtype=str, keep_default_na=False, na_filter=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"manifest {str(p)!r} is not a readable TSV: {_short(exc)}") from exc
    if list(df.columns) != MANIFEST_COLUMNS:
        raise ValueError(f"manifest {str(p)!r} has columns {list(df.columns)}, expected {MANIFEST_COLUMNS}")
    bad_status = sorted(set(df["status"]) - {"ok", "rejected"})
    if bad_status:
        raise ValueError(f"manifest {str(p)!r} has unknown status values {bad_status}")
    for col in ("width", "height"):
        try:
            df[col] = pd.to_numeric(df[col].mask(df[col] == "")).astype("Int64")
        except (ValueError, TypeError) as exc:
            raise ValueError(f"manifest {str(p)!r}: column {col!r} is not integer: {_short(exc)}") from exc
    if ok_only:
        df = df[df["status"] == "ok"].reset_index(drop=True)
    return df
