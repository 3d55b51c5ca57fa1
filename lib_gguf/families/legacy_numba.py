"""Compiled (numba) quantizers of the legacy formats Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0,
on the layouts of :mod:`lib_gguf.families.legacy`: the same bytes as its torch
quantizers (the reference) and as ggml.

Speed: each loop over a block's 32 weights is written so that LLVM vectorizes it
(eight lanes with AVX2). numba widens integer arithmetic to int64, which AVX2 can
neither convert floats to nor take the min of, so the codes are int32 throughout
(``I32`` casts). Float min/max reductions do not vectorize without fast-math, so
the block's extremes are found on the floats' bits, as int32 (the scans here
reproduce the scalar scans' choices exactly, NaNs and signed zeros included). Loop
counts come from the arrays' shapes, not constants: LLVM unrolls a loop of known
count before it would vectorize it. Blocks go in chunks whose scales are divided
together.
"""
from __future__ import annotations

import numpy as np

from ..formats import GGMLType, get_format
from ..numba_support import F0, F1, F_HALF, f32, jit_inline, pjit, prange, put_f16, quantizer, roundf
from .legacy import Q4_0, Q4_1, Q5_0, Q5_1, Q8_0

I32 = np.int32
F127 = f32(127.0)
ABS_BITS = I32(0x7FFFFFFF)   # a float's bits less the sign; also int32's largest
INF_BITS = I32(0x7F800000)   # +inf: absolute bits above it are a NaN's
MIN_I32 = I32(-0x80000000)
SIGN_SHIFT = I32(31)
I0, I1, I4, I15 = I32(0), I32(1), I32(4), I32(15)


# -- block scans on the floats' bits ----------------------------------------------------------
#
# Each scans ``x[i, o:o + n]`` (float32) through ``fb``, the same array viewed as int32,
# indexing the 2-d arrays (a row slice would cost a reference count each block).

@jit_inline
def order_key(b):
    """A float's bits -> an int32 in the floats' order (-0 one below +0); its own inverse."""
    return I32(b ^ I32(I32(b >> SIGN_SHIFT) & ABS_BITS))


@jit_inline
def first_zero(x, fb, i, o, n):
    """The first zero (+0 or -0, as it is there)."""
    for j in range(o, o + n):
        if I32(fb[i, j] & ABS_BITS) == I0:
            return x[i, j]
    return F0


@jit_inline
def min_max(x, fb, i, o, n):
    """(lo, hi) as the scalar scan from ``lo = hi = x[0]`` with ``v < lo`` / ``v > hi``
    leaves them: a NaN is skipped, unless x[0] is one; of equal zeros the first."""
    kmin = ABS_BITS
    kmax = MIN_I32
    for j in range(o, o + n):
        b = fb[i, j]
        k = I32(b ^ I32(I32(b >> SIGN_SHIFT) & ABS_BITS))
        nan = I32(b & ABS_BITS) > INF_BITS
        kmin = min(kmin, ABS_BITS if nan else k)
        kmax = max(kmax, MIN_I32 if nan else k)
    if I32(fb[i, o] & ABS_BITS) > INF_BITS:
        return x[i, o], x[i, o]
    lo = I32(order_key(kmin)).view(np.float32)
    hi = I32(order_key(kmax)).view(np.float32)
    if lo == F0 or hi == F0:      # the key puts -0 below +0; the scan keeps the first zero
        z = first_zero(x, fb, i, o, n)
        lo = z if lo == F0 else lo
        hi = z if hi == F0 else hi
    return lo, hi


@jit_inline
def abs_max_bits(fb, i, o, n):
    """The largest absolute value's bits (NaNs skipped; 0 when there is none above 0)."""
    m = I0
    for j in range(o, o + n):
        a = I32(fb[i, j] & ABS_BITS)
        m = max(m, I0 if a > INF_BITS else a)
    return m


@jit_inline
def first_abs_max(x, fb, i, o, n):
    """(the first value of largest magnitude, that magnitude), (0, 0) when all are zero
    or NaN: :func:`~lib_gguf.numba_support.signed_absmax`, in two passes that vectorize."""
    m = abs_max_bits(fb, i, o, n)
    if m == I0:
        return F0, F0
    end = I32(o + n)
    first = end
    for j in range(o, o + n):
        first = min(first, I32(j) if I32(fb[i, j] & ABS_BITS) == m else end)
    return x[i, first], I32(m).view(np.float32)


