"""Image payloads (pixel budget, encode once, key from encoded bytes), the cache file and the config."""

from __future__ import annotations

import io
import math
import sqlite3
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import yaml
from PIL import Image

from vlmrel import vlm
from vlmrel.grounding.request import GROUNDING_SCHEMA
from vlmrel.vlm.config import VLMConfig

ROOT = Path(__file__).resolve().parents[1]


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, size=(max(1, h // 16), max(1, w // 16), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)


@pytest.mark.parametrize(
    "size,budget", [((3000, 2000), 100_000), ((1000, 10), 500), ((640, 480), 307_200), ((7, 5), 64)]
)
def test_downscale_respects_pixel_budget(size: tuple[int, int], budget: int) -> None:
    enc = vlm.encode_image(_photo(*size), vlm.ImageConfig(max_pixels=budget))
    assert enc.width * enc.height <= budget
    if size[0] * size[1] <= budget:
        assert (enc.width, enc.height) == size  # never enlarged
    else:
        # each side is the exact scale factor sqrt(budget / pixels) times the original, within rounding
        s = math.sqrt(budget / (size[0] * size[1]))
        assert abs(enc.width - size[0] * s) <= 1.5 and abs(enc.height - size[1] * s) <= 1.5
    with Image.open(io.BytesIO(enc.data)) as im:  # the bytes are what they claim
        assert im.size == (enc.width, enc.height) and im.format == "JPEG"


def test_fit_pixel_budget_matches_direct_formula() -> None:
    for w, h, b in [(4000, 3000, 1_003_520), (1920, 1080, 250_000), (333, 777, 10_000)]:
        fw, fh = vlm.fit_pixel_budget(w, h, b)
        s = math.sqrt(b / (w * h))
        assert fw * fh <= b and abs(fw - w * s) <= 2 and abs(fh - h * s) <= 2


def test_cache_key_uses_encoded_bytes(tmp_path: Path) -> None:
    im = _photo(800, 600)
    png, bmp = tmp_path / "a.png", tmp_path / "a.bmp"
    im.save(png)
    im.save(bmp)
    assert png.read_bytes() != bmp.read_bytes()
    cfg = VLMConfig()
    e_png, e_bmp = vlm.encode_image(png, cfg.image), vlm.encode_image(bmp, cfg.image)
    assert e_png.data == e_bmp.data  # same pixels -> same payload
    k = vlm.chat_key(cfg, "p", e_png.sha256, None)
    assert k == vlm.chat_key(cfg, "p", e_bmp.sha256, None)
    small = vlm.encode_image(png, vlm.ImageConfig(max_pixels=10_000))
    assert vlm.chat_key(cfg, "p", small.sha256, None) != k  # another budget is another payload
    assert vlm.chat_key(cfg.replace(generation={"temperature": 0.7}), "p", e_png.sha256, None) != k
    assert vlm.chat_key(cfg.replace(model="other"), "p", e_png.sha256, None) != k
    assert vlm.chat_key(cfg.replace(endpoints=["http://elsewhere:1"]), "p", e_png.sha256, None) == k
    assert vlm.chat_key(cfg, "p", e_png.sha256, GROUNDING_SCHEMA) != k
    # the simulator's answer-shaping settings are part of the key; its latency and faults are not
    sim = cfg.replace(simulator={"enabled": True})
    ks = vlm.chat_key(sim, "p", e_png.sha256, None)
    assert ks != k
    assert (
        vlm.chat_key(
            sim.replace(simulator={"enabled": True, "grounding_sensitivity": 0.4}), "p", e_png.sha256, None
        )
        != ks
    )
    assert (
        vlm.chat_key(sim.replace(simulator={"enabled": True, "latency_s": 0.5}), "p", e_png.sha256, None)
        == ks
    )
    assert vlm.embed_key(sim, "t") != vlm.embed_key(cfg, "t")


def test_image_modes_and_exif_orientation() -> None:
    rgba = Image.new("RGBA", (20, 10), (255, 0, 0, 0))
    enc = vlm.encode_image(rgba, vlm.ImageConfig(format="png"))
    px = Image.open(io.BytesIO(enc.data)).getpixel((5, 5))
    assert px == (255, 255, 255)  # transparent composited on white
    grey16 = Image.fromarray(np.arange(200, dtype=np.uint16).reshape(10, 20) * 300)
    assert Image.open(io.BytesIO(vlm.encode_image(grey16).data)).mode == "RGB"
    # EXIF orientation 6 (rotate 90 CW): a 40x20 stored image is shown 20x40
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    _photo(40, 20).save(buf, format="JPEG", exif=exif)
    enc = vlm.encode_image(buf.getvalue())
    assert (enc.width, enc.height) == (20, 40)


def test_unreadable_image_is_a_recorded_failure(tmp_path: Path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(vlm.ImageError, match="broken.jpg"):
        vlm.encode_image(bad)
    cfg = VLMConfig(endpoints=("http://127.0.0.1:9",))
    res = vlm.run_requests(cfg, [vlm.Request("p", bad)], cache_path=tmp_path / "c.sqlite", progress=False)
    assert res[0].failure_kind == "image_error" and "broken.jpg" in res[0].error


def test_cache_is_wal_and_persists(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "c.sqlite"
    with vlm.ResponseCache(path) as c:
        c.put(
            "k1",
            status="ok",
            text='{"a": 1}',
            parsed={"a": 1},
            failure_kind=None,
            error=None,
            latency_s=0.1,
            endpoint="http://x",
            backend="ollama",
            model="m",
            attempts=1,
        )
        c.put(
            "k2",
            status="failed",
            text=None,
            parsed=None,
            failure_kind="timeout",
            error="slow",
            latency_s=5.0,
            endpoint="http://x",
            backend="ollama",
            model="m",
            attempts=3,
        )
        c.put_embedding("e1", np.arange(4, dtype=np.float64), backend="ollama", model="m")
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with vlm.ResponseCache(path) as c:
        assert c.get("k1").parsed == {"a": 1} and c.get("k1").status == "ok"
        assert c.get("k2").failure_kind == "timeout" and c.get("k2").attempts == 3
        assert c.get("nope") is None
        np.testing.assert_array_equal(c.get_embeddings(["e1", "e2"])["e1"], np.arange(4, dtype=np.float32))
        assert c.count() == 2 and c.count("failed") == 1


# -- config ------------------------------------------------------------------------------------
def _schema() -> dict:
    doc = yaml.safe_load((ROOT / "config" / "schemas" / "vlm.yaml").read_text())
    return doc["$defs"]["vlm"]


def _schema_defaults(schema: dict) -> dict:
    out = {}
    for key, prop in schema.get("properties", {}).items():
        if prop.get("type") == "object" and "properties" in prop and key != "faults":
            out[key] = _schema_defaults(prop)
        elif "default" in prop:
            out[key] = prop["default"]
    return out


def test_schema_defaults_equal_dataclass_defaults() -> None:
    assert _schema_defaults(_schema()) == VLMConfig().to_dict()


def test_schema_accepts_defaults_and_rejects_unknown_keys() -> None:
    schema = _schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(VLMConfig().to_dict(), schema)
    demo = {"backend": "openai", "model": "m", "simulator": {"enabled": True, "faults": {"timeout": 0.01}}}
    jsonschema.validate(demo, schema)
    for bad in ({"modle": "x"}, {"image": {"max_pixel": 5}}, {"simulator": {"faults": {"meteor": 0.1}}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_from_dict_validates_with_clear_messages() -> None:
    cfg = VLMConfig.from_dict(
        {"endpoints": "http://a:1/", "generation": {"temperature": 0}, "retry_failed": "timeout"}
    )
    assert (
        cfg.endpoints == ("http://a:1",)
        and cfg.retry_failed == ("timeout",)
        and cfg.generation.max_tokens == 1024
    )
    assert VLMConfig.from_dict(cfg.to_dict()) == cfg
    for bad, match in [
        ({"modle": "x"}, "vlm: unknown key.*modle"),
        ({"image": {"max_pixel": 5}}, "vlm.image: unknown key.*max_pixel"),
        ({"backend": "tgi"}, "vlm.backend"),
        ({"concurrency": 0}, "vlm.concurrency"),
        ({"concurrency": True}, "vlm.concurrency"),
        ({"endpoints": ["localhost:11434"]}, "not an http"),
        ({"retry_failed": ["meteor"]}, "vlm.retry_failed"),
        ({"timeout_s": 0}, "vlm.timeout_s"),
        ({"generation": 3}, "vlm.generation"),
    ]:
        with pytest.raises(vlm.ConfigError, match=match):
            VLMConfig.from_dict(bad)


def test_importing_vlm_pulls_no_heavy_modules() -> None:
    import subprocess
    import sys

    code = "import sys, vlmrel.vlm; bad = [m for m in ('torch', 'transformers', 'open_clip', 'openai', 'ollama', 'snakemake') if m in sys.modules]; print(bad)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "[]"


@pytest.mark.parametrize("kind", ["uniform", "gradient"])
def test_16bit_payload_equals_pixel_file_conversion(tmp_path, kind):
    """One conversion serves the VLM payload and the pixel files (issue 19): a uniform 16-bit
    image at 40000 reaches the VLM as 156 (40000 / 257), as in the pixel file, not black."""
    from vlmrel.images import load_rgb
    from vlmrel.models import preprocess_spec
    from vlmrel.pixels import preprocess

    if kind == "uniform":
        arr16 = np.full((48, 64), 40000, dtype=np.uint16)
    else:
        arr16 = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21 + 300).astype(np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(arr16).save(path)
    assert Image.open(path).mode.startswith("I")
    enc = vlm.encode_image(path, vlm.ImageConfig(format="png"))
    sent = np.asarray(Image.open(io.BytesIO(enc.data)).convert("RGB"))
    pixel_file_rgb = np.asarray(load_rgb(path))  # what the pixels job decodes
    assert np.array_equal(sent, pixel_file_rgb)
    if kind == "uniform":
        assert (sent == 156).all()
    spec = preprocess_spec("tiny_clip")
    assert np.array_equal(
        preprocess(Image.open(io.BytesIO(enc.data)), spec), preprocess(Image.open(path), spec)
    )
