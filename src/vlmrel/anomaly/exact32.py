"""Exact AUROC, AUPR and FPR95 of float32 scores over every pixel, in bounded memory.

float16 scores have 65,536 values, so one histogram is their sorted list (``metrics``). float32
scores have 2^32; a histogram over all of them does not fit. Two kinds of pass do instead:

1. **Coarse pass.** Every score gets an order-preserving uint32 key (``float32_keys``: ``-0.0``
   shares ``+0.0``'s key, NaN is an error). Counts ``[65536, 2]`` (normal, anomaly) are kept per
   *coarse bin*, the key's top 16 bits (sign, exponent and 7 mantissa bits).
2. **Refinement passes.** Only a bin whose inside order can change a metric is refined:

   * a *mixed* bin (anomalies and normals share it): AUROC counts its inner pairs, AP and
     FPR95 see its inner interleaving;
   * a bin of 2+ anomalies only, below some normal pixel: AP depends on which of its anomalies
     tie (``pos_v * tp_v / (tp_v + fp_v)`` over distinct values).

   A refined bin gets counts over the key's low 16 bits and the label, i.e. over every float32
   value inside it. The refinement kernel (numba, ``_exact32_kernels``) looks up each pixel's
   bin in a 65,536-entry slot table and appends its low key to a stretch of its (bin, label):

   * a *sparse* bin's two stretches (uint16, ``SPARSE_BYTES`` = 2 per pixel) hold every pixel
     of the bin; their sizes are the coarse counts, so nothing grows or is merged. After the
     pass a bin is counted in a 2 x 65,536 table (``SORT_BELOW`` pixels or more) or radix-sorted;
   * a *dense* bin has a uint16 table of its 2 x 65,536 (value, label) cells (256 KB) and two
     stretches of ``BUFFER`` low keys, added to the table whenever one is full (the increments
     of a flush stay inside the bin's 256 KB); a cell's wrap from 65,535 to 0 is logged (int64,
     at most one per 65,536 pixels) and counts 65,536 after the pass.

   Bins are sparse while every refined pixel fits ``max_refine_mb`` (fastest: one append per
   pixel, no table lookups in DRAM). Beyond it the bins that save most as tables turn dense until
   the rest fits, then bins are grouped in descending order to fit ``max_refine_mb``; each group
   costs one more pass over the data. A dense bin costs 272 KB, plus 8 bytes per 65,536 of its
   pixels, so the passes are bounded by the number of bins rather than of pixels. Pure-normal bins are
   never refined. After each pass one kernel call walks every bin of the group from its highest
   value down and checks its totals against the coarse counts (other data is an error).

From the coarse counts (``T0_b``, ``F0_b`` = anomalies/normals in bins above bin ``b``) and the
refined bins:

* AUROC = ``(sum_b 2 neg_b T0_b + sum_{refined b} [2 sum_v neg_v pos_above_v + sum_v neg_v pos_v]) / (2 P N)``
  in exact integers (the Mann-Whitney statistic, ties one half = ``roc_auc_score``);
* AUPR = ``(1/P) sum_v pos_v tp_v / (tp_v + fp_v)`` over distinct values ``v``
  (``average_precision_score``); an unrefined anomaly bin is one value or has ``fp = 0``, so it
  contributes ``pos_b (T0_b + pos_b) / (T0_b + pos_b + F0_b)``;
* FPR95 = ``fp / N`` at the first value (descending) with ``tp / P >= level``
  (``roc_curve(drop_intermediate=False)``); found in the coarse bin where TPR crosses ``level``
  and, when that bin is refined, inside it.

Memory: the coarse counts (1 MB), about ``max_refine_mb`` for the group's stretches, tables and
wrap log (planned exactly from the coarse counts, allocated by ``start_group``), 1 MB of
counts while a bin is reduced, and the temporaries of one chunk when the scores are not float32
(float32 arrays are read in place). Passes: 1 + the number of groups, i.e. 2 while the refined
pixels x 2 bytes fit ``max_refine_mb`` (400M pixels: ~0.8 GB), and at most
about 1 + ceil(refined bins x 272 KB / ``max_refine_mb``) however many pixels there are.

Compilation: the kernels compile on their first use (about 3-4 s of CPU; ``compile_kernels()``
does it up front and returns the time) and numba caches the machine code on disk (``cache=True``:
``__pycache__`` beside the module, or ``NUMBA_CACHE_DIR``; an edited source or another CPU
compiles anew), so later processes only load it (numba's import included, about 1 s).
``exact_metrics_float32`` on arrays up to ``SORT_MAX`` pixels (one image) sorts with numpy and
compiles nothing.

Usage, for data that can be read again (a file, a generator)::

    result = exact_metrics_passes(lambda: iter_chunks(), tpr_level=0.95)

or with the accumulator: ``update`` every chunk, then for ``g in range(acc.plan())``:
``acc.start_group(g)``, ``refine`` every chunk, ``acc.finish_group()``; then ``result()``.
"""

