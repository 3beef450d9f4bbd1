"""Pixel files store uint8 (vlmrel.pixels), the encoder normalises on its device bit for bit like
the float32 numpy path it replaces, the prefetching loader, and the scale benchmark."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import threading
import time
from contextlib import redirect_stdout
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

import vlmrel.pixels as pixels_mod
from vlmrel.models import REGISTRY, load_encoder, normalise_on_device, preprocess_spec
from vlmrel.pixels import (
    H5_CHUNK_ROWS,
    PixelFile,
    PixelFileError,
    canonical_spec_json,
    iter_batches,
    prefetch,
    prefetch_batches,
    preproc_key,
    raw_pixels,
    resize_to_spec,
    to_float32,
    validate_spec,
    write_pixel_images,
)

SKIMAGE = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "camera",
    "immunohistochemistry",
)  # RGB, RGB, ..., grey, RGB


def _photos() -> list[Image.Image]:
    out = []
    for name in SKIMAGE:
        arr = getattr(data, name)()
        out.append(Image.fromarray(arr[..., :3] if arr.ndim == 3 else arr))
    return out


def _float32_reference(img: Image.Image, spec: dict) -> np.ndarray:
    """The float32 pixels as vlmrel stored them before uint8 storage (its numpy ``normalise``,
    written out independently here): HWC, ``x/255``, ``(x - mean) / std`` in float32, to CHW."""
    x = np.asarray(resize_to_spec(img, spec), dtype=np.uint8).astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(spec["mean"], dtype=np.float32)) / np.asarray(spec["std"], dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return (
        a.dtype == b.dtype == np.float32
        and a.shape == b.shape
        and np.array_equal(a.view(np.uint32), b.view(np.uint32))
    )


# --------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize("model", ["clip_b32", "siglip2_b16", "siglip2_so400m", "effnet_lite0", "tiny_clip"])
def test_device_normalisation_equals_the_float32_path_for_every_byte(model):
    """Normalisation is per channel and element-wise: every uint8 value in every channel covers its domain."""
    spec = preprocess_spec(model)
    raw = np.empty((1, 3, 16, 16), dtype=np.uint8)
    raw[0] = np.arange(256, dtype=np.uint8).reshape(16, 16)
    ref = (raw.astype(np.float32) / np.float32(255.0) - np.float32(spec["mean"])[:, None, None]) / np.float32(
        spec["std"]
    )[:, None, None]
    assert _bits_equal(to_float32(raw, spec), ref)
    assert _bits_equal(normalise_on_device(torch.from_numpy(raw), spec).numpy(), ref)


@pytest.mark.parametrize("model", ["tiny_clip", "tiny_siglip"])  # CLIP crop, SigLIP squash
def test_encoder_prepare_of_stored_pixels_equals_yesterdays_float32_pixels(tmp_path, model):
    spec = preprocess_spec(model)
    photos = _photos()
    ref = np.stack([_float32_reference(img, spec) for img in photos])
    out = tmp_path / "px.h5"
    write_pixel_images([f"i{k}" for k in range(len(photos))], photos, spec, out, chunk_size=4, progress=False)
    enc = load_encoder(model, device="cpu", precision="fp32")
    with PixelFile(out) as pf:
        stored = pf.read_raw(range(len(pf)))
        assert stored.dtype == np.uint8
        np.testing.assert_array_equal(stored, np.stack([raw_pixels(img, spec) for img in photos]))
        assert _bits_equal(pf.read(range(len(pf))), ref)  # the shared numpy path
    prepared = enc.prepare(stored)
    assert prepared.dtype == torch.float32 and prepared.device.type == "cpu"
    assert _bits_equal(prepared.numpy(), ref)
    # float32 pixels still pass through unchanged, so both give the same features
    assert torch.equal(enc.encode_image(stored), enc.encode_image(ref))
    bf16 = load_encoder(model, device="cpu", precision="bf16")
    assert torch.equal(bf16.prepare(stored), torch.from_numpy(ref).to(torch.bfloat16))
    with pytest.raises(ValueError, match="uint8.*floating point.*int32"):
        enc.prepare(stored.astype(np.int32))


# --------------------------------------------------------------------------- the file contract


def test_storage_is_part_of_the_spec_and_the_key():
    spec = preprocess_spec("clip_b32")
    assert "storage" not in spec  # the registry's specs leave it to the default
    assert validate_spec(spec)["storage"] == "uint8"
    assert validate_spec({**spec, "storage": "uint8"}) == validate_spec(spec)
    with pytest.raises(ValueError, match="'storage' must be one of \\['uint8'\\], got 'float32'"):
        validate_spec({**spec, "storage": "float32"})
    assert json.loads(canonical_spec_json(spec))["storage"] == "uint8"
    # the key of the same spec before storage was recorded (what float32 files were called)
    old = hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:8]
    assert (
        preproc_key(spec) == "crop224-" + hashlib.sha256(canonical_spec_json(spec).encode()).hexdigest()[:8]
    )
    assert not preproc_key(spec).endswith(old)


def _write(tmp_path: Path, spec: dict, n: int, name: str = "px.h5", **kw) -> Path:
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 256, (40 + k, 52, 3), dtype=np.uint8)) for k in range(n)]
    out = tmp_path / name
    write_pixel_images([f"img{k}" for k in range(n)], imgs, spec, out, progress=False, **kw)
    return out


def test_chunks_are_sized_for_batch_reads(tmp_path):
    spec = preprocess_spec("clip_b32")
    out = _write(tmp_path, spec, 40)
    with h5py.File(out, "r") as f:
        ds = f["pixels"]
        assert ds.dtype == np.uint8 and ds.compression is None
        assert ds.chunks == (H5_CHUNK_ROWS, 3, 224, 224)
        assert json.loads(f.attrs["spec"])["storage"] == "uint8"
    assert out.stat().st_size / 40 < 0.16e6 + 2 * 150528  # two partial chunks' slack at N=40
    # 384 px: the byte bound caps the rows per chunk
    big = {**preprocess_spec("siglip2_so400m")}
    assert pixels_mod._MAX_H5_CHUNK_BYTES // (3 * 384 * 384) == 11
    out = _write(tmp_path, {**big, "size": 384}, 12, "big.h5", chunk_size=32)
    with h5py.File(out, "r") as f:
        assert f["pixels"].chunks == (11, 3, 384, 384)
    # compression is an option, transparent to readers
    plain = _write(tmp_path, {**spec, "size": 32}, 5, "plain.h5")
    lzf = _write(tmp_path, {**spec, "size": 32}, 5, "lzf.h5", compression="lzf")
    with PixelFile(plain) as a, PixelFile(lzf) as b:
        np.testing.assert_array_equal(a.read_raw(range(5)), b.read_raw(range(5)))
    with pytest.raises(ValueError, match="compression"):
        _write(tmp_path, spec, 1, "bad.h5", compression="zstd")


def test_old_float32_files_and_unknown_storage_are_refused(tmp_path):
    spec = {**preprocess_spec("tiny_clip"), "size": 16}
    good = _write(tmp_path, spec, 3)

    old = tmp_path / "old.h5"  # as written before uint8 storage: float32, no storage in the spec
    with h5py.File(good, "r") as src, h5py.File(old, "w") as f:
        f.create_dataset("pixels", data=np.zeros((3, 3, 16, 16), np.float32))
        f.create_dataset("image_id", data=src["image_id"][...])
        f.attrs.update(dict(src.attrs))
        f.attrs["spec"] = json.dumps(
            {k: v for k, v in json.loads(src.attrs["spec"]).items() if k != "storage"}
        )
    with pytest.raises(PixelFileError, match=r"old.h5.*no pixel storage.*float32.*stale.*delete it"):
        PixelFile(old)

    odd = tmp_path / "odd.h5"
    shutil.copyfile(good, odd)
    with h5py.File(odd, "r+") as f:
        f.attrs["spec"] = json.dumps({**json.loads(f.attrs["spec"]), "storage": "float16"})
    with pytest.raises(PixelFileError, match=r"odd.h5.*unknown pixel storage 'float16'.*\['uint8'\]"):
        PixelFile(odd)

    lying = tmp_path / "lying.h5"  # says uint8, holds float32
    shutil.copyfile(good, lying)
    with h5py.File(lying, "r+") as f:
        del f["pixels"]
        f.create_dataset("pixels", data=np.zeros((3, 3, 16, 16), np.float32))
    with pytest.raises(PixelFileError, match=r"lying.h5.*dtype float32, expected uint8"):
        PixelFile(lying)


# --------------------------------------------------------------------------- the loader


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("vlmrel-prefetch")]


def test_prefetch_batches_equal_iter_batches_in_order(tmp_path):
    spec = {**preprocess_spec("tiny_clip"), "size": 16}
    out = _write(tmp_path, spec, 11)
    order = [7, 3, 3, 10, 0, 1, 2, 9, 8]
    for indices in (None, order):
        for raw in (True, False):
            want = list(iter_batches(out, 4, indices, raw=raw))
            got = list(prefetch_batches(out, 4, indices, raw=raw, depth=1))
            assert [ids for ids, _ in got] == [ids for ids, _ in want]
            for (_, a), (_, b) in zip(got, want, strict=True):
                assert a.dtype == (np.uint8 if raw else np.float32)
                np.testing.assert_array_equal(a, b)
    with PixelFile(out) as pf:
        ref = np.stack([pf.read_raw([i])[0] for i in order])  # one row at a time
    np.testing.assert_array_equal(np.concatenate([x for _, x in prefetch_batches(out, 2, order)]), ref)
    assert not _prefetch_threads()


def test_prefetch_reads_ahead_and_hands_errors_over_in_order():
    produced: list[int] = []

    def items():
        for i in range(10):
            produced.append(i)
            if i == 6:
                raise OSError("disk gone at item 6")
            yield i

    got = []
    it = prefetch(items, depth=2)
    got.append(next(it))
    deadline = time.monotonic() + 10
    while len(produced) < 3 and time.monotonic() < deadline:  # read ahead while the consumer works
        time.sleep(0.01)
    assert 3 <= len(produced) <= 4  # item 0, two queued, at most one waiting to be queued
    with pytest.raises(OSError, match="disk gone at item 6"):
        for x in it:
            got.append(x)
    assert got == [0, 1, 2, 3, 4, 5]
    assert not _prefetch_threads()
    with pytest.raises(ValueError, match="depth"):
        next(prefetch(items, depth=0))


def test_prefetch_read_errors_name_the_file(tmp_path):
    spec = {**preprocess_spec("tiny_clip"), "size": 16}
    good = _write(tmp_path, spec, 40, chunk_size=4)
    truncated = tmp_path / "truncated.h5"
    raw = good.read_bytes()
    truncated.write_bytes(raw[: len(raw) * 2 // 3])
    with pytest.raises(PixelFileError, match="truncated.h5"):
        list(prefetch_batches(truncated, 4))
    with pytest.raises(PixelFileError, match="missing.h5.*does not exist"):
        list(prefetch_batches(tmp_path / "missing.h5", 4))
    assert not _prefetch_threads()


def test_prefetch_leaves_no_thread_when_the_consumer_stops_early(tmp_path):
    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    for stop in ("break", "raise", "drop"):
        closed.clear()
        it = prefetch(endless, depth=3)
        if stop == "break":
            for x in it:
                if x == 5:
                    break
            it.close()
        elif stop == "raise":
            with pytest.raises(RuntimeError):
                for x in it:
                    if x == 2:
                        raise RuntimeError("consumer failed")
            it.close()
        else:
            assert next(it) == 0
            del it  # dropped without close: the generator's finally still stops the thread
        assert closed.wait(5), stop  # the producer's iterator (its file) was closed
        assert not _prefetch_threads(), stop

    # a pixel file: stop after one batch, the file can be replaced (it is closed) and no thread is left
    spec = {**preprocess_spec("tiny_clip"), "size": 16}
    out = _write(tmp_path, spec, 30)
    batches = prefetch_batches(out, 2)
    next(batches)
    batches.close()
    assert not _prefetch_threads()
    with h5py.File(out, "w"):
        pass


def test_trial_through_the_loader_equals_the_float32_trial(tmp_path):
    """mcdo's trial job (uint8 file, prefetching loader, device normalisation) gives exactly the
    traces of run_trial fed yesterday's float32 pixels."""
    from vlmrel.mcdo import pipeline
    from vlmrel.mcdo.dropout import run_trial
    from vlmrel.mcdo.spec import TrialSpec

    spec = preprocess_spec("tiny_clip")
    photos = _photos()
    px = tmp_path / "px.h5"
    write_pixel_images([f"i{k}" for k in range(len(photos))], photos, spec, px, progress=False)
    out = tmp_path / "trial0.npz"
    kw = dict(exp="exp0", model="tiny_clip", kind="output", p=0.05, seed=3, T=[2, 4])
    pipeline.trial(px, out, TrialSpec(k=1, precision="fp32", batch_size=4, device="cpu", **kw))
    ref_px = np.stack([_float32_reference(img, spec) for img in photos])
    batches = [
        ([f"i{k}" for k in range(s, min(s + 4, len(photos)))], ref_px[s : s + 4])
        for s in range(0, len(photos), 4)
    ]
    ref = run_trial(
        load_encoder("tiny_clip", device="cpu", precision="fp32"),
        batches,
        p=0.05,
        seed=3,
        trial=1,
        T_list=[2, 4],
        kind="output",
        progress=False,
    )
    with np.load(out, allow_pickle=False) as z:
        assert list(z["image_id"]) == ref.image_id
        assert np.array_equal(z["trace_pre"], ref.trace_pre)
        assert np.array_equal(z["trace_post"], ref.trace_post)


