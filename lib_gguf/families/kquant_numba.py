"""Compiled (numba) quantizers of the K-quants Q2_K, Q4_K, Q5_K and Q6_K (Q3_K's is in
:mod:`kquant_q3_numba`), on the
layouts of :mod:`lib_gguf.families.kquant`: the same bytes as its torch quantizers
(the reference) and as ggml, spread over threads.

Every format fits the 16 sub-blocks of a block (Q4_K and Q5_K: of two blocks) side by
side, one per column (see "the fits" below), in stack arrays (``stack_f32``) so that
the column loops become vector instructions, and leaves the blocks that hold a
non-finite weight, or a value past nearest_int's exact range, to the torch kernel."""
from __future__ import annotations

import numpy as np

from ..formats import GGMLType
from ..numba_support import (F0, F1, F_EPS, F_MAGIC_LIMIT, F_TENTH, f32, jit, jit_inline, nearest_int, pjit, prange,
                             put_f16, quantizer, stack_f32)
from .kquant import Q2_K, Q4_K, Q5_K, Q6_K

F15 = f32(15.0)
F32 = f32(32.0)
F63 = f32(63.0)
F128 = f32(128.0)
F_NAN = f32(np.nan)
_CHUNK = 16  # blocks a parallel work item

# the byte offsets of the fields the kernels write (numba takes module ints as constants)
K_D, K_DMIN, K_SCALES = Q4_K.d.offset, Q4_K.dmin.offset, Q4_K.scales.offset  # Q5_K's are the same
Q4_QS = Q4_K.qs.offset
Q5_QH, Q5_QS = Q5_K.qh.offset, Q5_K.qs.offset
Q6_QL, Q6_QH, Q6_SCALES, Q6_D, Q6_SIZE = Q6_K.ql.offset, Q6_K.qh.offset, Q6_K.scales.offset, Q6_K.d.offset, Q6_K.size
Q2_SCALES, Q2_QS, Q2_D, Q2_DMIN = Q2_K.scales.offset, Q2_K.qs.offset, Q2_K.d.offset, Q2_K.dmin.offset
assert (Q5_K.d.offset, Q5_K.dmin.offset, Q5_K.scales.offset) == (K_D, K_DMIN, K_SCALES)


@jit
def _levels_at(xb, L, o, n, dm, dd, lo, hi):
    """The final levels of a sub-block: ``L[o+k] = clamp(nearest_int((xb[o+k] + dm) / dd), lo, hi) - lo``."""
    for k in range(n):
        L[o + k] = max(lo, min(hi, nearest_int(f32(f32(xb[o + k] + dm) / dd)))) - lo


@jit
def _pack_k_scale(sc, j, ls, lm):
    if j < 4:
        sc[j] = ls
        sc[j + 4] = lm
    else:
        sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
        sc[j - 4] |= (ls >> 4) << 6
        sc[j] |= (lm >> 4) << 6


@jit
def _k_scale_min(sc, j):
    if j < 4:
        return sc[j] & 63, sc[j + 4] & 63
    return (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)


# -- the fits, many sub-blocks side by side ------------------------------------------------
#
# ggml fits one sub-block at a time, in long chains of dependent float32 sums. Here
# every fit works on a (n, G) slab: column g is one sub-block (16 or 32 weights), and
# each step runs over the G columns at once. Every column still sees exactly ggml's
# operations in ggml's order (so the bytes are the same), but the columns are
# independent, which lets LLVM keep a whole vector register of them in flight.
#
# Codes are kept as float32 (exact for these small integers) and rounded with
# ``np.rint`` (round half to even, ggml's nearest_int below 2**22). A block where some
# rounded value could reach 2**22, or that holds a non-finite weight, is flagged, and
# the caller quantizes it with the torch kernel (the reference) instead.


