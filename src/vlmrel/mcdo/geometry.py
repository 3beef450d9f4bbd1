"""exp0b: per-image covariance geometry of the T MC-dropout pass features (seed 002, section 5).

For one image let ``x_1 .. x_T`` in R^D be the features of its T stochastic passes (the encoder's
embedding before L2 normalisation, the "pre" space) and ``u_t = x_t / ||x_t||`` their directions
(the "post" space). All statistics are computed in float64 from features centred explicitly, never
as ``sumsq/T - mean^2`` (which cancels badly when the dropout noise is small against the mean).

In either space, with ``y_t`` the features of that space (``x_t`` pre, ``u_t`` post):

- mean ``mu = (1/T) sum_t y_t``, centred matrix ``Y`` [T, D] with rows ``y_t - mu``;
- covariance ``C = Y^T Y / (T - ddof)`` [D, D] (``ddof = 1`` by default, as ``np.cov``);
- ``trace = tr(C) / D`` (the mcdo uncertainty score);
- ``diagonality = sum_i C_ii^2 / sum_ij C_ij^2 = ||diag C||^2 / ||C||_F^2``: the share of the
  covariance energy (squared Frobenius norm) on the diagonal, in [1/D, 1]; 1 when the feature
  dimensions vary independently, small when the noise is correlated across dimensions;
- ``top_eig_share = lambda_max(C) / tr(C)``: the share of the total variance along the first
  principal axis, in [1/min(T-1, D), 1]; 1 when the passes spread along a single direction.

Neither needs C itself: ``C_ii = sum_t Y_ti^2 / (T - ddof)``, and when ``T <= D`` the Gram matrix
``G = Y Y^T / (T - ddof)`` [T, T] has the same non-zero eigenvalues as C and ``||G||_F = ||C||_F``
(``tr(C^2) = tr(G^2)``), so the work and memory per image are O(T^2 D) and O(T D); when ``T > D``
C [D, D] is the smaller matrix and is used instead.

Angular variance (direction invariant, so one value for both spaces): with the mean direction
``m = sum_t u_t / ||sum_t u_t||`` and ``theta_t`` the angle between ``u_t`` and ``m``, computed
stably as ``theta_t = 2 atan2(||u_t - m||, ||u_t + m||)`` (not ``arccos``, which loses the small
angles dropout produces),

    angular_variance = sum_t theta_t^2 / (T - ddof)        [rad^2]

the mean squared geodesic distance of the pass directions from their mean direction on the unit
sphere. For small spread it approaches the trace of the post-normalisation covariance projected on
the tangent space at ``m``.

Streaming: :class:`GeometryAccumulator` takes one pass at a time for a batch of B images
(features [B, D]) and keeps the batch's passes (float32, O(B T D) memory), then computes the
statistics in chunks of images. :class:`GeometryCollector` wraps it for a whole trial through a
per-pass hook ``on_pass(batch_start, t, features)`` so only one batch's passes are held at a time.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vlmrel.io import write_npz
from vlmrel.mcdo.reliability import reliability

#: Per-image outputs of the geometry computation, in a stable order.
GEOMETRY_KEYS = (
    "diagonality_pre",
    "diagonality_post",
    "top_eig_share_pre",
    "top_eig_share_post",
    "angular_variance",
    "trace_pre",
    "trace_post",
)

#: Working-memory budget (bytes) for the float64 chunk arrays in :func:`geometry_from_passes`.
_CHUNK_BYTES = 256 * 2**20


def _to_numpy(features: Any) -> np.ndarray:
    """A float32 numpy array from a numpy array or a torch tensor (any device/dtype), no torch import."""
    if hasattr(features, "detach"):  # torch.Tensor: bf16 has no numpy dtype, so go through float32
        features = features.detach().float().cpu().numpy()
    return np.asarray(features, dtype=np.float32)


def _cov_stats(y: np.ndarray, ddof: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """trace/D, diagonality and top-eigenvalue share for features y [c, T, D] (float64)."""
    _, t, d = y.shape
    yc = y - y.mean(axis=1, keepdims=True)
    denom = t - ddof
    diag = np.einsum("ctd,ctd->cd", yc, yc) / denom  # C_ii, [c, D]
    tr = diag.sum(axis=1)
    if t <= d:
        m = np.matmul(yc, yc.transpose(0, 2, 1)) / denom  # Gram [c, T, T]
    else:
        m = np.matmul(yc.transpose(0, 2, 1), yc) / denom  # covariance [c, D, D]
    fro2 = np.einsum("cij,cij->c", m, m)
    lam_max = np.linalg.eigvalsh(m)[:, -1]
    with np.errstate(divide="ignore", invalid="ignore"):
        diagonality = np.where(fro2 > 0, np.einsum("cd,cd->c", diag, diag) / fro2, np.nan)
        top = np.where(tr > 0, lam_max / tr, np.nan)
    return tr / d, diagonality, top


def _angular_variance(u: np.ndarray, ddof: int) -> np.ndarray:
    """Mean squared angle of unit vectors u [c, T, D] from their mean direction (float64)."""
    t = u.shape[1]
    s = u.sum(axis=1)
    norm = np.linalg.norm(s, axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        m = np.where(norm > 0, s / norm, np.nan)[:, None, :]
    theta = 2.0 * np.arctan2(np.linalg.norm(u - m, axis=2), np.linalg.norm(u + m, axis=2))
    return (theta**2).sum(axis=1) / (t - ddof)


def geometry_from_passes(passes: Any, ddof: int = 1) -> dict[str, np.ndarray]:
    """Per-image geometry from all passes at once: ``passes`` [T, B, D] (pass-major).

    Returns a dict with the arrays [B] named in :data:`GEOMETRY_KEYS` (definitions in the module
    docstring). A statistic that is undefined for an image (all passes identical) is NaN.
    """
    x = passes if isinstance(passes, np.ndarray) else _to_numpy(passes)
    if x.ndim != 3:
        raise ValueError(f"passes must be a [T, B, D] array, got shape {x.shape}")
    t, b, d = x.shape
    if t < 2 or t - ddof < 1:
        raise ValueError(f"geometry needs at least 2 passes (and T > ddof), got T={t}, ddof={ddof}")
    out = {k: np.empty(b, dtype=np.float64) for k in GEOMETRY_KEYS}
    per_image = 8 * (4 * t * d + 2 * min(t, d) ** 2)
    chunk = max(1, _CHUNK_BYTES // max(per_image, 1))
    for s in range(0, b, chunk):
        e = min(b, s + chunk)
        xb = np.asarray(x[:, s:e, :], dtype=np.float64).transpose(1, 0, 2)  # [c, T, D]
        if not np.all(np.isfinite(xb)):
            bad = sorted({s + int(i) for i in np.nonzero(~np.isfinite(xb).all(axis=(1, 2)))[0]})
            raise ValueError(f"pass features of batch images {bad[:10]} contain NaN or infinite values")
        norms = np.linalg.norm(xb, axis=2, keepdims=True)
        if np.any(norms == 0):
            bad = sorted({s + int(i) for i in np.nonzero((norms == 0).any(axis=(1, 2)))[0]})
            raise ValueError(f"a pass feature of batch images {bad[:10]} is the zero vector (no direction)")
        u = xb / norms
        out["trace_pre"][s:e], out["diagonality_pre"][s:e], out["top_eig_share_pre"][s:e] = _cov_stats(
            xb, ddof
        )
        out["trace_post"][s:e], out["diagonality_post"][s:e], out["top_eig_share_post"][s:e] = _cov_stats(
            u, ddof
        )
        out["angular_variance"][s:e] = _angular_variance(u, ddof)
    return out


class GeometryAccumulator:
    """Streaming geometry for one batch of B images, fed one pass (features [B, D]) at a time.

    Keeps the passes as float32 [n_passes, B, D] (O(B T D) memory); :meth:`result` computes the
    statistics of :func:`geometry_from_passes` on the first ``n`` passes (nested T for free).
    """

    def __init__(self, n_images: int, dim: int, n_passes: int, ddof: int = 1) -> None:
        if n_images < 1 or dim < 1 or n_passes < 2:
            raise ValueError(
                f"need n_images >= 1, dim >= 1, n_passes >= 2 (got {n_images}, {dim}, {n_passes})"
            )
        self.n_images, self.dim, self.n_passes, self.ddof = n_images, dim, n_passes, ddof
        self._buf = np.empty((n_passes, n_images, dim), dtype=np.float32)
        self.count = 0

    def update(self, features: Any) -> None:
        """Add one pass: features [B, D] (numpy array or torch tensor) in the batch's image order."""
        f = _to_numpy(features)
        if f.shape != (self.n_images, self.dim):
            raise ValueError(f"pass features have shape {f.shape}, expected {(self.n_images, self.dim)}")
        if self.count >= self.n_passes:
            raise ValueError(f"accumulator already holds its {self.n_passes} passes")
        self._buf[self.count] = f
        self.count += 1

    @property
    def full(self) -> bool:
        return self.count == self.n_passes

    def result(self, n: int | None = None) -> dict[str, np.ndarray]:
        """Geometry of the first ``n`` passes (default: all received so far)."""
        n = self.count if n is None else n
        if not 2 <= n <= self.count:
            raise ValueError(f"asked for the geometry of {n} passes, {self.count} received (need >= 2)")
        return geometry_from_passes(self._buf[:n], ddof=self.ddof)


