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
   value inside it: sorted (value, label) runs merged across chunks (a sparse bin: at most one
   entry per pixel, ``ENTRY_BYTES`` each), or a uint32 table of all 2 x 65,536 cells where the bin
   holds more pixels than that costs (a dense bin). Bins are grouped so that one group's planned
   memory fits ``max_refine_mb``; each group costs one more pass over the data. Pure-normal bins
   are never refined.

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

Memory: the coarse counts (1 MB), about ``max_refine_mb`` for the refined counts (planned per bin
from its coarse count, merge temporaries included), the temporaries of one chunk, and those of
reducing ``FINISH_ENTRIES`` counts at a time after each pass (~200 MB). It does not
grow with the number of pixels; the number of passes grows with the data's mixed bins (at most
1 + ceil(refined bins x 0.5 MB / max_refine_mb)).

Usage, for data that can be read again (a file, a generator)::

    result = exact_metrics_passes(lambda: iter_chunks(), tpr_level=0.95)

or with the accumulator: ``update`` every chunk, then for ``g in range(acc.plan())``:
``acc.start_group(g)``, ``refine`` every chunk, ``acc.finish_group()``; then ``result()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np

NBINS = 1 << 16
SUB = 1 << 17  # (value, label) cells per refined bin: 65536 low keys x (normal, anomaly)
ENTRY_BYTES = 48  # planned memory per stored (value, label) count, merge temporaries included
DENSE_BYTES = 4  # per cell of a dense bin table (uint32)
FINISH_ENTRIES = 1 << 20  # (value, label) entries reduced at once after a pass (~200 MB of temporaries)
CHUNK = 1 << 20
_NEG_ZERO = np.uint32(0x7FFFFFFF)
_POS_ZERO = np.uint32(0x80000000)


def float32_keys(scores: np.ndarray) -> tuple[np.ndarray, bool]:
    """Order-preserving uint32 keys of ``scores`` as float32, and whether float32 held them exactly."""
    s = np.asarray(scores)
    if not (np.issubdtype(s.dtype, np.floating) or np.issubdtype(s.dtype, np.integer)):
        raise TypeError(f"scores must be a float array, got dtype {s.dtype}")
    lossless = True
    if s.dtype != np.float32:
        with np.errstate(over="ignore", invalid="ignore"):
            s32 = s.astype(np.float32)
        if s.dtype.itemsize > 4 or np.issubdtype(s.dtype, np.integer):
            lossless = bool(np.array_equal(s32.astype(s.dtype), s, equal_nan=True))
        s = s32
    if np.isnan(s).any():
        raise ValueError(f"scores contain {int(np.isnan(s).sum())} NaN values")
    u = np.ascontiguousarray(s).view(np.uint32)
    flip = ((u >> np.uint32(31)) * np.uint32(0x7FFFFFFF)) | _POS_ZERO
    keys = u ^ flip
    keys[keys == _NEG_ZERO] = _POS_ZERO
    return keys, lossless


def _flatten(
    scores: np.ndarray, is_anomaly: np.ndarray, valid: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores).reshape(-1)
    y = np.asarray(is_anomaly).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(
            f"scores and is_anomaly differ in size: {np.shape(scores)} vs {np.shape(is_anomaly)}"
        )
    if valid is not None:
        v = np.asarray(valid, dtype=bool).reshape(-1)
        if v.shape != s.shape:
            raise ValueError(f"valid mask has shape {np.shape(valid)}, scores {np.shape(scores)}")
        if not v.all():
            s, y = s[v], y[v]
    return s, y.astype(bool, copy=False)


