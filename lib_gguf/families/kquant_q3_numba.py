"""Compiled (numba) quantizer of Q3_K, on the layout of :mod:`lib_gguf.families.kquant`: the
same bytes as its torch quantizer (the reference) and as ggml.

ggml's make_q3_quants changes one weight at a time, each choice depending on the sums so
far; here the 16 sub-blocks of a block take those steps side by side, one per column of
stack arrays (``stack_f32``, so that the column loops run as vector instructions). A block
holding a non-finite weight, or a value past nearest_int's exact range, is left to the
torch kernel."""
from __future__ import annotations

import numpy as np

from ..formats import GGMLType
from ..numba_support import (F0, F1, F_EPS, F_MAGIC_LIMIT, f32, jit, jit_inline, nearest_int, pjit, prange, put_f16,
                             quantizer, signed_absmax, stack_f32, stack_i64)
from .kquant import Q3_K
from .kquant_numba import F32, _CHUNK, _columns16, _finite, column_absmax

F3 = f32(3.0)
F4 = f32(4.0)
F_M4 = f32(-4.0)
Q3_HMASK, Q3_QS, Q3_SCALES, Q3_D = Q3_K.hmask.offset, Q3_K.qs.offset, Q3_K.scales.offset, Q3_K.d.offset


@jit_inline
def _q3_step(xt, w, wx, L, Lnew, i, G, fmin, ftop, sx, s2, sx_out, s2_out, moved, big):
    """make_q3_quants' try on weight ``i`` of every column: from the sums (sx, s2) to
    (sx_out, s2_out), the code into ``Lnew``."""
    for g in range(G):
        li = L[i, g]
        slx = sx[g] - wx[i, g] * li
        sl2 = s2[g] - (w[i, g] * li) * li
        v = (xt[i, g] * sl2) / slx
        ok = slx > F0
        big[g] = max(big[g], F1 if ok and not (abs(v) < F_MAGIC_LIMIT) else F0)
        new_l = min(max(np.rint(v), fmin), ftop)
        slx2 = slx + wx[i, g] * new_l
        sl22 = sl2 + (w[i, g] * new_l) * new_l
        take = ok and new_l != li and sl22 > F0 and (slx2 * slx2) * s2[g] > (sx[g] * sx[g]) * sl22
        Lnew[i, g] = new_l if take else li
        sx_out[g] = slx2 if take else sx[g]
        s2_out[g] = sl22 if take else s2[g]
        moved[g] = max(moved[g], F1 if take else F0)


@jit
def make_q3_lanes(xt_in, nmax, L_out, scale_out):
    """ggml's make_q3_quants (do_rmse) on every column of ``xt_in`` (16, 16): one sub-block
    of 16 weights a column. Fills ``L_out`` with codes 0..2*nmax-1 and ``scale_out`` (16)
    with the scales; returns True when some rounded value that counts was 2**22 or more
    (nearest_int's exact range ends there: the caller leaves that block to the torch kernel).

    ggml changes one weight at a time, each choice depending on the sums so far; here
    the 16 columns take that walk side by side, each step a select per column. A column
    whose pass changed nothing would change nothing in a further pass (its state is the
    same), so running passes until no column changes gives ggml's result in every column."""
    n = min(16, xt_in.shape[0])
    G = min(16, scale_out.shape[0])   # from an argument: see qkx2_lanes
    fmax = f32(nmax)
    fmin = f32(-nmax)
    ftop = f32(nmax - 1)
    xt = stack_f32(16, 16)
    w = stack_f32(16, 16)
    wx = stack_f32(16, 16)
    L = stack_f32(16, 16)
    Lnew = stack_f32(16, 16)
    st = stack_f32(8, 16)
    mx, amax, sumlx, suml2, moved, big, sumlx_b, suml2_b = st[0], st[1], st[2], st[3], st[4], st[5], st[6], st[7]
    for i in range(n):
        for g in range(G):
            v = xt_in[i, g]
            xt[i, g] = v
            w[i, g] = v * v
            wx[i, g] = (v * v) * v
    for g in range(G):
        big[g] = F0
    column_absmax(xt, n, G, mx, amax)
    for g in range(G):
        mx[g] = -fmax / mx[g]             # now the first try's inverse scale
        sumlx[g] = F0
        suml2[g] = F0
    for i in range(n):
        for g in range(G):
            l = min(max(np.rint(mx[g] * xt[i, g]), fmin), ftop)
            L[i, g] = l
            sumlx[g] = sumlx[g] + wx[i, g] * l
            suml2[g] = suml2[g] + (w[i, g] * l) * l
    # Each step reads the sums from one pair of rows and writes them whole into the other
    # (and the codes into Lnew): a kept value is then a plain store, not a store under a
    # mask, which is slow on many CPUs. n is even, so a pass ends with the sums back in
    # (sumlx, suml2).
    for _ in range(5):
        for g in range(G):
            moved[g] = F0
        for i in range(0, n, 2):
            _q3_step(xt, w, wx, L, Lnew, i, G, fmin, ftop, sumlx, suml2, sumlx_b, suml2_b, moved, big)
            _q3_step(xt, w, wx, L, Lnew, i + 1, G, fmin, ftop, sumlx_b, suml2_b, sumlx, suml2, moved, big)
        any_moved = F0
        for g in range(G):
            any_moved = max(any_moved, moved[g])
        for i in range(n):
            for g in range(G):
                L[i, g] = Lnew[i, g]
        if any_moved == F0:
            break
    flagged = False
    for g in range(G):
        zero = amax[g] < F_EPS
        scale_out[g] = F0 if zero else sumlx[g] / suml2[g]
        for i in range(n):
            L_out[i, g] = F0 if zero else L[i, g] + fmax
        flagged = flagged or big[g] != F0
    return flagged