class GeometryCollector:
    """Geometry for a whole trial of N images, fed by ``mcdo.run_trial``'s per-pass hook.

    ``on_pass(batch_start, t, features)`` receives, for the batch of images
    ``[batch_start, batch_start + B)`` of the trial, pass ``t`` (0-based) as features [B, D]
    before normalisation. Passes ``t >= n_passes`` are ignored. A batch's statistics are computed as
    soon as its ``n_passes`` passes have arrived and its passes are dropped, so with batches in the
    outer loop and passes in the inner one only one batch is held (O(B T D) memory).
    """

    def __init__(self, n_images: int, n_passes: int, ddof: int = 1) -> None:
        self.n_images, self.n_passes, self.ddof = n_images, n_passes, ddof
        self._out = {k: np.full(n_images, np.nan) for k in GEOMETRY_KEYS}
        self._done = np.zeros(n_images, dtype=bool)
        self._open: dict[int, GeometryAccumulator] = {}

    def on_pass(self, batch_start: int, t: int, features: Any) -> None:
        if t >= self.n_passes:
            return
        f = _to_numpy(features)
        b = f.shape[0]
        if f.ndim != 2 or not 0 <= batch_start <= self.n_images - b:
            raise ValueError(
                f"batch at {batch_start} with features {f.shape} does not fit {self.n_images} images"
            )
        acc = self._open.get(batch_start)
        if acc is None:
            if t != 0:
                raise ValueError(f"batch at {batch_start}: pass {t} arrived before pass 0")
            acc = self._open[batch_start] = GeometryAccumulator(b, f.shape[1], self.n_passes, self.ddof)
        elif t != acc.count:
            raise ValueError(f"batch at {batch_start}: pass {t} arrived, expected pass {acc.count}")
        acc.update(f)
        if acc.full:
            stats = acc.result()
            for k in GEOMETRY_KEYS:
                self._out[k][batch_start : batch_start + b] = stats[k]
            self._done[batch_start : batch_start + b] = True
            del self._open[batch_start]

    def result(self) -> dict[str, np.ndarray]:
        """Per-image arrays [N] for every key of :data:`GEOMETRY_KEYS`; error if an image is missing."""
        if self._open or not self._done.all():
            missing = np.nonzero(~self._done)[0]
            raise ValueError(
                f"geometry incomplete: {missing.size} of {self.n_images} images lack {self.n_passes} passes "
                f"(first: {missing[:5].tolist()})"
            )
        return {k: v.copy() for k, v in self._out.items()}


