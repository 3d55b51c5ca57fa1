"""Triton value functions of TQ1_0 and TQ2_0, on the layouts of
:mod:`lib_gguf.families.ternary` (conventions and exactness: :mod:`lib_gguf.dequant_triton`)."""
from __future__ import annotations

from ..formats import GGMLType
from ..triton_support import const, triton
from .ternary import TQ1_0, TQ2_0

VALUES: dict = {}

if triton is not None:
    import triton.language as tl

    from ..triton_support import f16f, u8

    T1_QS, T1_QH, T1_D = const(TQ1_0.qs.offset), const(TQ1_0.qh.offset), const(TQ1_0.d.offset)
    T2_QS, T2_D = const(TQ2_0.qs.offset), const(TQ2_0.d.offset)

    @triton.jit
    def tq1_0(src, off, j, mask, tab):
        # digit k of a byte: (byte * 3**k mod 256) * 3 >> 8; weights 0..159 from qs bytes
        # 0..31 (5 digits), 160..239 from qs bytes 32..47 (5 digits), 240..255 from qh (4)
        k = tl.where(j < 160, j // 32, tl.where(j < 240, (j - 160) // 16, (j - 240) // 4))
        byte = tl.where(j < 160, T1_QS + j % 32, tl.where(j < 240, T1_QS + 32 + (j - 160) % 16, T1_QH + (j - 240) % 4))
        p3 = tl.where(k == 0, 1, tl.where(k == 1, 3, tl.where(k == 2, 9, tl.where(k == 3, 27, 81))))
        x = (u8(src, off + byte, mask) * p3) & 0xFF
        t = ((x * 3) >> 8) - 1
        return f16f(src, off + T1_D, mask) * t.to(tl.float32)

    @triton.jit
    def tq2_0(src, off, j, mask, tab):
        q = (u8(src, off + T2_QS + (j // 128) * 32 + (j % 32), mask) >> (((j // 32) % 4) * 2)) & 0x03
        return f16f(src, off + T2_D, mask) * (q - 1).to(tl.float32)

    VALUES = {GGMLType.TQ1_0: (tq1_0, None), GGMLType.TQ2_0: (tq2_0, None)}
