"""Compiled (numba) quantizers of IQ4_NL and IQ4_XS, on the layouts and levels of
:mod:`lib_gguf.families.iq4`: the same bytes as its torch quantizers (the
reference) and as ggml."""
from __future__ import annotations

import numpy as np

from ..formats import GGMLType
from ..numba_support import (F0, F1, F_EPS, f32, jit, nearest_int, pjit, prange, put_f16, quantizer, scratch,
                             signed_absmax)
from .iq4 import IQ4_NL, IQ4_XS, LEVELS

F32 = f32(32.0)
LEVELS8 = np.array(LEVELS, dtype=np.int8)
NL_D, NL_QS = IQ4_NL.d.offset, IQ4_NL.qs.offset
XS_D, XS_SCALES_H, XS_SCALES_L, XS_QS = IQ4_XS.d.offset, IQ4_XS.scales_h.offset, IQ4_XS.scales_l.offset, IQ4_XS.qs.offset


@jit
def best_index_int8(val, v):
    """ggml's best_index_int8: the nearest of the sorted levels ``val``, the lower on a tie."""
    n = val.shape[0]
    if v <= f32(val[0]):
        return 0
    if v >= f32(val[n - 1]):
        return n - 1
    ml = 0
    mu = n - 1
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if v < f32(val[mav]):
            mu = mav
        else:
            ml = mav
    return mu - 1 if f32(v - f32(val[mu - 1])) < f32(f32(val[mu]) - v) else mu


@jit
def _level_sums(x, idv):
    """Each weight to its nearest level at inverse scale ``idv``: (sum w q x, sum w q q), w = x*x."""
    sumqx = F0
    sumq2 = F0
    for j in range(32):
        q = f32(LEVELS8[best_index_int8(LEVELS8, f32(idv * x[j]))])
        wq = f32(f32(x[j] * x[j]) * q)
        sumqx = f32(sumqx + f32(wq * x[j]))
        sumq2 = f32(sumq2 + f32(wq * q))
    return sumqx, sumq2


@jit
def iq4_scale(x, ntry):
    """The scale ggml's quantize_row_iq4_nl_impl picks for one 32-weight sub-block
    (weights x*x, ``ntry`` tries each side)."""
    mx, amax = signed_absmax(x[:32])
    if amax < F_EPS:
        return F0
    d = f32(-mx / f32(LEVELS8[0]))
    sumqx, sumq2 = _level_sums(x, f32(F1 / d))
    d = f32(sumqx / sumq2)
    best = f32(d * sumqx)
    for t in range(-ntry, ntry + 1):
        sumqx, sumq2 = _level_sums(x, f32(f32(t + np.int64(LEVELS8[0])) / mx))
        if sumq2 > F0 and f32(sumqx * sumqx) > f32(best * sumq2):
            d = f32(sumqx / sumq2)
            best = f32(d * sumqx)
    return d


@pjit
def _iq4_nl(x, out):
    nb = x.shape[0]
    for i in prange(nb):
        s = iq4_scale(x[i], 7)
        put_f16(out, i, NL_D, s)
        idv = f32(F1 / s) if s != F0 else F0
        for j in range(16):
            a = best_index_int8(LEVELS8, f32(idv * x[i, j]))
            b = best_index_int8(LEVELS8, f32(idv * x[i, 16 + j]))
            out[i, NL_QS + j] = a | (b << 4)


@jit
def _iq4_xs(xb, out, i, scratch, p0, p1, p2):
    scales = scratch[3][:8]
    for j in range(8):
        scales[j] = iq4_scale(xb[32 * j:32 * j + 32], 7)
    max_scale = signed_absmax(scales)[0]
    d = f32(-max_scale / F32)
    put_f16(out, i, XS_D, d)
    idv = f32(F1 / d) if d != F0 else F0
    sh = 0
    for j in range(8):
        l = max(-32, min(31, nearest_int(f32(idv * scales[j]))))
        dl = f32(d * f32(l))
        idl = f32(F1 / dl) if dl != F0 else F0
        for k in range(16):
            a = best_index_int8(LEVELS8, f32(idl * xb[32 * j + k]))
            b = best_index_int8(LEVELS8, f32(idl * xb[32 * j + 16 + k]))
            out[i, XS_QS + 16 * j + k] = a | (b << 4)
        l += 32
        if j % 2 == 0:
            out[i, XS_SCALES_L + j // 2] = l & 0xF
        else:
            out[i, XS_SCALES_L + j // 2] |= (l & 0xF) << 4
        sh |= (l >> 4) << (2 * j)
    out[i, XS_SCALES_H] = sh & 0xFF
    out[i, XS_SCALES_H + 1] = sh >> 8



@pjit
def _iq4_xs_blocks(x, out):
    for c in prange((x.shape[0] + 15) // 16):
        s = scratch()
        for i in range(c * 16, min(x.shape[0], c * 16 + 16)):
            _iq4_xs(x[i], out, i, s, 0, F0, 0)


QUANTIZERS = {
    GGMLType.IQ4_NL: quantizer(_iq4_nl, IQ4_NL.size),
    GGMLType.IQ4_XS: quantizer(_iq4_xs_blocks, IQ4_XS.size),
}
DEQUANTIZERS: dict = {}