# --------------------------------------------------------------------------- the scale benchmark


def test_fit_exponent_recovers_power_laws():
    from vlmrel.bench.scale import fit_exponent

    ns = [250, 1000, 4000]
    for b in (0.5, 1.0, 1.3):
        assert fit_exponent(ns, [2.0 * n**b for n in ns]) == pytest.approx(b, abs=1e-9)


def test_scale_bench_runs_tiny(tmp_path):
    from vlmrel.bench import scale
    from vlmrel.bench.__main__ import main as bench_main

    photos = scale.generate_photos(tmp_path / "p", 3, seed=1)
    again = scale.generate_photos(tmp_path / "q", 3, seed=1)
    assert [p.read_bytes() for p in photos] == [p.read_bytes() for p in again]  # seeded
    sizes = {Image.open(p).size for p in photos}
    assert sizes <= set(scale.PHOTO_SIZES)

    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = bench_main(["scale", "--json", "--n", "3", "6", "--T", "1", "--batch-size", "4", "--size", "32", "--repeats", "2",
                         "--workdir", str(tmp_path)])  # fmt: skip
    assert rc == 0
    out = json.loads(buf.getvalue())
    assert out["benchmark"] == "scale" and out["n"] == [3, 6] and out["repeats"] == 2
    assert (
        out["model"] == scale.BENCH_MODEL
        and out["image_size"] == 32
        and out["T"] == 1
        and out["batch_size"] == 4
    )
    for stage in ("manifest", "pixels", "read", "trial"):
        s = out["stages"][stage]
        assert len(s["seconds"]) == 2 and all(t > 0 for t in s["seconds"])
        assert s["seconds_per_image"] == pytest.approx(
            [t / n for t, n in zip(s["seconds"], [3, 6], strict=True)], abs=1e-3
        )
        assert (
            np.isfinite(s["exponent"])
            and np.isfinite(s["cpu_exponent"])
            and all(c > 0 for c in s["cpu_seconds"])
        )
    # uint8 storage: 3 x 32 x 32 bytes per image plus the file's fixed overhead, spread over N
    per = out["pixel_bytes_per_image"]
    assert all(p >= 3 * 32 * 32 for p in per) and per[1] < per[0]
    assert list(tmp_path.glob("vlmrel-scale-*")) == []  # the scratch folder is removed
    assert scale.BENCH_MODEL not in REGISTRY  # registered for the run only