@jit_inline
def _track_big(iscale, mx, lo, mn, big, G):
    """The largest ``|iscale * (x - mn)|`` of each column into ``big``: the rounded products
    grow with x, so the extremes are those of the column's largest and smallest weight
    (the same float operations, so the same values as a pass over every weight)."""
    for g in range(G):
        a = abs(iscale[g] * (mx[g] - mn[g]))
        b = abs(iscale[g] * (lo[g] - mn[g]))
        big[g] = max(big[g], max(a, b))


@jit
def qkx2_lanes(xt_in, w_in, fn, rmin, rdelta, nstep, use_mad, L_out, st_out):
    """ggml's make_qkx2_quants on every column of ``xt_in`` (n, 16), n <= 32, weights ``w_in``.

    Fills ``L_out`` (n, 16) with the codes and ``st_out`` (12, 16): row 0 the fitted
    minimum, row 10 the fitted scale. A flat column (max == min) comes back with its
    minimum and no usable scale: the caller zeroes it. Returns True when a rounded value
    reached 2**22. The work is done on copies in stack arrays (see ``stack_f32``), so
    that the column loops run as vector instructions."""
    n = min(32, xt_in.shape[0])
    # 16 columns; taken from an argument (LLVM must not see the constant, or it unrolls the
    # small column loops whole into scalar code instead of making them vector loops)
    G = min(16, st_out.shape[1])
    xt = stack_f32(32, 16)
    w = stack_f32(32, 16)
    Laux = stack_f32(32, 16)
    st = stack_f32(15, 16)
    for i in range(n):
        for g in range(G):
            xt[i, g] = xt_in[i, g]
            w[i, g] = w_in[i, g]
    mn, mx, sum_w, sum_x, best, iscale = st[0], st[1], st[2], st[3], st[4], st[5]
    sl, sl2, sxl, mad, scale, big = st[6], st[7], st[8], st[9], st[10], st[11]
    l_iscale, l_mn = st[12], st[13]  # the winning codes are clamp(rint(l_iscale * (x - l_mn)))
    lo = st[14]                      # the column's own minimum
    for g in range(G):
        mn[g] = xt[0, g]
        mx[g] = xt[0, g]
        sum_w[g] = w[0, g]
        sum_x[g] = w[0, g] * xt[0, g]
        big[g] = F0
    for i in range(1, n):
        for g in range(G):
            v = xt[i, g]
            mn[g] = v if v < mn[g] else mn[g]
            mx[g] = v if v > mx[g] else mx[g]
            sum_w[g] = sum_w[g] + w[i, g]
            sum_x[g] = sum_x[g] + w[i, g] * v
    for g in range(G):
        lo[g] = mn[g]
        mn[g] = F0 if mn[g] > F0 else mn[g]
        iscale[g] = fn / (mx[g] - mn[g])
        scale[g] = F1 / iscale[g]
        best[g] = F0
    _track_big(iscale, mx, lo, mn, big, G)
    for g in range(G):
        l_iscale[g] = iscale[g]
        l_mn[g] = mn[g]
    for i in range(n):
        for g in range(G):
            v = iscale[g] * (xt[i, g] - mn[g])
            l = min(max(np.rint(v), F0), fn)
            diff = (scale[g] * l + mn[g]) - xt[i, g]
            diff = abs(diff) if use_mad else diff * diff
            best[g] = best[g] + w[i, g] * diff
    for step in range(nstep + 1):
        num = (rmin + rdelta * f32(step)) + fn
        for g in range(G):
            iscale[g] = num / (mx[g] - mn[g])   # ggml moves the minimum when a step wins
            sl[g] = F0
            sl2[g] = F0
            sxl[g] = F0
        _track_big(iscale, mx, lo, mn, big, G)
        for i in range(n):
            for g in range(G):
                v = iscale[g] * (xt[i, g] - mn[g])
                l = min(max(np.rint(v), F0), fn)
                Laux[i, g] = l
                wl = w[i, g] * l
                sl[g] = sl[g] + wl
                sl2[g] = sl2[g] + wl * l
                sxl[g] = sxl[g] + wl * xt[i, g]
        # every column's fit at once, without branches (so as vector instructions): where
        # ggml finds no fit (D <= 0) the fit is NaN, whose error never wins below
        for g in range(G):
            D = sum_w[g] * sl2[g] - sl[g] * sl[g]
            this_scale = (sum_w[g] * sxl[g] - sum_x[g] * sl[g]) / D
            this_min = (sl2[g] * sum_x[g] - sl[g] * sxl[g]) / D
            only_scale = sxl[g] / sl2[g]       # the fit with its minimum held at 0
            clamp = this_min > F0
            this_scale = only_scale if clamp else this_scale
            this_min = F0 if clamp else this_min
            fits = D > F0
            sl[g] = this_scale if fits else F_NAN   # rows 6 and 7 now hold this step's fit
            sl2[g] = this_min if fits else F_NAN
            mad[g] = F0
        for i in range(n):
            for g in range(G):
                diff = (sl[g] * Laux[i, g] + sl2[g]) - xt[i, g]
                diff = abs(diff) if use_mad else diff * diff
                mad[g] = mad[g] + w[i, g] * diff
        for g in range(G):
            wins = mad[g] < best[g]
            l_iscale[g] = iscale[g] if wins else l_iscale[g]
            l_mn[g] = mn[g] if wins else l_mn[g]
            scale[g] = sl[g] if wins else scale[g]
            mn[g] = sl2[g] if wins else mn[g]
            best[g] = mad[g] if wins else best[g]
    for i in range(n):
        for g in range(G):
            L_out[i, g] = min(max(np.rint(l_iscale[g] * (xt[i, g] - l_mn[g])), F0), fn)
    for r in range(12):
        for g in range(G):
            st_out[r, g] = st[r, g]
    for g in range(G):
        if not (big[g] < F_MAGIC_LIMIT):
            return True
    return False


