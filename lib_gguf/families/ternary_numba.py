"""Compiled (numba) dequantizers and quantizers of TQ1_0 and TQ2_0, on the layouts of
:mod:`lib_gguf.families.ternary`: the same values and bytes as its torch kernels
(the reference) and as ggml."""
from __future__ import annotations

import numpy as np

from ..formats import GGMLType
from ..numba_support import absmax_scale, dequantizer, emit, f32, half, jit, jit_inline, pjit, prange, quantizer, roundf
from .ternary import TQ1_0, TQ2_0

T1_QS, T1_QH, T1_D = TQ1_0.qs.offset, TQ1_0.qh.offset, TQ1_0.d.offset
T2_QS, T2_D = TQ2_0.qs.offset, TQ2_0.d.offset
_CHUNK = 128  # blocks a parallel work item


# -- dequantizing: block functions for _drive (below) ------------------------------

@jit
def _trit(q, p):
    """Base-3 digit of a TQ1_0 byte: multiplying by 3**k (mod 256) brings digit k to
    the top, and (x * 3) >> 8 reads it; minus one for the ternary value."""
    return f32((((q * p) & 0xFF) * 3 >> 8) - 1)


@jit
def _trits_of(tmp, d, r, src, n, base, digits):
    """The first ``digits`` base-3 digits of bytes ``r[src:src + n]``: digit k of byte m
    to ``tmp[base + k * n + m]``, times ``d``."""
    for m in range(n):
        q = np.int64(r[src + m])
        p = 1
        for k in range(digits):
            tmp[base + k * n + m] = f32(d * _trit(q, p))
            p *= 3


@jit
def _dq_tq1_0(r, tmp, table, ksign):
    d = half(r[T1_D], r[T1_D + 1])
    _trits_of(tmp, d, r, T1_QS, 32, 0, 5)         # 32 bytes x 5 digits: weights 0-159
    _trits_of(tmp, d, r, T1_QS + 32, 16, 160, 5)  # 16 bytes x 5 digits: 160-239
    _trits_of(tmp, d, r, T1_QH, 4, 240, 4)        # 4 bytes x 4 digits: 240-255


@jit
def _dq_tq2_0(r, tmp, table, ksign):
    d = half(r[T2_D], r[T2_D + 1])
    for h in range(2):
        for m in range(32):
            q = np.int64(r[T2_QS + 32 * h + m])
            tmp[128 * h + m] = f32(d * f32((q & 3) - 1))
            tmp[128 * h + 32 + m] = f32(d * f32(((q >> 2) & 3) - 1))
            tmp[128 * h + 64 + m] = f32(d * f32(((q >> 4) & 3) - 1))
            tmp[128 * h + 96 + m] = f32(d * f32((q >> 6) - 1))


# -- quantizing ---------------------------------------------------------------------------

@jit_inline
def _trit_code(v, idv):
    """roundf(v / d) + 1: 0, 1 or 2."""
    return int(roundf(f32(v * idv))) + 1


@jit_inline
def _base3_byte(xb, idv, start, stride, count, scale):
    """The byte ggml stores for the trits of ``xb[start + stride * n]``, n < count, first
    most significant, times ``scale``: ceil(q * 256 / 243)."""
    q = 0
    for n in range(count):
        q = q * 3 + _trit_code(xb[start + stride * n], idv)
    q *= scale
    return (q * 256 + 242) // 243

@jit
def _q_tq1_0(xb, out, i):
    idv = absmax_scale(xb, out, i, T1_D)
    for m in range(32):          # 5 trits a byte over the first 160 weights
        out[i, T1_QS + m] = _base3_byte(xb, idv, m, 32, 5, 1)
    for m in range(16):          # then 5 a byte over the next 80
        out[i, T1_QS + 32 + m] = _base3_byte(xb, idv, 160 + m, 16, 5, 1)
    for j in range(4):           # and 4 a byte over the last 16, shifted to the top trit
        out[i, T1_QH + j] = _base3_byte(xb, idv, 240 + j, 4, 4, 3)


@jit
def _q_tq2_0(xb, out, i):
    idv = absmax_scale(xb, out, i, T2_D)
    for h in range(2):
        for m in range(32):
            q = 0
            for n in range(4):
                q |= (_trit_code(xb[128 * h + m + 32 * n], idv) & 3) << (2 * n)
            out[i, T2_QS + 32 * h + m] = q



@pjit
def _quantize(x, out, kind):
    for i in prange(x.shape[0]):
        if kind == 1:
            _q_tq1_0(x[i], out, i)
        else:
            _q_tq2_0(x[i], out, i)


@pjit
def _drive(b, out, chunk, kind, table, ksign):
    """The dequantizers' parallel loop: block function ``kind`` (1: TQ1_0, 2: TQ2_0)."""
    for c in prange((b.shape[0] + chunk - 1) // chunk):
        tmp = np.empty(out.shape[1], np.float32)
        for i in range(c * chunk, min(b.shape[0], c * chunk + chunk)):
            if kind == 1:
                _dq_tq1_0(b[i], tmp, table, ksign)
            else:
                _dq_tq2_0(b[i], tmp, table, ksign)
            emit(out, i, tmp)


_NO_TABLE = np.zeros((1, 1), dtype=np.float32)

DEQUANTIZERS = {
    GGMLType.TQ1_0: dequantizer(_drive, 1, _CHUNK, lambda: _NO_TABLE),
    GGMLType.TQ2_0: dequantizer(_drive, 2, _CHUNK, lambda: _NO_TABLE),
}
QUANTIZERS = {
    GGMLType.TQ1_0: quantizer(lambda x, out: _quantize(x, out, 1), TQ1_0.size),
    GGMLType.TQ2_0: quantizer(lambda x, out: _quantize(x, out, 2), TQ2_0.size),
}