from __future__ import annotations

import math
import mmap
import time
from collections.abc import Callable, Iterable

import numpy as np

NBINS = 1 << 16
SUB = 1 << 17  # (value, label) cells per refined bin: 65536 low keys x (normal, anomaly)
SPARSE_BYTES = 2  # per pixel of a sparse bin: its low key (uint16), in a stretch per label
TABLE_BYTES = 2 * SUB  # a dense bin's table: one uint16 per cell
BUFFER = 1 << 12  # low keys a dense bin buffers per label before adding them to its table
OVF_BYTES = 8  # per logged wrap of a dense cell (int64 cell index; at most pixels / 65536)
SORT_BELOW = 1 << 11  # a sparse bin with fewer pixels is sorted, a fuller one counted in a table
LAYOUT = "auto"  # "auto": dense bins only where the budget needs them; "dense"/"sparse" (tests)
CHUNK = 1 << 20  # pixels converted to float32 at a time when the scores are another dtype
_NEG_ZERO = np.uint32(0x7FFFFFFF)
_POS_ZERO = np.uint32(0x80000000)
_NO_MASK = np.zeros(0, dtype=np.uint8)


def _fresh_uint16(n: int) -> np.ndarray:
    """An uninitialized uint16 array in pages the kernel maps up front, in 4 KB pages.

    The refinement pass writes every element once, in thousands of interleaved streams; faulting
    a large ``np.empty`` in on first touch, in transparent huge pages (which numpy asks for),
    costs more than the pass itself on some machines.
    """
    if n * 2 < 1 << 22 or not hasattr(mmap, "MAP_ANONYMOUS"):
        return np.empty(n, dtype=np.uint16)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    return np.frombuffer(mmap.mmap(-1, n * 2, flags=flags), dtype=np.uint16)


def _kernels():  # type: ignore[no-untyped-def]
    from vlmrel.anomaly import _exact32_kernels

    return _exact32_kernels


def compile_kernels() -> float:
    """Import numba and compile the kernels now (they compile on first use otherwise); seconds taken.

    The first process compiles (3-4 s of CPU) and numba's on-disk cache serves later ones (~1 s,
    mostly numba's import).
    """
    t0 = time.perf_counter()
    _kernels()
    acc = Float32Exact(max_refine_mb=1.0)
    s = np.array([2.0, 1.0, 1.0, -0.0, 0.0], np.float32)
    y = np.array([0, 1, 0, 1, 0], bool)
    acc.update(s, y)
    for g in range(acc.plan()):
        acc.start_group(g)
        acc.refine(s, y)
        acc.finish_group()
    return time.perf_counter() - t0


def _as_float32(s: np.ndarray) -> tuple[np.ndarray, bool]:
    """``s`` as contiguous float32, and whether float32 held every value exactly."""
    if not (np.issubdtype(s.dtype, np.floating) or np.issubdtype(s.dtype, np.integer)):
        raise TypeError(f"scores must be a float array, got dtype {s.dtype}")
    lossless = True
    if s.dtype != np.float32:
        with np.errstate(over="ignore", invalid="ignore"):
            s32 = s.astype(np.float32)
        if s.dtype.itemsize > 4 or np.issubdtype(s.dtype, np.integer):
            lossless = bool(np.array_equal(s32.astype(s.dtype), s, equal_nan=True))
        s = s32
    return np.ascontiguousarray(s), lossless


