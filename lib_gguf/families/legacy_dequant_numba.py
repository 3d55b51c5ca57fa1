"""Compiled (numba) dequantizers of the 32-weight formats Q4_1, Q5_0 and Q5_1, on the layouts of :mod:`lib_gguf.families.legacy`: the float32 operations of
its torch kernels (the reference) in their order, so the same values bit for bit
(float16 output is the float32 value rounded once, as the torch kernels give it).

One pass per block from the file's bytes to the output; the torch kernels' passes over
unpacked codes and their fixed cost per chunk are most of their time on small and
medium weights. Q4_0, Q8_0 and Q8_1 keep their torch kernels: their float16 output is
built in place in a few whole-row passes, which measured faster than this per-block
loop (1 thread, CPU time: 0.7x and 0.4-0.7x). (The quantizers are in :mod:`legacy_numba`.)
"""
from __future__ import annotations

import numpy as np

from ..formats import GGMLType
from ..numba_support import dequantizer, emit, f32, half, jit, pjit, prange
from .legacy import Q4_1, Q5_0, Q5_1

_CHUNK = 1024  # 32-weight blocks a parallel work item
Q4_1_D, Q4_1_M, Q4_1_QS = Q4_1.d.offset, Q4_1.m.offset, Q4_1.qs.offset
Q5_0_D, Q5_0_QH, Q5_0_QS = Q5_0.d.offset, Q5_0.qh.offset, Q5_0.qs.offset
Q5_1_D, Q5_1_M, Q5_1_QH, Q5_1_QS = Q5_1.d.offset, Q5_1.m.offset, Q5_1.qh.offset, Q5_1.qs.offset


@jit
def _dq_q4_1(r, tmp):
    """``d * q + m``, low nibbles first."""
    d = half(r[Q4_1_D], r[Q4_1_D + 1])
    m = half(r[Q4_1_M], r[Q4_1_M + 1])
    for j in range(16):
        q = np.int64(r[Q4_1_QS + j])
        tmp[j] = f32(f32(f32(q & 0x0F) * d) + m)
        tmp[16 + j] = f32(f32(f32(q >> 4) * d) + m)


@jit
def _dq_q5(r, tmp, d_off, m_off, qh_off, qs_off):
    """Q5_0 (``m_off`` < 0: ``d * (q - 16)``) and Q5_1 (``d * q + m``): bit j of the
    little-endian 32-bit ``qh`` is bit 4 of weight j."""
    d = half(r[d_off], r[d_off + 1])
    qh = (np.int64(r[qh_off]) | (np.int64(r[qh_off + 1]) << 8) | (np.int64(r[qh_off + 2]) << 16)
          | (np.int64(r[qh_off + 3]) << 24))
    if m_off < 0:
        for j in range(16):
            q = np.int64(r[qs_off + j])
            tmp[j] = f32(f32(((q & 0x0F) | (((qh >> j) & 1) << 4)) - 16) * d)
            tmp[16 + j] = f32(f32(((q >> 4) | (((qh >> (16 + j)) & 1) << 4)) - 16) * d)
    else:
        m = half(r[m_off], r[m_off + 1])
        for j in range(16):
            q = np.int64(r[qs_off + j])
            tmp[j] = f32(f32(f32((q & 0x0F) | (((qh >> j) & 1) << 4)) * d) + m)
            tmp[16 + j] = f32(f32(f32((q >> 4) | (((qh >> (16 + j)) & 1) << 4)) * d) + m)


@pjit
def _drive(b, out, chunk, kind, table, ksign):
    """The dequantizers' parallel loop: ``kind`` 41 Q4_1, 50 Q5_0, 51 Q5_1."""
    for c in prange((b.shape[0] + chunk - 1) // chunk):
        tmp = np.empty(out.shape[1], np.float32)
        for i in range(c * chunk, min(b.shape[0], c * chunk + chunk)):
            r = b[i]
            if kind == 41:
                _dq_q4_1(r, tmp)
            elif kind == 50:
                _dq_q5(r, tmp, Q5_0_D, -1, Q5_0_QH, Q5_0_QS)
            else:
                _dq_q5(r, tmp, Q5_1_D, Q5_1_M, Q5_1_QH, Q5_1_QS)
            emit(out, i, tmp)


DEQUANTIZERS = {t: dequantizer(_drive, kind, _CHUNK)
                for t, kind in ((GGMLType.Q4_1, 41), (GGMLType.Q5_0, 50), (GGMLType.Q5_1, 51))}
QUANTIZERS: dict = {}
