"""Semantic drift: the local MiniLM embedder, dedup, cosine distance, the d.max() == 0 case."""

import warnings

import numpy as np
import pytest
from PIL import Image
from scipy.spatial.distance import cosine

from vlmrel.grounding.drift import (
    CachedEmbedder,
    CallableEmbedder,
    MiniLMEmbedder,
    answer_text,
    cosine_distance,
    make_embedder,
    normalized_similarity,
    region_drift,
    semantic_drift,
)


class CountingEmbedder:
    """Bag-of-characters vectors; records every batch it is asked for."""

    name = "count"

    def __init__(self):
        self.calls: list[list[str]] = []

    def embed(self, texts):
        self.calls.append(list(texts))
        out = np.zeros((len(texts), 64))
        for i, t in enumerate(texts):
            for ch in t:
                out[i, ord(ch) % 64] += 1
        return out


def test_cosine_distance_matches_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    assert cosine_distance(a, b) == pytest.approx([cosine(x, y) for x, y in zip(a, b, strict=True)])
    assert np.isnan(cosine_distance(np.zeros(3), np.ones(3)))


def test_semantic_drift_embeds_answers_once_and_handles_missing():
    emb = CachedEmbedder(CountingEmbedder())
    orig = ['{"bbox_2d": [1, 2, 3, 4]}', None]
    pert = [['{"bbox_2d": [1, 2, 3, 4]}', '{"bbox_2d": [9, 9, 30, 40]}', None], ["x", "y", "z"]]
    d = semantic_drift(orig, pert, emb)
    assert d.shape == (2, 3)
    assert d[0, 0] == 0.0 and d[0, 1] > 0  # seed defect 2: different answers, non-zero drift
    assert np.isnan(d[0, 2]) and np.isnan(d[1]).all()
    assert emb.n_computed == 5  # distinct texts only
    semantic_drift(orig, pert, emb)
    assert emb.n_computed == 5  # nothing new the second time
    assert len(emb.inner.calls) == 1


def test_normalized_similarity_all_zero_rows_are_defined():
    d = np.array([[0.0, 0.0, 0.0], [0.0, 0.2, 0.4], [np.nan, 0.0, 0.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = normalized_similarity(d)
    assert s[0].tolist() == [1.0, 1.0, 1.0]
    assert s[1].tolist() == pytest.approx([1.0, 0.5, 0.0])
    assert np.isnan(s[2, 0]) and s[2, 1:].tolist() == [1.0, 1.0]


def test_answer_text_modes():
    raw = '```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "red car"}]\n```'
    assert answer_text(raw, "label") == "red car"
    assert answer_text(raw, "raw") == raw.strip()
    assert answer_text('{"bbox_2d": [1, 2, 3, 4]}', "label") == '{"bbox_2d": [1, 2, 3, 4]}'
    assert answer_text("  ", "raw") is None and answer_text(None) is None
    with pytest.raises(ValueError):
        answer_text("x", "tokens")


def test_make_embedder_remote_needs_the_client():
    with pytest.raises(ValueError, match="VLM client"):
        make_embedder({"kind": "ollama", "model": "qwen3-embedding"})
    e = make_embedder({"kind": "openai", "model": "m"}, remote=lambda texts: [[len(t), 1.0] for t in texts])
    assert e.embed(["ab", "abc"]).shape == (2, 2)
    bad = CallableEmbedder(lambda texts: [[1.0]], "broken")
    with pytest.raises(ValueError, match="broken"):
        bad.embed(["a", "b"])


def test_region_drift():
    img = Image.new("RGB", (40, 40), (200, 10, 10))
    img.paste((10, 10, 200), (20, 0, 40, 40))

    def mean_color(crops):
        return np.stack([np.asarray(c, float).reshape(-1, 3).mean(0) for c in crops])

    pairs = [
        (img, (0, 0, 0.5, 1), img, (0, 0, 0.5, 1)),  # same region
        (img, (0, 0, 0.5, 1), img, (0.5, 0, 1, 1)),  # red vs blue
        (img, None, img, (0, 0, 1, 1)),
    ]
    d = region_drift(pairs, mean_color)
    assert d[0] == pytest.approx(0.0, abs=1e-12) and d[1] > 0.5 and np.isnan(d[2])


def test_minilm_offline():
    emb = MiniLMEmbedder()
    v = emb.embed(
        ["the man on the left", "the person on the left side", "a bowl of soup", "the man on the left"]
    )
    assert v.shape == (4, 384)
    assert np.linalg.norm(v, axis=1) == pytest.approx(np.ones(4), abs=1e-5)
    d = cosine_distance(v[[0, 0, 0]], v[[1, 2, 3]])
    assert d[2] == pytest.approx(0.0, abs=1e-6)
    assert d[0] < d[1]  # a paraphrase is closer than an unrelated phrase