# -- the kernels ------------------------------------------------------------------------------

# the fields' byte offsets: numba takes module ints as constants
Q8_D, Q8_QS = Q8_0.d.offset, Q8_0.qs.offset
Q4_0_D, Q4_0_QS = Q4_0.d.offset, Q4_0.qs.offset
Q5_0_D, Q5_0_QH, Q5_0_QS = Q5_0.d.offset, Q5_0.qh.offset, Q5_0.qs.offset
Q4_1_D, Q4_1_M, Q4_1_QS = Q4_1.d.offset, Q4_1.m.offset, Q4_1.qs.offset
Q5_1_D, Q5_1_M, Q5_1_QH, Q5_1_QS = Q5_1.d.offset, Q5_1.m.offset, Q5_1.qh.offset, Q5_1.qs.offset


@jit_inline
def _put_pair(out, i, qs_off, j, a, b):
    """Codes ``a`` (weight j) and ``b`` (weight j + 16): their low nibbles into byte j of ``qs``."""
    out[i, qs_off + j] = I32(a & I15) | I32(I32(b & I15) << I4)


POW2 = np.array([1 << j for j in range(16)], dtype=np.int32)


@jit_inline
def _fifth_bit(c, j):
    """Code ``c``'s fifth bit at bit ``j`` (a mask from a table rather than a shift by j,
    which would be int64: this vectorizes in int32)."""
    return I32(POW2[j] & I32(-I32(I32(c >> I4) & I1)))


@jit_inline
def _put_u32(out, i, o, v):
    for k in range(4):
        out[i, o + k] = (v >> (8 * k)) & 0xFF


# Each work item is a chunk of blocks, in three passes: the blocks' extremes, then their
# scales and inverse scales all together (divisions are slow one at a time, and
# these vectorize), then the codes.
CHUNK = 64


@jit_inline
def _chunk_end(x, b0):
    return min(x.shape[0], b0 + CHUNK)


@jit_inline
def _inverses(dv, iv, k_end):
    """iv[k] = 1 / dv[k], 0 where dv[k] is 0."""
    for k in range(k_end):
        iv[k] = f32(F1 / dv[k]) if dv[k] != F0 else F0


