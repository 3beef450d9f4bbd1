"""The VLM simulator: deterministic answers from metadata, degradation with perturbation, faults, CLI."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance

from vlmrel import vlm
from vlmrel.grounding.request import GROUNDING_SCHEMA, grounding_prompt
from vlmrel.teacher.schema import ANNOTATION_SCHEMA, annotation_prompt
from vlmrel.vlm.config import SimulatorConfig
from vlmrel.vlm.simulator import Simulator, write_metadata

SKIMAGE_DATA = Path(__import__("skimage").__file__).parent / "data"


def _iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _scene(seed: int, size: tuple[int, int] = (320, 240)) -> tuple[Image.Image, list[float]]:
    """A synthetic scene: noise background and one red disc; returns the image and the disc's box (0-1000)."""
    rng = np.random.default_rng(seed)
    bg = rng.integers(40, 200, size=(size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    im = Image.fromarray(bg).resize(size, Image.Resampling.BILINEAR)
    r = int(rng.integers(20, 50))
    cx, cy = int(rng.integers(r, size[0] - r)), int(rng.integers(r, size[1] - r))
    ImageDraw.Draw(im).ellipse([cx - r, cy - r, cx + r, cy + r], fill=(230, 20, 20))
    box = [
        (cx - r) / size[0] * 1000,
        (cy - r) / size[1] * 1000,
        (cx + r) / size[0] * 1000,
        (cy + r) / size[1] * 1000,
    ]
    return im, box


def test_demo_photos_get_their_registered_annotation() -> None:
    sim = Simulator(SimulatorConfig(enabled=True))
    try:
        for name, scene, flag in [
            ("astronaut.png", "people", "has_person"),
            ("chelsea.png", "animals", "has_animal"),
            ("page.png", "document", "is_document"),
        ]:
            raw = (SKIMAGE_DATA / name).read_bytes()
            enc = vlm.encode_image(raw, vlm.ImageConfig(max_pixels=100_000))  # what a client sends
            ans = sim.answer_chat(annotation_prompt(), enc.data, ANNOTATION_SCHEMA)
            jsonschema.validate(ans, ANNOTATION_SCHEMA)
            assert ans["scene"] == scene and ans[flag] is True
            # deterministic
            assert ans == sim.answer_chat(annotation_prompt(), enc.data, ANNOTATION_SCHEMA)
    finally:
        sim.stop()


def test_unknown_images_get_plausible_deterministic_answers() -> None:
    sim = Simulator(SimulatorConfig(enabled=True), builtin_registry=False)
    try:
        white = Image.new("RGB", (300, 400), (250, 250, 250))
        ImageDraw.Draw(white).text((20, 20), "Invoice 42\nTotal: 17 EUR", fill=(0, 0, 0))
        ans = sim.answer_chat(annotation_prompt(), _png(white), ANNOTATION_SCHEMA)
        jsonschema.validate(ans, ANNOTATION_SCHEMA)
        assert ans["scene"] == "document" and ans["is_document"] is True
        noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
        a = sim.answer_chat(annotation_prompt(), _png(noise), ANNOTATION_SCHEMA)
        jsonschema.validate(a, ANNOTATION_SCHEMA)
        assert a == sim.answer_chat(annotation_prompt(), _png(noise), ANNOTATION_SCHEMA)
        # grounding on an unknown image: the most salient region (the red disc)
        im, box = _scene(5)
        g = sim.answer_chat(grounding_prompt("the red disc"), _png(im), GROUNDING_SCHEMA)
        assert _iou(g["bbox_2d"], box) > 0.3
    finally:
        sim.stop()


def test_grounding_degrades_with_perturbation() -> None:
    """IoU with the registered box falls as brightness moves away from the original."""
    sim = Simulator(SimulatorConfig(enabled=True))
    try:
        original = Image.open(SKIMAGE_DATA / "coffee.png").convert("RGB")
        truth = [300, 30, 700, 570]
        ious: dict[float, list[float]] = {}
        for factor in (1.0, 0.9, 1.1, 0.6, 1.5, 0.35, 1.9):
            ious[factor] = []
            for k, expr in enumerate(["cup", "the cup", "the coffee cup", "espresso cup"]):
                im = ImageEnhance.Brightness(original).enhance(factor)
                im = ImageEnhance.Contrast(im).enhance(1.0 + 0.01 * k)  # distinct images per expression
                ans = sim.answer_chat(
                    grounding_prompt(expr), vlm.encode_image(im).data, GROUNDING_SCHEMA
                )
                ious[factor].append(_iou(ans["bbox_2d"], truth))
        mild = np.mean(ious[1.0] + ious[0.9] + ious[1.1])
        strong = np.mean(ious[0.35] + ious[1.9])
        assert np.mean(ious[1.0]) > 0.8
        assert mild > strong + 0.15
        assert min(ious[0.35] + ious[1.9]) < 0.7  # some answers cross an IoU class boundary
    finally:
        sim.stop()


def test_registered_scenes_over_http_both_coord_conventions(tmp_path: Path) -> None:
    images = []
    truths = {}
    for i in range(4):
        im, box = _scene(100 + i)
        path = tmp_path / f"scene_{i}.png"
        im.save(path)
        images.append({"id": f"scene_{i}", "path": path.name, "boxes": {"red disc": box}})
        truths[i] = (im, box)
    meta = tmp_path / "scenes.json"
    write_metadata(meta, images)
    reqs = [
        vlm.Request(
            grounding_prompt("red disc"), tmp_path / f"scene_{i}.png", GROUNDING_SCHEMA, meta={"i": i}
        )
        for i in range(4)
    ]
    base = {"backend": "ollama", "model": "sim", "simulator": {"enabled": True, "latency_s": 0.0}}
    cfg = vlm.VLMConfig.from_dict(base).with_sim_metadata(meta)
    res = vlm.run_requests(cfg, reqs, cache_path=tmp_path / "c.sqlite", progress=False)
    for r in res:
        assert r.ok and _iou(r.parsed["bbox_2d"], truths[r.meta["i"]][1]) > 0.8
    # Qwen2.5-VL convention: absolute pixels of the image the server received
    cfg_abs = cfg.replace(
        simulator={**cfg.simulator.__dict__, "coords": "absolute"}, image={"max_pixels": 19200}
    )
    res_abs = vlm.run_requests(cfg_abs, reqs, cache_path=tmp_path / "c.sqlite", progress=False)
    for r in res_abs:
        x1, y1, x2, y2 = r.parsed["bbox_2d"]
        sent_w, sent_h = 160, 120  # 320x240 shrunk to the 19200-pixel budget
        rel = [x1 / sent_w * 1000, y1 / sent_h * 1000, x2 / sent_w * 1000, y2 / sent_h * 1000]
        assert _iou(rel, truths[r.meta["i"]][1]) > 0.7
        assert max(x2, y2) <= 160


def test_fault_draws_are_deterministic_per_key_and_attempt() -> None:
    cfg = SimulatorConfig(enabled=True, faults={"http_500": 0.5}, seed=3)
    a, b = Simulator(cfg), Simulator(cfg)
    try:
        keys = [f"k{i}" for i in range(200)]
        da = [a.draw_fault(k, n) for k in keys for n in range(3)]
        db = [b.draw_fault(k, n) for k in keys for n in range(3)]
        assert da == db
        rate = sum(x == "http_500" for x in da) / len(da)
        assert 0.4 < rate < 0.6  # the configured probability
        c = Simulator(SimulatorConfig(enabled=True, faults={"http_500": 0.5}, seed=4))
        assert [c.draw_fault(k, 0) for k in keys] != [a.draw_fault(k, 0) for k in keys]
        c.stop()
    finally:
        a.stop()
        b.stop()


def test_config_rejects_bad_fault_settings() -> None:
    with pytest.raises(vlm.ConfigError, match="unknown fault"):
        SimulatorConfig(faults={"meteor": 0.1})
    with pytest.raises(vlm.ConfigError, match="sum"):
        SimulatorConfig(faults={"http_500": 0.7, "timeout": 0.7})


def test_cli_serves_both_apis(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlmrel.vlm.simulator", "--port", "0", "--latency", "0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stderr.readline()
        assert "simulator, not a model" in line
        port = int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            assert b"simulator" in r.read()
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello"}]}).encode()
        for path, key in [("/api/chat", "message"), ("/v1/chat/completions", "choices")]:
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}{path}", data=body, headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=5) as r:
                assert key in json.loads(r.read())
    finally:
        proc.terminate()
        proc.wait(timeout=10)
