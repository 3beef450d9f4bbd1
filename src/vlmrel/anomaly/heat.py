"""HEAT: hybrid energy-adaptive thresholding (seed 003, Day 7 and Day 9), defined exactly.

For one image with logits ``z`` [C, H, W], ``p = softmax(z)`` over classes, and (when the producer
model has features) the per-pixel Mahalanobis distance ``d_M`` [H, W]:

1. **Energy** ``E = -T * logsumexp(z / T)`` (temperature ``T`` = ``anomaly.temperature``).
2. **Mahalanobis distance** of the backbone features ``f`` [D] at the pixel
   (``FEATURE_LAYER``: layer3 for DeepLabV3-ResNet50)::

       d_M(f) = sqrt( min_c (f - mu_c)^T Sigma^-1 (f - mu_c) )

   ``mu_c``: mean feature of class ``c``; ``Sigma``: the tied (pooled within-class) covariance,
   both over the labelled pixels of the statistics split (``FeatureStats``, stored as
   safetensors). Labels are taken to the feature grid by nearest neighbour; ``d_M`` is computed
   on the feature grid and resized bilinearly to the image (``segnet.heat_feature_stats`` /
   ``produce_logits``).
3. **Spatial consistency** ``S = KL(p || q) = sum_c p_c (log p_c - log q_c)`` with ``q`` the mean of
   ``p`` over the pixel's 3x3 neighbourhood (the pixel included; at the border only the
   neighbours inside the image).
4. **Adaptive normalisation.** Each component ``X`` in (E, d_M, S) is standardised with an
   exponential moving average of its per-image mean and standard deviation, taken over the
   images in file order::

       m_X <- alpha * m_X + (1 - alpha) * mean_image(X)     (alpha = 0.9; the first image sets m_X)
       s_X <- alpha * s_X + (1 - alpha) * std_image(X)
       X^ = (X - m_X) / s_X                                  (after the update with this image)

   The statistics use every pixel of the image, not its labels. The state (``HeatState``) is
   three (mean, std) pairs: deterministic, and a run resumed from a saved state equals an
   uninterrupted one.
5. **Reliability weighting by entropy.** ``h = H(p) / log C`` in [0, 1]. Where the classifier is
   confident (``h`` small) the logit evidence is trusted; where it hesitates, the feature distance::

       HEAT = (1 - h) * E^ + h * d_M^ + lambda * S^           (lambda = anomaly.heat.spatial_weight)

Higher = more anomalous, as every score in ``scores``.

**Fallback.** Without features (source=logits, or a logits file without ``mahalanobis``) HEAT is
the energy score ``E`` itself (seed 003: "energy fallback" for models without a ResNet
backbone), and ``metrics.json`` records ``heat.fallback = "energy"`` with the reason.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

FEATURE_LAYER = {
    "deeplabv3_resnet50": "backbone.layer3",
    "tiny_deeplabv3": "backbone.layer2",
    "tinyseg": "enc3",
}
COMPONENTS = ("energy", "mahalanobis", "spatial")


# ---- the components ----------------------------------------------------------------------------


def energy(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """``-T logsumexp(z / T)`` over axis 0, in float64."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    m = z.max(axis=0)
    return -temperature * (m + np.log(np.exp(z - m).sum(axis=0)))


def _box3(x: np.ndarray) -> np.ndarray:
    """Sum over the 3x3 neighbourhood of the last two axes (zeros outside)."""
    p = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)])
    h, w = x.shape[-2:]
    out = np.zeros_like(x)
    for dy in range(3):
        for dx in range(3):
            out += p[..., dy : dy + h, dx : dx + w]
    return out


def spatial_kl(logits: np.ndarray) -> np.ndarray:
    """``KL(p || q)`` per pixel, ``q`` = mean of ``p`` over the 3x3 neighbourhood inside the image."""
    z = np.asarray(logits, dtype=np.float64)
    logp = z - z.max(axis=0)
    logp -= np.log(np.exp(logp).sum(axis=0))
    p = np.exp(logp)
    count = _box3(np.ones((1, *z.shape[1:])))
    q = _box3(p) / count
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (logp - np.log(q)), 0.0)
    return np.maximum(terms.sum(axis=0), 0.0)


def normalised_entropy(logits: np.ndarray) -> np.ndarray:
    """``H(p) / log C`` per pixel, in [0, 1]."""
    z = np.asarray(logits, dtype=np.float64)
    logp = z - z.max(axis=0)
    logp -= np.log(np.exp(logp).sum(axis=0))
    p = np.exp(logp)
    h = -(p * logp).sum(axis=0) / math.log(z.shape[0])
    return np.clip(h, 0.0, 1.0)