@jit
def _qx_sums(xt, isc, fn, slx, sl2):
    """One try of make_qx_quants on every column: the weighted sums of x*l and l*l."""
    n, G = xt.shape
    for g in range(G):
        slx[g] = F0
        sl2[g] = F0
    for i in range(n):
        for g in range(G):
            v = xt[i, g]
            l = min(max(np.rint(isc[g] * v), -fn), fn - F1)
            wv = v * v
            slx[g] = slx[g] + (wv * v) * l
            sl2[g] = sl2[g] + (wv * l) * l


@jit_inline
def column_absmax(xt, n, G, mx, amax):
    """Each column's first value of largest magnitude into ``mx`` and that magnitude into
    ``amax`` (0 and 0 for a column of zeros), as ggml's scalar scan leaves them."""
    for g in range(G):
        mx[g] = F0
        amax[g] = F0
    for i in range(n):
        for g in range(G):
            a = abs(xt[i, g])
            larger = a > amax[g]
            amax[g] = a if larger else amax[g]
            mx[g] = xt[i, g] if larger else mx[g]


@jit
def qx_lanes(xt, fn, L, st):
    """ggml's make_qx_quants (rmse_type 1: weights x*x) on every column of ``xt`` (n, G).

    Fills ``L`` (n, G) with codes 0..2*nmax-1; ``st`` (8, G) is scratch whose row 5 ends
    as the scales (0 for a column whose largest magnitude is below ggml's epsilon).
    The rounded values stay within nmax + 1 in magnitude: no 2**22 check is needed."""
    n, G = xt.shape
    mx, amax, isc, slx, sl2, scale, best, pick = st[0], st[1], st[2], st[3], st[4], st[5], st[6], st[7]
    column_absmax(xt, n, G, mx, amax)
    for g in range(G):
        isc[g] = -fn / mx[g] if amax[g] >= F_EPS else F0
    _qx_sums(xt, isc, fn, slx, sl2)
    for g in range(G):
        scale[g] = slx[g] / sl2[g] if sl2[g] != F0 else F0
        best[g] = scale[g] * slx[g]
        pick[g] = isc[g]
    for s in range(-9, 10):
        if s == 0:
            continue
        for g in range(G):
            isc[g] = -(fn + F_TENTH * f32(s)) / mx[g] if amax[g] >= F_EPS else F0
        _qx_sums(xt, isc, fn, slx, sl2)
        for g in range(G):
            if sl2[g] > F0 and slx[g] * slx[g] > best[g] * sl2[g]:
                scale[g] = slx[g] / sl2[g]
                best[g] = scale[g] * slx[g]
                pick[g] = isc[g]
    for i in range(n):
        for g in range(G):
            L[i, g] = fn + min(max(np.rint(pick[g] * xt[i, g]), -fn), fn - F1)
    for g in range(G):
        if amax[g] < F_EPS:
            scale[g] = F0
            for i in range(n):
                L[i, g] = F0