# --------------------------------------------------------------------------- trial files


def save_geometry(
    path: str | os.PathLike[str], stats: Mapping[str, np.ndarray], image_id: Sequence[str], meta: Mapping
) -> None:
    """Write one trial's geometry as ``.npz`` (keys of GEOMETRY_KEYS, ``image_id``, JSON ``meta``)."""
    n = len(image_id)
    arrays = {}
    for k in GEOMETRY_KEYS:
        a = np.asarray(stats[k], dtype=np.float64)
        if a.shape != (n,):
            raise ValueError(f"{path}: geometry '{k}' has shape {a.shape}, expected ({n},)")
        arrays[k] = a
    write_npz(path, {"image_id": np.asarray(list(image_id), dtype=str), **arrays}, meta)


def load_geometry(
    paths: Sequence[str | os.PathLike[str]],
) -> tuple[list[str], dict[str, np.ndarray], list[dict]]:
    """Stack K geometry trial files: (image ids, {key: [K, N]}, metas); they must share image ids."""
    if not paths:
        raise ValueError("no geometry files given")
    ids: list[str] | None = None
    stacks: dict[str, list[np.ndarray]] = {k: [] for k in GEOMETRY_KEYS}
    metas = []
    for path in paths:
        try:
            with np.load(path, allow_pickle=False) as z:
                ids_i = [str(v) for v in z["image_id"]]
                for k in GEOMETRY_KEYS:
                    stacks[k].append(np.asarray(z[k], dtype=np.float64))
                metas.append(json.loads(str(z["meta"])))
        except (OSError, KeyError, ValueError) as exc:
            raise ValueError(f"{path}: not a valid geometry file ({exc})") from exc
        if ids is None:
            ids = ids_i
        elif ids_i != ids:
            raise ValueError(f"{path}: image ids differ from {paths[0]}")
    assert ids is not None
    return ids, {k: np.stack(v) for k, v in stacks.items()}, metas


