"""numba kernels of ``vlmrel.anomaly.exact32`` (see its docstring for what they count).

Imported on first use, so importing ``exact32`` costs neither numba's import nor compilation.
The kernels compile on their first call, or up front with ``exact32.compile_kernels()``, and
numba caches them on disk (``cache=True``; numba checks the source file's stamp and the CPU, so
cached code is never stale, and it falls back to its user cache directory, or
``NUMBA_CACHE_DIR``, when ``__pycache__`` is not writable). Every argument has one fixed dtype,
so each kernel compiles once.

Keys: ``u`` is the float32 bit pattern as uint32, widened to int64 inside the kernels. The key
of ``u`` is ``u ^ 0xFFFFFFFF`` for a set sign bit, else ``u | 0x80000000``; ``-0.0`` (key
``0x7FFFFFFF``) gets ``+0.0``'s key ``0x80000000``. ``u & 0x7FFFFFFF > 0x7F800000`` is NaN.
"""

from __future__ import annotations

import numpy as np
from numba import njit

NBINS = 1 << 16
SUB = 1 << 17  # cells of a refined bin: 65536 low keys x (normal, anomaly)
BLOCK = 1 << 14  # pixels the refinement kernel takes in two steps (stretch indices, then appends)
WRAP = 1 << 16  # a uint16 table cell wraps every 65,536 increments; each wrap is logged in ``ovf``

_OPTS = {"nogil": True, "cache": True, "boundscheck": False}
_INNER = {"cache": True, "boundscheck": False}  # helpers, compiled with the kernels that call them


@njit(**_INNER)
def _is_nan(b):  # type: ignore[no-untyped-def]
    return (b & 0x7FFFFFFF) > 0x7F800000


@njit(**_INNER)
def _key(b):  # type: ignore[no-untyped-def]
    k = b ^ (0x80000000 | ((b >> 31) * 0x7FFFFFFF))  # branch-free: the sign is data
    return k + (k == 0x7FFFFFFF)  # -0.0 ties +0.0


@njit(**_OPTS)
def coarse_pass(u, y, v, coarse):  # type: ignore[no-untyped-def]
    """``coarse[(key >> 16) * 2 + label] += 1`` for every valid pixel; returns the NaN count.

    ``u`` uint32 bits, ``y`` uint8 labels, ``v`` uint8 valid mask (empty: all valid),
    ``coarse`` int64 [2 x 65536]. NaN pixels are counted, not binned.
    """
    masked = v.size > 0
    nan = 0
    for i in range(u.size):
        if masked and v[i] == 0:
            continue
        b = np.int64(u[i])
        if _is_nan(b):
            nan += 1
            continue
        lab = 1 if y[i] != 0 else 0
        coarse[((_key(b) >> 16) << 1) | lab] += 1
    return nan


@njit(**_INNER)
def _flush(table, off, buf, lo, hi, ovf, n_ovf):  # type: ignore[no-untyped-def]
    """Add the cells ``off + 2 * buf[lo:hi]`` of a uint16 table; log each wrap to 0 in ``ovf``."""
    err = 0
    for j in range(lo, hi):
        c = off + 2 * np.int64(buf[j])
        t = table[c] + 1
        table[c] = t  # uint16: 65536 stores 0
        if t == WRAP:
            if n_ovf < ovf.size:
                ovf[n_ovf] = c
                n_ovf += 1
            else:
                err = 1
    return n_ovf, err


