"""Small heads on image embeddings, trained on the auto truth (seed 004, section 6).

- **scene**: a linear softmax head over the scene keys of the mapping (cross-entropy);
- **attributes**: a multi-label linear head with BCE-with-logits over the attribute keys
  that are *not* derived from the scene; ``attr.is_document`` and ``attr.is_screenshot``
  follow from the predicted scene (``scene.document`` / ``scene.screenshot``), as in the
  seed, which keeps them consistent with the taxonomy and avoids sparse-head instability;
- **objects**: the same multi-label head over the object keys seen in training, used to
  rank object labels (top-1 / top-3 hit rates).

Training is full batch (AdamW, zero initial weights, so no random draw at all), with a
validation split drawn by ``numpy.random.default_rng(seed)`` over the sorted image ids and
early stopping on the validation loss (the best epoch's weights are kept). Heads are saved
as one safetensors file (``scene.weight``, ``scene.bias``, ``attributes.*``,
``objects.*``) plus a JSON card: labels, derived attributes, training-data hash, split,
settings and metrics. No pickles.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from vlmrel.io import atomic_path, read_json, write_json
from vlmrel.stats import softmax

from .truth import TruthMapping, read_truth

log = logging.getLogger(__name__)

DEFAULT_DERIVED = {"attr.is_document": "scene.document", "attr.is_screenshot": "scene.screenshot"}


@dataclass(frozen=True)
class HeadSettings:
    """Config ``teacher.heads``."""

    val_fraction: float = 0.2
    max_epochs: int = 500
    patience: int = 30
    lr: float = 0.05
    weight_decay: float = 1e-4
    threshold: float = 0.5
    seed: int = 42
    derived_attributes: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_DERIVED))

    def __post_init__(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"teacher.heads.val_fraction: must be in [0, 1), got {self.val_fraction}")
        if self.max_epochs < 1 or self.patience < 1:
            raise ValueError("teacher.heads.max_epochs and patience must be >= 1")
        if not 0 < self.threshold < 1:
            raise ValueError(f"teacher.heads.threshold: must be in (0, 1), got {self.threshold}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> HeadSettings:
        d = dict(d or {})
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"teacher.heads: unknown key(s) {', '.join(unknown)}")
        return cls(**d)


class HeadError(ValueError):
    """Training or loading a head failed; the message names the head and the reason."""


# -- split and training --------------------------------------------------------------------
def split_indices(ids: Sequence[str], val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/validation split; depends only on the set of ids, the fraction and the seed."""
    order = np.argsort(np.asarray(ids, dtype=object), kind="stable")
    n = len(ids)
    n_val = int(round(n * val_fraction)) if n >= 2 else 0
    n_val = min(max(n_val, 1 if val_fraction > 0 and n >= 2 else 0), n - 1) if n >= 2 else 0
    perm = order[np.random.default_rng(seed).permutation(n)]
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def train_linear(
    x: np.ndarray,
    y: np.ndarray,
    kind: str,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    settings: HeadSettings,
    mask: np.ndarray | None = None,
    name: str = "head",
    n_classes: int | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Train a linear head; ``kind`` is ``softmax`` (y: class indices) or ``bce`` (y: 0/1 [N, K]).

    ``mask`` (bce only, [N, K] bool) leaves out unknown targets. Returns ``(weight [K, D],
    bias [K], history)``; the weights are the epoch with the lowest validation loss (the
    training loss when there is no validation set), and training stops after ``patience``
    epochs without improvement.
    """
    import torch

    if kind not in ("softmax", "bce"):
        raise HeadError(f"{name}: unknown head kind {kind!r}")
    if len(train_idx) == 0:
        raise HeadError(f"{name}: no training examples")
    xt = torch.as_tensor(np.asarray(x, dtype=np.float32))
    n_out = max(int(y.max()) + 1, n_classes or 0) if kind == "softmax" else y.shape[1]
    if kind == "softmax":
        yt = torch.as_tensor(np.asarray(y, dtype=np.int64))
    else:
        yt = torch.as_tensor(np.asarray(y, dtype=np.float32))
        mt = torch.as_tensor(np.ones_like(y, dtype=bool) if mask is None else np.asarray(mask, dtype=bool))
    lin = torch.nn.Linear(xt.shape[1], n_out)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
    opt = torch.optim.AdamW(lin.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    tr = torch.as_tensor(train_idx, dtype=torch.long)
    va = torch.as_tensor(val_idx, dtype=torch.long)

    def loss_on(idx: torch.Tensor) -> torch.Tensor:
        logits = lin(xt[idx])
        if kind == "softmax":
            return torch.nn.functional.cross_entropy(logits, yt[idx])
        m = mt[idx]
        if not bool(m.any()):
            return logits.sum() * 0.0
        return torch.nn.functional.binary_cross_entropy_with_logits(logits[m], yt[idx][m])

    best = (float("inf"), -1, lin.weight.detach().clone(), lin.bias.detach().clone())
    monitor = "val" if len(val_idx) else "train"
    epoch = 0
    for epoch in range(1, settings.max_epochs + 1):
        opt.zero_grad()
        loss = loss_on(tr)
        loss.backward()
        opt.step()
        with torch.no_grad():
            score = float(loss_on(va if len(val_idx) else tr))
        if score < best[0] - 1e-7:
            best = (score, epoch, lin.weight.detach().clone(), lin.bias.detach().clone())
        elif epoch - best[1] >= settings.patience:
            break
    with torch.no_grad():
        lin.weight.copy_(best[2])
        lin.bias.copy_(best[3])
        train_loss = float(loss_on(tr))
    history = {
        "epochs_run": epoch,
        "best_epoch": best[1],
        "monitor": monitor,
        "best_monitor_loss": best[0],
        "train_loss": train_loss,
        "stopped_early": epoch < settings.max_epochs,
    }
    return best[2].numpy(), best[3].numpy(), history




def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _acc(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray) -> float | None:
    if len(y) == 0:
        return None
    return float(((x @ w.T + b).argmax(axis=1) == y).mean())


def _multilabel_acc(
    w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray, m: np.ndarray, thr: float
) -> float | None:
    if len(y) == 0 or not m.any():
        return None
    pred = _sigmoid(x @ w.T + b) >= thr
    return float((pred == (y > 0.5))[m].mean())


# -- the three heads -----------------------------------------------------------------------
def training_data_hash(ids: Sequence[str], x: np.ndarray, truth: Mapping[str, dict[str, Any]]) -> str:
    """sha256 of the training examples: ids, their labels and their embedding bytes."""
    h = hashlib.sha256()
    for i, iid in enumerate(ids):
        rec = truth[iid]
        h.update(
            json.dumps(
                [iid, rec["scene"], rec.get("attributes", {}), rec.get("objects", [])], sort_keys=True
            ).encode()
        )
        h.update(np.ascontiguousarray(x[i], dtype=np.float32).tobytes())
    return h.hexdigest()


def train_heads(
    ids: Sequence[str],
    x: np.ndarray,
    truth: Sequence[dict[str, Any]],
    mapping: TruthMapping,
    settings: HeadSettings,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Train scene, attribute and object heads on the images with both an embedding and truth.

    Returns ``(tensors, card)``.
    """
    by_id = {r["image_id"]: r for r in truth}
    pos = {iid: i for i, iid in enumerate(ids)}
    use = sorted(iid for iid in by_id if iid in pos)
    if not use:
        raise HeadError("heads: no image has both an embedding and a ground-truth record")
    missing = len(by_id) - len(use)
    if missing:
        log.warning("heads: %d ground-truth records have no embedding and are left out", missing)
    xs = np.asarray(x, dtype=np.float32)[[pos[i] for i in use]]
    train_idx, val_idx = split_indices(use, settings.val_fraction, settings.seed)

    scene_labels = mapping.scene_labels
    scene_index = {s: k for k, s in enumerate(scene_labels)}
    y_scene = np.empty(len(use), dtype=np.int64)
    for n, iid in enumerate(use):
        s = by_id[iid]["scene"][0] if by_id[iid]["scene"] else mapping.scene_other
        y_scene[n] = scene_index.get(s, scene_index[mapping.scene_other])

    derived = {a: s for a, s in settings.derived_attributes.items() if a in mapping.attribute_labels}
    attr_labels = [a for a in mapping.attribute_labels if a not in derived]
    obj_labels = sorted({o for iid in use for o in by_id[iid]["objects"]})

    def multi(labels: list[str], getter: Any) -> tuple[np.ndarray, np.ndarray]:
        y = np.zeros((len(use), len(labels)), dtype=np.float32)
        m = np.zeros((len(use), len(labels)), dtype=bool)
        for n, iid in enumerate(use):
            for k, lab in enumerate(labels):
                v = getter(by_id[iid], lab)
                if v is not None:
                    y[n, k], m[n, k] = float(v), True
        return y, m

    y_attr, m_attr = multi(labels=attr_labels, getter=lambda r, a: r["attributes"].get(a))
    y_obj, m_obj = multi(labels=obj_labels, getter=lambda r, o: o in r["objects"])

    tensors: dict[str, np.ndarray] = {}
    metrics: dict[str, Any] = {}
    w, b, hist = train_linear(
        xs, y_scene, "softmax", train_idx, val_idx, settings, name="scene head", n_classes=len(scene_labels)
    )
    tensors["scene.weight"], tensors["scene.bias"] = w, b
    metrics["scene"] = {
        **hist,
        "train_accuracy": _acc(w, b, xs[train_idx], y_scene[train_idx]),
        "val_accuracy": _acc(w, b, xs[val_idx], y_scene[val_idx]),
    }
    for head, labels, y, m in (
        ("attributes", attr_labels, y_attr, m_attr),
        ("objects", obj_labels, y_obj, m_obj),
    ):
        if labels:
            w, b, hist = train_linear(xs, y, "bce", train_idx, val_idx, settings, mask=m, name=f"{head} head")
        else:
            w, b, hist = np.zeros((0, xs.shape[1]), np.float32), np.zeros(0, np.float32), {"epochs_run": 0}
        tensors[f"{head}.weight"], tensors[f"{head}.bias"] = w, b
        metrics[head] = {
            **hist,
            "train_accuracy": _multilabel_acc(
                w, b, xs[train_idx], y[train_idx], m[train_idx], settings.threshold
            ),
            "val_accuracy": _multilabel_acc(w, b, xs[val_idx], y[val_idx], m[val_idx], settings.threshold),
        }
    card = {
        "labels": {
            "scene": scene_labels,
            "attributes": attr_labels,
            "derived_attributes": derived,
            "objects": obj_labels,
        },
        "training_data_hash": training_data_hash(use, xs, by_id),
        "n_examples": len(use),
        "n_train": len(train_idx),
        "n_val": len(val_idx),
        "val_ids": [use[i] for i in val_idx],
        "scene_counts_train": {
            s: int((y_scene[train_idx] == k).sum())
            for k, s in enumerate(scene_labels)
            if (y_scene[train_idx] == k).any()
        },
        "settings": asdict(settings),
        "metrics": metrics,
        "feature_dim": int(xs.shape[1]),
    }
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, card


# -- files ---------------------------------------------------------------------------------
def save_heads(tensors: dict[str, np.ndarray], card: dict[str, Any], heads_path: str, card_path: str) -> None:
    from safetensors.numpy import save_file

    with atomic_path(heads_path) as tmp:
        save_file(tensors, str(tmp), metadata={"labels": json.dumps(card["labels"], sort_keys=True)})
    write_json(card_path, card)


def load_heads(
    heads_path: str | os.PathLike[str], card_path: str | os.PathLike[str]
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    from safetensors.numpy import load_file

    try:
        tensors = load_file(os.fspath(heads_path))
    except Exception as exc:  # safetensors raises its own SafetensorError on a bad header
        raise HeadError(f"heads file {os.fspath(heads_path)!r} is not readable safetensors: {exc}") from exc
    card = read_json(card_path)
    for head in ("scene", "attributes", "objects"):
        n = len(card["labels"][head])
        for part in ("weight", "bias"):
            t = tensors.get(f"{head}.{part}")
            if t is None or t.shape[0] != n:
                raise HeadError(
                    f"heads file {os.fspath(heads_path)!r}: tensor {head}.{part} missing or not matching "
                    f"the card's {n} {head} labels"
                )
    return tensors, card


def train_heads_files(
    embeddings_path: str,
    truth_path: str,
    heads_path: str,
    card_path: str,
    mapping: Mapping[str, Any] | TruthMapping | None,
    settings: Mapping[str, Any] | HeadSettings | None,
    model: str | None = None,
) -> dict[str, Any]:
    from vlmrel.embeddings import read_embeddings

    m = mapping if isinstance(mapping, TruthMapping) else TruthMapping.from_dict(mapping)
    s = settings if isinstance(settings, HeadSettings) else HeadSettings.from_dict(settings)
    ids, x, attrs = read_embeddings(embeddings_path)
    tensors, card = train_heads(ids, x, read_truth(truth_path), m, s)
    card["model"] = model or attrs.get("model")
    card["embedding"] = {k: attrs.get(k) for k in ("model", "preproc_key", "feature_dim", "precision")}
    card["truth"] = os.fspath(truth_path)
    save_heads(tensors, card, heads_path, card_path)
    log.info("heads for %s: %s", card["model"], json.dumps(card["metrics"], default=str))
    return card


# -- prediction ----------------------------------------------------------------------------
def predict(
    tensors: Mapping[str, np.ndarray], card: Mapping[str, Any], x: np.ndarray
) -> dict[str, np.ndarray]:
    """Scene probabilities [N, S], attribute probabilities [N, A] (derived ones 0/1 from the
    predicted scene, in ``card['labels']['attributes'] + derived`` order) and object scores [N, O]."""
    x = np.asarray(x, dtype=np.float64)
    labels = card["labels"]
    scene_p = softmax(x @ tensors["scene.weight"].T.astype(np.float64) + tensors["scene.bias"])
    scene_pred = scene_p.argmax(axis=1)
    attr_p = _sigmoid(x @ tensors["attributes.weight"].T.astype(np.float64) + tensors["attributes.bias"])
    derived = [
        (scene_pred == labels["scene"].index(s)).astype(np.float64)
        if s in labels["scene"]
        else np.zeros(len(x))
        for s in labels["derived_attributes"].values()
    ]
    if derived:
        attr_p = np.concatenate([attr_p, np.stack(derived, axis=1)], axis=1)
    obj = _sigmoid(x @ tensors["objects.weight"].T.astype(np.float64) + tensors["objects.bias"])
    return {"scene": scene_p, "attributes": attr_p, "objects": obj}


def attribute_order(card: Mapping[str, Any]) -> list[str]:
    return list(card["labels"]["attributes"]) + list(card["labels"]["derived_attributes"])


def write_predictions(
    embeddings_path: str, heads_path: str, card_path: str, out_path: str, top_k: int = 5
) -> int:
    """Predictions of the heads for every embedded image, one JSON line each."""
    from vlmrel.embeddings import read_embeddings

    from .truth import write_jsonl

    tensors, card = load_heads(heads_path, card_path)
    ids, x, _ = read_embeddings(embeddings_path)
    if x.shape[1] != card["feature_dim"]:
        raise HeadError(
            f"embedding file {embeddings_path!r} has {x.shape[1]} dims, heads {heads_path!r} expect {card['feature_dim']}"
        )
    p = predict(tensors, card, x)
    thr = card["settings"]["threshold"]
    scenes, attrs, objs = card["labels"]["scene"], attribute_order(card), card["labels"]["objects"]
    recs = []
    for n, iid in enumerate(ids):
        order = np.argsort(-p["objects"][n], kind="stable")[:top_k]
        recs.append(
            {
                "image_id": iid,
                "scene": scenes[int(p["scene"][n].argmax())],
                "scene_prob": round(float(p["scene"][n].max()), 6),
                "attributes": {a: bool(p["attributes"][n, k] >= thr) for k, a in enumerate(attrs)},
                "attribute_probs": {a: round(float(p["attributes"][n, k]), 6) for k, a in enumerate(attrs)},
                "objects_ranked": [objs[int(k)] for k in order],
                "object_scores": [round(float(p["objects"][n, int(k)]), 6) for k in order],
            }
        )
    write_jsonl(out_path, recs)
    return len(recs)
