"""Image sources, decoding to RGB and the manifest (vlmrel.images)."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageFile

from vlmrel.images import (
    MANIFEST_COLUMNS,
    ImageRejected,
    build_manifest,
    list_images,
    load_rgb,
    materialize_demo,
    read_manifest,
)


def _photo(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth colour image (JPEG-friendly) with a little seeded texture."""
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    img = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h) + 60], axis=-1)
    img = img + rng.normal(0, 3, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _jpeg_bytes(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def _png_raw(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG assembled by hand, so the header can claim anything and 16-bit RGB is possible."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(rows))
        + _png_chunk(b"IEND", b"")
    )


def _sha16(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


@pytest.fixture()
def messy_folder(tmp_path: Path) -> Path:
    """Good images in many modes plus every kind of bad file."""
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    good = _jpeg_bytes(_photo())
    (root / "a_good.jpg").write_bytes(good)
    (root / "sub" / "z_copy.jpg").write_bytes(good)  # byte-identical duplicate, later in sort order
    (root / "b_empty.jpg").write_bytes(b"")
    (root / "c_truncated.jpg").write_bytes(good[: len(good) * 6 // 10])
    png = io.BytesIO()
    Image.fromarray(_photo(seed=1)).save(png, format="PNG")
    (root / "c_truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (root / "d_text.jpg").write_text("this is not a JPEG, only text\n")
    # claims 20000 x 20000 RGB pixels (400 M) but is 70 bytes on disk
    (root / "e_bomb.png").write_bytes(_png_raw(20000, 20000, 8, 2, b""))

    # EXIF orientation 6: stored 64 wide x 48 high, displayed rotated 90 degrees clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    (root / "f_exif6.jpg").write_bytes(_jpeg_bytes(_photo(), exif=exif))
    Image.fromarray(_photo()[..., 0]).save(root / "g_gray.png")  # L
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[...] = (200, 0, 0, 128)
    Image.fromarray(rgba, mode="RGBA").save(root / "h_rgba.png")
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.save(root / "i_palette.png", transparency=0)  # index 0 transparent
    cmyk = Image.new("CMYK", (6, 4), (255, 0, 0, 0))  # pure cyan
    cmyk.save(root / "j_cmyk.tif")
    gray16 = np.array([[0, 1000, 32896, 65535]], dtype=np.uint16)
    Image.fromarray(gray16).save(root / "k_gray16.png")
    rgb16 = np.array([[[1000, 40000, 65280], [65535, 0, 257]]], dtype=">u2")
    rows = b"".join(b"\x00" + row.tobytes() for row in rgb16)
    (root / "l_rgb16.png").write_bytes(_png_raw(2, 1, 16, 2, rows))
    return root


def test_manifest_rejects_bad_files_with_reasons_and_goes_on(messy_folder: Path, tmp_path: Path) -> None:
    root = messy_folder
    out = tmp_path / "out" / "manifest.tsv"
    df = build_manifest(root, list_images(root), out)

    on_disk = pd.read_csv(out, sep="\t", dtype=str, keep_default_na=False)
    assert list(on_disk.columns) == MANIFEST_COLUMNS
    assert list(on_disk["rel_path"]) == sorted(on_disk["rel_path"])
    assert list(df["rel_path"]) == list(on_disk["rel_path"])
    rows = {r.rel_path: r for r in read_manifest(out, ok_only=False).itertuples()}

    expected_rejects = {
        "b_empty.jpg": "zero-byte file",
        "c_truncated.jpg": "truncated image data",
        "c_truncated.png": "truncated image data",
        "d_text.jpg": "unsupported or unrecognised image format",
        "e_bomb.png": "decompression bomb: 20000x20000 pixels exceeds max_pixels=",
        "sub/z_copy.jpg": "duplicate of a_good.jpg",
    }
    for rel, reason in expected_rejects.items():
        assert rows[rel].status == "rejected", rel
        assert rows[rel].reason.startswith(reason), (rel, rows[rel].reason)
    ok = {rel for rel, r in rows.items() if r.status == "ok"}
    assert ok == set(rows) - set(expected_rejects)
    assert all(rows[rel].reason == "" for rel in ok)
    # content hash, computed independently
    for rel, r in rows.items():
        assert r.image_id == _sha16(root / rel)
    assert rows["sub/z_copy.jpg"].image_id == rows["a_good.jpg"].image_id
    # sizes after EXIF orientation: the orientation-6 JPEG is stored 64x48 but displayed 48x64
    assert (rows["a_good.jpg"].width, rows["a_good.jpg"].height) == (64, 48)
    assert (rows["f_exif6.jpg"].width, rows["f_exif6.jpg"].height) == (48, 64)
    assert (rows["l_rgb16.png"].width, rows["l_rgb16.png"].height) == (2, 1)
    assert pd.isna(rows["b_empty.jpg"].width)

    ok_only = read_manifest(out)
    assert list(ok_only["rel_path"]) == sorted(ok)
    assert set(ok_only["status"]) == {"ok"}


def test_mode_conversions_give_correct_rgb(messy_folder: Path) -> None:
    root = messy_folder
    for p in root.rglob("*"):
        if p.is_file() and p.name[0] in "afghijkl":
            assert load_rgb(p).mode == "RGB", p

    # orientation 6 = rotate 90 degrees clockwise for display
    rotated = np.asarray(load_rgb(root / "f_exif6.jpg"), dtype=float)
    plain = np.asarray(load_rgb(root / "a_good.jpg"), dtype=float)
    assert rotated.shape == (64, 48, 3)
    assert np.abs(rotated - np.rot90(plain, k=-1)).mean() < 3.0
    assert np.abs(rotated - np.rot90(plain, k=1)).mean() > 20.0

    gray = np.asarray(load_rgb(root / "g_gray.png"))
    src = np.asarray(Image.open(root / "g_gray.png"))
    assert np.array_equal(gray, np.repeat(src[..., None], 3, axis=-1))

    # RGBA (200,0,0) at alpha 128 over white: c*a + 255*(1-a)
    a = 128 / 255
    want = np.array([200 * a + 255 * (1 - a), 255 * (1 - a), 255 * (1 - a)])
    got = np.asarray(load_rgb(root / "h_rgba.png"))[0, 0].astype(float)
    assert np.abs(got - want).max() <= 1.0

    pal = np.asarray(load_rgb(root / "i_palette.png"))
    assert tuple(pal[0, 0]) == (255, 255, 255)  # transparent index -> white
    assert tuple(pal[3, 3]) == (10, 20, 30)

    assert tuple(np.asarray(load_rgb(root / "j_cmyk.tif"))[0, 0]) == (0, 255, 255)

    # 16-bit greyscale is scaled (v / 257), not clipped: 1000 -> 4, not 255
    g16 = np.asarray(load_rgb(root / "k_gray16.png"))[0, :, 0]
    assert list(g16) == [round(v / 257) for v in (0, 1000, 32896, 65535)] == [0, 4, 128, 255]

    # 16-bit RGB: within one level of v / 257 (Pillow keeps the high byte)
    rgb16 = np.asarray(load_rgb(root / "l_rgb16.png")).astype(float)
    want16 = np.array([[[1000, 40000, 65280], [65535, 0, 257]]]) / 257
    assert np.abs(rgb16 - want16).max() <= 1.0


def test_load_rgb_rejects_with_reasons(messy_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = messy_folder
    cases = {
        "b_empty.jpg": "zero-byte file",
        "c_truncated.jpg": "truncated image data: ",
        "d_text.jpg": "unsupported or unrecognised image format",
        "e_bomb.png": "decompression bomb: 20000x20000",
    }
    for name, reason in cases.items():
        with pytest.raises(ImageRejected) as info:
            load_rgb(root / name)
        assert info.value.reason.startswith(reason)
        assert name in str(info.value)
    # a small max_pixels turns an ordinary image into a bomb, checked before decoding
    with pytest.raises(ImageRejected, match=r"decompression bomb: 64x48 pixels exceeds max_pixels=1000"):
        load_rgb(root / "a_good.jpg", max_pixels=1000)
    assert load_rgb(root / "a_good.jpg", max_pixels=64 * 48).size == (64, 48)

    # even if some other library allowed truncated images globally, decoding stays strict
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImageRejected, match="truncated"):
        load_rgb(root / "c_truncated.png")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored afterwards


def test_list_images_seeded_subset(tmp_path: Path) -> None:
    root = tmp_path / "lib"
    rels = [f"d{i % 3}/img_{i:02d}.jpg" for i in range(30)]
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.jpg").write_bytes(b"x")
    (root / ".DS_Store").write_bytes(b"x")
    (root / "notes.txt").write_text("x")

    every = [p.relative_to(root).as_posix() for p in list_images(root)]
    assert every == sorted(rels + ["notes.txt"])
    jpgs = [p.relative_to(root).as_posix() for p in list_images(root, "**/*.jpg")]
    assert jpgs == sorted(rels)

    a = list_images(root, "**/*.jpg", limit=10, seed=0)
    b = list_images(root, "**/*.jpg", limit=10, seed=0)
    c = list_images(root, "**/*.jpg", limit=10, seed=1)
    assert a == b and len(a) == 10 and a != c
    assert a == sorted(a, key=lambda p: p.relative_to(root).as_posix())
    assert set(a) <= set(list_images(root, "**/*.jpg"))
    # the same draw as numpy's seeded choice over the sorted list
    idx = np.sort(np.random.default_rng(0).choice(30, size=10, replace=False))
    assert [p.relative_to(root).as_posix() for p in a] == [sorted(rels)[i] for i in idx]
    assert len(list_images(root, "**/*.jpg", limit=100)) == 30

    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_images(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="limit"):
        list_images(root, limit=0)


def test_demo_set_is_real_and_accepted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import skimage.data._fetchers as fetchers

    def _no_download(*args, **kwargs):
        raise AssertionError("the demo set must not call scikit-image's pooch fetchers")

    monkeypatch.setattr(fetchers, "_fetch", _no_download)
    dest = tmp_path / "demo"
    paths = materialize_demo(dest)
    assert len(paths) >= 15
    assert paths == sorted(paths)
    assert materialize_demo(dest) == paths  # deterministic names and order
    assert sorted(dest.iterdir()) == paths
    assert not any(p.name.startswith(".") for p in dest.iterdir())  # no temp files left
    import skimage

    src = Path(skimage.__file__).parent / "data" / "astronaut.png"
    assert (dest / "skimage_astronaut.png").read_bytes() == src.read_bytes()

    df = build_manifest(dest, list_images(dest), tmp_path / "manifest.tsv")
    assert len(df) == len(paths)
    assert (df["status"] == "ok").all(), df[df["status"] != "ok"]
    assert df["image_id"].is_unique
    # real photos, not tiny synthetic patterns
    assert (df["width"] * df["height"] >= 100 * 100).all()


def test_build_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        build_manifest(tmp_path / "missing_dir", [], tmp_path / "m.tsv")
    other = tmp_path / "other.jpg"
    other.write_bytes(b"x")
    (tmp_path / "root").mkdir()
    with pytest.raises(ValueError, match="not inside"):
        build_manifest(tmp_path / "root", [other], tmp_path / "m.tsv")
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\n1\t2\n")
    with pytest.raises(ValueError, match="bad.tsv"):
        read_manifest(bad)
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        read_manifest(tmp_path / "nope.tsv")


def test_manifest_rewrite_is_atomic(
    messy_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "manifest.tsv"
    build_manifest(messy_folder, list_images(messy_folder), out)
    before = out.read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(pd.DataFrame, "to_csv", boom)
    with pytest.raises(RuntimeError):
        build_manifest(messy_folder, list_images(messy_folder), out)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