@jit
def _q3_k(xb, out, i):
    """Block ``i`` of Q3_K from ``xb``; False when it is left to the torch kernel."""
    xt = stack_f32(16, 16)
    Lt = stack_f32(16, 16)
    scales = stack_f32(1, 16)[0]
    dd = stack_f32(1, 16)[0]
    L = stack_i64(1, 256)[0]
    _columns16(xb, xt)
    if make_q3_lanes(xt, 4, Lt, scales):
        return False
    max_scale = signed_absmax(scales)[0]
    for k in range(12):
        out[i, Q3_SCALES + k] = 0
    if max_scale != F0:
        iscale = f32(-F32 / max_scale)
        for j in range(16):
            l = max(-32, min(31, nearest_int(f32(iscale * scales[j])))) + 32
            if j < 8:
                out[i, Q3_SCALES + j] = l & 0xF
            else:
                out[i, Q3_SCALES + j - 8] |= (l & 0xF) << 4
            out[i, Q3_SCALES + 8 + j % 4] |= (l >> 4) << (2 * (j // 4))
        d = put_f16(out, i, Q3_D, f32(F1 / iscale))
    else:
        d = put_f16(out, i, Q3_D, F0)
    for j in range(16):
        lo4 = np.int64(out[i, Q3_SCALES + j]) & 0xF if j < 8 else np.int64(out[i, Q3_SCALES + j - 8]) >> 4
        sv = (lo4 | (((np.int64(out[i, Q3_SCALES + 8 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32
        dd[j] = f32(d * f32(sv))
    # the final codes against the stored scales (a sub-block whose scale is 0 keeps its fit's)
    big = F0
    for k in range(16):
        for j in range(16):
            v = (xt[k, j] + F0) / dd[j]
            keep = dd[j] == F0
            big = max(big, F0 if keep or abs(v) < F_MAGIC_LIMIT else F1)
            Lt[k, j] = Lt[k, j] if keep else min(max(np.rint(v), F_M4), F3) + F4
    if big != F0:
        return False
    for j in range(16):
        for k in range(16):
            L[16 * j + k] = int(Lt[k, j])
    for k in range(32):
        h = 0
        for q in range(8):
            h |= (1 << q) if L[32 * q + k] > 3 else 0
        out[i, Q3_HMASK + k] = h
    for h in range(2):
        for k in range(32):
            out[i, Q3_QS + 32 * h + k] = ((L[128 * h + k] & 3) | ((L[128 * h + 32 + k] & 3) << 2)
                                       | ((L[128 * h + 64 + k] & 3) << 4) | ((L[128 * h + 96 + k] & 3) << 6))
    return True


@pjit
def _quantize_q3(x, out, redo):
    """Every block of ``x`` in Q3_K, ``_CHUNK`` blocks a parallel work item."""
    for c in prange((x.shape[0] + _CHUNK - 1) // _CHUNK):
        for i in range(c * _CHUNK, min(x.shape[0], c * _CHUNK + _CHUNK)):
            if not (_finite(x[i]) and _q3_k(x[i], out, i)):
                redo[i] = True


QUANTIZERS = {GGMLType.Q3_K: quantizer(_quantize_q3, Q3_K.size, leaves_to=GGMLType.Q3_K)}
DEQUANTIZERS: dict = {}
