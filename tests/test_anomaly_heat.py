"""HEAT: every component against a direct computation on small tensors; chunking, resuming, fallback."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest

from vlmrel.anomaly import heat as H
from vlmrel.anomaly.evaluate import HeatConfig, evaluate_segmentation, iter_scored
from vlmrel.anomaly.io import LabelSpec, SegLogitsReader, write_seg_data

SPEC = LabelSpec(num_classes=3, anomaly_ids=(3,), ignore_ids=(255,))


def softmax(z):
    e = np.exp(z - z.max(0))
    return e / e.sum(0)


@pytest.fixture
def z():
    return np.random.default_rng(0).normal(0, 2, size=(3, 5, 6))


def test_energy_against_direct_sum(z):
    for t in (1.0, 2.5):
        direct = -t * np.log(np.exp(z / t).sum(axis=0))
        np.testing.assert_allclose(H.energy(z, t), direct, rtol=1e-12)


def test_spatial_kl_against_direct_neighbourhood_loop(z):
    p = softmax(z)
    C, h, w = z.shape
    ref = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            nb = [
                p[:, a, b]
                for a in range(i - 1, i + 2)
                for b in range(j - 1, j + 2)
                if 0 <= a < h and 0 <= b < w
            ]
            q = np.mean(nb, axis=0)
            ref[i, j] = sum(p[c, i, j] * math.log(p[c, i, j] / q[c]) for c in range(C))
    np.testing.assert_allclose(H.spatial_kl(z), ref, rtol=1e-10, atol=1e-14)
    assert H.spatial_kl(np.zeros((3, 4, 4))).max() == 0.0  # a uniform map is consistent


def test_normalised_entropy_against_direct(z):
    p = softmax(z)
    np.testing.assert_allclose(H.normalised_entropy(z), -(p * np.log(p)).sum(0) / math.log(3), rtol=1e-12)


def test_feature_statistics_and_mahalanobis_against_numpy(tmp_path):
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(600, 4)) + np.repeat(np.eye(4)[:3] * 3, 200, axis=0)
    labels = np.repeat([0, 1, 2], 200)
    perm = rng.permutation(600)
    feats, labels = feats[perm], labels[perm]
    acc = H.FeatureStatsAccumulator(3, 4)
    for lo in range(0, 600, 77):  # batches of mixed classes
        acc.update(feats[lo : lo + 77], labels[lo : lo + 77])
    stats = acc.result(ridge=0.0)
    means = np.stack([feats[labels == c].mean(0) for c in range(3)])
    centred = feats - means[labels]
    cov = centred.T @ centred / (600 - 3)
    np.testing.assert_allclose(stats.means, means, rtol=1e-12)
    np.testing.assert_allclose(stats.covariance, cov, rtol=1e-10, atol=1e-12)
    x = rng.normal(size=(4, 3, 5))  # [D, h, w]
    inv = np.linalg.inv(cov)
    ref = np.array(
        [
            [math.sqrt(min((x[:, i, j] - m) @ inv @ (x[:, i, j] - m) for m in means)) for j in range(5)]
            for i in range(3)
        ]
    )
    np.testing.assert_allclose(stats.distance(x), ref, rtol=1e-9)
    np.testing.assert_array_equal(stats.distance(x, chunk=4), stats.distance(x))  # pixel chunks
    # stored as safetensors (no pickle), and read back the same
    stats.save(tmp_path / "s.safetensors", arch="test")
    raw = (tmp_path / "s.safetensors").read_bytes()
    assert not raw.startswith(b"\x80") and b'"means"' in raw[:1000]
    back = H.FeatureStats.load(tmp_path / "s.safetensors")
    np.testing.assert_array_equal(back.distance(x), stats.distance(x))


def test_ema_normalisation_and_combination_against_direct():
    rng = np.random.default_rng(2)
    images = [rng.normal(0, 2, size=(3, 4, 5)) for _ in range(3)]
    mahas = [rng.gamma(2.0, size=(4, 5)) for _ in range(3)]
    scorer = H.HeatScorer(temperature=1.5, alpha=0.9, spatial_weight=0.5)
    got = [scorer.score(z, m) for z, m in zip(images, mahas, strict=True)]
    ema = {}
    for k, (z, m) in enumerate(zip(images, mahas, strict=True)):
        comps = {"energy": H.energy(z, 1.5), "mahalanobis": m, "spatial": H.spatial_kl(z)}
        norm = {}
        for name, x in comps.items():
            if k == 0:
                ema[name] = (x.mean(), x.std())
            else:
                mu, sd = ema[name]
                ema[name] = (0.9 * mu + 0.1 * x.mean(), 0.9 * sd + 0.1 * x.std())
            norm[name] = (x - ema[name][0]) / ema[name][1]
        h = H.normalised_entropy(z)
        ref = (1 - h) * norm["energy"] + h * norm["mahalanobis"] + 0.5 * norm["spatial"]
        np.testing.assert_allclose(got[k], ref.astype(np.float32), rtol=1e-6, atol=1e-6)
    assert scorer.state.images == 3


def test_resumed_run_equals_uninterrupted():
    rng = np.random.default_rng(3)
    images = [(rng.normal(size=(3, 6, 6)), rng.gamma(2.0, size=(6, 6))) for _ in range(5)]
    whole = H.HeatScorer()
    ref = [whole.score(z, m) for z, m in images]
    first = H.HeatScorer()
    part = [first.score(z, m) for z, m in images[:2]]
    saved = first.state.to_dict()
    resumed = H.HeatScorer(state=H.HeatState.from_dict(saved))
    part += [resumed.score(z, m) for z, m in images[2:]]
    for a, b in zip(ref, part, strict=True):
        np.testing.assert_array_equal(a, b)


def _logits_file(path, with_maha: bool, n=5, h=8, w=9):
    rng = np.random.default_rng(4)
    logits = rng.normal(0, 2, size=(n, 3, h, w)).astype(np.float16)
    labels = rng.integers(0, 3, size=(n, h, w)).astype(np.uint8)
    labels[:3, 2:5, 2:5] = 3
    labels[:, 0, :] = 255
    with h5py.File(path, "w") as f:
        f.create_dataset("logits", data=logits)
        f.create_dataset("labels", data=labels)
        if with_maha:
            f.create_dataset("mahalanobis", data=rng.gamma(2.0, size=(n, h, w)).astype(np.float32))
    return path, logits


def test_heat_does_not_depend_on_block_size(tmp_path):
    path, _ = _logits_file(tmp_path / "l.h5", True)
    runs = []
    for mb in (1e-6, 0.002, 256.0):  # one image per read ... all at once
        with SegLogitsReader(path, SPEC, max_block_mb=mb) as r:
            runs.append([it.scores["heat"] for it in iter_scored(r, ["heat"], heat=HeatConfig())])
    for other in runs[1:]:
        for a, b in zip(runs[0], other, strict=True):
            np.testing.assert_array_equal(a, b)
    # and a second pass over the file (the exact float32 refinement) sees the same scores
    ev = evaluate_segmentation(path, SPEC, ["heat", "energy"], max_block_mb=0.002)
    assert ev.heat["fallback"] is None and ev.pooled["heat"]["quantization"]["exact"]
    assert 0 <= ev.segmentation["miou"] <= 1


def test_without_features_heat_is_energy_and_says_so(tmp_path):
    path, logits = _logits_file(tmp_path / "l.h5", False)
    with SegLogitsReader(path, SPEC) as r:
        items = list(iter_scored(r, ["heat", "energy"]))
    for it in items:
        np.testing.assert_array_equal(it.scores["heat"], it.scores["energy"])
    ev = evaluate_segmentation(path, SPEC, ["heat", "energy"])
    assert ev.heat["fallback"] == "energy" and "mahalanobis" in ev.heat["reason"]
    assert ev.pooled["heat"]["auroc"] == ev.pooled["energy"]["auroc"]
    assert ev.summary()["heat"]["fallback"] == "energy"


def test_miou_against_direct_confusion(tmp_path):
    path, logits = _logits_file(tmp_path / "l.h5", False)
    ev = evaluate_segmentation(path, SPEC, ["energy"])
    with h5py.File(path) as f:
        labels = f["labels"][:]
    pred = logits.astype(np.float32).argmax(1)
    known = labels < 3
    ious = [
        ((pred == c) & (labels == c) & known).sum() / (((pred == c) & known) | (labels == c)).sum()
        for c in range(3)
    ]
    assert ev.segmentation["miou"] == pytest.approx(np.mean(ious), abs=1e-12)


@pytest.mark.parametrize("arch", ["tiny_deeplabv3", "tinyseg"])
def test_producer_writes_mahalanobis_maps_from_its_feature_layer(tmp_path, arch):
    torch = pytest.importorskip("torch")
    from vlmrel.anomaly.segnet import build_model, heat_feature_stats, produce_logits

    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, size=(3, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 3, size=(3, 32, 32)).astype(np.uint8)
    labels[0, :4] = 255
    write_seg_data(tmp_path / "data.h5", images, labels)
    model = build_model(arch, 3, seed=1).eval()
    stats = heat_feature_stats(
        model, tmp_path / "data.h5", arch=arch, num_classes=3, ignore_ids=[255], batch_size=2
    )
    assert stats.layer == H.FEATURE_LAYER[arch] and stats.counts.sum() > 0
    produce_logits(
        model,
        tmp_path / "data.h5",
        tmp_path / "l.h5",
        num_classes=3,
        batch_size=2,
        heat_stats=stats,
        arch=arch,
    )
    with h5py.File(tmp_path / "l.h5") as f:
        maha = f["mahalanobis"][:]
        assert f.attrs["heat_feature_layer"] == H.FEATURE_LAYER[arch]
    assert maha.shape == (3, 32, 32) and np.isfinite(maha).all() and (maha >= 0).all()
    # the map is the distance of the layer's features, resized bilinearly
    feats = {}
    handle = model.get_submodule(H.FEATURE_LAYER[arch]).register_forward_hook(
        lambda _m, _i, out: feats.__setitem__("f", out.detach())
    )
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        model((torch.from_numpy(images[:1]).float() / 255 - mean) / std)
    handle.remove()
    d = torch.from_numpy(stats.distance(feats["f"][0].numpy())).float()[None, None]
    ref = torch.nn.functional.interpolate(d, size=(32, 32), mode="bilinear", align_corners=False)[
        0, 0
    ].numpy()
    np.testing.assert_allclose(maha[0], ref, rtol=1e-4, atol=1e-4)