@dataclass
class FeatureStats:
    """Class means [C, D] and the tied covariance [D, D] of backbone features (float64)."""

    means: np.ndarray
    covariance: np.ndarray
    counts: np.ndarray
    layer: str = ""
    ridge: float = 1e-6
    _chol: np.ndarray | None = field(default=None, repr=False)

    def whitener(self) -> np.ndarray:
        """``L`` with ``L L^T = Sigma^-1`` (Sigma regularised by ``ridge`` x mean variance)."""
        if self._chol is None:
            d = self.covariance.shape[0]
            reg = self.covariance + self.ridge * max(float(np.trace(self.covariance)) / d, 1e-12) * np.eye(d)
            self._chol = np.linalg.cholesky(np.linalg.inv(reg))
        return self._chol

    def distance(self, feats: np.ndarray, chunk: int = 65536) -> np.ndarray:
        """Mahalanobis distance to the nearest class mean of ``feats`` [D, ...] (pixel chunks)."""
        f = np.asarray(feats, dtype=np.float64)
        d = f.shape[0]
        if d != self.means.shape[1]:
            raise ValueError(f"features have {d} channels, the statistics {self.means.shape[1]}")
        flat = f.reshape(d, -1)
        L = self.whitener()
        mw = self.means[self.counts > 0] @ L  # [C seen, D]; a class never seen attracts nothing
        out = np.empty(flat.shape[1])
        for lo in range(0, flat.shape[1], chunk):
            g = flat[:, lo : lo + chunk].T @ L  # [n, D]
            d2 = (g * g).sum(1)[:, None] - 2 * g @ mw.T + (mw * mw).sum(1)[None, :]
            out[lo : lo + chunk] = np.sqrt(np.maximum(d2.min(axis=1), 0.0))
        return out.reshape(f.shape[1:])

    def save(self, path: str | os.PathLike[str], **meta: str) -> None:
        from safetensors.numpy import save_file

        from vlmrel.io import atomic_path

        tensors = {
            "means": np.ascontiguousarray(self.means),
            "covariance": np.ascontiguousarray(self.covariance),
            "counts": np.ascontiguousarray(self.counts),
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"layer": self.layer, "ridge": repr(self.ridge), **meta})

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FeatureStats:
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="numpy") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        return cls(
            t["means"], t["covariance"], t["counts"], meta.get("layer", ""), float(meta.get("ridge", 1e-6))
        )


class FeatureStatsAccumulator:
    """Per-class means and the pooled within-class scatter, merged stably batch by batch (Chan et al.)."""

    def __init__(self, num_classes: int, dim: int) -> None:
        self.C, self.D = int(num_classes), int(dim)
        self.n = np.zeros(self.C, dtype=np.int64)
        self.mean = np.zeros((self.C, self.D))
        self.scatter = np.zeros((self.D, self.D))

    def update(self, feats: np.ndarray, labels: np.ndarray) -> None:
        """``feats`` [n, D], ``labels`` [n] in 0..C-1 (other pixels already removed)."""
        f = np.asarray(feats, dtype=np.float64)
        lab = np.asarray(labels)
        for c in np.unique(lab):
            x = f[lab == c]
            nb = x.shape[0]
            mb = x.mean(axis=0)
            xc = x - mb
            na = int(self.n[c])
            n = na + nb
            delta = mb - self.mean[c]
            self.scatter += xc.T @ xc + np.outer(delta, delta) * (na * nb / n)
            self.mean[c] += delta * (nb / n)
            self.n[c] = n

    def result(self, layer: str = "", ridge: float = 1e-6) -> FeatureStats:
        seen = self.n > 0
        if seen.sum() == 0 or int(self.n.sum()) <= int(seen.sum()):
            raise ValueError("feature statistics need more labelled pixels than classes")
        cov = self.scatter / (int(self.n.sum()) - int(seen.sum()))
        return FeatureStats(self.mean.copy(), cov, self.n.copy(), layer, ridge)


# ---- adaptive normalisation and the combination --------------------------------------------------


@dataclass
class HeatState:
    """EMA (mean, std) per component; ``None`` before the first image."""

    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)
    images: int = 0

    def to_dict(self) -> dict:
        return {"mean": dict(self.mean), "std": dict(self.std), "images": self.images}

    @classmethod
    def from_dict(cls, d: dict) -> HeatState:
        return cls(dict(d["mean"]), dict(d["std"]), int(d["images"]))


class HeatScorer:
    """HEAT scores image by image, in file order (the EMA state carries across images)."""

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        alpha: float = 0.9,
        spatial_weight: float = 0.5,
        state: HeatState | None = None,
    ) -> None:
        if not 0 <= alpha < 1:
            raise ValueError(f"HEAT alpha must lie in [0, 1), got {alpha}")
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.spatial_weight = float(spatial_weight)
        self.state = state or HeatState()

    def _normalise(self, name: str, x: np.ndarray) -> np.ndarray:
        m, s = float(x.mean()), float(x.std())
        st = self.state
        if name not in st.mean:
            st.mean[name], st.std[name] = m, s
        else:
            st.mean[name] = self.alpha * st.mean[name] + (1 - self.alpha) * m
            st.std[name] = self.alpha * st.std[name] + (1 - self.alpha) * s
        return (x - st.mean[name]) / max(st.std[name], 1e-12)

    def components(self, logits: np.ndarray, mahalanobis: np.ndarray | None) -> dict[str, np.ndarray]:
        out = {"energy": energy(logits, self.temperature)}
        if mahalanobis is not None:
            out["mahalanobis"] = np.asarray(mahalanobis, dtype=np.float64)
            out["spatial"] = spatial_kl(logits)
            out["entropy"] = normalised_entropy(logits)
        return out

    def score(self, logits: np.ndarray, mahalanobis: np.ndarray | None) -> np.ndarray:
        """HEAT [H, W] (float32) of one image; energy when ``mahalanobis`` is None (fallback)."""
        if mahalanobis is None:  # the energy score exactly as the `energy` method computes it
            from vlmrel.anomaly.scores import compute_scores

            e = compute_scores(logits, ["energy"], axis=0, temperature=self.temperature)["energy"]
            return e.astype(np.float32, copy=False)
        c = self.components(logits, mahalanobis)
        if c["mahalanobis"].shape != c["energy"].shape:
            raise ValueError(
                f"Mahalanobis map {c['mahalanobis'].shape} does not match the logits {logits.shape}"
            )
        z = {k: self._normalise(k, c[k]) for k in COMPONENTS}
        self.state.images += 1
        h = c["entropy"]
        heat = (1 - h) * z["energy"] + h * z["mahalanobis"] + self.spatial_weight * z["spatial"]
        return heat.astype(np.float32)
