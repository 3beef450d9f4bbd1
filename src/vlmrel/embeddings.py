"""Image embeddings from a registry model, streamed from a pixel file.

``results/{run}/embeddings/{model}.h5`` holds

- ``embedding`` float32 [N, D]: image features, L2-normalised (attr ``normalized``);
- ``image_id`` [N] (UTF-8 strings, the pixel file's order);
- attrs ``model``, ``precision``, ``preproc_key``, ``feature_dim``, ``n_images``,
  ``vlmrel_version``.

Pixels are read batch by batch, as their stored uint8 values, by the prefetching loader
(:func:`vlmrel.pixels.prefetch_batches`) and normalised on the model's device by its
``prepare``, so memory follows the batch size, not the number of images. The file is written
atomically.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from vlmrel.io import atomic_path

log = logging.getLogger(__name__)


class EmbeddingFileError(ValueError):
    """An embedding file is missing, unreadable or inconsistent; the message names it."""


def compute_embeddings(
    pixels_path: str | os.PathLike[str],
    model: str,
    out_path: str | os.PathLike[str],
    batch_size: int = 32,
    device: str = "cpu",
    precision: str = "fp32",
    progress: bool = True,
) -> dict[str, Any]:
    """Embed every image of ``pixels_path`` with registry model ``model`` into ``out_path``."""
    import h5py
    import torch
    from tqdm.auto import tqdm

    import vlmrel
    from vlmrel.models import load_encoder, preprocess_spec
    from vlmrel.pixels import PixelFile, prefetch_batches, preproc_key

    if isinstance(batch_size, bool) or int(batch_size) < 1:
        raise ValueError(f"teacher.embeddings.batch_size: must be a positive integer, got {batch_size!r}")
    want_key = preproc_key(preprocess_spec(model))
    with PixelFile(pixels_path) as pf:
        if pf.preproc_key != want_key:
            raise EmbeddingFileError(
                f"pixel file {str(pixels_path)!r} has preprocessing {pf.preproc_key}, "
                f"but model {model!r} needs {want_key}"
            )
        n = len(pf)
        enc = load_encoder(model, device=device, precision=precision)
        ids: list[str] = []
        with atomic_path(out_path) as tmp, h5py.File(tmp, "w") as f:
            ds = f.create_dataset("embedding", shape=(n, enc.feature_dim), dtype="float32")
            bar = tqdm(total=n, desc=f"embed {model}", unit="img", file=sys.stderr, disable=not progress)
            start = 0
            with torch.no_grad():
                for batch_ids, px in prefetch_batches(pixels_path, int(batch_size), device=enc.device):
                    feats = enc.encode_image(px)
                    feats = torch.nn.functional.normalize(feats, dim=-1).cpu().numpy().astype(np.float32)
                    if not np.isfinite(feats).all():
                        raise EmbeddingFileError(f"model {model!r} produced non-finite features")
                    ds[start : start + len(batch_ids)] = feats
                    ids.extend(batch_ids)
                    start += len(batch_ids)
                    bar.update(len(batch_ids))
            bar.close()
            f.create_dataset("image_id", data=np.array(ids, dtype=object), dtype=h5py.string_dtype("utf-8"))
            f.attrs.update(
                {
                    "model": model,
                    "precision": precision,
                    "preproc_key": pf.preproc_key,
                    "feature_dim": enc.feature_dim,
                    "n_images": n,
                    "normalized": True,
                    "vlmrel_version": getattr(vlmrel, "__version__", ""),
                }
            )
    log.info("embeddings %s: %d images x %d dims with %s", out_path, n, enc.feature_dim, model)
    return {"n_images": n, "feature_dim": enc.feature_dim}


def read_embeddings(path: str | os.PathLike[str]) -> tuple[list[str], np.ndarray, dict[str, Any]]:
    """``(image_ids, embeddings float32 [N, D], attrs)`` of an embedding file."""
    import h5py

    p = Path(path)
    if not p.is_file():
        raise EmbeddingFileError(f"embedding file {str(p)!r} does not exist")
    try:
        with h5py.File(p, "r", locking=False) as f:
            for name in ("embedding", "image_id"):
                if name not in f:
                    raise EmbeddingFileError(f"embedding file {str(p)!r}: dataset {name!r} is missing")
            x = np.asarray(f["embedding"][...], dtype=np.float32)
            ids = [str(s) for s in f["image_id"].asstr()[...]]
            attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
    except OSError as exc:
        raise EmbeddingFileError(f"embedding file {str(p)!r} is not readable HDF5: {exc}") from exc
    if x.ndim != 2 or x.shape[0] != len(ids):
        raise EmbeddingFileError(
            f"embedding file {str(p)!r}: 'embedding' has shape {x.shape} for {len(ids)} image ids"
        )
    return ids, x, attrs
