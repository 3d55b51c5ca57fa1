"""Compiled (numba) dequantizers of the K-quants Q2_K, Q3_K, Q4_K, Q5_K and Q6_K, on the
layouts of :mod:`lib_gguf.families.kquant`: the same float32 operations in the same
order as its torch kernels (the reference), so the same values bit for bit.

One pass per 256-weight block, straight from the file's bytes to the output (float32,
or float16 through :func:`~lib_gguf.numba_support.put`), each run of 16 or 32 weights in
vector lanes (its length passed in, see :mod:`lib_gguf.numba_support`): the torch kernels make
several whole-tensor intermediates (unpacked codes, scales) and pay a fixed cost per
chunk, which is most of their time on the small and medium weights of a model. (The
quantizers are in :mod:`kquant_numba`.)
"""
from __future__ import annotations

import numpy as np

from ..formats import GGMLType
from ..numba_support import dequantizer, f32, half, jit, jit_inline, pjit, prange, put
from .kquant import Q2_K, Q3_K, Q4_K, Q5_K, Q6_K

_CHUNK = 128  # 256-weight blocks a parallel work item

Q2_SC, Q2_QS, Q2_D, Q2_DMIN = Q2_K.scales.offset, Q2_K.qs.offset, Q2_K.d.offset, Q2_K.dmin.offset
Q3_HM, Q3_QS, Q3_SC, Q3_D = Q3_K.hmask.offset, Q3_K.qs.offset, Q3_K.scales.offset, Q3_K.d.offset
Q4_D, Q4_DMIN, Q4_SC, Q4_QS = Q4_K.d.offset, Q4_K.dmin.offset, Q4_K.scales.offset, Q4_K.qs.offset
Q5_D, Q5_DMIN, Q5_SC, Q5_QH, Q5_QS = Q5_K.d.offset, Q5_K.dmin.offset, Q5_K.scales.offset, Q5_K.qh.offset, Q5_K.qs.offset
Q6_QL, Q6_QH, Q6_SC, Q6_D = Q6_K.ql.offset, Q6_K.qh.offset, Q6_K.scales.offset, Q6_K.d.offset


@jit_inline
def _scale_min(r, sc_off, j):
    """Q4_K / Q5_K: sub-block ``j``'s 6-bit scale and min from the 12 packed bytes."""
    if j < 4:
        return np.int64(r[sc_off + j]) & 63, np.int64(r[sc_off + 4 + j]) & 63
    hi = np.int64(r[sc_off + 4 + j])
    sc = (hi & 0x0F) | ((np.int64(r[sc_off + j - 4]) >> 6) << 4)
    mn = (hi >> 4) | ((np.int64(r[sc_off + j]) >> 6) << 4)
    return sc, mn


