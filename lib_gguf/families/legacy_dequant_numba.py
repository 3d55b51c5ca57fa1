"""Compiled (numba) dequantizers of the 32-weight formats Q4_0, Q4_1, Q5_0, Q5_1, Q8_0
and Q8_1, on the layouts of :mod:`lib_gguf.families.legacy`: the float32 operations of
its torch kernels (the reference) in their order, so the same values bit for bit
(float16 output is the float32 value rounded once, as the torch kernels give it).

One pass per block from the file's bytes to the output, each weight computed and stored
in vector lanes: the loops over a block's weights take their lane count (16 or 32) as
an argument, ``n``, which keeps LLVM from unrolling them into scalar code (see
:mod:`lib_gguf.numba_support`). The block functions are inlined into their format's loop
(``jit_inline``), so the byte offsets the loop passes are constants there: called as
separate functions with those offsets, the Q8_0 loop ran 2.7x slower. (The quantizers are
in :mod:`legacy_numba`.)
"""
from __future__ import annotations

import numpy as np

from ..formats import GGMLType
from ..numba_support import dequantizer, f32, half, jit, jit_inline, pjit, prange, put
from .legacy import Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1

_CHUNK = 1024  # 32-weight blocks a parallel work item
Q4_0_D, Q4_0_QS = Q4_0.d.offset, Q4_0.qs.offset
Q4_1_D, Q4_1_M, Q4_1_QS = Q4_1.d.offset, Q4_1.m.offset, Q4_1.qs.offset
Q5_0_D, Q5_0_QH, Q5_0_QS = Q5_0.d.offset, Q5_0.qh.offset, Q5_0.qs.offset
Q5_1_D, Q5_1_M, Q5_1_QH, Q5_1_QS = Q5_1.d.offset, Q5_1.m.offset, Q5_1.qh.offset, Q5_1.qs.offset
Q8_0_D, Q8_0_QS = Q8_0.d.offset, Q8_0.qs.offset
Q8_1_D, Q8_1_QS = Q8_1.d.offset, Q8_1.qs.offset


@jit_inline
def _dq_q4_0(r, o, n):
    """``d * (q - 8)``, low nibbles first (``n`` = 16 bytes of codes)."""
    d = half(r[Q4_0_D], r[Q4_0_D + 1])
    for j in range(n):
        q = np.int32(r[Q4_0_QS + j])
        put(o, j, f32(f32((q & 0x0F) - 8) * d))
        put(o, n + j, f32(f32((q >> 4) - 8) * d))


@jit_inline
def _dq_q4_1(r, o, n):
    """``d * q + m``, low nibbles first."""
    d = half(r[Q4_1_D], r[Q4_1_D + 1])
    m = half(r[Q4_1_M], r[Q4_1_M + 1])
    for j in range(n):
        q = np.int32(r[Q4_1_QS + j])
        put(o, j, f32(f32(f32(q & 0x0F) * d) + m))
        put(o, n + j, f32(f32(f32(q >> 4) * d) + m))


@jit_inline
def _dq_q5(r, o, n, d_off, m_off, qh_off, qs_off):
    """Q5_0 (``m_off`` < 0: ``d * (q - 16)``) and Q5_1 (``d * q + m``): bit j of the
    little-endian 32-bit ``qh`` is bit 4 of weight j. The offsets are the callers'
    constants, which inlining folds in."""
    d = half(r[d_off], r[d_off + 1])
    qh = (np.int64(r[qh_off]) | (np.int64(r[qh_off + 1]) << 8) | (np.int64(r[qh_off + 2]) << 16)
          | (np.int64(r[qh_off + 3]) << 24))
    lo_bits, hi_bits = np.int32(qh & 0xFFFF), np.int32(qh >> 16)
    if m_off < 0:
        for j in range(n):
            q = np.int32(r[qs_off + j])
            put(o, j, f32(f32(((q & 0x0F) | (((lo_bits >> j) & 1) << 4)) - 16) * d))
            put(o, n + j, f32(f32(((q >> 4) | (((hi_bits >> j) & 1) << 4)) - 16) * d))
    else:
        m = half(r[m_off], r[m_off + 1])
        for j in range(n):
            q = np.int32(r[qs_off + j])
            put(o, j, f32(f32(f32((q & 0x0F) | (((lo_bits >> j) & 1) << 4)) * d) + m))
            put(o, n + j, f32(f32(f32((q >> 4) | (((hi_bits >> j) & 1) << 4)) * d) + m))


@jit_inline
def _dq_q8(r, o, n, d_off, qs_off):
    """``d * q`` for the ``n`` int8 codes at ``qs_off`` (Q8_0, Q8_1: its sum ``s`` unused)."""
    d = half(r[d_off], r[d_off + 1])
    for j in range(n):
        put(o, j, f32(f32(np.int8(r[qs_off + j])) * d))


@jit
def _blocks(b, out, lo, hi, kind):
    """Blocks ``lo:hi`` of one format: ``kind`` 40 Q4_0, 41 Q4_1, 50 Q5_0, 51 Q5_1,
    80 Q8_0, 81 Q8_1. One loop per format (the choice made once, outside it), and the
    lane counts from the output's width (32 weights a block), not from constants (see
    the module's note)."""
    n = out.shape[1]
    h = n // 2
    if kind == 40:
        for i in range(lo, hi):
            _dq_q4_0(b[i], out[i], h)
    elif kind == 41:
        for i in range(lo, hi):
            _dq_q4_1(b[i], out[i], h)
    elif kind == 50:
        for i in range(lo, hi):
            _dq_q5(b[i], out[i], h, Q5_0_D, -1, Q5_0_QH, Q5_0_QS)
    elif kind == 51:
        for i in range(lo, hi):
            _dq_q5(b[i], out[i], h, Q5_1_D, Q5_1_M, Q5_1_QH, Q5_1_QS)
    elif kind == 80:
        for i in range(lo, hi):
            _dq_q8(b[i], out[i], n, Q8_0_D, Q8_0_QS)
    else:
        for i in range(lo, hi):
            _dq_q8(b[i], out[i], n, Q8_1_D, Q8_1_QS)


@pjit
def _drive(b, out, chunk, kind, table, ksign):
    """The dequantizers' parallel loop over chunks of ``chunk`` blocks."""
    for c in prange((b.shape[0] + chunk - 1) // chunk):
        _blocks(b, out, c * chunk, min(b.shape[0], c * chunk + chunk), kind)


DEQUANTIZERS = {t: dequantizer(_drive, kind, _CHUNK)
                for t, kind in ((GGMLType.Q4_0, 40), (GGMLType.Q4_1, 41), (GGMLType.Q5_0, 50), (GGMLType.Q5_1, 51),
                                (GGMLType.Q8_0, 80), (GGMLType.Q8_1, 81))}
QUANTIZERS: dict = {}
