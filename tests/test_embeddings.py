"""Embeddings from a registry model, streamed from a pixel file."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vlmrel.embeddings import EmbeddingFileError, compute_embeddings, read_embeddings
from vlmrel.images import build_manifest, list_images
from vlmrel.models import load_encoder, preprocess_spec
from vlmrel.pixels import PixelFile, write_pixels


@pytest.fixture(scope="module")
def pixel_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("emb")
    root = d / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for k in range(7):
        Image.fromarray(rng.integers(0, 255, (40 + k, 50, 3), dtype=np.uint8)).save(root / f"im{k}.png")
    build_manifest(root, list_images(root), d / "manifest.tsv")
    out = d / "tiny_clip.h5"
    write_pixels(d / "manifest.tsv", root, preprocess_spec("tiny_clip"), out)
    return out


def test_embeddings_match_the_encoder_and_are_normalised(tmp_path, pixel_file):
    out = tmp_path / "embeddings" / "tiny_clip.h5"
    info = compute_embeddings(pixel_file, "tiny_clip", out, batch_size=3, progress=False)
    ids, x, attrs = read_embeddings(out)
    with PixelFile(pixel_file) as pf:
        assert ids == pf.image_ids
        px = pf.read(range(len(pf)))
    assert x.shape == (7, info["feature_dim"]) and x.dtype == np.float32
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    ref = load_encoder("tiny_clip").encode_image(px).numpy()
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    assert np.allclose(x, ref, atol=1e-5)  # batching does not change the result
    assert attrs["model"] == "tiny_clip" and attrs["normalized"]
    assert not list(out.parent.glob(".*"))  # no temporary file left behind


def test_wrong_preprocessing_and_missing_file_are_named(tmp_path, pixel_file):
    with pytest.raises(EmbeddingFileError, match="tiny_siglip"):
        compute_embeddings(pixel_file, "tiny_siglip", tmp_path / "x.h5", progress=False)
    assert not (tmp_path / "x.h5").exists()
    with pytest.raises(EmbeddingFileError, match="does not exist"):
        read_embeddings(tmp_path / "nope.h5")
