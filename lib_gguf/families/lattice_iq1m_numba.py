"""The compiled (numba) IQ1_M quantizer: the fit of
:func:`lib_gguf.families.lattice_fit.fit_iq1m_sub_blocks` and the packing of
:func:`lib_gguf.families.lattice.quantize_iq1_m` in one pass over each block, with
the same float32 operations in the same order, so ggml's bytes.

The split search of a 16-weight sub-block tries every pair of boundaries (153) for
four shift choices, each a sum of 16 terms in sorted order. Pairs share the start
of their sums: the terms of the first segment are the same for every pair with the
same first boundary, and the second segment grows by one term from a pair to the
next; only the tail is added per pair. These are the very additions, in the very
order, of each sum taken whole, a third of them. The four choices are summed side
by side. Off-grid groups search their neighbours eight at a time
(:mod:`lib_gguf.families.lattice_lanes_numba`).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from ..numba_support import F0, F1, F_HALF, f16_bits, f32, jit, jit_inline, nearest_int, pjit, prange
from .lattice import IQ1_M
from .lattice_fit import IQ1_EPS, IQ1_MINUS, IQ1_PLUS, tables_np
from .lattice_grids import IQ1_DELTA
from .lattice_search_numba import nearest, run, search_tables

_CHUNK = 16  # 256-weight blocks a parallel work item

_IQ1_XP = IQ1_PLUS
_IQ1_XM = IQ1_MINUS
F_IQ1_EPS = f32(IQ1_EPS)
F_IQ1_DELTA = f32(IQ1_DELTA)
F_NEG_TINY = f32(-np.finfo(np.float32).tiny)
F_IQ1M_FUDGE = f32(1.1125)
X1M_QS, X1M_QH, X1M_SCALES = IQ1_M.qs.offset, IQ1_M.qh.offset, IQ1_M.scales.offset
_IQ1M_MASKS = np.array([0x00, 0x80, 0x08, 0x88], dtype=np.int64)  # qh's delta-sign bits, by shift choice


@jit_inline
def _iq1_plus(k, group):
    """Whether group ``group`` is shifted up under choice ``k`` (0: +,+  1: +,-  2: -,+  3: -,-)."""
    return (k < 2) if group == 0 else (k % 2 == 0)


@jit_inline
def _iq1_value(k, group, lev):
    """The value of level ``lev`` (0, 1, 2) in group ``group`` under shift choice ``k``:
    ``lev - 1`` shifted by +-delta (exact, as IQ1_PLUS and IQ1_MINUS hold it)."""
    return f32(f32(lev - 1) + (F_IQ1_DELTA if _iq1_plus(k, group) else -F_IQ1_DELTA))


@jit_inline
def _iq1_better(ax, aq, best):
    return aq > F0 and f32(ax * ax) > f32(best * aq)


@jit
def _iq1m_sub(x, o, kmap, start, index, vals, w, order, t, L, gi, r):
    """One 16-weight sub-block ``x[o:o+16]`` (lattice_fit.fit_iq1m_sub_blocks): grid
    indices into ``gi[2r:2r+2]``; returns (scale, shift choice, skipped, failed)."""
    mx = F0
    for i in range(16):
        w[i] = f32(x[o + i] * x[o + i])
        if abs(x[o + i]) > mx:
            mx = abs(x[o + i])
    if mx < F_IQ1_EPS:
        gi[2 * r] = 0
        gi[2 * r + 1] = 0
        return F0, 0, True, False
    for i in range(16):          # stable insertion sort of the positions by value
        order[i] = i
        j = i
        while j > 0 and x[o + order[j - 1]] > x[o + i]:
            order[j] = order[j - 1]
            j -= 1
        order[j] = i
    # t[((s * 16 + j) * 2 + {0: x-term, 1: q2-term}) * 4 + k]: level s at sorted position j, choice k
    for j in range(16):
        i = order[j]
        grp = 1 if i >= 8 else 0
        for s in range(3):
            for k in range(4):
                v = (_IQ1_XP if _iq1_plus(k, grp) else _IQ1_XM)[s]
                wv = f32(w[i] * v)
                t[((s * 16 + j) * 2) * 4 + k] = f32(wv * x[o + i])
                t[((s * 16 + j) * 2 + 1) * 4 + k] = f32(wv * v)
    best = F_NEG_TINY
    scale = mx
    b1 = -1
    b2 = -1
    bk = -1
    # every split (i1, i2): positions < i1 level 0, < i2 level 1, the rest level 2
    px0 = px1 = px2 = px3 = F0      # sums over positions < i1 at level 0
    pq0 = pq1 = pq2 = pq3 = F0
    for i1 in range(17):
        if i1 > 0:
            b = ((0 * 16 + i1 - 1) * 2) * 4
            px0, px1, px2, px3 = (f32(px0 + t[b]), f32(px1 + t[b + 1]), f32(px2 + t[b + 2]), f32(px3 + t[b + 3]))
            pq0, pq1, pq2, pq3 = (f32(pq0 + t[b + 4]), f32(pq1 + t[b + 5]), f32(pq2 + t[b + 6]),
                                  f32(pq3 + t[b + 7]))
        rx0, rx1, rx2, rx3 = px0, px1, px2, px3    # and then over i1 <= position < i2 at level 1
        rq0, rq1, rq2, rq3 = pq0, pq1, pq2, pq3
        for i2 in range(i1, 17):
            if i2 > i1:
                b = ((1 * 16 + i2 - 1) * 2) * 4
                rx0, rx1, rx2, rx3 = (f32(rx0 + t[b]), f32(rx1 + t[b + 1]), f32(rx2 + t[b + 2]),
                                      f32(rx3 + t[b + 3]))
                rq0, rq1, rq2, rq3 = (f32(rq0 + t[b + 4]), f32(rq1 + t[b + 5]), f32(rq2 + t[b + 6]),
                                      f32(rq3 + t[b + 7]))
            ax0, ax1, ax2, ax3 = rx0, rx1, rx2, rx3
            aq0, aq1, aq2, aq3 = rq0, rq1, rq2, rq3
            for j in range(i2, 16):
                b = ((2 * 16 + j) * 2) * 4
                ax0, ax1, ax2, ax3 = (f32(ax0 + t[b]), f32(ax1 + t[b + 1]), f32(ax2 + t[b + 2]),
                                      f32(ax3 + t[b + 3]))
                aq0, aq1, aq2, aq3 = (f32(aq0 + t[b + 4]), f32(aq1 + t[b + 5]), f32(aq2 + t[b + 6]),
                                      f32(aq3 + t[b + 7]))
            if _iq1_better(ax0, aq0, best):
                scale = f32(ax0 / aq0)
                best = f32(scale * ax0)
                b1, b2, bk = i1, i2, 0
            if _iq1_better(ax1, aq1, best):
                scale = f32(ax1 / aq1)
                best = f32(scale * ax1)
                b1, b2, bk = i1, i2, 1
            if _iq1_better(ax2, aq2, best):
                scale = f32(ax2 / aq2)
                best = f32(scale * ax2)
                b1, b2, bk = i1, i2, 2
            if _iq1_better(ax3, aq3, best):
                scale = f32(ax3 / aq3)
                best = f32(scale * ax3)
                b1, b2, bk = i1, i2, 3
    failed = b1 < 0
    if failed:
        bk = 0
        b1 = 0
        b2 = 0
    for j in range(16):
        L[order[j]] = 0 if j < b1 else (1 if j < b2 else 2)
    if scale < F0:
        for j in range(16):
            L[j] = 2 - L[j]
        scale = -scale
        bk = 3 - bk
    any_off = False
    for g in range(2):
        u = 0
        for j in range(8):
            u |= L[8 * g + j] << (2 * j)
        k = kmap[u]
        if k < 0:
            any_off = True
            delta = F_IQ1_DELTA if _iq1_plus(bk, g) else -F_IQ1_DELTA
            p = nearest(np.int64(start[u]), np.int64(start[u + 1]), vals, delta, scale, x, o + 8 * g, w, 8 * g, 8,
                         True)
            k = index[p]
            base = 64 * (p // 8) + p % 8
            for j in range(8):
                L[8 * g + j] = int(vals[base + 8 * j]) + 1
        gi[2 * r + g] = k
    if any_off:  # refit the scale over both groups' grid points
        fx = F0
        f2 = F0
        for g in range(2):
            for j in range(8):
                qv = _iq1_value(bk, g, L[8 * g + j])
                wq = f32(w[8 * g + j] * qv)
                fx = f32(fx + f32(wq * x[o + 8 * g + j]))
                f2 = f32(f2 + f32(wq * qv))
        if fx > F0 and f2 > F0:
            scale = f32(fx / f2)
    return scale, bk, False, failed


@pjit
def _quantize_iq1_m(x, out, failed, kmap, start, index, vals, glev):
    """Every block of ``x`` in IQ1_M; ``failed[i]``: block i had a sub-block with no fit."""
    for c in prange((x.shape[0] + _CHUNK - 1) // _CHUNK):
        w = np.empty(16, np.float32)
        order = np.empty(16, np.int64)
        t = np.empty(3 * 16 * 2 * 4, np.float32)
        L = np.empty(16, np.int64)
        gi = np.empty(32, np.int64)
        scales = np.empty(16, np.float32)
        bks = np.empty(16, np.int64)
        l = np.empty(16, np.int64)
        for i in range(c * _CHUNK, min(x.shape[0], c * _CHUNK + _CHUNK)):
            xb = x[i]
            bad = False
            for r in range(16):
                scl, bk, skp, fail = _iq1m_sub(xb, 16 * r, kmap, start, index, vals, w, order, t, L, gi, r)
                scales[r] = scl
                bks[r] = 0 if skp else bk   # ggml leaves a skipped sub-block's shift unset: 0 here
                bad |= fail
            failed[i] = bad
            mx = scales[0]
            for r in range(1, 16):
                if scales[r] > mx or scales[r] != scales[r]:
                    mx = scales[r]
            live = mx > F0
            d = f32(mx / f32(15))
            idv = f32(F1 / d) if live else F1
            for r in range(16):
                l[r] = max(0, min(7, nearest_int(f32(F_HALF * f32(f32(idv * scales[r]) - F1)))))
            # the block scale, refitted over all 256 weights
            fx = F0
            f2 = F0
            for r in range(16):
                m = f32(2 * l[r] + 1)
                for g in range(2):
                    gv = gi[2 * r + g]
                    for j in range(8):
                        xi = xb[16 * r + 8 * g + j]
                        q = f32(_iq1_value(bks[r], g, glev[8 * gv + j]) * m)
                        wq = f32(f32(xi * xi) * q)
                        fx = f32(fx + f32(wq * xi))
                        f2 = f32(f2 + f32(wq * q))
            if f2 > F0:
                d = f32(fx / f2)
            dbits = f16_bits(f32(d * F_IQ1M_FUDGE))
            for k in range(32):
                out[i, X1M_QS + k] = gi[k] & 0xFF
            for r in range(16):
                qh = (gi[2 * r] >> 8) | ((gi[2 * r + 1] >> 8) << 4)
                out[i, X1M_QH + r] = (qh | _IQ1M_MASKS[bks[r]]) if live else qh
            for q4 in range(4):
                v = 0
                if live:
                    v = (l[4 * q4] | (l[4 * q4 + 1] << 3) | (l[4 * q4 + 2] << 6) | (l[4 * q4 + 3] << 9)
                         | (((dbits >> (4 * q4)) & 0xF) << 12))
                out[i, X1M_SCALES + 2 * q4] = v & 0xFF
                out[i, X1M_SCALES + 2 * q4 + 1] = v >> 8


# -- entry point ---------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _iq1_grid_levels():
    return np.ascontiguousarray(tables_np("IQ1_S", 3, 2, 3)[2].astype(np.int8).reshape(-1))


def quantize_iq1_m(blocks):
    """IQ1_M; a FloatingPointError for a sub-block with no fit (non-finite weights), as the torch kernel."""
    failed = np.zeros(blocks.shape[0], dtype=np.bool_)
    out = run(_quantize_iq1_m, blocks, IQ1_M.size, failed, *search_tables("IQ1_S", 3, 2, 3, True), _iq1_grid_levels())
    if failed.any():
        raise FloatingPointError("IQ1_M: no fit for a sub-block (non-finite weights?)")
    return torch.from_numpy(out)