@jit
def _finite(xb):
    for v in xb:
        if not (abs(v) < np.inf):
            return False
    return True


# -- Q4_K and Q5_K: 8 sub-blocks of 32, two blocks (16 columns) at a time ------------------

@jit
def _q45_columns(xb, xt, w, col, flat):
    """Block ``xb``'s 8 sub-blocks into columns col..col+7 of ``xt`` with ggml's weights
    (the sub-block's rms plus |x|); ``flat[g]``: the column's max equals its min (<= 0)."""
    for j in range(8):
        g = col + j
        sum_x2 = F0
        for k in range(32):
            v = xb[32 * j + k]
            xt[k, g] = v
            sum_x2 = sum_x2 + v * v
        av_x = np.sqrt(sum_x2 / F32)
        lo = xt[0, g]
        hi = lo
        for k in range(32):
            v = xt[k, g]
            w[k, g] = av_x + abs(v)
            lo = v if v < lo else lo
            hi = v if v > hi else hi
        flat[g] = hi == (F0 if lo > F0 else lo)


@jit
def _q45_block(xb, out, i, L, st, col, flat, nmax, Lb, scales, mins, sc):
    """Block ``i``'s bytes from its 8 fitted columns: the 6-bit scales and mins, the
    final codes against the stored (fp16-rounded) scales, the packed nibbles."""
    max_scale = F0
    max_min = F0
    for j in range(8):
        g = col + j
        s = F0 if flat[g] else st[10, g]
        m = f32(-st[0, g])
        for k in range(32):
            Lb[32 * j + k] = 0 if flat[g] else int(L[k, g])
        scales[j] = s
        mins[j] = m
        max_scale = s if s > max_scale else max_scale
        max_min = m if m > max_min else max_min
    inv_scale = f32(F63 / max_scale) if max_scale > F0 else F0
    inv_min = f32(F63 / max_min) if max_min > F0 else F0
    for k in range(12):
        sc[k] = 0
    for j in range(8):
        ls = min(63, nearest_int(f32(inv_scale * scales[j])) & 0xFF)
        lm = min(63, nearest_int(f32(inv_min * mins[j])) & 0xFF)
        _pack_k_scale(sc, j, ls, lm)
    d = put_f16(out, i, K_D, f32(max_scale / F63))
    dmin = put_f16(out, i, K_DMIN, f32(max_min / F63))
    for k in range(12):
        out[i, K_SCALES + k] = sc[k]
    for j in range(8):
        si, mi = _k_scale_min(sc, j)
        dd = f32(d * f32(si))
        if dd == F0:
            continue
        _levels_at(xb, Lb, 32 * j, 32, f32(dmin * f32(mi)), dd, 0, nmax)
    if nmax == 15:
        for q in range(4):
            for k in range(32):
                out[i, Q4_QS + 32 * q + k] = Lb[64 * q + k] | (Lb[64 * q + 32 + k] << 4)
        return
    for k in range(32):
        out[i, Q5_QH + k] = 0
    for q in range(4):
        for k in range(32):
            l1 = Lb[64 * q + k]
            l2 = Lb[64 * q + 32 + k]
            h = 0
            if l1 > 15:
                l1 -= 16
                h |= 1 << (2 * q)
            if l2 > 15:
                l2 -= 16
                h |= 2 << (2 * q)
            out[i, Q5_QH + k] |= h
            out[i, Q5_QS + 32 * q + k] = l1 | (l2 << 4)