@jit_inline
def _dq_q2_k(r, o, n):
    """16 sub-blocks of ``n`` = 16: element e = 128 h + 32 s + l."""
    d = half(r[Q2_D], r[Q2_D + 1])
    dmin = half(r[Q2_DMIN], r[Q2_DMIN + 1])
    for e16 in range(16):
        sc = np.int64(r[Q2_SC + e16])
        dl = f32(d * f32(sc & 0x0F))
        ml = f32(dmin * f32(sc >> 4))
        shift = 2 * ((e16 // 2) % 4)
        base = Q2_QS + 32 * (e16 // 8) + 16 * (e16 % 2)
        for l in range(n):
            q = (np.int32(r[base + l]) >> shift) & 3
            put(o, 16 * e16 + l, f32(f32(f32(q) * dl) - ml))


@jit_inline
def _dq_q3_k(r, o, n):
    """16 sub-blocks of ``n`` = 16: 2 low bits from ``qs``, the third from ``hmask``."""
    d = half(r[Q3_D], r[Q3_D + 1])
    for e16 in range(16):
        lo = (np.int64(r[Q3_SC + e16 % 8]) >> (4 * (e16 // 8))) & 0x0F
        hi = (np.int64(r[Q3_SC + 8 + e16 % 4]) >> (2 * (e16 // 4))) & 0x03
        dl = f32(d * f32((lo | (hi << 4)) - 32))
        shift = 2 * ((e16 // 2) % 4)
        hbit = e16 // 2
        qs = Q3_QS + 32 * (e16 // 8) + 16 * (e16 % 2)
        hm = Q3_HM + 16 * (e16 % 2)
        for l in range(n):
            q = (np.int32(r[qs + l]) >> shift) & 3
            m = (np.int32(r[hm + l]) >> hbit) & 1
            put(o, 16 * e16 + l, f32(f32((q | (m << 2)) - 4) * dl))


@jit_inline
def _dq_q45_k(r, o, n, five):
    """Q4_K (``five`` False) and Q5_K: 8 sub-blocks of ``n`` = 32, low nibbles of 32 bytes
    then their high nibbles; Q5_K's fifth bit of sub-block j's weight l at bit j of
    ``qh[l]``. ``five`` is the caller's constant, which inlining folds in."""
    d_off, dmin_off, sc_off, qs_off = (Q5_D, Q5_DMIN, Q5_SC, Q5_QS) if five else (Q4_D, Q4_DMIN, Q4_SC, Q4_QS)
    d = half(r[d_off], r[d_off + 1])
    dmin = half(r[dmin_off], r[dmin_off + 1])
    for j in range(8):
        sc, mn = _scale_min(r, sc_off, j)
        dl = f32(d * f32(sc))
        ml = f32(dmin * f32(mn))
        base = qs_off + 32 * (j // 2)
        shift = 4 * (j % 2)
        for l in range(n):
            q = (np.int32(r[base + l]) >> shift) & 0x0F
            if five:
                q |= ((np.int32(r[Q5_QH + l]) >> j) & 1) << 4
            put(o, 32 * j + l, f32(f32(f32(q) * dl) - ml))


@jit_inline
def _dq_q6_k(r, o, n):
    """Per half (128 weights), run s (32 weights) and column l: the low 4 bits from ``ql``
    (byte l, or l + 32 for runs 1 and 3; low nibble for runs 0 and 1), the high 2 from
    bits 2 s of ``qh`` byte l; each run of 32 has two scales (``n`` = 16 weights each)."""
    d = half(r[Q6_D], r[Q6_D + 1])
    for h in range(2):
        for s in range(4):
            ql = Q6_QL + 64 * h + 32 * (s % 2)
            shift = 4 * (s // 2)
            for part in range(2):
                sc = np.int64(r[Q6_SC + 8 * h + 2 * s + part])
                dl = f32(d * f32(sc - 256 if sc > 127 else sc))
                at = 128 * h + 32 * s + n * part
                for l in range(n):
                    c = n * part + l
                    lo = (np.int32(r[ql + c]) >> shift) & 0x0F
                    hi = (np.int32(r[Q6_QH + 32 * h + c]) >> (2 * s)) & 0x03
                    put(o, at + l, f32(f32((lo | (hi << 4)) - 32) * dl))


@jit
def _blocks(b, out, lo, hi, kind):
    """Blocks ``lo:hi`` of one format (``kind`` 2-6: Q2_K-Q6_K), one loop per format; the
    lane counts come from the output's width (256), not constants (see numba_support)."""
    n16 = out.shape[1] // 16
    n32 = 2 * n16
    if kind == 4:
        for i in range(lo, hi):
            _dq_q45_k(b[i], out[i], n32, False)
    elif kind == 6:
        for i in range(lo, hi):
            _dq_q6_k(b[i], out[i], n16)
    elif kind == 5:
        for i in range(lo, hi):
            _dq_q45_k(b[i], out[i], n32, True)
    elif kind == 3:
        for i in range(lo, hi):
            _dq_q3_k(b[i], out[i], n16)
    else:
        for i in range(lo, hi):
            _dq_q2_k(b[i], out[i], n16)


@pjit
def _drive(b, out, chunk, kind, table, ksign):
    """The dequantizers' parallel loop over chunks of ``chunk`` blocks."""
    for c in prange((b.shape[0] + chunk - 1) // chunk):
        _blocks(b, out, c * chunk, min(b.shape[0], c * chunk + chunk), kind)


DEQUANTIZERS = {
    GGMLType.Q2_K: dequantizer(_drive, 2, _CHUNK),
    GGMLType.Q3_K: dequantizer(_drive, 3, _CHUNK),
    GGMLType.Q4_K: dequantizer(_drive, 4, _CHUNK),
    GGMLType.Q5_K: dequantizer(_drive, 5, _CHUNK),
    GGMLType.Q6_K: dequantizer(_drive, 6, _CHUNK),
}
QUANTIZERS: dict = {}