def test_exp7_degraded_versions_score_as_with_float32_pixels(tmp_path):
    """exp7 degrades after the crop and now hands uint8 to the encoder: its scores equal the
    float32 path's (degraded image -> yesterday's float32 normalisation -> features)."""
    from vlmrel.images import build_manifest, list_images
    from vlmrel.mcdo import aleatoric
    from vlmrel.pixels import iter_manifest_images

    root = tmp_path / "images"
    root.mkdir()
    for k, img in enumerate(_photos()[:4]):
        img.convert("RGB").save(root / f"p{k}.png")
    build_manifest(root, list_images(root), tmp_path / "manifest.tsv")
    versions = ["clean", "blur3", "occlude20", "down4", "jpeg30"]
    out = tmp_path / "aleatoric.npz"
    kw = dict(versions=versions, num_images=None, seed=5, precision="fp32", batch_size=3, device="cpu")
    aleatoric.score_job(
        tmp_path / "manifest.tsv", root, out, model="tiny_clip", class_names="demo",
        prompt_template="a photo of a {}.", **kw,
    )  # fmt: skip
    spec = preprocess_spec("tiny_clip")
    enc = load_encoder("tiny_clip", device="cpu", precision="fp32")
    ids, images = iter_manifest_images(tmp_path / "manifest.tsv", root)
    ref_px = []
    for image_id, img in zip(ids, images, strict=True):
        base = resize_to_spec(img, spec)
        for v in versions:
            d = aleatoric.degrade(base, v, seed=5, image_id=image_id)
            x = np.asarray(d, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
            x = (x - np.float32(spec["mean"])) / np.float32(spec["std"])
            ref_px.append(x.transpose(2, 0, 1))
    with torch.inference_mode():  # the job's batching (3), as BLAS results depend on the batch shape
        feats = [
            enc.encode_image(np.stack(ref_px[s : s + 3])).double().numpy() for s in range(0, len(ref_px), 3)
        ]
    feats = np.concatenate(feats).reshape(len(ids), len(versions), -1)
    with np.load(out, allow_pickle=False) as z:
        assert list(z["image_id"]) == ids
        np.testing.assert_allclose(
            z["aleatoric_pre"], aleatoric.aleatoric_variance(feats), rtol=1e-12, atol=0
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_are_pinned_and_normalise_bit_for_bit(tmp_path):
    """On CUDA: pinned host batches, a non-blocking copy, and the device's normalisation equal to
    numpy's (255 is a device tensor: CUDA would multiply by the reciprocal of a CPU scalar)."""
    spec = preprocess_spec("tiny_clip")
    photos = _photos()
    px = tmp_path / "px.h5"
    write_pixel_images([f"i{k}" for k in range(len(photos))], photos, spec, px, progress=False)
    ref = np.stack([_float32_reference(img, spec) for img in photos])
    enc = load_encoder("tiny_clip", device="cuda", precision="fp32")
    got = []
    for _, batch in prefetch_batches(px, 4, device=enc.device):
        assert isinstance(batch, torch.Tensor) and batch.is_pinned() and batch.dtype == torch.uint8
        got.append(enc.prepare(batch).cpu().numpy())
    assert _bits_equal(np.concatenate(got), ref)
    raw = np.zeros((1, 3, 16, 16), dtype=np.uint8)
    raw[0] = np.arange(256, dtype=np.uint8).reshape(16, 16)
    on_gpu = normalise_on_device(torch.from_numpy(raw).cuda(), spec).cpu().numpy()
    assert _bits_equal(on_gpu, to_float32(raw, spec))
