"""Image-level OOD with a trained ImageNet classifier (``effnet_lite0``) on real photos.

The anomaly chain's per-image scores (msp, maxlogit, energy, entropy; :mod:`vlmrel.anomaly.scores`)
on the classifier's own logits, with the exact metrics of :mod:`vlmrel.anomaly.metrics`:

- **in-distribution**: the accepted photos of the image manifest (``results/{run}/images``), except
  the textures;
- **OOD, textures**: the manifest photos whose ``rel_path`` matches one of the ``textures`` glob
  patterns (the demo: scikit-image's brick, grass and gravel, CC0 texture photographs with no
  ImageNet object in them);
- **OOD, generated** (seeded, ``np.random.default_rng([seed, kind, i])``): ``noise`` (uniform RGB
  noise), ``scenes`` (the chain's own synthetic street scenes, :func:`make_scene`, upsampled) and
  ``shuffle`` (an in-distribution photo cut into a grid of patches, shuffled: the photo's colours
  and local textures without its objects).

``metrics.json`` holds the pooled metrics (every OOD image against the photos) and one set per OOD
group; ``per_image.tsv`` each image's group, scores and top-1 ImageNet class. Photos are decoded
once and streamed in batches; only the ``shuffle`` sources (at most ``n`` photos) are kept.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import h5py
import numpy as np
from PIL import Image

from vlmrel.anomaly.metrics import ExactAccumulator
from vlmrel.anomaly.scores import compute_scores
from vlmrel.anomaly.synthetic import make_scene
from vlmrel.io import atomic_path, write_json

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
GENERATED_KINDS = ("noise", "scenes", "shuffle")
METHODS = ("msp", "maxlogit", "energy", "entropy")
_SIZE = 256  # generated images are drawn at this size, then preprocessed like the photos
_SHUFFLE_GRID = 4


def generated_image(kind: str, i: int, seed: int, photo: Image.Image | None = None) -> Image.Image:
    """Generated OOD image ``i`` of ``kind`` (seeded by ``[seed, kind, i]``)."""
    if kind not in GENERATED_KINDS:
        raise ValueError(f"unknown generated OOD kind {kind!r}; choose from {list(GENERATED_KINDS)}")
    rng = np.random.default_rng([int(seed), GENERATED_KINDS.index(kind), int(i)])
    if kind == "noise":
        return Image.fromarray(rng.integers(0, 256, size=(_SIZE, _SIZE, 3), dtype=np.uint8))
    if kind == "scenes":
        img, _ = make_scene(rng, size=64, with_anomaly=bool(i % 2))
        return Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0))).resize(
            (_SIZE, _SIZE), Image.Resampling.BILINEAR
        )
    if photo is None:
        raise ValueError("the 'shuffle' kind needs a source photo")
    arr = np.asarray(photo.convert("RGB").resize((_SIZE, _SIZE), Image.Resampling.BICUBIC))
    g, s = _SHUFFLE_GRID, _SIZE // _SHUFFLE_GRID
    tiles = [arr[r * s : (r + 1) * s, c * s : (c + 1) * s] for r in range(g) for c in range(g)]
    order = rng.permutation(len(tiles))
    rows = [np.concatenate([tiles[order[r * g + c]] for c in range(g)], axis=1) for r in range(g)]
    return Image.fromarray(np.concatenate(rows, axis=0))


def _items(
    manifest_tsv: PathLike, root: PathLike, textures: Sequence[str], kinds: Sequence[str], n: int, seed: int
) -> Iterator[tuple[str, str, Image.Image]]:
    """(image_id, group, image): the photos and textures of the manifest, then the generated images."""
    from vlmrel.images import read_manifest
    from vlmrel.pixels import iter_manifest_images

    ids, images = iter_manifest_images(manifest_tsv, root)
    rels = read_manifest(manifest_tsv, ok_only=True)["rel_path"].tolist()
    sources: list[tuple[str, Image.Image]] = []
    n_tex = 0
    for image_id, rel, img in zip(ids, rels, images, strict=True):
        is_texture = any(fnmatch.fnmatch(rel, pat) for pat in textures)
        n_tex += is_texture
        if not is_texture and len(sources) < n:
            sources.append((image_id, img.copy()))
        yield image_id, "texture" if is_texture else "photo", img
    if textures and n_tex == 0:
        raise ValueError(f"anomaly.image_ood.textures {list(textures)}: no manifest image matches")
    for kind in kinds:
        for i in range(n):
            if kind == "shuffle":
                if not sources:
                    raise ValueError("anomaly.image_ood: 'shuffle' needs in-distribution photos")
                src_id, src = sources[i % len(sources)]
                yield f"{src_id}__shuffle{i}", kind, generated_image(kind, i, seed, src)
            else:
                yield f"{kind}{i}", kind, generated_image(kind, i, seed)


def write_logits(
    manifest_tsv: PathLike,
    root: PathLike,
    out_h5: PathLike,
    *,
    model: str,
    textures: Sequence[str],
    kinds: Sequence[str],
    n: int,
    seed: int,
    precision: str,
    batch_size: int,
    device: str,
) -> dict[str, int]:
    """The classifier's logits on every item: ``logits`` [N, C] float32, ``ood`` [N], ``image_id``,
    ``group`` [N] and ``class_names`` [C], written atomically."""
    from vlmrel.models import load_encoder, preprocess_spec
    from vlmrel.pixels import raw_pixels

    if n < 1:
        raise ValueError(f"anomaly.image_ood.n: must be >= 1, got {n}")
    encoder = load_encoder(model, device=device, precision=precision)
    if not encoder.has_classifier:
        raise ValueError(
            f"anomaly.image_ood.models: {model!r} has no classifier head (image-level OOD needs class logits)"
        )
    spec = preprocess_spec(model)
    logits: list[np.ndarray] = []
    ids: list[str] = []
    groups: list[str] = []
    batch: list[np.ndarray] = []

    def flush() -> None:
        if batch:
            logits.append(encoder.logits(np.stack(batch)).cpu().numpy().astype(np.float32))
            batch.clear()

    for image_id, group, img in _items(manifest_tsv, root, textures, kinds, n, seed):
        batch.append(raw_pixels(img, spec))  # uint8; the encoder normalises on its device
        ids.append(image_id)
        groups.append(group)
        if len(batch) >= batch_size:
            flush()
    flush()
    z = np.concatenate(logits)
    if not np.isfinite(z).all():
        raise ValueError(f"model {model!r} produced non-finite logits")
    ood = np.array([g != "photo" for g in groups])
    with atomic_path(out_h5) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("logits", data=z)
        f.create_dataset("ood", data=ood)
        f.create_dataset("image_id", data=np.array(ids, dtype=object), dtype=h5py.string_dtype("utf-8"))
        f.create_dataset("group", data=np.array(groups, dtype=object), dtype=h5py.string_dtype("utf-8"))
        names = np.array(encoder.class_names, dtype=object)
        f.create_dataset("class_names", data=names, dtype=h5py.string_dtype("utf-8"))
        f.attrs.update({"model": model, "num_classes": z.shape[1], "seed": int(seed), "precision": precision})
    counts = {g: groups.count(g) for g in dict.fromkeys(groups)}
    log.info("image OOD logits of %s: %s", model, counts)
    return counts


def evaluate(
    logits_h5: PathLike,
    out_json: PathLike,
    per_image_tsv: PathLike,
    *,
    methods: Sequence[str] = METHODS,
    temperature: float = 1.0,
    tpr_level: float = 0.95,
) -> dict[str, Any]:
    """Exact AUROC / AUPR / FPR95 of each score: all OOD against the photos, and per OOD group."""
    import pandas as pd

    with h5py.File(logits_h5, "r") as f:
        z = np.asarray(f["logits"][...], dtype=np.float64)
        ood = np.asarray(f["ood"][...], dtype=bool)
        ids = [str(s) for s in f["image_id"].asstr()[...]]
        groups = np.array([str(s) for s in f["group"].asstr()[...]])
        names = [str(s) for s in f["class_names"].asstr()[...]]
        model = str(f.attrs.get("model", ""))
    if "sml" in methods:
        raise ValueError("anomaly.image_ood.methods: 'sml' needs class statistics from a validation split")
    scores = compute_scores(z, list(methods), axis=1, temperature=temperature)
    photo = groups == "photo"

    def metrics(mask: np.ndarray) -> dict[str, Any]:
        out = {}
        for m in methods:
            acc = ExactAccumulator(tpr_level)
            acc.update(scores[m][mask], ood[mask])
            r = acc.result()
            out[m] = {k: r[k] for k in ("auroc", "aupr", "fpr95", "n_anomaly", "n_normal")}
            out[m]["exact"] = r["quantization"]["exact"]
        return out

    by_group = {g: metrics(photo | (groups == g)) for g in dict.fromkeys(groups[~photo])}
    e = np.exp(z - z.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    top = p.argmax(axis=1)
    result = {
        "model": model,
        "in_distribution": "real photos of the image manifest (textures excluded)",
        "n_images": {g: int((groups == g).sum()) for g in dict.fromkeys(groups)},
        "methods": list(methods),
        "pooled": metrics(np.ones_like(ood)),
        "by_group": by_group,
        "mean_p_top1": {g: float(p[groups == g].max(axis=1).mean()) for g in dict.fromkeys(groups)},
    }
    table = pd.DataFrame(
        {
            "image_id": ids,
            "group": groups,
            "ood": ood,
            "top1": [names[i] for i in top],
            "p_top1": p[np.arange(len(ids)), top],
            **{m: scores[m] for m in methods},
        }
    )
    with atomic_path(per_image_tsv) as tmp:
        table.to_csv(tmp, sep="\t", index=False, float_format="%.6g")
    write_json(out_json, result)
    log.info("image OOD %s: pooled AUROC %s", model, {m: result["pooled"][m]["auroc"] for m in methods})
    return result