@njit(**_OPTS)
def refine_pass(u, y, v, slot_of_bin, dense_off, table, ovf, n_ovf, buf, ptr, start, end):  # type: ignore[no-untyped-def]
    """Collect the low 16 key bits of the group's pixels; returns ``(n_ovf, error)``.

    ``slot_of_bin`` int32 [65536]: the bin's slot in this group, or -1. Slot ``k``'s pixels of
    label ``l`` append their low key (uint16) to their own stretch ``buf[start[j]:end[j]]`` at
    ``ptr[j]``, ``j = 2 k + l``. A *sparse* slot's stretches hold all its pixels (the coarse
    counts). A *dense* slot's (``dense_off[k] >= 0``) are buffers, flushed into its uint16 table
    ``table[dense_off[k] + 2 * low + l]`` when full; a cell's wrap from 65535 to 0 appends the
    cell to ``ovf`` (int64; ``n_ovf`` entries so far). ``error``: 1 when a sparse stretch or
    ``ovf`` would overflow (the pass sees more pixels than the coarse pass), 2 on NaN.
    """
    masked = v.size > 0
    err = 0
    jt = np.empty(BLOCK, np.int32)  # per pixel of a block: its stretch, or -1
    lt = np.empty(BLOCK, np.uint16)  # its low key
    for b0 in range(0, u.size, BLOCK):
        m = min(BLOCK, u.size - b0)
        # first the stretch of every pixel of the block (no stores to the stretches: vectorizes) ...
        nan = 0
        for i in range(m):
            b = np.int64(u[b0 + i])
            k = _key(b)
            jt[i] = 2 * slot_of_bin[k >> 16] + np.int64(y[b0 + i])  # y is 0 or 1
            lt[i] = k & 0xFFFF
            nan += _is_nan(b)
        if nan:  # an error unless masked out, as in the coarse pass
            for i in range(m):
                if _is_nan(np.int64(u[b0 + i])):
                    jt[i] = -1
                    if not masked or v[b0 + i] != 0:
                        err = 2
        if masked:
            for i in range(m):
                if v[b0 + i] == 0:
                    jt[i] = -1
        # ... then the appends, the only stores into thousands of streams
        for i in range(m):
            j = jt[i]
            if j < 0:
                continue
            p = ptr[j]
            if p == end[j]:
                off = dense_off[j >> 1]
                if off < 0:
                    err = 1
                    continue
                n_ovf, e = _flush(table, off + (j & 1), buf, start[j], p, ovf, n_ovf)
                err = max(err, e)
                p = start[j]
            buf[p] = lt[i]
            ptr[j] = p + 1
    return n_ovf, err


@njit(**_INNER)
def _value(ng, ps, cpos, cneg, a, b2, ap, t0, f0, P, level, cross, fpc):  # type: ignore[no-untyped-def]
    """One distinct value (descending) of a bin: ``ng`` normals and ``ps`` anomalies at it."""
    a += ng * cpos  # normals below anomalies above them, inside the bin
    b2 += ng * ps  # ties
    cpos += ps
    cneg += ng
    if ps > 0:
        tp = t0 + cpos
        fp = f0 + cneg
        ap += ps * (tp / (tp + fp))
        if cross and fpc < 0 and tp / P >= level:
            fpc = fp
    return cpos, cneg, a, b2, ap, fpc


@njit(**_INNER)
def _sort16(a, tmp):  # type: ignore[no-untyped-def]
    """Sort uint16 ``a`` in place: two counting passes of 8 bits (``tmp`` as long as ``a``)."""
    n = a.size
    c = np.zeros(257, np.int64)
    for r in range(2):
        shift = 8 * r
        c[:] = 0
        for i in range(n):
            c[((np.int64(a[i]) >> shift) & 255) + 1] += 1
        for d in range(256):
            c[d + 1] += c[d]
        for i in range(n):
            d = (np.int64(a[i]) >> shift) & 255
            tmp[c[d]] = a[i]
            c[d] += 1
        for i in range(n):
            a[i] = tmp[i]


