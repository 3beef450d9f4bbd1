"""IoU thresholds chosen by mutual information (notebook 02's objective), found exactly.

The objective
-------------
Given paired observations ``(iou_i, s_i)`` (failures removed) and ``k`` sorted thresholds
``t_1 < ... < t_k`` in (0, 1):

* the IoU class is ``C_t(iou) = #{j : iou >= t_j}`` (notebook 02's ``iou_to_class``), so ``k``
  thresholds give ``k + 1`` classes ``0 .. k``;
* the signal is binned into ``n_bins`` bins, ``S``. ``binning="width"`` (default, as the seed):
  equal-width bins over ``[min(s), max(s)]``, bin ``b = min(floor((s - min) / (max - min) * n_bins),
  n_bins - 1)``; a constant signal puts everything in bin 0. ``binning="quantile"``: edges at the
  ``b / n_bins`` quantiles, ``b = searchsorted(inner_edges, s, side="right")`` (ties may empty bins).
  ``binning="seed"``: notebook 02's ``np.digitize(s, linspace(min, max, n_bins))`` exactly, labels
  ``0 .. n_bins`` (``n_bins + 1`` bins: label 0 is always empty, ``n_bins - 1`` equal-width bins of
  width ``(max - min) / (n_bins - 1)``, and the maximum alone in the last, label ``n_bins``; a
  constant signal is all label ``n_bins``). Use it to match the seed's MI values;
  :func:`n_bin_labels` gives the number of labels of a rule.
* ``MI = sum_{c,s} p(c,s) log(p(c,s) / (p(c) p(s)))`` in **nats** (natural log, like
  ``sklearn.metrics.mutual_info_score``), with empirical probabilities.

Why it can be solved exactly
----------------------------
``MI`` only depends on which IoU values fall in which class, so it is piecewise constant in
``t`` and only changes when a threshold crosses an observed IoU value. With the distinct sorted
IoU values ``u_1 < ... < u_m`` the candidate cut points are the midpoints ``(u_i + u_{i+1}) / 2``
(``m - 1`` of them, all inside (0, 1)). Writing ``c`` for the bin-count vector of one class and
``n_b`` for the bin totals, ``n * MI = sum_classes [sum_b c_b log c_b - |c| log |c|] + n H(S)``, and
``H(S)`` does not depend on ``t``: the objective is a sum over classes of a function of the class's
own count vector. A dynamic programme over (number of classes, last distinct value) with cumulative
count tables ``N[i, b]`` (``[m + 1, n_bins]``) therefore finds the global optimum over all
``C(m - 1, k)`` choices in ``O(k m^2 n_bins)`` (used up to ``n_cells = 256`` blocks).

Exact speed-up: adjacent groups of distinct values whose bin-count vectors are proportional are
merged before the DP. ``phi(c) = |c| H(c / |c|)`` is concave, so moving a cut that separates two
proportional blocks towards either end never increases ``sum phi`` (a concave function of the
cut's position along the common direction reaches its minimum at an end); an optimal partition
without that cut exists. The tests check the result against brute force over all k-subsets.

Branch and bound (``m`` above ``n_cells`` blocks): the plain DP is quadratic in ``m`` (8,000
distinct IoUs take seconds), so :func:`solve_partition` searches over *cells* of consecutive cut
positions instead and refines only where the optimum can be. With ``phi(segment) = n H(S)`` of the
segment (``n * MI = n H(S) - sum phi``): ``phi`` never decreases when a segment grows, and it is
superadditive (``phi(X u Y) >= phi(X) + phi(Y)``, concavity of ``H``). If cut ``s`` lies somewhere in
cell ``A_s = [lo_s, hi_s]``, the segment between cuts ``s`` and ``s + 1`` contains the *core*
``[hi_s, lo_(s+1))`` whatever the exact positions, and the *free* blocks ``[lo_s, hi_s)`` of each
cell are split between its two segments. Adding a part ``P`` to a segment ``Y`` raises ``phi`` by
at least ``phi(P)``, and (``x log x`` is convex) by at least the increase computed with ``|Y|`` as
small and each bin count of ``Y`` as large as the neighbouring cells still paired with ``A_s``
allow. The least of these costs over the cut position in the cell, ``kappa(A_s)``, gives
``sum phi >= sum_s phi(core_s) + sum_s kappa(A_s)``: a sum over consecutive pairs of cells, which a
forward and a backward pass maximise for every pair at once (two cuts in one cell count that
cell's blocks as 0). Pairs whose best bound is below the best exact value found so far (the DP
inside the best-bounded cells) cannot hold the optimum and are dropped; the others are halved,
until every cell is one position, where the bound is the objective itself. The result equals
the plain DP's (tested on random tables with ties, few and many bins). The work grows with the
number of near-optimal configurations: on 9,900 distinct IoUs against a weak signal (perturbation
magnitude, MI 0.07 nats) ``k = 3`` takes 0.06 s, ``k = 4`` 1 s and ``k = 6`` 11 s.

The seed's method (L-BFGS-B from 10 random starts on a piecewise-constant function whose gradient
is zero almost everywhere) is reproduced in :func:`lbfgsb_thresholds` for comparison; the baseline
is ``[0.3, 0.5, 0.7]``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BASELINE_THRESHOLDS: tuple[float, ...] = (0.3, 0.5, 0.7)
BINNINGS = ("width", "quantile", "seed")


def iou_to_class(iou: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Class ``#{j : iou >= t_j}`` for each IoU (``k`` thresholds give classes ``0 .. k``); NaN gives -1."""
    iou = np.asarray(iou, dtype=float)
    t = np.sort(np.asarray(thresholds, dtype=float))
    classes = np.searchsorted(t, iou, side="right").astype(int)
    classes[np.isnan(iou)] = -1
    return classes


