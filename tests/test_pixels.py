"""Preprocessing specs, preprocessing against the reference processors, and pixel files (vlmrel.pixels)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

import vlmrel
import vlmrel.pixels as pixels_mod
from vlmrel.images import build_manifest, list_images, load_rgb, materialize_demo, read_manifest
from vlmrel.pixels import (
    PixelFile,
    PixelFileError,
    iter_batches,
    preproc_key,
    preprocess,
    read_pixel_meta,
    resize_to_spec,
    write_pixels,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_SPEC = {
    "size": 224,
    "resize": "shortest_edge_center_crop",
    "interpolation": "bicubic",
    "mean": list(CLIP_MEAN),
    "std": list(CLIP_STD),
}
SIGLIP_SPEC = {
    "size": 384,
    "resize": "squash",
    "interpolation": "bilinear",
    "mean": [0.5] * 3,
    "std": [0.5] * 3,
}

# portrait, landscape, square, greyscale, small (upsampled), large (downsampled) photos
REF_IMAGES = [
    "skimage_astronaut.png",
    "skimage_coins.png",
    "skimage_microaneurysms.png",
    "skimage_motorcycle_left.png",
    "skimage_text.png",
    "sklearn_china.jpg",
]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return materialize_demo(tmp_path_factory.mktemp("demo") / "images")[0].parent


@pytest.fixture(scope="module")
def ref_images(demo_dir: Path) -> list[Image.Image]:
    imgs = [load_rgb(demo_dir / name) for name in REF_IMAGES]
    # a portrait crop too, so both branches of the shortest-edge resize are exercised
    imgs.append(imgs[3].crop((100, 0, 400, 500)))
    return imgs


def test_preproc_key_equal_for_equal_specs_and_different_otherwise() -> None:
    key = preproc_key(CLIP_SPEC)
    assert re.fullmatch(r"crop224-[0-9a-f]{8}", key)
    assert re.fullmatch(r"squash384-[0-9a-f]{8}", preproc_key(SIGLIP_SPEC))
    same = {
        "std": tuple(CLIP_STD),
        "mean": np.array(CLIP_MEAN),
        "interpolation": "bicubic",
        "resize": "shortest_edge_center_crop",
        "size": np.int64(224),
    }
    assert preproc_key(same) == key
    assert preproc_key({**SIGLIP_SPEC, "mean": [0.5, 0.5, 0.5]}) == preproc_key(
        {**SIGLIP_SPEC, "mean": [1 / 2] * 3}
    )
    assert preproc_key({**SIGLIP_SPEC, "std": [1, 1, 1]}) == preproc_key(
        {**SIGLIP_SPEC, "std": [1.0, 1.0, 1.0]}
    )
    variants = [
        {**CLIP_SPEC, "size": 336},
        {**CLIP_SPEC, "resize": "squash"},
        {**CLIP_SPEC, "interpolation": "bilinear"},
        {**CLIP_SPEC, "mean": [0.5, 0.5, 0.5]},
        {**CLIP_SPEC, "std": [0.26862954, 0.26130258, 0.2757772]},
    ]
    keys = {preproc_key(v) for v in variants}
    assert len(keys) == len(variants) and key not in keys
    for bad, what in [
        ({**CLIP_SPEC, "size": 0}, "size"),
        ({**CLIP_SPEC, "resize": "longest"}, "resize"),
        ({**CLIP_SPEC, "interpolation": "nearest"}, "interpolation"),
        ({**CLIP_SPEC, "mean": [0.5, 0.5]}, "mean"),
        ({**CLIP_SPEC, "std": [0.5, 0.0, 0.5]}, "std"),
        ({**CLIP_SPEC, "extra": 1}, "extra"),
    ]:
        with pytest.raises(ValueError, match=what):
            preproc_key(bad)


@pytest.mark.parametrize(("size", "interpolation"), [(224, "bicubic"), (336, "bicubic"), (224, "bilinear")])
def test_preprocess_matches_open_clip(ref_images: list[Image.Image], size: int, interpolation: str) -> None:
    open_clip_transform = pytest.importorskip("open_clip.transform")
    ref = open_clip_transform.image_transform(
        size, is_train=False, mean=CLIP_MEAN, std=CLIP_STD, interpolation=interpolation
    )
    spec = {**CLIP_SPEC, "size": size, "interpolation": interpolation}
    for img in ref_images:
        ours = preprocess(img, spec)
        theirs = ref(img).numpy()
        assert ours.dtype == np.float32 and ours.shape == theirs.shape == (3, size, size)
        # the same Pillow resize and the same float32 arithmetic: identical up to float rounding
        # (measured: max |diff| = 0 on the demo photos)
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("size", "interpolation"), [(224, "bilinear"), (384, "bilinear"), (224, "bicubic")])
def test_preprocess_matches_siglip_processors(
    ref_images: list[Image.Image], size: int, interpolation: str
) -> None:
    transformers = pytest.importorskip("transformers")
    resample = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}[interpolation]
    spec = {**SIGLIP_SPEC, "size": size, "interpolation": interpolation}
    pil_proc = transformers.SiglipImageProcessorPil(size={"height": size, "width": size}, resample=resample)
    tv_proc = transformers.SiglipImageProcessor(size={"height": size, "width": size}, resample=resample)
    one_level = 1 / 255 / 0.5  # one uint8 step after (x/255 - 0.5) / 0.5
    for img in ref_images:
        ours = preprocess(img, spec)
        # the Pillow-backed processor resizes exactly as we do (measured max |diff| = 0)
        pil = pil_proc(images=img, return_tensors="np")["pixel_values"][0]
        np.testing.assert_allclose(ours, pil, rtol=0, atol=1e-6)
        # the default (torchvision-backed) processor resizes uint8 tensors with its own antialias
        # kernels, which round differently from Pillow. Measured on these photos: max |diff| =
        # 1 uint8 level (bilinear) / 4 levels (bicubic); < 1% of values differ for landscape and
        # square images, up to 20% (by one level) for portrait ones; mean |diff| <= 0.21 levels.
        tv = tv_proc(images=img, return_tensors="np")["pixel_values"][0]
        diff = np.abs(ours - tv) / one_level
        assert diff.max() <= (4 if interpolation == "bicubic" else 1) + 1e-4
        assert (diff > 1e-3).mean() < 0.25
        assert diff.mean() < 0.25


def _small_library(root: Path, demo_dir: Path) -> None:
    """Five demo photos, one duplicate and one corrupt file, in a nested folder."""
    (root / "sub").mkdir(parents=True)
    for name in ["skimage_coffee.png", "skimage_camera.png", "sklearn_flower.jpg"]:
        shutil.copyfile(demo_dir / name, root / name)
    for name in ["skimage_rocket.jpg", "skimage_page.png"]:
        shutil.copyfile(demo_dir / name, root / "sub" / name)
    shutil.copyfile(demo_dir / "skimage_camera.png", root / "sub" / "camera_again.png")
    (root / "broken.jpg").write_bytes((demo_dir / "skimage_rocket.jpg").read_bytes()[:5000])


@pytest.fixture()
def library(tmp_path: Path, demo_dir: Path) -> tuple[Path, Path]:
    root = tmp_path / "lib"
    _small_library(root, demo_dir)
    manifest = tmp_path / "manifest.tsv"
    build_manifest(root, list_images(root), manifest)
    return root, manifest


def test_write_pixels_round_trip_chunked(
    library: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, manifest = library
    ok = read_manifest(manifest)
    assert len(ok) == 5  # the duplicate and the corrupt file are left out
    spec = {**CLIP_SPEC, "size": 32}
    writes: list[int] = []
    real_write = pixels_mod._write_chunk

    def spy(ds, start, block):
        writes.append(len(block))
        real_write(ds, start, block)

    monkeypatch.setattr(pixels_mod, "_write_chunk", spy)
    out = tmp_path / "pixels" / f"{preproc_key(spec)}.h5"
    write_pixels(manifest, root, spec, out, chunk_size=2, progress=False)
    assert writes == [2, 2, 1]  # written chunk by chunk, never the whole array at once

    expected = np.stack([preprocess(load_rgb(root / rel), spec) for rel in ok["rel_path"]])
    # the file stores the resized, cropped RGB values as uint8 (its spec says so); reads normalise
    stored = np.stack(
        [np.asarray(resize_to_spec(load_rgb(root / rel), spec)).transpose(2, 0, 1) for rel in ok["rel_path"]]
    )
    with h5py.File(out, "r") as f:
        assert f["pixels"].shape == (5, 3, 32, 32) and f["pixels"].dtype == np.uint8
        assert f["pixels"].chunks[0] <= 2
        assert [s.decode() for s in f["image_id"][...]] == list(ok["image_id"])
        np.testing.assert_array_equal(f["pixels"][...], stored)
        assert json.loads(f.attrs["spec"]) == {**spec, "storage": "uint8"}
        assert f.attrs["preproc_key"] == preproc_key(spec)
        assert int(f.attrs["n_images"]) == 5
        assert f.attrs["vlmrel_version"] == vlmrel.__version__

    meta = read_pixel_meta(out)
    assert (
        meta["n_images"] == 5
        and meta["shape"] == [5, 3, 32, 32]
        and meta["spec"] == {**spec, "storage": "uint8"}
    )
    assert meta["preproc_key"] == preproc_key(spec)

    batches = list(iter_batches(out, batch_size=2))
    assert [len(ids) for ids, _ in batches] == [2, 2, 1]
    assert [i for ids, _ in batches for i in ids] == list(ok["image_id"])
    np.testing.assert_array_equal(np.concatenate([x for _, x in batches]), expected)

    order = [4, 0, 2, 2, 1]
    sel = list(iter_batches(out, batch_size=3, indices=order))
    assert [i for ids, _ in sel for i in ids] == [ok["image_id"][k] for k in order]
    np.testing.assert_array_equal(np.concatenate([x for _, x in sel]), expected[order])
    with PixelFile(out) as pf:
        assert len(pf) == 5 and pf.image_ids == list(ok["image_id"])
        np.testing.assert_array_equal(pf.read([3, 1]), expected[[3, 1]])
        with pytest.raises(IndexError, match="out of range"):
            pf.read([5])


def test_pixel_file_errors_name_the_file(library: tuple[Path, Path], tmp_path: Path) -> None:
    root, manifest = library
    spec = {**SIGLIP_SPEC, "size": 16}
    out = tmp_path / "p.h5"
    write_pixels(manifest, root, spec, out, progress=False)

    with pytest.raises(PixelFileError, match="missing.h5.*does not exist"):
        read_pixel_meta(tmp_path / "missing.h5")

    truncated = tmp_path / "truncated.h5"
    data = out.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(PixelFileError, match="truncated.h5"):
        list(iter_batches(truncated, 2))

    wrong = tmp_path / "wrong.h5"
    shutil.copyfile(out, wrong)
    with h5py.File(wrong, "r+") as f:
        del f["pixels"]
        f.create_dataset("pixels", data=np.zeros((5, 3, 8, 8), np.float32))
    with pytest.raises(PixelFileError, match=r"wrong.h5.*shape \(5, 3, 8, 8\), expected \(5, 3, 16, 16\)"):
        PixelFile(wrong)

    no_ids = tmp_path / "no_ids.h5"
    shutil.copyfile(out, no_ids)
    with h5py.File(no_ids, "r+") as f:
        del f["image_id"]
    with pytest.raises(PixelFileError, match="no_ids.h5.*'image_id' is missing"):
        read_pixel_meta(no_ids)


def test_write_pixels_refuses_bad_input_and_is_atomic(
    library: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, manifest = library
    spec = {**CLIP_SPEC, "size": 16}

    empty = tmp_path / "empty_manifest.tsv"
    rows = manifest.read_text().splitlines()
    empty.write_text("\n".join([rows[0]] + [r for r in rows[1:] if "\trejected\t" in r]) + "\n")
    with pytest.raises(ValueError, match="empty_manifest.tsv.*no images with status 'ok'"):
        write_pixels(empty, root, spec, tmp_path / "x.h5", progress=False)

    # an image that changed after the manifest was built is refused, naming it
    changed = tmp_path / "changed"
    shutil.copytree(root, changed)
    shutil.copyfile(changed / "skimage_coffee.png", changed / "sub" / "skimage_page.png")
    with pytest.raises(ValueError, match="skimage_page.png.*changed since the manifest"):
        write_pixels(manifest, changed, spec, tmp_path / "y.h5", progress=False)

    # a failure part-way leaves neither the output nor a temporary file behind
    calls = {"n": 0}
    real = pixels_mod.raw_pixels  # what the writer stores per image (uint8)

    def fail_on_fourth(img, s):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("killed")
        return real(img, s)

    monkeypatch.setattr(pixels_mod, "raw_pixels", fail_on_fourth)
    out_dir = tmp_path / "atomic"
    with pytest.raises(RuntimeError, match="killed"):
        write_pixels(manifest, root, spec, out_dir / "z.h5", chunk_size=2, progress=False)
    assert list(out_dir.iterdir()) == []