@pjit
def _q45_k(x, out, redo, nmax, rmin, nstep):
    """Q4_K (nmax 15) and Q5_K (nmax 31); ``redo[i]`` marks the blocks left to the caller."""
    nb = x.shape[0]
    npair = (nb + 1) // 2
    fn = f32(nmax)
    for c in prange((npair + 7) // 8):
        xt = np.empty((32, 16), dtype=np.float32)
        w = np.empty((32, 16), dtype=np.float32)
        L = np.empty((32, 16), dtype=np.float32)
        st = np.empty((12, 16), dtype=np.float32)
        flat = np.empty(16, dtype=np.bool_)
        Lb = np.empty(256, dtype=np.int64)
        scales = np.empty(8, dtype=np.float32)
        mins = np.empty(8, dtype=np.float32)
        sc = np.zeros(12, dtype=np.int64)
        for p in range(c * 8, min(npair, c * 8 + 8)):
            i0 = 2 * p
            i1 = min(nb - 1, i0 + 1)          # an odd last block pairs with itself
            if not (_finite(x[i0]) and _finite(x[i1])):
                redo[i0] = True
                redo[i1] = True
                continue
            _q45_columns(x[i0], xt, w, 0, flat)
            _q45_columns(x[i1], xt, w, 8, flat)
            if qkx2_lanes(xt, w, fn, rmin, F_TENTH, nstep, False, L, st):
                redo[i0] = True
                redo[i1] = True
                continue
            _q45_block(x[i0], out, i0, L, st, 0, flat, nmax, Lb, scales, mins, sc)
            if i1 != i0:
                _q45_block(x[i1], out, i1, L, st, 8, flat, nmax, Lb, scales, mins, sc)


# -- Q6_K and Q2_K: 16 sub-blocks of 16 (16 columns a block) ---------------------------------

@jit
def _columns16(xb, xt):
    for k in range(16):
        for j in range(16):
            xt[k, j] = xb[16 * j + k]


@pjit
def _q6_k(x, out, redo):
    nb = x.shape[0]
    fn = f32(32.0)
    for c in prange((nb + 15) // 16):
        xt = np.empty((16, 16), dtype=np.float32)
        Lt = np.empty((16, 16), dtype=np.float32)
        L = np.empty(256, dtype=np.int64)
        st = np.empty((8, 16), dtype=np.float32)
        for i in range(c * 16, min(nb, c * 16 + 16)):
            xb = x[i]
            if not _finite(xb):
                redo[i] = True
                continue
            _columns16(xb, xt)
            qx_lanes(xt, fn, Lt, st)
            max_scale = F0
            max_abs = F0
            for j in range(16):
                s = st[5, j]
                if abs(s) > max_abs:
                    max_abs = abs(s)
                    max_scale = s
                for k in range(16):
                    L[16 * j + k] = int(Lt[k, j])
            if max_abs < F_EPS:
                for k in range(Q6_SIZE):
                    out[i, k] = 0
                continue
            iscale = f32(-F128 / max_scale)
            d = put_f16(out, i, Q6_D, f32(F1 / iscale))
            for j in range(16):
                q = min(127, nearest_int(f32(iscale * st[5, j])))
                out[i, Q6_SCALES + j] = q & 0xFF
                dd = f32(d * f32(q))
                if dd == F0:
                    continue
                _levels_at(xb, L, 16 * j, 16, F0, dd, -32, 31)
            for h in range(2):
                for k in range(32):
                    a = L[128 * h + k]
                    b = L[128 * h + 32 + k]
                    c2 = L[128 * h + 64 + k]
                    e = L[128 * h + 96 + k]
                    out[i, Q6_QL + 64 * h + k] = (a & 0xF) | ((c2 & 0xF) << 4)
                    out[i, Q6_QL + 64 * h + 32 + k] = (b & 0xF) | ((e & 0xF) << 4)
                    out[i, Q6_QH + 32 * h + k] = (a >> 4) | ((b >> 4) << 2) | ((c2 >> 4) << 4) | ((e >> 4) << 6)


@pjit
def _q2_k(x, out, redo):
    nb = x.shape[0]
    fn = f32(3.0)
    for c in prange((nb + 15) // 16):
        xt = np.empty((16, 16), dtype=np.float32)
        w = np.empty((16, 16), dtype=np.float32)
        L = np.empty((16, 16), dtype=np.float32)
        Lb = np.empty(256, dtype=np.int64)
        st = np.empty((12, 16), dtype=np.float32)
        scales = np.empty(16, dtype=np.float32)
        mins = np.empty(16, dtype=np.float32)
        for i in range(c * 16, min(nb, c * 16 + 16)):
            xb = x[i]
            if not _finite(xb):
                redo[i] = True
                continue
            _columns16(xb, xt)
            for k in range(16):
                for j in range(16):
                    w[k, j] = abs(xt[k, j])
            if qkx2_lanes(xt, w, fn, f32(-0.5), F_TENTH, 15, True, L, st):
                redo[i] = True
                continue
            max_scale = F0
            max_min = F0
            for j in range(16):
                lo = xt[0, j]
                hi = lo
                for k in range(16):
                    lo = xt[k, j] if xt[k, j] < lo else lo
                    hi = xt[k, j] if xt[k, j] > hi else hi
                flat = hi == (F0 if lo > F0 else lo)
                s = F0 if flat else st[10, j]
                m = f32(-st[0, j])
                for k in range(16):
                    Lb[16 * j + k] = 0 if flat else int(L[k, j])
                scales[j] = s
                mins[j] = m
                max_scale = s if s > max_scale else max_scale
                max_min = m if m > max_min else max_min
            if max_scale > F0:
                iscale = f32(F15 / max_scale)
                for j in range(16):
                    out[i, Q2_SCALES + j] = nearest_int(f32(iscale * scales[j])) & 0xFF
                d = put_f16(out, i, Q2_D, f32(max_scale / F15))
            else:
                for j in range(16):
                    out[i, Q2_SCALES + j] = 0
                d = put_f16(out, i, Q2_D, F0)
            if max_min > F0:
                iscale = f32(F15 / max_min)
                for j in range(16):
                    out[i, Q2_SCALES + j] = (out[i, Q2_SCALES + j] | (nearest_int(f32(iscale * mins[j])) << 4)) & 0xFF
                dmin = put_f16(out, i, Q2_DMIN, f32(max_min / F15))
            else:
                dmin = put_f16(out, i, Q2_DMIN, F0)
            for j in range(16):
                dd = f32(d * f32(out[i, Q2_SCALES + j] & 0xF))
                if dd == F0:
                    continue
                _levels_at(xb, Lb, 16 * j, 16, f32(dmin * f32(out[i, Q2_SCALES + j] >> 4)), dd, 0, 3)
            for h in range(2):
                for k in range(32):
                    out[i, Q2_QS + 32 * h + k] = (Lb[128 * h + k] | (Lb[128 * h + 32 + k] << 2)
                                                  | (Lb[128 * h + 64 + k] << 4) | (Lb[128 * h + 96 + k] << 6))


# The side-by-side kernels mark in ``redo`` the blocks they leave (a non-finite weight, or a
# value that would round past 2**22): those are quantized by the torch kernel, the reference.
QUANTIZERS = {
    GGMLType.Q2_K: quantizer(_q2_k, Q2_K.size, leaves_to=GGMLType.Q2_K),
    GGMLType.Q4_K: quantizer(lambda x, o, r: _q45_k(x, o, r, 15, f32(-1.0), 20), Q4_K.size, leaves_to=GGMLType.Q4_K),
    GGMLType.Q5_K: quantizer(lambda x, o, r: _q45_k(x, o, r, 31, f32(-0.5), 15), Q5_K.size, leaves_to=GGMLType.Q5_K),
    GGMLType.Q6_K: quantizer(_q6_k, Q6_K.size, leaves_to=GGMLType.Q6_K),
}
DEQUANTIZERS: dict = {}