@pjit
def _q8_0(x, out):
    fb = x.view(np.int32)
    for c in prange((x.shape[0] + CHUNK - 1) // CHUNK):
        b0 = c * CHUNK
        b1 = _chunk_end(x, b0)
        dv = np.empty(CHUNK, dtype=np.float32)
        iv = np.empty(CHUNK, dtype=np.float32)
        for i in range(b0, b1):
            dv[i - b0] = I32(abs_max_bits(fb, i, 0, x.shape[1])).view(np.float32)
        for k in range(b1 - b0):
            dv[k] = f32(dv[k] / F127)
        _inverses(dv, iv, b1 - b0)
        for i in range(b0, b1):
            idv = iv[i - b0]
            put_f16(out, i, Q8_D, dv[i - b0])
            for j in range(x.shape[1]):
                out[i, Q8_QS + j] = I32(I32(roundf(f32(x[i, j] * idv))) & I32(0xFF))


@jit_inline
def _sym_chunk(x, fb, out, b0, bits, d_off, qs_off, qh_off):
    """Q4_0 (``bits`` 4) or Q5_0 (5) blocks b0.. of a chunk: ``d = max / -2**(bits-1)``,
    max the first value of largest magnitude, codes ``x / d + 2**(bits-1)`` truncated."""
    b1 = _chunk_end(x, b0)
    dv = np.empty(CHUNK, dtype=np.float32)
    iv = np.empty(CHUNK, dtype=np.float32)
    half = I32(1 << (bits - 1))
    off = f32(f32(half) + F_HALF)
    top = I32(2 * half - 1)
    for i in range(b0, b1):
        dv[i - b0] = first_abs_max(x, fb, i, 0, x.shape[1])[0]
    for k in range(b1 - b0):
        dv[k] = f32(dv[k] / -f32(half))
    _inverses(dv, iv, b1 - b0)
    for i in range(b0, b1):
        idv = iv[i - b0]
        put_f16(out, i, d_off, dv[i - b0])
        qh_a = I0  # the fifth bits of weights 0..15 and 16..31
        qh_b = I0
        for j in range(x.shape[1] // 2):  # 16; not a constant, so that LLVM vectorizes rather than unrolls
            a = min(top, I32(f32(f32(x[i, j] * idv) + off)))
            b = min(top, I32(f32(f32(x[i, 16 + j] * idv) + off)))
            _put_pair(out, i, qs_off, j, a, b)
            if bits == 5:
                qh_a |= _fifth_bit(a, j)
                qh_b |= _fifth_bit(b, j)
        if bits == 5:
            _put_u32(out, i, qh_off, np.int64(qh_a) | (np.int64(qh_b) << 16))


@jit_inline
def _asym_chunk(x, fb, out, b0, bits, d_off, m_off, qs_off, qh_off):
    """Q4_1 (``bits`` 4) or Q5_1 (5) blocks b0.. of a chunk: ``m`` the least value, ``d``
    the range over 2**bits - 1, codes ``(x - m) / d`` rounded half up."""
    b1 = _chunk_end(x, b0)
    dv = np.empty(CHUNK, dtype=np.float32)
    iv = np.empty(CHUNK, dtype=np.float32)
    mv = np.empty(CHUNK, dtype=np.float32)
    for i in range(b0, b1):
        mv[i - b0], dv[i - b0] = min_max(x, fb, i, 0, x.shape[1])
    for k in range(b1 - b0):
        dv[k] = f32(f32(dv[k] - mv[k]) / f32((1 << bits) - 1))
    _inverses(dv, iv, b1 - b0)
    for i in range(b0, b1):
        lo = mv[i - b0]
        idv = iv[i - b0]
        put_f16(out, i, d_off, dv[i - b0])
        put_f16(out, i, m_off, lo)
        qh_a = I0
        qh_b = I0
        for j in range(x.shape[1] // 2):
            a = I32(f32(f32(f32(x[i, j] - lo) * idv) + F_HALF))
            b = I32(f32(f32(f32(x[i, 16 + j] - lo) * idv) + F_HALF))
            if bits == 4:  # Q5_1 has no clamp (nor has ggml)
                a = min(I15, a)
                b = min(I15, b)
            _put_pair(out, i, qs_off, j, a, b)
            if bits == 5:
                qh_a |= _fifth_bit(a, j)
                qh_b |= _fifth_bit(b, j)
        if bits == 5:
            _put_u32(out, i, qh_off, np.int64(qh_a) | (np.int64(qh_b) << 16))


# one kernel per format, so that each chunk function is compiled for its constants
@pjit
def _q4_0(x, out):
    fb = x.view(np.int32)
    for c in prange((x.shape[0] + CHUNK - 1) // CHUNK):
        _sym_chunk(x, fb, out, c * CHUNK, 4, Q4_0_D, Q4_0_QS, 0)


@pjit
def _q5_0(x, out):
    fb = x.view(np.int32)
    for c in prange((x.shape[0] + CHUNK - 1) // CHUNK):
        _sym_chunk(x, fb, out, c * CHUNK, 5, Q5_0_D, Q5_0_QS, Q5_0_QH)


@pjit
def _q4_1(x, out):
    fb = x.view(np.int32)
    for c in prange((x.shape[0] + CHUNK - 1) // CHUNK):
        _asym_chunk(x, fb, out, c * CHUNK, 4, Q4_1_D, Q4_1_M, Q4_1_QS, 0)


@pjit
def _q5_1(x, out):
    fb = x.view(np.int32)
    for c in prange((x.shape[0] + CHUNK - 1) // CHUNK):
        _asym_chunk(x, fb, out, c * CHUNK, 5, Q5_1_D, Q5_1_M, Q5_1_QS, Q5_1_QH)


def _size(t) -> int:
    return get_format(t).type_size


QUANTIZERS = {
    GGMLType.Q8_0: quantizer(_q8_0, _size(GGMLType.Q8_0)),
    GGMLType.Q4_0: quantizer(_q4_0, _size(GGMLType.Q4_0)),
    GGMLType.Q5_0: quantizer(_q5_0, _size(GGMLType.Q5_0)),
    GGMLType.Q4_1: quantizer(_q4_1, _size(GGMLType.Q4_1)),
    GGMLType.Q5_1: quantizer(_q5_1, _size(GGMLType.Q5_1)),
}
DEQUANTIZERS: dict = {}