# --------------------------------------------------------------------------- exp0b summary


def _describe(values: np.ndarray) -> dict[str, float]:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return {"n": 0}
    q = np.quantile(v, [0.05, 0.25, 0.5, 0.75, 0.95])
    return {
        "n": int(v.size),
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if v.size > 1 else math.nan,
        "min": float(v.min()),
        "q05": float(q[0]),
        "q25": float(q[1]),
        "median": float(q[2]),
        "q75": float(q[3]),
        "q95": float(q[4]),
        "max": float(v.max()),
    }


def geometry_summary(stacks: Mapping[str, np.ndarray], keys: Sequence[str] = GEOMETRY_KEYS) -> dict:
    """exp0b summary across K trials from ``{key: [K, N]}`` (as :func:`load_geometry` returns).

    Per key: the distribution across images of the per-image trial mean (``across_images``), the
    mean across images of the within-image standard deviation across trials
    (``within_image_std``), and the reliability of the key as a per-image score across trials
    (ICC, SNR, Spearman, status; on the images where it is finite in every trial).
    """
    out: dict[str, Any] = {}
    for k in keys:
        arr = np.asarray(stacks[k], dtype=np.float64)
        if arr.ndim != 2:
            raise ValueError(f"geometry '{k}' must be [K trials, N images], got shape {arr.shape}")
        finite = np.isfinite(arr).all(axis=0)
        entry: dict[str, Any] = {
            "n_trials": arr.shape[0],
            "n_images": arr.shape[1],
            "n_nonfinite_images": int((~finite).sum()),
            "across_images": _describe(arr.mean(axis=0)),
        }
        good = arr[:, finite]
        entry["within_image_std"] = (
            float(np.mean(good.std(axis=0, ddof=1))) if good.shape[0] > 1 and good.shape[1] else math.nan
        )
        entry["reliability"] = reliability(good) if good.shape[1] >= 2 else None
        out[k] = entry
    return out
