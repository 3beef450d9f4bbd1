"""Segmentation networks: the demo's tiny network (trained in the pipeline) and the logits producer.

Architectures (``ARCHS``):

* ``tinyseg``: a small encoder-decoder CNN the demo trains on its synthetic scenes in a minute.
* ``deeplabv3_resnet50``: torchvision's DeepLabV3-ResNet50 (seed 003's model); weights from the
  checkpoint named in config (a state dict saved by ``torch.save`` or safetensors; an
  ``aux_classifier`` in the checkpoint is loaded and ignored at inference).
* ``tiny_deeplabv3``: torchvision's DeepLabV3 head on a small backbone, with seeded weights: the
  same code path as ``deeplabv3_resnet50`` at test size.

``produce_logits`` runs a network over a data file and writes logits [N, C, H, W] (float16 by
default) with the labels, image block by image block. torch is imported inside the functions.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from vlmrel.anomaly.heat import FEATURE_LAYER, FeatureStats, FeatureStatsAccumulator
from vlmrel.anomaly.io import AnomalyInputError, SegDataReader, seg_logits_writer
from vlmrel.io import atomic_path

log = logging.getLogger("vlmrel.anomaly")

ARCHS = ("tinyseg", "tiny_deeplabv3", "deeplabv3_resnet50")
_FINAL_LAYER = {
    "tinyseg": "head.weight",
    "tiny_deeplabv3": "classifier.4.weight",
    "deeplabv3_resnet50": "classifier.4.weight",
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _tinyseg(num_classes: int) -> Any:
    import torch
    from torch import nn

    def block(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )

    class TinySegNet(nn.Module):
        """Encoder (3 scales) - decoder with skip connections; output at input resolution."""

        def __init__(self) -> None:
            super().__init__()
            self.enc1 = block(3, 12)
            self.enc2 = nn.Sequential(block(12, 24, stride=2), block(24, 24, dilation=2))
            self.enc3 = nn.Sequential(block(24, 32, stride=2), block(32, 32, dilation=2))
            self.dec2 = block(32 + 24, 24)
            self.dec1 = block(24 + 12, 12)
            self.head = nn.Conv2d(12, num_classes, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = nn.functional
            e1 = self.enc1(x)
            e2 = self.enc2(e1)
            e3 = self.enc3(e2)
            d2 = self.dec2(torch.cat([f.interpolate(e3, size=e2.shape[-2:], mode="bilinear"), e2], 1))
            d1 = self.dec1(torch.cat([f.interpolate(d2, size=e1.shape[-2:], mode="bilinear"), e1], 1))
            return self.head(d1)

    return TinySegNet()


def _tiny_deeplabv3(num_classes: int) -> Any:
    from collections import OrderedDict

    from torch import nn
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3

    backbone = nn.Sequential(
        OrderedDict(
            conv1=nn.Sequential(
                nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
            ),
            layer1=nn.Sequential(
                nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU()
            ),
            layer2=nn.Sequential(
                nn.Conv2d(32, 32, 3, padding=2, dilation=2, bias=False), nn.BatchNorm2d(32), nn.ReLU()
            ),
        )
    )
    body = IntermediateLayerGetter(backbone, return_layers={"layer2": "out"})
    return DeepLabV3(body, DeepLabHead(32, num_classes, atrous_rates=(2, 4, 6)), None)


def build_model(arch: str, num_classes: int, *, seed: int = 0, aux_loss: bool = False) -> Any:
    """An untrained network with initial weights drawn from ``seed`` (global RNG state untouched)."""
    import torch

    if arch not in ARCHS:
        raise ValueError(f"unknown segmentation architecture {arch!r}; choose from {list(ARCHS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch == "tinyseg":
            return _tinyseg(num_classes)
        if arch == "tiny_deeplabv3":
            return _tiny_deeplabv3(num_classes)
        from torchvision.models.segmentation import deeplabv3_resnet50

        return deeplabv3_resnet50(
            weights=None, weights_backbone=None, num_classes=num_classes, aux_loss=aux_loss
        )


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A state dict from safetensors or a ``torch.save`` file (``weights_only=True``), unwrapped."""
    import torch

    p = os.fspath(path)
    if not os.path.exists(p):
        raise AnomalyInputError(f"checkpoint {p}: no such file (set anomaly.model.checkpoint)")
    try:
        if p.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd: Any = load_file(p)
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad checkpoint
        raise AnomalyInputError(
            f"checkpoint {p}: cannot be read as a weights-only state dict: {exc}"
        ) from exc
    for key in ("model_state_dict", "state_dict", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(hasattr(v, "shape") for v in sd.values()):
        raise AnomalyInputError(f"checkpoint {p}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_model(arch: str, num_classes: int, checkpoint: str | os.PathLike[str]) -> Any:
    """Network ``arch`` with the weights of ``checkpoint``; a class-count mismatch is a clear error."""
    sd = read_state_dict(checkpoint)
    final = _FINAL_LAYER[arch]
    if final not in sd:
        raise AnomalyInputError(f"checkpoint {checkpoint}: no {final!r}; is it a {arch} checkpoint?")
    ck_classes = int(sd[final].shape[0])
    if ck_classes != num_classes:
        raise AnomalyInputError(
            f"checkpoint {checkpoint}: the {arch} classifier outputs {ck_classes} classes but "
            f"anomaly.num_classes is {num_classes} (the number of classes the model was trained on, "
            "not the number of label ids in the dataset)"
        )
    aux = any(k.startswith("aux_classifier.") for k in sd)
    model = build_model(arch, num_classes, aux_loss=aux)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise AnomalyInputError(f"checkpoint {checkpoint} does not fit {arch}: {exc}") from exc
    return model.eval()


def _forward(model: Any, x: Any) -> Any:
    out = model(x)
    return out["out"] if isinstance(out, dict) else out


def _normalise(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> Any:
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / s


def train_segnet(
    train_path: str | os.PathLike[str],
    val_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    arch: str = "tinyseg",
    num_classes: int,
    ignore_ids: Sequence[int] = (),
    epochs: int = 40,
    batch_size: int = 8,
    lr: float = 3e-3,
    seed: int = 0,
    threads: int = 1,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> dict:
    """Train ``arch`` on the known classes; save safetensors; return the training record (val mIoU).

    Pixels whose label is an ignore id or not a trained class (anomalies) do not enter the loss.
    """
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    torch.set_num_threads(max(1, int(threads)))
    with SegDataReader(train_path) as r:
        images, labels = r.read(slice(0, len(r)))
    with SegDataReader(val_path) as r:
        vimages, vlabels = r.read(slice(0, len(r)))

    def targets(lab: np.ndarray) -> torch.Tensor:
        t = lab.astype(np.int64)
        t[(t < 0) | (t >= num_classes) | np.isin(lab, list(ignore_ids))] = -100
        return torch.from_numpy(t)

    x, y = _normalise(images, mean, std), targets(labels)
    vx, vy = _normalise(vimages, mean, std), targets(vlabels)
    model = build_model(arch, num_classes, seed=seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs))
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in tqdm(range(epochs), desc=f"train {arch}", unit="epoch", mininterval=2.0):
        model.train()
        perm = torch.randperm(x.shape[0], generator=gen)
        total, count = 0.0, 0
        for start in range(0, x.shape[0], batch_size):
            idx = perm[start : start + batch_size]
            xb, yb = x[idx], y[idx]
            if torch.rand((), generator=gen) < 0.5:  # horizontal flip
                xb, yb = xb.flip(-1), yb.flip(-1)
            loss = torch.nn.functional.cross_entropy(_forward(model, xb), yb, ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        sched.step()
        losses.append(total / count)
    model.eval()
    with torch.no_grad():
        pred = _forward(model, vx).argmax(1)
    iou = []
    valid = vy >= 0
    for c in range(num_classes):
        inter = int(((pred == c) & (vy == c) & valid).sum())
        union = int((((pred == c) & valid) | (vy == c)).sum())
        iou.append(inter / union if union else math.nan)
    record = {
        "arch": arch,
        "num_classes": num_classes,
        "epochs": epochs,
        "loss": losses,
        "val_iou": iou,
        "val_miou": float(np.nanmean(iou)),
        "val_pixel_accuracy": float(((pred == vy) & valid).sum() / max(1, int(valid.sum()))),
    }
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out_path) as tmp:
        save_file(state, str(tmp), metadata={"arch": arch, "num_classes": str(num_classes)})
    log.info("trained %s: final loss %.4f, val mIoU %.3f", arch, losses[-1], record["val_miou"])
    return record


def produce_logits(
    model: Any,
    data_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    num_classes: int,
    batch_size: int = 4,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    device: str = "cpu",
    dtype: str = "float16",
    threads: int = 1,
    heat_stats: FeatureStats | None = None,
    arch: str | None = None,
    **attrs: object,
) -> None:
    """Run ``model`` over the data file's images and write logits [N, C, H, W] + labels, atomically.

    With ``heat_stats`` (and ``arch``, naming the feature layer) each image's Mahalanobis map
    [H, W] (``vlmrel.anomaly.heat``) is written beside its logits as ``mahalanobis``.
    """
    import torch
    from tqdm import tqdm

    torch.set_num_threads(max(1, int(threads)))
    model = model.to(device).eval()
    if arch is not None:
        attrs = {"arch": arch, **attrs}
    grab = _FeatureGrab(model, arch) if heat_stats is not None else None
    if grab is not None:
        attrs = {**attrs, "heat_feature_layer": grab.layer}
    with SegDataReader(data_path) as data:
        n = len(data)
        h, w = data.images.shape[2:]
        with seg_logits_writer(
            out_path, n, num_classes, (h, w), data.labels.dtype, dtype, features=grab is not None, **attrs
        ) as sink:
            for start in tqdm(range(0, n, batch_size), desc="logits", unit="batch", mininterval=2.0):
                images, labels = data.read(slice(start, min(n, start + batch_size)))
                with torch.no_grad():
                    out = _forward(model, _normalise(images, mean, std).to(device)).float().cpu().numpy()
                maha = None
                if grab is not None:
                    assert heat_stats is not None
                    maha = grab.mahalanobis(heat_stats, (h, w))
                if out.shape[1] != num_classes:
                    raise AnomalyInputError(
                        f"the model outputs {out.shape[1]} classes, anomaly.num_classes is {num_classes}"
                    )
                if out.shape[2:] != (h, w):
                    raise AnomalyInputError(f"the model outputs {out.shape[2:]} maps for {h}x{w} images")
                if not np.isfinite(out).all():
                    raise AnomalyInputError(
                        f"{data_path}: the model produced non-finite logits for images {start}.."
                    )
                sink.write(out, labels, maha)
    if grab is not None:
        grab.close()


class _FeatureGrab:
    """Keeps the output of the architecture's HEAT feature layer at every forward pass."""

    def __init__(self, model: Any, arch: str | None) -> None:
        if arch not in FEATURE_LAYER:
            raise AnomalyInputError(f"no HEAT feature layer is known for architecture {arch!r}")
        self.layer = FEATURE_LAYER[arch]
        self.value: Any = None
        self._handle = model.get_submodule(self.layer).register_forward_hook(self._keep)

    def _keep(self, _module: Any, _inputs: Any, output: Any) -> None:
        self.value = output.detach().float().cpu()

    def mahalanobis(self, stats: FeatureStats, hw: tuple[int, int]) -> np.ndarray:
        """[B, H, W] float32: distance on the feature grid, resized bilinearly to the image."""
        import torch

        feats = self.value.numpy()
        d = np.stack([stats.distance(f) for f in feats])
        up = torch.nn.functional.interpolate(
            torch.from_numpy(d).float()[:, None], size=hw, mode="bilinear", align_corners=False
        )
        return up[:, 0].numpy()

    def close(self) -> None:
        self._handle.remove()


def heat_feature_stats(
    model: Any,
    data_path: str | os.PathLike[str],
    *,
    arch: str,
    num_classes: int,
    ignore_ids: Sequence[int] = (),
    batch_size: int = 4,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    device: str = "cpu",
    threads: int = 1,
    ridge: float = 1e-6,
) -> FeatureStats:
    """Class means and tied covariance of the feature layer over the labelled pixels of a data file.

    Labels go to the feature grid by nearest neighbour; pixels whose label is an ignore id or not
    a trained class (anomalies) are left out.
    """
    import torch
    from tqdm import tqdm

    torch.set_num_threads(max(1, int(threads)))
    model = model.to(device).eval()
    grab = _FeatureGrab(model, arch)
    acc: FeatureStatsAccumulator | None = None
    try:
        with SegDataReader(data_path) as data:
            n = len(data)
            for start in tqdm(range(0, n, batch_size), desc="heat stats", unit="batch", mininterval=2.0):
                images, labels = data.read(slice(start, min(n, start + batch_size)))
                with torch.no_grad():
                    _forward(model, _normalise(images, mean, std).to(device))
                feats = grab.value  # [B, D, h, w]
                lab = (
                    torch.nn.functional.interpolate(
                        torch.from_numpy(labels.astype(np.float32))[:, None],
                        size=feats.shape[-2:],
                        mode="nearest",
                    )[:, 0]
                    .numpy()
                    .astype(np.int64)
                )
                keep = (lab >= 0) & (lab < num_classes) & ~np.isin(lab, list(ignore_ids))
                if acc is None:
                    acc = FeatureStatsAccumulator(num_classes, feats.shape[1])
                f = feats.permute(0, 2, 3, 1).numpy()[keep]
                acc.update(f, lab[keep])
    finally:
        grab.close()
    if acc is None:
        raise AnomalyInputError(f"{data_path}: no images for the HEAT feature statistics")
    stats = acc.result(FEATURE_LAYER[arch], ridge)
    log.info(
        "HEAT statistics of %s: %d pixels, %d features",
        FEATURE_LAYER[arch],
        int(stats.counts.sum()),
        stats.means.shape[1],
    )
    return stats


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