def n_bin_labels(n_bins: int, binning: str = "width") -> int:
    """How many bin labels :func:`bin_signal` can give: ``n_bins``, or ``n_bins + 1`` for ``seed``."""
    if binning not in BINNINGS:
        raise ValueError(f"unknown binning {binning!r}; choose one of {BINNINGS}")
    return n_bins + 1 if binning == "seed" else n_bins


def bin_signal(signal: np.ndarray, n_bins: int = 20, binning: str = "width") -> np.ndarray:
    """Bin a finite 1-D signal into labels ``0 .. n_bin_labels(n_bins, binning) - 1`` (module docstring)."""
    s = np.asarray(signal, dtype=float).ravel()
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if not np.all(np.isfinite(s)):
        raise ValueError("bin_signal: the signal has NaN/inf values; drop them first")
    if s.size == 0:
        return np.zeros(0, dtype=int)
    if binning == "width":
        lo, hi = float(s.min()), float(s.max())
        if hi <= lo:
            return np.zeros(s.size, dtype=int)
        b = np.floor((s - lo) / (hi - lo) * n_bins).astype(int)
        return np.clip(b, 0, n_bins - 1)
    if binning == "quantile":
        inner = np.quantile(s, np.arange(1, n_bins) / n_bins)
        return np.searchsorted(inner, s, side="right").astype(int)
    if binning == "seed":
        return np.digitize(s, np.linspace(s.min(), s.max(), n_bins)).astype(int)
    raise ValueError(f"unknown binning {binning!r}; choose one of {BINNINGS}")


