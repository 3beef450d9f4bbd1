"""numba kernels of ``vlmrel.anomaly.exact32`` (see its docstring for what they count).

Imported on first use, so importing ``exact32`` costs neither numba's import nor compilation.
The kernels compile on their first call, or up front with ``exact32.compile_kernels()``;
nothing is cached on disk (``cache=False``): no cache directory has to be writable and no
compiled code can be stale. Every argument has one fixed dtype, so each kernel compiles once.

Keys: ``u`` is the float32 bit pattern as uint32, widened to int64 inside the kernels. The key
of ``u`` is ``u ^ 0xFFFFFFFF`` for a set sign bit, else ``u | 0x80000000``; ``-0.0`` (key
``0x7FFFFFFF``) gets ``+0.0``'s key ``0x80000000``. ``u & 0x7FFFFFFF > 0x7F800000`` is NaN.
"""

from __future__ import annotations

import numpy as np
from numba import njit

NBINS = 1 << 16
SUB = 1 << 17  # cells of a refined bin: 65536 low keys x (normal, anomaly)
WRAP = 256  # a uint8 table cell wraps every 256 increments; each wrap is logged in ``ovf``

_OPTS = {"nogil": True, "cache": False, "boundscheck": False}


@njit(inline="always")
def _is_nan(b):  # type: ignore[no-untyped-def]
    return (b & 0x7FFFFFFF) > 0x7F800000


@njit(inline="always")
def _key(b):  # type: ignore[no-untyped-def]
    if b >= 0x80000000:
        k = b ^ 0xFFFFFFFF
        if k == 0x7FFFFFFF:  # -0.0 ties +0.0
            k = 0x80000000
        return k
    return b | 0x80000000


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


@njit(**_OPTS)
def refine_pass(u, y, v, slot_of_bin, dense_off, table, ovf, n_ovf, seg, seg_ptr, seg_end):  # type: ignore[no-untyped-def]
    """Count the pixels of the group's bins by value and label; returns ``(n_ovf, error)``.

    ``slot_of_bin`` int32 [65536]: the bin's slot in this group, or -1. A *dense* slot
    (``dense_off[slot] >= 0``) counts in ``table[dense_off + low * 2 + label]`` (uint8, in place);
    a cell's wrap from 255 to 0 appends the cell to ``ovf`` (int64; ``n_ovf`` entries so far).
    A *sparse* slot appends ``low * 2 + label`` (uint32) at ``seg[seg_ptr[slot]]``; its
    segment ends at ``seg_end[slot]`` (the coarse count). ``error``: 1 when a segment or ``ovf``
    would overflow (the pass sees more pixels than the coarse pass), 2 on NaN.
    """
    masked = v.size > 0
    err = 0
    cap = ovf.size
    for i in range(u.size):
        if masked and v[i] == 0:
            continue
        b = np.int64(u[i])
        if _is_nan(b):
            err = 2
            continue
        k = _key(b)
        sl = slot_of_bin[k >> 16]
        if sl < 0:
            continue
        cell = ((k & 0xFFFF) << 1) | (1 if y[i] != 0 else 0)
        off = dense_off[sl]
        if off >= 0:
            c = off + cell
            t = table[c] + 1
            table[c] = t  # uint8: 256 stores 0
            if t == WRAP:
                if n_ovf < cap:
                    ovf[n_ovf] = c
                    n_ovf += 1
                else:
                    err = 1
        else:
            p = seg_ptr[sl]
            if p < seg_end[sl]:
                seg[p] = cell
                seg_ptr[sl] = p + 1
            else:
                err = 1
    return n_ovf, err


@njit(inline="always")
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


@njit(**_OPTS)
def finish_group(table, dense_off, ovf, n_ovf, seg, seg_start, seg_ptr, t0, f0, P, level, cross_slot,
                 out_pos, out_neg, out_a, out_b, out_ap):  # type: ignore[no-untyped-def]
    """Walk every slot's values from the highest down; per slot, write its totals and terms.

    ``t0``/``f0`` int64 per slot: anomalies/normals in higher bins. Per slot: ``out_pos``/
    ``out_neg`` the pixels counted, ``out_a`` = sum_v neg_v pos_above_v, ``out_b`` = sum_v neg_v
    pos_v, ``out_ap`` = sum_v pos_v tp_v / (tp_v + fp_v). Sparse segments are sorted in place.
    Returns the false positives where ``tp / P`` first reaches ``level`` in slot ``cross_slot``
    (-1 when it is not in this group).
    """
    o = np.sort(ovf[:n_ovf])
    cnt = np.empty(SUB, np.int64)
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
        if off >= 0:
            for j in range(SUB):
                cnt[j] = table[off + j]
            lo = np.searchsorted(o, off)
            hi = np.searchsorted(o, off + SUB)
            for j in range(lo, hi):
                cnt[o[j] - off] += WRAP
            for low in range(NBINS - 1, -1, -1):
                ng = cnt[2 * low]
                ps = cnt[2 * low + 1]
                if ng == 0 and ps == 0:
                    continue
                cpos, cneg, a, b2, ap, fpc = _value(ng, ps, cpos, cneg, a, b2, ap, tk, fk, P, level, cross, fpc)
        else:
            sg = seg[seg_start[k] : seg_ptr[k]]
            sg.sort()
            j = sg.size - 1
            while j >= 0:
                val = sg[j] >> 1
                ng = np.int64(0)
                ps = np.int64(0)
                while j >= 0 and (sg[j] >> 1) == val:
                    if sg[j] & 1:
                        ps += 1
                    else:
                        ng += 1
                    j -= 1
                cpos, cneg, a, b2, ap, fpc = _value(ng, ps, cpos, cneg, a, b2, ap, tk, fk, P, level, cross, fpc)
        out_pos[k] = cpos
        out_neg[k] = cneg
        out_a[k] = a
        out_b[k] = b2
        out_ap[k] = ap
    return fpc
