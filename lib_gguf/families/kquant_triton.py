"""Triton value functions of the K-quants, on the layouts of
:mod:`lib_gguf.families.kquant` (conventions and exactness: :mod:`lib_gguf.dequant_triton`)."""
from __future__ import annotations

from ..formats import GGMLType
from ..triton_support import const, triton
from .kquant import Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K

VALUES: dict = {}

if triton is not None:
    import triton.language as tl

    from ..triton_support import f16f, f32f, i8f, u8

    Q2_SCALES, Q2_QS, Q2_D, Q2_DMIN = (const(Q2_K.scales.offset), const(Q2_K.qs.offset), const(Q2_K.d.offset),
                                       const(Q2_K.dmin.offset))
    Q3_HMASK, Q3_QS, Q3_SCALES, Q3_D = (const(Q3_K.hmask.offset), const(Q3_K.qs.offset), const(Q3_K.scales.offset),
                                        const(Q3_K.d.offset))
    Q3_SCALES_HI = const(Q3_K.scales.offset + 8)
    Q4_QS = const(Q4_K.qs.offset)
    Q5_QH, Q5_QS = const(Q5_K.qh.offset), const(Q5_K.qs.offset)
    Q6_QL, Q6_QH, Q6_SCALES, Q6_D = (const(Q6_K.ql.offset), const(Q6_K.qh.offset), const(Q6_K.scales.offset),
                                     const(Q6_K.d.offset))
    Q8_D, Q8_QS = const(Q8_K.d.offset), const(Q8_K.qs.offset)

    @triton.jit
    def _crumb(src, off, j, mask, qs: tl.constexpr):
        """2-bit code ``j`` of 64 bytes at ``qs``: 128 weights a 32-byte half, each byte
        holding weights l, l+32, l+64, l+96 of it in bits 0-1, 2-3, 4-5, 6-7."""
        return (u8(src, off + qs + (j // 128) * 32 + (j % 32), mask) >> (((j // 32) % 4) * 2)) & 0x03

    @triton.jit
    def q2_k(src, off, j, mask, tab):
        sc = u8(src, off + Q2_SCALES + j // 16, mask)
        d = f16f(src, off + Q2_D, mask)
        dmin = f16f(src, off + Q2_DMIN, mask)
        dl = d * (sc & 0x0F).to(tl.float32)
        ml = dmin * (sc >> 4).to(tl.float32)
        return _crumb(src, off, j, mask, Q2_QS).to(tl.float32) * dl - ml

    @triton.jit
    def q3_k(src, off, j, mask, tab):
        d = f16f(src, off + Q3_D, mask)
        t = j // 16  # sub-block: 6-bit scale, low 4 bits in the first 8 scale bytes, high 2 in the last 4
        lo = (u8(src, off + Q3_SCALES + (t % 8), mask) >> ((t // 8) * 4)) & 0x0F
        hi = (u8(src, off + Q3_SCALES_HI + (t % 4), mask) >> ((t // 4) * 2)) & 0x03
        dl = d * ((lo | (hi << 4)) - 32).to(tl.float32)
        h = (u8(src, off + Q3_HMASK + (j % 32), mask) >> (j // 32)) & 1
        q = (_crumb(src, off, j, mask, Q3_QS) | (h << 2)) - 4
        return q.to(tl.float32) * dl

    # Q4_K and Q5_K share the head: d, dmin, 12 bytes of 6-bit scales and mins
    K_D, K_DMIN, K_SCALES = const(Q4_K.d.offset), const(Q4_K.dmin.offset), const(Q4_K.scales.offset)

    @triton.jit
    def _k_dl_ml(src, off, sb, mask):
        """Q4_K / Q5_K: sub-block ``sb``'s scale and offset, d * scale and dmin * min."""
        i = sb % 4
        a = u8(src, off + K_SCALES + i, mask)
        m = u8(src, off + K_SCALES + 4 + i, mask)
        md = u8(src, off + K_SCALES + 8 + i, mask)
        sc = tl.where(sb < 4, a & 0x3F, (md & 0x0F) | ((a >> 2) & 0x30))
        mn = tl.where(sb < 4, m & 0x3F, (md >> 4) | ((m >> 2) & 0x30))
        return f16f(src, off + K_D, mask) * sc.to(tl.float32), f16f(src, off + K_DMIN, mask) * mn.to(tl.float32)

    @triton.jit
    def q4_k(src, off, j, mask, tab):
        sb = j // 32
        dl, ml = _k_dl_ml(src, off, sb, mask)
        q = (u8(src, off + Q4_QS + (j // 64) * 32 + (j % 32), mask) >> ((sb % 2) * 4)) & 0x0F
        return q.to(tl.float32) * dl - ml

    @triton.jit
    def q5_k(src, off, j, mask, tab):
        sb = j // 32
        dl, ml = _k_dl_ml(src, off, sb, mask)
        q = (u8(src, off + Q5_QS + (j // 64) * 32 + (j % 32), mask) >> ((sb % 2) * 4)) & 0x0F
        q = q | (((u8(src, off + Q5_QH + (j % 32), mask) >> sb) & 1) << 4)
        return q.to(tl.float32) * dl - ml

    @triton.jit
    def q6_k(src, off, j, mask, tab):
        d = f16f(src, off + Q6_D, mask)
        dl = d * i8f(src, off + Q6_SCALES + j // 16, mask)
        h = j // 128
        ql = (u8(src, off + Q6_QL + h * 64 + (j % 64), mask) >> (((j // 64) % 2) * 4)) & 0x0F
        qh = (u8(src, off + Q6_QH + h * 32 + (j % 32), mask) >> (((j // 32) % 4) * 2)) & 0x03
        return ((ql | (qh << 4)) - 32).to(tl.float32) * dl

    @triton.jit
    def q8_k(src, off, j, mask, tab):
        return i8f(src, off + Q8_QS + j, mask) * f32f(src, off + Q8_D, mask)

    VALUES = {GGMLType.Q2_K: (q2_k, None), GGMLType.Q3_K: (q3_k, None), GGMLType.Q4_K: (q4_k, None),
              GGMLType.Q5_K: (q5_k, None), GGMLType.Q6_K: (q6_k, None), GGMLType.Q8_K: (q8_k, None)}