def float32_keys(scores: np.ndarray) -> tuple[np.ndarray, bool]:
    """Order-preserving uint32 keys of ``scores`` as float32, and whether float32 held them exactly."""
    s, lossless = _as_float32(np.asarray(scores))
    if np.isnan(s).any():
        raise ValueError(f"scores contain {int(np.isnan(s).sum())} NaN values")
    u = s.view(np.uint32)
    flip = ((u >> np.uint32(31)) * np.uint32(0x7FFFFFFF)) | _POS_ZERO
    keys = u ^ flip
    keys[keys == _NEG_ZERO] = _POS_ZERO
    return keys, lossless


def _flatten(
    scores: np.ndarray, is_anomaly: np.ndarray, valid: np.ndarray | None, apply_mask: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Flat scores and bool labels; the valid mask applied, or returned flat (``apply_mask=False``)."""
    s = np.asarray(scores).reshape(-1)
    y = np.asarray(is_anomaly).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(
            f"scores and is_anomaly differ in size: {np.shape(scores)} vs {np.shape(is_anomaly)}"
        )
    v = None
    if valid is not None:
        v = np.asarray(valid, dtype=bool).reshape(-1)
        if v.shape != s.shape:
            raise ValueError(f"valid mask has shape {np.shape(valid)}, scores {np.shape(scores)}")
        if v.all():
            v = None
        elif apply_mask:
            s, y, v = s[v], y[v], None
    return s, y.astype(bool, copy=False), v


def _chunks(scores, is_anomaly, valid):  # type: ignore[no-untyped-def]
    """(uint32 bits, uint8 labels, uint8 mask or empty, lossless) of contiguous float32 pieces."""
    s, y, v = _flatten(scores, is_anomaly, valid, apply_mask=False)
    step = s.size if s.dtype == np.float32 else CHUNK  # float32 is used in place: no copy
    for lo in range(0, s.size, max(step, 1)):
        s32, ok = _as_float32(s[lo : lo + step])
        y8 = np.ascontiguousarray(y[lo : lo + step]).view(np.uint8)
        v8 = _NO_MASK if v is None else np.ascontiguousarray(v[lo : lo + step]).view(np.uint8)
        yield s32.view(np.uint32), y8, v8, ok


class Float32Exact:
    """Exact metrics of float32 scores by a coarse pass and refinement passes (module docstring)."""

    def __init__(self, tpr_level: float = 0.95, max_refine_mb: float = 1024.0) -> None:
        self.tpr_level = float(tpr_level)
        self.max_refine_mb = float(max_refine_mb)
        self.coarse = np.zeros(2 * NBINS, dtype=np.int64)
        self.lossless = True
        self._groups: list[np.ndarray] | None = None
        self._group: int | None = None
        self._twice_within = 0
        self._ap_refined: dict[int, float] = {}
        self._fp_at_cross: int | None = None
        self._done = 0

    # ---- pass 1 ----------------------------------------------------------------------------------

    def update(self, scores: np.ndarray, is_anomaly: np.ndarray, valid: np.ndarray | None = None) -> None:
        """Count pixels in the coarse bins (NaN scores raise ``ValueError``)."""
        if self._groups is not None:
            raise RuntimeError("update() after plan(): the coarse pass is over")
        K = _kernels()
        for u, y, v, ok in _chunks(scores, is_anomaly, valid):
            self.lossless &= ok
            nan = K.coarse_pass(u, y, v, self.coarse)
            if nan:
                raise ValueError(f"scores contain {nan} NaN values")

    def __iadd__(self, other: Float32Exact) -> Float32Exact:
        if self._groups is not None or other._groups is not None:
            raise RuntimeError("only coarse passes can be merged")
        self.coarse += other.coarse
        self.lossless &= other.lossless
        return self

    # ---- planning --------------------------------------------------------------------------------

    def _desc(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        c = self.coarse.reshape(NBINS, 2)
        bins = np.flatnonzero(c.sum(axis=1))[::-1]  # occupied bins, highest scores first
        neg, pos = c[bins, 0], c[bins, 1]
        return bins, neg, pos, np.cumsum(pos) - pos, np.cumsum(neg) - neg

    def refined_bins(self) -> np.ndarray:
        """Coarse bins (descending) whose inner order matters."""
        bins, neg, pos, _t0, f0 = self._desc()
        need = ((pos > 0) & (neg > 0)) | ((pos > 1) & (f0 > 0))
        return bins[need]

    def plan(self) -> int:
        """Group the refined bins under ``max_refine_mb``; the number of refinement passes.

        A refined bin costs ``SPARSE_BYTES`` per pixel as a *sparse* bin (its pixels' low keys,
        fastest), or as a *dense* bin a uint16 table of ``SUB`` cells, buffers of ``BUFFER`` low
        keys per label and ``OVF_BYTES`` per 65,536 pixels (nearly bounded per bin). Bins are
        sparse while all of them fit ``max_refine_mb``; past that, the bins that save most as
        tables become dense until the rest fits, or every bin that saves is dense. Bins are then
        grouped in descending order while their costs fit ``max_refine_mb`` (a bin over it is a
        group alone).
        """
        if self._groups is None:
            refined = self.refined_bins()
            c = self.coarse.reshape(NBINS, 2)[refined]
            if np.any(c[:, 0].astype(np.float64) * c[:, 1] >= 2.0**62):
                raise OverflowError("a coarse bin holds more than 2^31 pixels of each class")
            n = c.sum(axis=1)
            budget = self.max_refine_mb * 2**20
            sparse_cost = SPARSE_BYTES * n
            dense_cost = TABLE_BYTES + 2 * SPARSE_BYTES * BUFFER + OVF_BYTES * (n // 65536)
            dense = np.zeros(refined.size, dtype=bool)
            if LAYOUT == "dense":
                dense[:] = True
            elif LAYOUT == "auto" and sparse_cost.sum() > budget:
                # the bins that save the most memory as tables, until the rest fits one pass
                gain = sparse_cost - dense_cost
                order = np.argsort(-gain, kind="stable")
                order = order[gain[order] > 0]
                left = sparse_cost.sum() - np.cumsum(gain[order])
                fits = left <= budget
                dense[order[: int(np.argmax(fits)) + 1 if fits.any() else order.size]] = True
            self._dense_bin = np.zeros(NBINS, dtype=bool)  # bins counted in a table
            self._dense_bin[refined] = dense
            need = np.where(dense, dense_cost, sparse_cost)
            self._groups, start, used = [], 0, 0.0
            for i, b in enumerate(need):
                if i > start and used + b > budget:
                    self._groups.append(refined[start:i])
                    start, used = i, 0.0
                used += b
            if refined.size:
                self._groups.append(refined[start:])
            self._crossing()
        return len(self._groups)

    def _crossing(self) -> None:
        """The coarse bin where TPR first reaches the level (its FPR when it is not refined)."""
        bins, neg, pos, t0, f0 = self._desc()
        P = int(pos.sum())
        self._cross_bin = None
        if P == 0 or int(neg.sum()) == 0:
            return
        i = int(np.argmax((t0 + pos) / P >= self.tpr_level))
        self._cross_bin = int(bins[i])
        self._fp_at_cross = int(f0[i])  # exact when the bin is pure anomaly (then it is not refined)

    # ---- refinement passes -----------------------------------------------------------------------

    def start_group(self, g: int) -> None:
        """Allocate group ``g``'s counts: uint16 tables and buffers (dense bins), pixel stretches (sparse)."""
        self.plan()
        assert self._groups is not None
        bins = self._groups[g]
        self._group = g
        self._slot = np.full(NBINS, -1, dtype=np.int32)
        self._slot[bins] = np.arange(bins.size, dtype=np.int32)
        dense = self._dense_bin[bins]
        n = self.coarse.reshape(NBINS, 2)[bins].sum(axis=1)
        self._dense_off = np.where(dense, (np.cumsum(dense) - 1) * SUB, -1).astype(np.int64)
        self._table = np.zeros(int(dense.sum()) * SUB, dtype=np.uint16)
        self._ovf = np.zeros(int((n[dense] // 65536).sum()), dtype=np.int64)
        self._n_ovf = 0
        n2 = self.coarse.reshape(NBINS, 2)[bins]  # (normals, anomalies) per slot
        size = np.where(dense[:, None], BUFFER, n2).reshape(-1)  # a sparse stretch holds all
        self._end = np.cumsum(size).astype(np.int64)
        self._start = self._end - size
        self._ptr = self._start.copy()
        self._buf = _fresh_uint16(int(size.sum()))
        self._refine_error = 0

    def refine(self, scores: np.ndarray, is_anomaly: np.ndarray, valid: np.ndarray | None = None) -> None:
        if self._group is None:
            return  # this accumulator has no group in this pass
        K = _kernels()
        for u, y, v, _ok in _chunks(scores, is_anomaly, valid):
            self._n_ovf, err = K.refine_pass(
                u, y, v, self._slot, self._dense_off, self._table, self._ovf, self._n_ovf,
                self._buf, self._ptr, self._start, self._end,
            )
            self._refine_error = max(self._refine_error, int(err))

    def finish_group(self) -> None:
        """Reduce the group's counts bin by bin (one numba call); check them against the coarse pass."""
        assert self._groups is not None and self._group is not None
        bins = self._groups[self._group]
        if self._refine_error == 2:
            raise ValueError("scores contain NaN values in a refinement pass")
        if self._refine_error:
            raise RuntimeError(
                "the refinement pass saw other data than the coarse pass (more pixels in a refined bin)"
            )
        bins_d, neg_d, pos_d, t0_d, f0_d = self._desc()
        index = np.full(NBINS, -1, dtype=np.int64)
        index[bins_d] = np.arange(bins_d.size)
        at = index[bins]  # position of each slot's bin in the descending arrays
        P = int(pos_d.sum())
        cross = np.flatnonzero(bins == self._cross_bin) if self._cross_bin is not None else []
        out = {k: np.zeros(bins.size, np.int64) for k in ("pos", "neg", "a", "b")}
        ap = np.zeros(bins.size, np.float64)
        fpc, err = _kernels().finish_group(
            self._table, self._dense_off, self._ovf, self._n_ovf, self._buf, self._start,
            self._ptr, t0_d[at].astype(np.int64), f0_d[at].astype(np.int64), max(P, 1),
            self.tpr_level, int(cross[0]) if len(cross) else -1, SORT_BELOW,
            out["pos"], out["neg"], out["a"], out["b"], ap,
        )
        if err:
            raise RuntimeError("the refinement pass saw other data than the coarse pass (more pixels)")
        bad = np.flatnonzero((out["pos"] != pos_d[at]) | (out["neg"] != neg_d[at]))
        if bad.size:
            k = int(bad[0])
            raise RuntimeError(
                "the refinement pass saw other data than the coarse pass (bin "
                f"{int(bins[k])}: {int(out['neg'][k])}/{int(out['pos'][k])} vs "
                f"{int(neg_d[at[k]])}/{int(pos_d[at[k]])})"
            )
        # per bin a, b <= neg_b * pos_b < 2^62 (plan); summed as Python integers
        self._twice_within += 2 * sum(int(x) for x in out["a"]) + sum(int(x) for x in out["b"])
        for k, b in enumerate(bins):
            self._ap_refined[int(b)] = float(ap[k])
        if fpc >= 0:
            self._fp_at_cross = int(fpc)
        self._group = None
        self._table = self._ovf = self._buf = np.zeros(0, dtype=np.uint8)
        self._done += 1

    # ---- result ----------------------------------------------------------------------------------

    def result(self) -> dict:
        if self._groups is None:
            self.plan()
        assert self._groups is not None
        if self._done != len(self._groups):
            raise RuntimeError("result() before every refinement pass has run")
        bins, neg, pos, t0, f0 = self._desc()
        P, N = int(pos.sum()), int(neg.sum())
        out: dict = {"n_anomaly": P, "n_normal": N, "tpr_level": self.tpr_level}
        if P == 0 or N == 0:
            # no pair to rank; with anomalies only, every precision is 1 (as average_precision_score)
            out.update(auroc=math.nan, aupr=math.nan if P == 0 else 1.0, fpr95=math.nan)
        else:
            twice = (
                2 * int(np.dot(neg, t0))
                if 2 * P * N < 2**62
                else sum(2 * int(n) * int(t) for n, t in zip(neg, t0, strict=True))
            )
            twice += self._twice_within
            ap = 0.0
            for b, n_pos, t, f in zip(bins, pos, t0, f0, strict=True):
                if n_pos == 0:
                    continue
                if int(b) in self._ap_refined:
                    ap += self._ap_refined[int(b)]
                else:
                    ap += float(n_pos) * float(t + n_pos) / float(t + n_pos + f)
            out.update(auroc=twice / (2 * P * N), aupr=ap / P, fpr95=self._fp_at_cross / N)
        out["passes"] = 1 + len(self._groups)
        out["refined_bins"] = int(sum(g.size for g in self._groups))
        out["exact"] = bool(self.lossless)
        return out


def exact_metrics_passes(
    make_chunks: Callable[[], Iterable[tuple]],
    *,
    tpr_level: float = 0.95,
    max_refine_mb: float = 1024.0,
) -> dict:
    """Exact metrics over data that ``make_chunks()`` yields afresh for every pass.

    Each item is ``(scores, is_anomaly)`` or ``(scores, is_anomaly, valid)``.
    """
    acc = Float32Exact(tpr_level, max_refine_mb)
    for item in make_chunks():
        acc.update(*item)
    for g in range(acc.plan()):
        acc.start_group(g)
        for item in make_chunks():
            acc.refine(*item)
        acc.finish_group()
    return acc.result()


SORT_MAX = 1 << 22


def exact_metrics_float32(
    scores: np.ndarray,
    is_anomaly: np.ndarray,
    valid: np.ndarray | None = None,
    *,
    tpr_level: float = 0.95,
    max_refine_mb: float = 1024.0,
    method: str = "auto",
) -> dict:
    """Exact metrics of in-memory float32 scores.

    ``method``: ``sort`` (sort the keys: memory ~ 3x the array, for small arrays such as one
    image), ``passes`` (coarse + refinement passes over the array, bounded extra memory), or
    ``auto`` (sort up to ``SORT_MAX`` elements).
    """
    s, y, _ = _flatten(scores, is_anomaly, valid)
    if method == "sort" or (method == "auto" and s.size <= SORT_MAX):
        return _sorted_metrics(s, y, tpr_level)
    if method not in ("auto", "passes"):
        raise ValueError(f"method must be auto, sort or passes, got {method!r}")
    return exact_metrics_passes(lambda: [(s, y)], tpr_level=tpr_level, max_refine_mb=max_refine_mb)


def _sorted_metrics(s: np.ndarray, y: np.ndarray, tpr_level: float) -> dict:
    keys, lossless = float32_keys(s)
    code = keys.astype(np.uint64) << np.uint64(1)
    code |= y.astype(np.uint64)
    u, c = np.unique(code, return_counts=True)
    value = u >> np.uint64(1)
    first = np.r_[True, value[1:] != value[:-1]]
    group = np.cumsum(first) - 1
    n_groups = int(group[-1]) + 1 if group.size else 0
    is_pos = (u & np.uint64(1)).astype(bool)
    pos = np.bincount(group[is_pos], weights=c[is_pos], minlength=n_groups).astype(np.int64)[::-1]
    neg = np.bincount(group[~is_pos], weights=c[~is_pos], minlength=n_groups).astype(np.int64)[::-1]
    P, N = int(pos.sum()), int(neg.sum())
    out: dict = {"n_anomaly": P, "n_normal": N, "tpr_level": float(tpr_level)}
    if P == 0 or N == 0:
        out.update(auroc=math.nan, aupr=math.nan if P == 0 else 1.0, fpr95=math.nan)
    else:
        tp, fp = np.cumsum(pos), np.cumsum(neg)
        twice = 2 * int(np.dot(neg, tp - pos)) + int(np.dot(neg, pos))
        has = pos > 0
        ap = float(np.dot(pos[has], tp[has] / (tp[has] + fp[has])))
        idx = int(np.argmax(tp / P >= tpr_level))
        out.update(auroc=twice / (2 * P * N), aupr=ap / P, fpr95=float(fp[idx] / N))
    out.update(passes=1, refined_bins=0, exact=bool(lossless))
    return out