class Float32Exact:
    """Exact metrics of float32 scores by a coarse pass and refinement passes (module docstring)."""

    def __init__(self, tpr_level: float = 0.95, max_refine_mb: float = 1024.0) -> None:
        self.tpr_level = float(tpr_level)
        self.max_refine_mb = float(max_refine_mb)
        self.coarse = np.zeros(2 * NBINS, dtype=np.int64)
        self.lossless = True
        self._groups: list[np.ndarray] | None = None
        self._group: int | None = None
        self._slot: np.ndarray | None = None
        self._twice_within = 0
        self._ap_refined: dict[int, float] = {}
        self._fp_at_cross: int | None = None
        self._done = 0

    # ---- pass 1 ----------------------------------------------------------------------------------

    def update(self, scores: np.ndarray, is_anomaly: np.ndarray, valid: np.ndarray | None = None) -> None:
        if self._groups is not None:
            raise RuntimeError("update() after plan(): the coarse pass is over")
        s, y = _flatten(scores, is_anomaly, valid)
        for lo in range(0, s.size, CHUNK):
            keys, ok = float32_keys(s[lo : lo + CHUNK])
            self.lossless &= ok
            code = (keys >> np.uint32(16)).astype(np.intp)
            code <<= 1
            code |= y[lo : lo + CHUNK]
            self.coarse += np.bincount(code, minlength=2 * NBINS)

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

        A refined bin stores at most ``min(pixels in it, 2 x 65536)`` (value, label) counts; a
        group holds bins whose bound, at ``ENTRY_BYTES`` each, fits ``max_refine_mb``.
        """
        if self._groups is None:
            refined = self.refined_bins()
            c = self.coarse.reshape(NBINS, 2).sum(axis=1)
            self._dense_bin = np.zeros(NBINS, dtype=bool)  # a table of every value is cheaper
            self._dense_bin[refined] = c[refined] * ENTRY_BYTES > SUB * DENSE_BYTES
            need = np.where(self._dense_bin[refined], SUB * DENSE_BYTES, c[refined] * ENTRY_BYTES)
            budget = self.max_refine_mb * 2**20
            self._groups, start, used = [], 0, 0.0
            for i, n in enumerate(need):
                if i > start and used + n > budget:
                    self._groups.append(refined[start:i])
                    start, used = i, 0.0
                used += n
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
        self.plan()
        assert self._groups is not None
        bins = self._groups[g]
        self._group = g
        self._slot = np.full(NBINS, -1, dtype=np.int64)
        self._slot[bins] = np.arange(bins.size)
        dense = np.flatnonzero(self._dense_bin[bins])  # slots counted in a table
        self._dense_of_slot = np.full(bins.size + 1, -1, dtype=np.int64)
        self._dense_of_slot[dense] = np.arange(dense.size)
        self._table = np.zeros(dense.size * SUB, dtype=np.uint32 if self.coarse.sum() < 2**32 else np.int64)
        self._code_dtype = np.dtype(np.uint32 if bins.size * SUB <= 2**32 else np.uint64)
        self._codes = np.zeros(0, dtype=self._code_dtype)
        self._counts = np.zeros(0, dtype=np.int64)
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending = 0

    def refine(self, scores: np.ndarray, is_anomaly: np.ndarray, valid: np.ndarray | None = None) -> None:
        if self._slot is None:
            return  # this accumulator has no group in this pass
        s, y = _flatten(scores, is_anomaly, valid)
        for lo in range(0, s.size, CHUNK):
            keys, _ = float32_keys(s[lo : lo + CHUNK])
            slot = self._slot[keys >> np.uint32(16)]
            sel = slot >= 0
            if not sel.any():
                continue
            code = slot[sel].astype(self._code_dtype)
            code *= self._code_dtype.type(SUB)
            low = (keys[sel] & np.uint32(0xFFFF)).astype(self._code_dtype)
            low <<= self._code_dtype.type(1)
            code += low
            code |= y[lo : lo + CHUNK][sel]
            code.sort()
            starts = np.flatnonzero(np.r_[True, code[1:] != code[:-1]])
            u, c = code[starts], np.diff(np.r_[starts, code.size])
            if self._table.size:
                d = self._dense_of_slot[(u // self._code_dtype.type(SUB)).astype(np.int64)]
                into = d >= 0
                cell = d[into] * SUB + (u[into] % self._code_dtype.type(SUB)).astype(np.int64)
                self._table[cell] += c[into].astype(self._table.dtype)
                u, c = u[~into], c[~into]
            self._runs.append((u, c))
            self._pending += u.size
            if self._pending >= max(self._codes.size, 1 << 22):
                self._consolidate()

    def _consolidate(self) -> None:
        """Merge the pending sorted runs into the (code, count) list."""
        if not self._runs:
            return
        codes = np.concatenate([self._codes, *(r[0] for r in self._runs)])
        counts = np.concatenate([self._counts, *(r[1] for r in self._runs)])
        self._runs, self._pending = [], 0
        if not codes.size:
            self._codes, self._counts = codes, counts
            return
        order = np.argsort(codes)  # order among equal codes does not matter: their counts are summed
        codes = codes[order]
        starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
        self._counts = np.add.reduceat(counts[order], starts)
        self._codes = codes[starts]

    def finish_group(self) -> None:
        """Reduce the group's counts bin by bin, in batches of at most ``FINISH_ENTRIES`` entries."""
        assert self._groups is not None and self._group is not None and self._slot is not None
        self._consolidate()
        bins = self._groups[self._group]
        bins_d, neg_d, pos_d, t0_d, f0_d = self._desc()
        index = np.full(NBINS, -1, dtype=np.int64)
        index[bins_d] = np.arange(bins_d.size)
        at = index[bins]  # position of each slot's bin in the descending arrays
        ctx = (bins, at, neg_d, pos_d, t0_d, f0_d, int(pos_d.sum()), int(neg_d.sum()))
        dense = self._dense_of_slot[:-1]
        sparse_slot = (self._codes // self._code_dtype.type(SUB)).astype(np.int64)
        bound = np.where(dense >= 0, SUB, np.bincount(sparse_slot, minlength=bins.size))
        k0 = 0
        while k0 < bins.size:
            k1, used = k0 + 1, int(bound[k0])
            while k1 < bins.size and used + int(bound[k1]) <= FINISH_ENTRIES:
                used += int(bound[k1])
                k1 += 1
            lo, hi = np.searchsorted(sparse_slot, [k0, k1])
            codes, counts = [self._codes[lo:hi]], [self._counts[lo:hi]]
            d = dense[k0:k1]
            if (d >= 0).any():  # dense slots of the batch are consecutive in the table
                d_lo, d_hi = int(d[d >= 0].min()), int(d[d >= 0].max()) + 1
                cells = self._table[d_lo * SUB : d_hi * SUB]
                nz = np.flatnonzero(cells)
                slots = np.flatnonzero(dense >= 0)[d_lo:d_hi]
                codes.append((slots[nz // SUB] * SUB + nz % SUB).astype(self._code_dtype))
                counts.append(cells[nz].astype(np.int64))
            # a slot is either dense or sparse: every slot stays contiguous and ascending
            self._reduce(np.concatenate(codes), np.concatenate(counts), ctx, k0, k1)
            k0 = k1
        self._group = None
        self._slot = None
        self._table = np.zeros(0, dtype=np.uint32)
        self._codes = np.zeros(0, dtype=np.uint32)
        self._counts = np.zeros(0, dtype=np.int64)
        self._done += 1

    def _reduce(self, code: np.ndarray, cnt: np.ndarray, ctx: tuple, k0: int, k1: int) -> None:
        """AUROC pair term, AP per bin and the FPR95 crossing from (code, count) entries of whole slots."""
        bins, at, neg_d, pos_d, t0_d, f0_d, P, N = ctx
        # reversed, each slot runs from its highest value down; every quantity below is per slot
        code, cnt = code[::-1], cnt[::-1]
        value = code >> self._code_dtype.type(1)
        is_pos = (code & self._code_dtype.type(1)).astype(bool)
        first = np.r_[True, value[1:] != value[:-1]]
        grp = np.cumsum(first) - 1
        nv = int(grp[-1]) + 1 if grp.size else 0
        pos = np.bincount(grp[is_pos], weights=cnt[is_pos], minlength=nv).astype(np.int64)
        neg = np.bincount(grp[~is_pos], weights=cnt[~is_pos], minlength=nv).astype(np.int64)
        vslot = (value[first] // self._code_dtype.type(NBINS)).astype(np.int64)
        seg_first = np.r_[True, vslot[1:] != vslot[:-1]]
        seg = np.cumsum(seg_first) - 1
        cp, cn = np.cumsum(pos), np.cumsum(neg)
        cpos = cp - (cp - pos)[seg_first][seg]
        cneg = cn - (cn - neg)[seg_first][seg]
        # every slot saw exactly the pixels the coarse pass counted in its bin
        present = np.unique(vslot)
        if present.size != k1 - k0:
            missing = sorted(set(range(k0, k1)) - set(present.tolist()))
            raise RuntimeError(
                f"the refinement pass saw other data than the coarse pass (bin {int(bins[missing[0]])}: no pixels)"
            )
        tot_pos = np.bincount(vslot, weights=pos, minlength=bins.size).astype(np.int64)[present]
        tot_neg = np.bincount(vslot, weights=neg, minlength=bins.size).astype(np.int64)[present]
        bad = np.flatnonzero((tot_pos != pos_d[at[present]]) | (tot_neg != neg_d[at[present]]))
        if bad.size:
            k = int(present[bad[0]])
            raise RuntimeError(
                "the refinement pass saw other data than the coarse pass (bin "
                f"{int(bins[k])}: {int(tot_neg[bad[0]])}/{int(tot_pos[bad[0]])} vs "
                f"{int(neg_d[at[k]])}/{int(pos_d[at[k]])})"
            )
        above = cpos - pos
        if 2 * P * max(N, 1) < 2**62:
            self._twice_within += 2 * int(np.dot(neg, above)) + int(np.dot(neg, pos))
        else:  # beyond int64: exact Python integers
            self._twice_within += sum(
                2 * int(n) * int(a) + int(n) * int(p) for n, a, p in zip(neg, above, pos, strict=True)
            )
        tp = t0_d[at][vslot] + cpos
        fp = f0_d[at][vslot] + cneg
        has = pos > 0
        ap = np.bincount(vslot[has], weights=pos[has] * (tp[has] / (tp[has] + fp[has])), minlength=bins.size)
        for k in present:
            self._ap_refined[int(bins[k])] = float(ap[k])
        if self._cross_bin is not None:
            hit = np.flatnonzero(bins[present] == self._cross_bin)
            if hit.size:
                mine = vslot == int(present[hit[0]])
                j = int(np.argmax(tp[mine] / P >= self.tpr_level))
                self._fp_at_cross = int(fp[mine][j])

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
    s, y = _flatten(scores, is_anomaly, valid)
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
