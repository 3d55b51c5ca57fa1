"""Triton value functions of the legacy formats and Q1_0, on the layouts of
:mod:`lib_gguf.families.legacy` (conventions and exactness: :mod:`lib_gguf.dequant_triton`)."""
from __future__ import annotations

from ..formats import GGMLType
from ..triton_support import const, triton
from .legacy import Q1_0, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1

VALUES: dict = {}

if triton is not None:
    import triton.language as tl

    from ..triton_support import f16f, i8f, u8

    Q4_0_D, Q4_0_QS = const(Q4_0.d.offset), const(Q4_0.qs.offset)
    Q4_1_D, Q4_1_M, Q4_1_QS = const(Q4_1.d.offset), const(Q4_1.m.offset), const(Q4_1.qs.offset)
    Q5_0_D, Q5_0_QH, Q5_0_QS = const(Q5_0.d.offset), const(Q5_0.qh.offset), const(Q5_0.qs.offset)
    Q5_1_D, Q5_1_M = const(Q5_1.d.offset), const(Q5_1.m.offset)
    Q5_1_QH, Q5_1_QS = const(Q5_1.qh.offset), const(Q5_1.qs.offset)
    Q8_0_D, Q8_0_QS = const(Q8_0.d.offset), const(Q8_0.qs.offset)
    Q8_1_D, Q8_1_QS = const(Q8_1.d.offset), const(Q8_1.qs.offset)
    Q1_0_D, Q1_0_QS = const(Q1_0.d.offset), const(Q1_0.qs.offset)

    @triton.jit
    def _nib32(src, off, j, mask, qs: tl.constexpr):
        """4-bit code ``j``: low nibbles of the 16 bytes at ``qs``, then high."""
        return (u8(src, off + qs + (j % 16), mask) >> ((j // 16) * 4)) & 0x0F

    @triton.jit
    def _hbit32(src, off, j, mask, qh: tl.constexpr):
        """Bit ``j`` of the little-endian uint32 at ``qh``, as 0 or 16."""
        return ((u8(src, off + qh + j // 8, mask) >> (j % 8)) & 1) << 4

    @triton.jit
    def q4_0(src, off, j, mask, tab):
        d = f16f(src, off + Q4_0_D, mask)
        return (_nib32(src, off, j, mask, Q4_0_QS) - 8).to(tl.float32) * d

    @triton.jit
    def q4_1(src, off, j, mask, tab):
        d = f16f(src, off + Q4_1_D, mask)
        m = f16f(src, off + Q4_1_M, mask)
        return _nib32(src, off, j, mask, Q4_1_QS).to(tl.float32) * d + m

    @triton.jit
    def q5_0(src, off, j, mask, tab):
        d = f16f(src, off + Q5_0_D, mask)
        q = _nib32(src, off, j, mask, Q5_0_QS) | _hbit32(src, off, j, mask, Q5_0_QH)
        return (q - 16).to(tl.float32) * d

    @triton.jit
    def q5_1(src, off, j, mask, tab):
        d = f16f(src, off + Q5_1_D, mask)
        m = f16f(src, off + Q5_1_M, mask)
        q = _nib32(src, off, j, mask, Q5_1_QS) | _hbit32(src, off, j, mask, Q5_1_QH)
        return q.to(tl.float32) * d + m

    @triton.jit
    def q8_0(src, off, j, mask, tab):
        return i8f(src, off + Q8_0_QS + j, mask) * f16f(src, off + Q8_0_D, mask)

    @triton.jit
    def q8_1(src, off, j, mask, tab):
        return i8f(src, off + Q8_1_QS + j, mask) * f16f(src, off + Q8_1_D, mask)

    @triton.jit
    def q1_0(src, off, j, mask, tab):
        """``d`` where bit ``j`` of ``qs`` is set, else ``-d``."""
        d = f16f(src, off + Q1_0_D, mask)
        return tl.where(((u8(src, off + Q1_0_QS + j // 8, mask) >> (j % 8)) & 1) != 0, d, -d)

    VALUES = {GGMLType.Q4_0: (q4_0, None), GGMLType.Q4_1: (q4_1, None), GGMLType.Q5_0: (q5_0, None),
              GGMLType.Q5_1: (q5_1, None), GGMLType.Q8_0: (q8_0, None), GGMLType.Q8_1: (q8_1, None),
              GGMLType.Q1_0: (q1_0, None)}