def _clean(iou: np.ndarray, signal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    iou = np.asarray(iou, dtype=float).ravel()
    signal = np.asarray(signal, dtype=float).ravel()
    if iou.shape != signal.shape:
        raise ValueError(f"iou and signal differ in size: {iou.size} vs {signal.size}")
    keep = np.isfinite(iou) & np.isfinite(signal)
    return iou[keep], signal[keep]


def _mi_from_labels(classes: np.ndarray, bins: np.ndarray) -> float:
    """Empirical MI (nats) between two integer label arrays."""
    n = classes.size
    if n == 0:
        return 0.0
    _, ci = np.unique(classes, return_inverse=True)
    _, bi = np.unique(bins, return_inverse=True)
    table = np.zeros((ci.max() + 1, bi.max() + 1))
    np.add.at(table, (ci, bi), 1.0)
    pc = table.sum(1, keepdims=True)
    pb = table.sum(0, keepdims=True)
    nz = table > 0
    return float(max(0.0, (table[nz] / n * np.log(table[nz] * n / (pc @ pb)[nz])).sum()))


def mutual_information(
    iou: np.ndarray, signal: np.ndarray, thresholds: Sequence[float], n_bins: int = 20, binning: str = "width"
) -> float:
    """``I(C_t(IoU); S)`` in nats; pairs where either value is NaN are left out."""
    iou, signal = _clean(iou, signal)
    return _mi_from_labels(iou_to_class(iou, thresholds), bin_signal(signal, n_bins, binning))


# ----------------------------------------------------------------------------------------- exact


@dataclass
class _Groups:
    values: np.ndarray  # distinct sorted IoU values, [m]
    counts: np.ndarray  # bin-count vector of each group, [m, B]


def _groups(iou: np.ndarray, bins: np.ndarray, n_bins: int) -> _Groups:
    values, inverse = np.unique(iou, return_inverse=True)
    counts = np.zeros((values.size, n_bins), dtype=np.int64)
    np.add.at(counts, (inverse, bins), 1)
    return _Groups(values, counts)


def _merge_proportional(counts: np.ndarray) -> np.ndarray:
    """Start indices of blocks of consecutive groups with proportional count vectors (exactly)."""
    m = counts.shape[0]
    if m <= 1:
        return np.zeros(min(m, 1), dtype=int)
    a, b = counts[:-1], counts[1:]
    # proportional iff a * |b| == b * |a| elementwise (integers: exact)
    same = np.all(a * b.sum(1, keepdims=True) == b * a.sum(1, keepdims=True), axis=1)
    return np.concatenate([[0], np.flatnonzero(~same) + 1])


def _xlogx_table(n: int) -> np.ndarray:
    x = np.arange(n + 1, dtype=float)
    out = np.zeros(n + 1)
    out[1:] = x[1:] * np.log(x[1:])
    return out


def _pad_thresholds(cuts: list[float], values: np.ndarray, k: int) -> np.ndarray:
    """Fill up to ``k`` thresholds with ones that leave the partition unchanged (empty classes).

    Extra thresholds go above every value, else below every value, else into a gap between two
    distinct values that already holds a cut (two thresholds in one gap make an empty class).
    Without any cut (all groups proportional, so MI is 0 for every partition) any gap will do.
    """
    cuts = sorted(cuts)
    if len(cuts) >= k:
        return np.asarray(cuts[:k], dtype=float)
    lo, hi = float(values.min()), float(values.max())
    need = k - len(cuts)
    if hi < 1.0:
        extra = list(np.linspace(hi, 1.0, need + 2)[1:-1])
    elif lo > 0.0:
        extra = list(np.linspace(0.0, lo, need + 2)[1:-1])
    else:
        gap_of = np.searchsorted(values, cuts) - 1 if cuts else np.array([int(np.argmax(np.diff(values)))])
        g = int(gap_of[0])
        inner = np.linspace(values[g], values[g + 1], need + 3)[1:-1]
        extra = [float(e) for e in inner if e not in cuts][:need]
    return np.sort(np.asarray(cuts + extra, dtype=float))


_SPAN_GROUPS = 16  # groups of partner cells per cell for the free-block bound
_NARROW = 8  # cell width (positions) from which partners are grouped
_CHUNK = 1 << 15  # pairs evaluated at once (keeps the working set in cache)


class _CountTable:
    """Cumulative bin counts of ``m`` blocks (``counts``, ``[m, B]``) and ``phi`` of any block range.

    Bins empty in every block are left out: they add ``0 log 0 = 0`` to every ``phi``."""

    def __init__(self, counts: np.ndarray) -> None:
        counts = np.asarray(counts, dtype=np.int64)
        counts = counts[:, counts.sum(0) > 0]
        cum = np.zeros((counts.shape[0] + 1, counts.shape[1]), dtype=np.int64)
        np.cumsum(counts, axis=0, out=cum[1:])
        self.m = counts.shape[0]
        self.cum_t = np.ascontiguousarray(cum.T)  # [B, m + 1]: one gather per bin
        self.tot = cum.sum(1)
        self.xlx = _xlogx_table(int(self.tot[-1]))

    def phi(self, a, b) -> np.ndarray:
        """``phi = |c| H(c / |c|)`` (nats x count) of the blocks ``[a, b)``, elementwise; 0 if empty."""
        a, b = np.broadcast_arrays(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))
        b = np.maximum(a, b)
        return self.mixed(a, b, a, b)

    def mixed(self, n0, n1, c0, c1) -> np.ndarray:
        """``xlx(|[n0, n1)|) - sum_b xlx(count_b([c0, c1)))``, elementwise (``phi`` when the ranges agree).

        Ranges must not be reversed."""
        n0, n1, c0, c1 = np.broadcast_arrays(*(np.asarray(x, dtype=np.int64) for x in (n0, n1, c0, c1)))
        shape = n0.shape
        n0, n1, c0, c1 = (x.reshape(-1) for x in (n0, n1, c0, c1))
        out = np.empty(n0.size)
        xlx, tot = self.xlx, self.tot
        for s in range(0, n0.size, _CHUNK):
            part = slice(s, s + _CHUNK)
            aa, bb = c0[part], c1[part]
            acc = xlx[tot[n1[part]] - tot[n0[part]]]
            for row in self.cum_t:
                acc -= xlx[row[bb] - row[aa]]
            out[part] = acc
        return out.reshape(shape)


