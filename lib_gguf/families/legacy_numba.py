"""Compiled (numba) quantizers of the legacy formats Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0,
on the layouts of :mod:`lib_gguf.families.legacy`: the same bytes as its torch
quantizers (the reference) and as ggml."""
from __future__ import annotations

from ..formats import GGMLType, get_format
from ..numba_support import F0, F1, F_HALF, f32, jit_inline, pjit, prange, put_f16, quantizer, roundf, signed_absmax
from .legacy import Q4_0, Q4_1, Q5_0, Q5_1, Q8_0

F127 = f32(127.0)


@jit_inline
def _put_codes(out, i, qs_off, j, a, b, qh):
    """Codes ``a`` (weight j) and ``b`` (weight j + 16): their low nibbles into byte j of
    ``qs``; returns ``qh`` with their fifth bits at bits j and j + 16."""
    out[i, qs_off + j] = (a & 0xF) | ((b & 0xF) << 4)
    return qh | (((a >> 4) & 1) << j) | (((b >> 4) & 1) << (j + 16))


@jit_inline
def _put_u32(out, i, o, v):
    for k in range(4):
        out[i, o + k] = (v >> (8 * k)) & 0xFF


# the fields' byte offsets: numba takes module ints as constants
Q8_D, Q8_QS = Q8_0.d.offset, Q8_0.qs.offset
Q4_0_D, Q4_0_QS = Q4_0.d.offset, Q4_0.qs.offset
Q5_0_D, Q5_0_QH, Q5_0_QS = Q5_0.d.offset, Q5_0.qh.offset, Q5_0.qs.offset
Q4_1_D, Q4_1_M, Q4_1_QS = Q4_1.d.offset, Q4_1.m.offset, Q4_1.qs.offset
Q5_1_D, Q5_1_M, Q5_1_QH, Q5_1_QS = Q5_1.d.offset, Q5_1.m.offset, Q5_1.qh.offset, Q5_1.qs.offset


@pjit
def _q8_0(x, out):
    nb = x.shape[0]
    for i in prange(nb):
        amax = F0
        for j in range(32):
            v = abs(x[i, j])
            if v > amax:
                amax = v
        d = f32(amax / F127)
        idv = f32(F1 / d) if d != F0 else F0
        put_f16(out, i, Q8_D, d)
        for j in range(32):
            q = int(roundf(f32(x[i, j] * idv)))
            out[i, Q8_QS + j] = q & 0xFF


@pjit
def _q_sym(x, out, bits):
    """Q4_0 (bits 4) and Q5_0 (bits 5)."""
    d_off, qs_off = (Q4_0_D, Q4_0_QS) if bits == 4 else (Q5_0_D, Q5_0_QS)
    nb = x.shape[0]
    half = 1 << (bits - 1)
    fhalf = f32(half)
    off = f32(f32(half) + F_HALF)
    top = 2 * half - 1
    for i in prange(nb):
        mx = signed_absmax(x[i])[0]
        d = f32(mx / -fhalf)
        idv = f32(F1 / d) if d != F0 else F0
        put_f16(out, i, d_off, d)
        qh = 0
        for j in range(16):
            a = min(top, int(f32(f32(x[i, j] * idv) + off)))
            b = min(top, int(f32(f32(x[i, 16 + j] * idv) + off)))
            qh = _put_codes(out, i, qs_off, j, a, b, qh)
        if bits == 5:
            _put_u32(out, i, Q5_0_QH, qh)


@pjit
def _q_asym(x, out, bits):
    """Q4_1 (bits 4) and Q5_1 (bits 5)."""
    d_off, m_off, qs_off = (Q4_1_D, Q4_1_M, Q4_1_QS) if bits == 4 else (Q5_1_D, Q5_1_M, Q5_1_QS)
    nb = x.shape[0]
    fl = f32((1 << bits) - 1)
    for i in prange(nb):
        lo = x[i, 0]
        hi = x[i, 0]
        for j in range(1, 32):
            v = x[i, j]
            if v < lo:
                lo = v
            if v > hi:
                hi = v
        d = f32(f32(hi - lo) / fl)
        idv = f32(F1 / d) if d != F0 else F0
        put_f16(out, i, d_off, d)
        put_f16(out, i, m_off, lo)
        qh = 0
        for j in range(16):
            a = int(f32(f32(f32(x[i, j] - lo) * idv) + F_HALF))
            b = int(f32(f32(f32(x[i, 16 + j] - lo) * idv) + F_HALF))
            if bits == 4:  # Q5_1 has no clamp (nor has ggml)
                a = min(15, a)
                b = min(15, b)
            qh = _put_codes(out, i, qs_off, j, a, b, qh)
        if bits == 5:
            _put_u32(out, i, Q5_1_QH, qh)


def _size(t) -> int:
    return get_format(t).type_size


QUANTIZERS = {
    GGMLType.Q8_0: quantizer(_q8_0, _size(GGMLType.Q8_0)),
    GGMLType.Q4_0: quantizer(lambda x, o: _q_sym(x, o, 4), _size(GGMLType.Q4_0)),
    GGMLType.Q5_0: quantizer(lambda x, o: _q_sym(x, o, 5), _size(GGMLType.Q5_0)),
    GGMLType.Q4_1: quantizer(lambda x, o: _q_asym(x, o, 4), _size(GGMLType.Q4_1)),
    GGMLType.Q5_1: quantizer(lambda x, o: _q_asym(x, o, 5), _size(GGMLType.Q5_1)),
}
DEQUANTIZERS: dict = {}
