"""Triton value functions of the lattice formats, on the layouts of
:mod:`lib_gguf.families.lattice`; ``tab`` holds the grid's points, row after row
(conventions and exactness: :mod:`lib_gguf.dequant_triton`)."""
from __future__ import annotations

import torch

from ..formats import GGMLType
from ..triton_support import const, triton
from .lattice import IQ1_M, IQ1_S, IQ2_S, IQ2_XS, IQ2_XXS, IQ3_S, IQ3_XXS
from .lattice_grids import IQ1_DELTA, grid

VALUES: dict = {}


def _grid_table(name: str):
    def make(device) -> torch.Tensor:
        return grid(name, device).to(torch.float32).contiguous().reshape(-1)

    return make


if triton is not None:
    import triton.language as tl

    from ..triton_support import f16f, u8

    D = const(IQ2_XXS.d.offset)  # every lattice layout with a d has it here (lattice_numba checks)
    X2XXS_QS = const(IQ2_XXS.qs.offset)
    X2XS_QS, X2XS_SCALES = const(IQ2_XS.qs.offset), const(IQ2_XS.scales.offset)
    X2S_QS, X2S_SIGNS = const(IQ2_S.qs.offset), const(IQ2_S.signs.offset)
    X2S_QH, X2S_SCALES = const(IQ2_S.qh.offset), const(IQ2_S.scales.offset)
    X3XXS_QS, X3XXS_SCALES = const(IQ3_XXS.qs.offset), const(IQ3_XXS.scales.offset)
    X3S_QS, X3S_QH = const(IQ3_S.qs.offset), const(IQ3_S.qh.offset)
    X3S_SIGNS, X3S_SCALES = const(IQ3_S.signs.offset), const(IQ3_S.scales.offset)
    X1S_QS, X1S_QH = const(IQ1_S.qs.offset), const(IQ1_S.qh.offset)
    X1M_QS, X1M_QH, X1M_SCALES = const(IQ1_M.qs.offset), const(IQ1_M.qh.offset), const(IQ1_M.scales.offset)
    DELTA = const(IQ1_DELTA)

    @triton.jit
    def _signed(g, byte, bit):
        """``g``, negated where bit ``bit`` of ``byte`` is set (exact)."""
        return tl.where(((byte >> bit) & 1) != 0, -g, g)

    @triton.jit
    def _ksign(s7):
        """ggml's 7-bit sign index -> 8 sign bits (the eighth makes the count even)."""
        p = s7 ^ (s7 >> 1)
        p = p ^ (p >> 2)
        p = p ^ (p >> 4)
        return s7 | ((p & 1) << 7)

    @triton.jit
    def _u32(src, q, mask):
        return u8(src, q, mask) | (u8(src, q + 1, mask) << 8) | (u8(src, q + 2, mask) << 16) \
            | (u8(src, q + 3, mask) << 24)

    @triton.jit
    def _u16(src, q, mask):
        return u8(src, q, mask) | (u8(src, q + 1, mask) << 8)

    @triton.jit
    def _d_group(src, off, j, mask):
        """The block's d, and the 32-weight group of weight ``j``."""
        return f16f(src, off + D, mask), j // 32

    @triton.jit
    def iq2_xxs(src, off, j, mask, tab):
        d, ib = _d_group(src, off, j, mask)
        l = (j // 8) % 4
        q = off + X2XXS_QS + ib * 8
        aux1 = _u32(src, q + 4, mask)
        db = d * (0.5 + ((aux1 >> 28) & 0x0F).to(tl.float32)) * 0.25
        g = tl.load(tab + u8(src, q + l, mask) * 8 + (j % 8))
        return db * _signed(g, _ksign((aux1 >> (7 * l)) & 0x7F), j % 8)

    @triton.jit
    def _iq2_scale(src, off, j, mask, at):
        """IQ2_XS / IQ2_S: group ``ib`` of 32, its quarter ``l``, and the 4-bit scale of
        that half group (the nibbles at byte ``at + ib``) times d."""
        ib = j // 32
        l = (j // 8) % 4
        sc = (u8(src, off + at + ib, mask) >> ((l // 2) * 4)) & 0x0F
        return ib, l, f16f(src, off + D, mask) * (0.5 + sc.to(tl.float32)) * 0.25

    @triton.jit
    def iq2_xs(src, off, j, mask, tab):
        ib, l, db = _iq2_scale(src, off, j, mask, X2XS_SCALES)
        q16 = _u16(src, off + X2XS_QS + (ib * 4 + l) * 2, mask)
        g = tl.load(tab + (q16 & 511) * 8 + (j % 8))
        return db * _signed(g, _ksign(q16 >> 9), j % 8)

    @triton.jit
    def iq2_s(src, off, j, mask, tab):
        ib, l, db = _iq2_scale(src, off, j, mask, X2S_SCALES)
        hi = (u8(src, off + X2S_QH + ib, mask) >> (2 * l)) & 0x03
        idx = u8(src, off + X2S_QS + ib * 4 + l, mask) | (hi << 8)
        g = tl.load(tab + idx * 8 + (j % 8))
        return db * _signed(g, u8(src, off + X2S_SIGNS + ib * 4 + l, mask), j % 8)

    @triton.jit
    def iq3_xxs(src, off, j, mask, tab):
        d, ib = _d_group(src, off, j, mask)
        pp = (j // 4) % 8
        sc = _u32(src, off + X3XXS_SCALES + ib * 4, mask)
        db = d * (0.5 + ((sc >> 28) & 0x0F).to(tl.float32)) * 0.5
        g = tl.load(tab + u8(src, off + X3XXS_QS + ib * 8 + pp, mask) * 4 + (j % 4))
        signs = _ksign((sc >> (7 * (pp // 2))) & 0x7F)
        return db * _signed(g, signs, (pp % 2) * 4 + (j % 4))

    @triton.jit
    def iq3_s(src, off, j, mask, tab):
        d, ib = _d_group(src, off, j, mask)
        p = j // 4
        sc = (u8(src, off + X3S_SCALES + ib // 2, mask) >> ((ib % 2) * 4)) & 0x0F
        db = d * (1 + 2 * sc).to(tl.float32)
        hi = (u8(src, off + X3S_QH + ib, mask) >> (p % 8)) & 1
        idx = u8(src, off + X3S_QS + p, mask) | (hi << 8)
        g = tl.load(tab + idx * 4 + (j % 4))
        return db * _signed(g, u8(src, off + X3S_SIGNS + p // 2, mask), (p % 2) * 4 + (j % 4))

    @triton.jit
    def iq1_s(src, off, j, mask, tab):
        d, ib = _d_group(src, off, j, mask)
        l = (j // 8) % 4
        qh = _u16(src, off + X1S_QH + ib * 2, mask)
        dl = d * (2 * ((qh >> 12) & 7) + 1).to(tl.float32)
        delta = tl.where((qh & 0x8000) == 0, DELTA, -DELTA)
        idx = u8(src, off + X1S_QS + ib * 4 + l, mask) | (((qh >> (3 * l)) & 7) << 8)
        g = tl.load(tab + idx * 8 + (j % 8))
        return dl * (g + delta)

    @triton.jit
    def iq1_m(src, off, j, mask, tab):
        s0 = _u16(src, off + X1M_SCALES, mask)
        s1 = _u16(src, off + X1M_SCALES + 2, mask)
        s2 = _u16(src, off + X1M_SCALES + 4, mask)
        s3 = _u16(src, off + X1M_SCALES + 6, mask)
        dbits = ((s0 & 0xF000) >> 12) | ((s1 & 0xF000) >> 8) | ((s2 & 0xF000) >> 4) | (s3 & 0xF000)
        d = dbits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        ib = j // 32
        k = ib // 2
        sk = tl.where(k == 0, s0, tl.where(k == 1, s1, tl.where(k == 2, s2, s3)))
        m = (ib % 2) * 2 + (j // 16) % 2
        dl = d * (2 * ((sk >> (3 * m)) & 7) + 1).to(tl.float32)
        p = j // 8
        nib = (u8(src, off + X1M_QH + p // 2, mask) >> ((p % 2) * 4)) & 0x0F
        delta = tl.where((nib & 8) == 0, DELTA, -DELTA)
        idx = u8(src, off + X1M_QS + p, mask) | ((nib & 7) << 8)
        g = tl.load(tab + idx * 8 + (j % 8))
        return dl * (g + delta)

    VALUES = {GGMLType.IQ2_XXS: (iq2_xxs, _grid_table("IQ2_XXS")), GGMLType.IQ2_XS: (iq2_xs, _grid_table("IQ2_XS")),
              GGMLType.IQ2_S: (iq2_s, _grid_table("IQ2_S")), GGMLType.IQ3_XXS: (iq3_xxs, _grid_table("IQ3_XXS")),
              GGMLType.IQ3_S: (iq3_s, _grid_table("IQ3_S")), GGMLType.IQ1_S: (iq1_s, _grid_table("IQ1_S")),
              GGMLType.IQ1_M: (iq1_m, _grid_table("IQ1_S"))}