def _dense_dp(tab: _CountTable, positions: list) -> tuple[float, list[int]]:
    """Max of ``-sum phi`` over cuts ``c_1 < ... < c_r`` with ``c_s`` from ``positions[s - 1]``.

    The plain DP, ``O(sum_s |P_(s-1)| |P_s| B)``. Returns ``(value, cuts)``; ``(-inf, [])`` when no
    increasing choice exists."""
    m = tab.m
    layers = [np.array([0])] + [np.asarray(p, dtype=np.int64) for p in positions] + [np.array([m])]
    best = np.zeros(1)
    args = []
    for s in range(1, len(layers)):
        a, b = layers[s - 1], layers[s]
        cand = np.full((a.size, b.size), -np.inf)
        # only pairs a < b; rows chunked to bound memory
        step = max(1, _CHUNK // max(1, b.size))
        for r in range(0, a.size, step):
            aa = a[r : r + step]
            value = best[r : r + step, None] - tab.phi(aa[:, None], b[None, :])
            cand[r : r + step] = np.where(aa[:, None] < b[None, :], value, -np.inf)
        i = np.argmax(cand, axis=0)
        best = cand[i, np.arange(b.size)]
        args.append(i)
    if not np.isfinite(best[0]):
        return -np.inf, []
    cuts, j = [], 0
    for s in range(len(layers) - 1, 1, -1):
        j = int(args[s - 1][j])
        cuts.append(int(layers[s - 1][j]))
    return float(best[0]), cuts[::-1]


def _ragged(sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ``sizes[i]`` consecutive elements per owner ``i``: each element's owner and its offset in it."""
    owner = np.repeat(np.arange(sizes.size), sizes)
    return owner, np.arange(owner.size) - (np.cumsum(sizes) - sizes)[owner]


def _free_cost(tab: _CountTable, lo, hi, left, right) -> np.ndarray:
    """Least cost of each cell's free blocks (``[lo, hi)``) over the cut position ``d`` in the cell.

    The blocks ``[lo, d)`` join the segment to the left and ``[d, hi)`` the one to the right. A
    part ``P`` joining a segment ``Y`` raises ``phi`` by ``phi(Y u P) - phi(Y)``, which is at least
    ``phi(P)`` (superadditivity) and, ``x log x`` being convex, at least its value with ``|Y|`` as
    small and every bin count of ``Y`` as large as the partner cells allow: with partners in a span
    of positions, ``Y`` holds at least the blocks up to the span's nearest end (``near``) and at
    most those from its farthest (``far``). ``left``/``right`` hold ``[cells, G]`` tables of such
    spans (partners grouped by position; ``near < 0`` where a group is empty); the bound of a part
    is the least over its cell's groups.
    """
    size = hi - lo + 1
    first = np.cumsum(size) - size
    cell, offset = _ragged(size)
    d = lo[cell] + offset
    cost = []
    for (near, far), is_left in ((left, True), (right, False)):
        ent_cell, ent_group = np.nonzero(near >= 0)  # the nonempty spans, by cell
        n, f = near[ent_cell, ent_group], far[ent_cell, ent_group]
        ent, offset = _ragged(size[ent_cell])
        pos = first[ent_cell][ent] + offset
        x = d[pos]
        if is_left:  # [lo, d) joins a segment holding at least [near, lo), at most [far, lo)
            e_lo = lo[ent_cell]
            v = tab.mixed(n[ent], x, f[ent], x) - tab.mixed(n, e_lo, f, e_lo)[ent]
            part = tab.phi(lo[cell], d)
        else:  # [d, hi) joins a segment holding at least [hi, near), at most [hi, far)
            e_hi = hi[ent_cell]
            v = tab.mixed(x, n[ent], x, f[ent]) - tab.mixed(e_hi, n, e_hi, f)[ent]
            part = tab.phi(d, hi[cell])
        grow = np.full(d.size, np.inf)
        np.minimum.at(grow, pos, v)
        grow[np.isinf(grow)] = 0.0  # no partner on that side: no bound from it
        cost.append(np.maximum(part, grow))
    return np.minimum.reduceat(cost[0] + cost[1], first)


def _spans(
    cells, partners, n_cells: int, ends: tuple, left: bool, groups: int
) -> tuple[np.ndarray, np.ndarray]:
    """``[n_cells, groups]`` tables: the nearest and farthest end of each cell's partner cells.

    Partners are grouped by their index (cells are in position order), ``groups`` to a cell;
    ``ends = (lo, hi)`` of the partner cells, which lie to the ``left`` or to the right of the
    cells. Empty groups hold -1."""
    lo_p, hi_p = ends
    key = cells * groups + partners * groups // lo_p.size
    big = np.iinfo(np.int64).max
    near = np.full(n_cells * groups, -1 if left else big)
    far = np.full(n_cells * groups, big if left else -1)
    if left:  # nearest = largest hi, farthest = least lo
        np.maximum.at(near, key, hi_p[partners])
        np.minimum.at(far, key, lo_p[partners])
    else:  # nearest = least lo, farthest = largest hi
        np.minimum.at(near, key, lo_p[partners])
        np.maximum.at(far, key, hi_p[partners])
    empty = (near == big) | (far == big) | (near < 0) | (far < 0)
    near[empty] = far[empty] = -1
    return near.reshape(n_cells, groups), far.reshape(n_cells, groups)


def _envelope(pa, pc, lo_a, hi_a, lo_c, hi_c, groups: int) -> tuple[tuple, tuple]:
    """Spans of partner cells for both sides of one pair set (see :func:`_free_cost`)."""
    apart = hi_a[pa] < lo_c[pc]  # cells of two cuts are equal or disjoint
    pa, pc = pa[apart], pc[apart]
    left = _spans(pc, pa, lo_c.size, (lo_a, hi_a), True, groups)  # the right cells' left partners
    right = _spans(pa, pc, lo_a.size, (lo_c, hi_c), False, groups)  # the left cells' right partners
    return left, right


def _group_max(keys: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Per key in ``0..n-1``: the max of ``values`` (-inf when the key has none)."""
    best = np.full(n, -np.inf)
    np.maximum.at(best, keys, values)
    return best


def _split(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Halve every cell; returns the children and, per parent, its first child and child count."""
    mid = (lo + hi) // 2
    two = hi > lo
    count = 1 + two.astype(np.int64)
    first = np.cumsum(count) - count
    clo = np.empty(int(count.sum()), dtype=np.int64)
    chi = np.empty_like(clo)
    clo[first], chi[first] = lo, np.where(two, mid, hi)
    clo[first[two] + 1], chi[first[two] + 1] = mid[two] + 1, hi[two]
    return clo, chi, first, count


def _expand(pa, pc, fa, na, fc, nc) -> tuple[np.ndarray, np.ndarray]:
    """Children pairs of the pairs ``(pa, pc)`` (every child of one with every child of the other)."""
    idx, within = _ragged(na[pa] * nc[pc])
    ncc = nc[pc][idx]
    return fa[pa][idx] + within // ncc, fc[pc][idx] + within % ncc


def _bounds(tab: _CountTable, lo: list, hi: list, pairs: list, core: list) -> tuple[list, list, list]:
    """Bound terms ``t`` of every pair and the best bounded prefix (``fwd``) / suffix (``bwd``) per cell."""
    r = len(lo) - 2
    # partners grouped by position once cells are narrow (earlier, every cell pairs all over)
    narrow = max(int((hi[s] - lo[s]).max(initial=0)) for s in range(1, r + 1)) < _NARROW
    groups = _SPAN_GROUPS if narrow else 1
    env = [_envelope(*pairs[s - 1], lo[s - 1], hi[s - 1], lo[s], hi[s], groups) for s in range(1, r + 2)]
    kap = [np.zeros(1)] + [_free_cost(tab, lo[s], hi[s], env[s - 1][0], env[s][1]) for s in range(1, r + 1)]
    kap.append(np.zeros(1))
    t = []
    for s in range(1, r + 2):
        pa, pc = pairs[s - 1]
        same = lo[s - 1][pa] == lo[s][pc]  # cells of two cuts are equal or disjoint
        # two cuts in one cell: the cell's blocks count 0, its cost taken on the way in is given back
        t.append(np.where(same, kap[s - 1][pa], -core[s - 1] - kap[s][pc]))
    fwd = [np.zeros(1)]
    for s in range(1, r + 2):
        pa, pc = pairs[s - 1]
        fwd.append(_group_max(pc, fwd[-1][pa] + t[s - 1], lo[s].size))
    bwd = [np.zeros(1)]
    for s in range(r, -1, -1):
        pa, pc = pairs[s]
        bwd.insert(0, _group_max(pa, t[s] + bwd[0][pc], lo[s].size))
    return t, fwd, bwd


def _prune(lo: list, hi: list, pairs: list, keep: list) -> None:
    """Keep the pairs marked in ``keep``, then drop the cells that lost every pair on one side (in place)."""
    r = len(lo) - 2
    for s in range(r + 1):
        pairs[s] = (pairs[s][0][keep[s]], pairs[s][1][keep[s]])
    for s in range(1, r + 1):
        used = np.zeros(lo[s].size, dtype=bool)
        used[pairs[s - 1][1]] = True
        also = np.zeros(lo[s].size, dtype=bool)
        also[pairs[s][0]] = True
        used &= also
        remap = np.cumsum(used) - 1
        (pa, pc), ok = pairs[s - 1], used[pairs[s - 1][1]]
        pairs[s - 1] = (pa[ok], remap[pc[ok]])
        (pa, pc), ok = pairs[s], used[pairs[s][0]]
        pairs[s] = (remap[pa[ok]], pc[ok])
        lo[s], hi[s] = lo[s][used], hi[s][used]


def _branch_and_bound(tab: _CountTable, r: int, n_cells: int = 256) -> tuple[float, list[int]]:
    """Exact max of ``-sum phi`` over ``r`` cuts by branch and bound on cells of cut positions.

    Every cut starts with the same ``n_cells`` cells of consecutive positions. Each level bounds
    every surviving (cell of cut s-1, cell of cut s) pair, drops the pairs whose best completion
    is bounded below the best exact value found so far, and halves the cells. Cells of different
    cuts are therefore equal or disjoint. The bound (module docstring) is exact once every cell is
    one position, so the best surviving configuration then is the optimum.
    """
    m = tab.m
    edges = np.unique(np.linspace(1, m, min(n_cells, m - 1) + 1).astype(np.int64))
    lo = [np.array([0])] + [edges[:-1].copy() for _ in range(r)] + [np.array([m])]
    hi = [np.array([0])] + [edges[1:] - 1 for _ in range(r)] + [np.array([m])]
    # all pairs of cells of consecutive cuts at the start
    pairs = []
    for s in range(1, r + 2):
        ga, gc = np.meshgrid(np.arange(lo[s - 1].size), np.arange(lo[s].size), indexing="ij")
        pairs.append((ga.ravel(), gc.ravel()))
    lb, lb_cuts = -np.inf, None
    while True:
        core = []
        for s in range(1, r + 2):
            pa, pc = pairs[s - 1]
            feasible = lo[s - 1][pa] < hi[s][pc]
            pairs[s - 1] = pa, pc = pa[feasible], pc[feasible]
            core.append(tab.phi(hi[s - 1][pa], lo[s][pc]))  # the blocks between the cells (0 if one cell)
        t, fwd, bwd = _bounds(tab, lo, hi, pairs, core)
        # the best-bounded configuration of cells; its exact optimum is a lower bound
        cells, j = [], 0
        for s in range(r + 1, 1, -1):
            pa, pc = pairs[s - 1]
            at = np.flatnonzero(pc == j)
            j = int(pa[at[np.argmax(fwd[s - 1][pa[at]] + t[s - 1][at])]])
            cells.append((lo[s - 1][j], hi[s - 1][j]))
        value, cuts = _dense_dp(tab, [np.arange(a, b + 1) for a, b in cells[::-1]])
        if value > lb:
            lb, lb_cuts = value, cuts
        if all((lo[s] == hi[s]).all() for s in range(1, r + 1)):
            return lb, lb_cuts  # cells are single positions: the bound is exact, lb is the optimum
        floor = lb - 1e-9 * max(1.0, abs(lb))
        keep = [fwd[s - 1][pa] + t[s - 1] + bwd[s][pc] >= floor for s, (pa, pc) in enumerate(pairs, start=1)]
        _prune(lo, hi, pairs, keep)
        # halve the cells and carry the surviving pairs to their children
        split = [(lo[0], hi[0], np.array([0]), np.array([1]))]
        split += [_split(lo[s], hi[s]) for s in range(1, r + 1)]
        split += [(lo[r + 1], hi[r + 1], np.array([0]), np.array([1]))]
        pairs = [
            _expand(pa, pc, split[s - 1][2], split[s - 1][3], split[s][2], split[s][3])
            for s, (pa, pc) in enumerate(pairs, start=1)
        ]
        lo = [sp[0] for sp in split]
        hi = [sp[1] for sp in split]


def solve_partition(
    counts: np.ndarray, r: int, *, method: str = "auto", n_cells: int = 256
) -> tuple[float, list[int]]:
    """Exact ``max -sum_segments phi`` over ``r`` cuts ``0 < c_1 < ... < c_r < m`` of ``m`` blocks.

    ``counts`` is the bin-count vector of each block, ``[m, B]`` (integers) in IoU order; a cut at
    ``c`` starts a new segment with block ``c``. ``method="dp"`` is the plain dynamic programme over
    every position, ``"bnb"`` the branch and bound (same optimum, far fewer pairs when ``m`` is
    large), ``"auto"`` the DP up to ``n_cells`` positions. Returns the value and the cut positions.
    """
    return _solve(_CountTable(counts), r, method, n_cells)


def _solve(tab: _CountTable, r: int, method: str = "auto", n_cells: int = 256) -> tuple[float, list[int]]:
    m = tab.m
    if r <= 0:
        return -float(tab.phi(0, m)), []
    if method == "dp" or (method == "auto" and m - 1 <= n_cells):
        return _dense_dp(tab, [np.arange(1, m)] * r)
    if method in ("bnb", "auto"):
        return _branch_and_bound(tab, r, n_cells)
    raise ValueError(f"unknown method {method!r}; choose auto, dp or bnb")


def optimal_thresholds(
    iou: np.ndarray, signal: np.ndarray, k: int = 3, n_bins: int = 20, *, binning: str = "width"
) -> tuple[np.ndarray, float]:
    """Exact global maximum of ``I(C_t(IoU); S)`` over ``k`` thresholds; returns ``(thresholds, mi)``.

    ``iou`` and ``signal`` are paired arrays of any (equal) shape; pairs with a NaN are dropped
    (failures are not IoU 0). Thresholds are midpoints between consecutive distinct IoU values,
    sorted; MI is in nats. See the module docstring for the objective and the algorithm.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    iou, signal = _clean(iou, signal)
    if iou.size == 0:
        raise ValueError("optimal_thresholds: no finite (iou, signal) pair")
    if iou.min() < 0 or iou.max() > 1:
        raise ValueError("optimal_thresholds: IoU values must lie in [0, 1]")
    bins = bin_signal(signal, n_bins, binning)
    g = _groups(iou, bins, n_bin_labels(n_bins, binning))
    starts = _merge_proportional(g.counts)
    block_counts = np.add.reduceat(g.counts, starts, axis=0)  # [M, B]
    # cut between block j-1 and j lies at the midpoint of the two distinct values around it
    block_first = g.values[starts]
    block_last = g.values[np.concatenate([starts[1:] - 1, [g.values.size - 1]])]
    tab = _CountTable(block_counts)
    n = iou.size
    h_s_term = float(tab.phi(0, tab.m))  # n H(S), nats x count

    r = min(k, tab.m - 1)  # more classes than blocks cannot help; splitting never lowers MI
    total, cut_blocks = _solve(tab, r)
    mi = max(0.0, (total + h_s_term) / n)
    cuts = [float((block_last[b - 1] + block_first[b]) / 2.0) for b in cut_blocks]
    return _pad_thresholds(cuts, g.values, k), float(mi)


# -------------------------------------------------------------------------------- comparisons


def candidate_cuts(iou: np.ndarray) -> np.ndarray:
    """Midpoints between consecutive distinct finite IoU values: where the objective can change."""
    v = np.unique(np.asarray(iou, dtype=float)[np.isfinite(iou)])
    return (v[:-1] + v[1:]) / 2.0


def brute_force_thresholds(
    iou: np.ndarray, signal: np.ndarray, k: int = 3, n_bins: int = 20, *, binning: str = "width"
) -> tuple[np.ndarray, float]:
    """Best MI over every k-subset of :func:`candidate_cuts` (tests and small benchmarks only)."""
    iou, signal = _clean(iou, signal)
    bins = bin_signal(signal, n_bins, binning)
    cands = candidate_cuts(iou)
    if cands.size > 200:
        raise ValueError(f"brute force over {cands.size} candidates is too large")
    best_t, best_mi = None, -np.inf
    for combo in itertools.combinations(cands, min(k, cands.size)):
        mi = _mi_from_labels(iou_to_class(iou, combo), bins)
        if mi > best_mi + 1e-15:
            best_t, best_mi = combo, mi
    if best_t is None:
        return _pad_thresholds([], np.unique(iou), k), 0.0
    return _pad_thresholds(list(best_t), np.unique(iou), k), float(best_mi)


def lbfgsb_thresholds(
    iou: np.ndarray,
    signal: np.ndarray,
    k: int = 3,
    n_bins: int = 20,
    *,
    binning: str = "width",
    n_restarts: int = 10,
    seed: int = 42,
) -> tuple[np.ndarray, float]:
    """Notebook 02's method: L-BFGS-B from ``n_restarts`` random starts (seeded, not global RNG).

    Starts ``sort(uniform(0.1, 0.9, k))``, bounds ``(0.05, 0.95)``, objective ``-MI`` of
    ``sort(clip(t, 0.01, 0.99))``. Kept only for comparison: the gradient is zero almost everywhere.
    """
    from scipy import optimize

    iou, signal = _clean(iou, signal)
    bins = bin_signal(signal, n_bins, binning)
    rng = np.random.default_rng(seed)

    def objective(t: np.ndarray) -> float:
        t = np.sort(np.clip(t, 0.01, 0.99))
        return -_mi_from_labels(iou_to_class(iou, t), bins)

    best_x, best_mi = None, -np.inf
    for _ in range(n_restarts):
        x0 = np.sort(rng.uniform(0.1, 0.9, k))
        res = optimize.minimize(objective, x0, method="L-BFGS-B", bounds=[(0.05, 0.95)] * k)
        if -res.fun > best_mi:
            best_mi, best_x = -float(res.fun), res.x
    t = np.sort(np.clip(best_x, 0.01, 0.99))
    return t, float(best_mi)


def threshold_comparison(
    iou: np.ndarray,
    signal: np.ndarray,
    *,
    k: int = 3,
    n_bins: int = 20,
    binning: str = "width",
    lbfgsb_restarts: int = 10,
    seed: int = 42,
    baseline: Sequence[float] = BASELINE_THRESHOLDS,
) -> dict:
    """One signal's entry of ``thresholds.json``: the exact optimum, the seed's method and the baseline.

    Deterministic (no timings: those are the benchmark's), so equal inputs give an identical file.
    """
    iou_c, sig_c = _clean(iou, signal)
    out: dict = {
        "n_pairs": int(iou_c.size),
        "n_dropped": int(np.asarray(iou).size - iou_c.size),
        "k": int(k),
        "n_bins": int(n_bins),
        "binning": binning,
        "mi_units": "nats",
        "signal_range": [float(sig_c.min()), float(sig_c.max())] if sig_c.size else None,
        "n_candidate_cuts": int(candidate_cuts(iou_c).size),
    }
    if iou_c.size == 0:
        out.update(exact=None, lbfgsb=None, baseline=None)
        return out
    t_exact, mi_exact = optimal_thresholds(iou_c, sig_c, k, n_bins, binning=binning)
    t_lb, mi_lb = lbfgsb_thresholds(
        iou_c, sig_c, k, n_bins, binning=binning, n_restarts=lbfgsb_restarts, seed=seed
    )
    mi_base = mutual_information(iou_c, sig_c, baseline, n_bins, binning)
    out["exact"] = {
        "thresholds": t_exact.tolist(),
        "mi": mi_exact,
        "method": "exact (DP up to 256 blocks, else branch and bound)",
    }
    out["lbfgsb"] = {
        "thresholds": t_lb.tolist(),
        "mi": mi_lb,
        "restarts": lbfgsb_restarts,
        "seed": seed,
    }
    out["baseline"] = {"thresholds": [float(x) for x in baseline], "mi": mi_base}
    for name in ("lbfgsb", "baseline"):
        other = out[name]["mi"]
        out[name]["gap_to_exact"] = mi_exact - other
        out[name]["exact_improvement_pct"] = (
            100.0 * (mi_exact - other) / other if other > 0 else (math.inf if mi_exact > 0 else 0.0)
        )
    return out