@njit(**_OPTS)
def finish_group(table, dense_off, ovf, n_ovf, buf, start, ptr, t0, f0, P, level, cross_slot, sort_below,
                 out_pos, out_neg, out_a, out_b, out_ap):  # type: ignore[no-untyped-def]
    """Walk every slot's values from the highest down; per slot, write its totals and terms.

    A dense slot's buffers are flushed first; its counts are the table plus 65,536 per logged wrap.
    A sparse slot's stretches are counted in a table of the bin (``sort_below`` pixels or more)
    or sorted in place (radix) and merged. ``t0``/``f0`` int64 per slot: anomalies/normals in higher
    bins. Per slot: ``out_pos``/``out_neg`` the pixels counted, ``out_a`` = sum_v neg_v
    pos_above_v, ``out_b`` = sum_v neg_v pos_v, ``out_ap`` = sum_v pos_v tp_v / (tp_v + fp_v).
    Returns ``(fp, error)``: the false positives where ``tp / P`` first reaches ``level`` in slot
    ``cross_slot`` (-1 when it is not in this group), and 1 when ``ovf`` overflowed.
    """
    err = 0
    for k in range(dense_off.size):
        if dense_off[k] >= 0:
            for lab in range(2):
                n_ovf, e = _flush(table, dense_off[k] + lab, buf, start[2 * k + lab], ptr[2 * k + lab], ovf, n_ovf)
                err = max(err, e)
    # the logged wraps, by dense table (a counting sort: wraps of table d at o[first[d]:first[d + 1]])
    n_tab = table.size // SUB
    first = np.zeros(n_tab + 1, np.int64)
    for e in range(n_ovf):
        first[ovf[e] // SUB + 1] += 1
    for d in range(n_tab):
        first[d + 1] += first[d]
    fill = first[:n_tab].copy()
    o = np.empty(n_ovf, np.int64)
    for e in range(n_ovf):
        d = ovf[e] // SUB
        o[fill[d]] = ovf[e]
        fill[d] += 1
    hn = np.zeros(NBINS, np.int64)  # a bin's normals per low key
    hp = np.zeros(NBINS, np.int64)  # its anomalies
    tmp = np.empty(sort_below, np.uint16)
    fpc = np.int64(-1)
    for k in range(dense_off.size):
        cross = k == cross_slot
        tk, fk = t0[k], f0[k]
        cpos = np.int64(0)
        cneg = np.int64(0)
        a = np.int64(0)
        b2 = np.int64(0)
        ap = 0.0
        off = dense_off[k]
        neg = buf[start[2 * k] : ptr[2 * k]]
        pos = buf[start[2 * k + 1] : ptr[2 * k + 1]]
        if off >= 0 or neg.size + pos.size >= sort_below:
            if off >= 0:
                for j in range(NBINS):
                    hn[j] = table[off + 2 * j]
                    hp[j] = table[off + 2 * j + 1]
                for j in range(first[off // SUB], first[off // SUB + 1]):
                    c = o[j] - off
                    if c & 1:
                        hp[c >> 1] += WRAP
                    else:
                        hn[c >> 1] += WRAP
            else:
                for j in range(neg.size):
                    hn[neg[j]] += 1
                for j in range(pos.size):
                    hp[pos[j]] += 1
            run = np.int64(0)  # normals at values without anomalies, since the last anomaly
            for low in range(NBINS - 1, -1, -1):
                ps = hp[low]
                if ps == 0:
                    run += hn[low]
                    continue
                a += run * cpos
                cneg += run
                run = 0
                cpos, cneg, a, b2, ap, fpc = _value(hn[low], ps, cpos, cneg, a, b2, ap, tk, fk, P, level, cross, fpc)
            a += run * cpos
            cneg += run
            hn[:] = 0
            hp[:] = 0
        else:
            _sort16(neg, tmp)
            _sort16(pos, tmp)
            i0 = neg.size - 1
            i1 = pos.size - 1
            while i0 >= 0 or i1 >= 0:
                val = max(np.int64(neg[i0]) if i0 >= 0 else -1, np.int64(pos[i1]) if i1 >= 0 else -1)
                ng = np.int64(0)
                ps = np.int64(0)
                while i0 >= 0 and neg[i0] == val:
                    ng += 1
                    i0 -= 1
                while i1 >= 0 and pos[i1] == val:
                    ps += 1
                    i1 -= 1
                cpos, cneg, a, b2, ap, fpc = _value(ng, ps, cpos, cneg, a, b2, ap, tk, fk, P, level, cross, fpc)
        out_pos[k] = cpos
        out_neg[k] = cneg
        out_a[k] = a
        out_b[k] = b2
        out_ap[k] = ap
    return fpc, err
