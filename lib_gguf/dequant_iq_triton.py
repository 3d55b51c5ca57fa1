"""Triton dequantizers for the formats of :mod:`lib_gguf.dequant_iq`: the non-linear
IQ4 formats, the lattice IQ formats, the ternary formats and the micro-scaled FP4
formats. Same conventions and exactness as :mod:`lib_gguf.dequant_triton` (which
imports this module and runs its value functions).

Lookup tables (IQ4 levels, FP4 values, the lattice grids) are small float32 tensors
on the weight's device, read with one gather a weight.
"""
from __future__ import annotations

import torch

from .dequant_triton import register, triton, tl
from .formats import GGMLType as T, get_format


def _levels(values):
    def make(device):
        return torch.tensor(values, dtype=torch.float32, device=device)

    return make


def _grid_table(name: str):
    def make(device):
        from .grids import grid

        return grid(name, device).to(torch.float32).contiguous().reshape(-1)

    return make


def _reg(t, fn, table=None):
    f = get_format(t)
    register(t, fn, f.block_size, f.type_size, table)


if triton is not None:
    from .dequant_iq import E2M1_DOUBLED, IQ4NL_LEVELS
    from .dequant_triton import f16f, u8

    # -- IQ4_NL / IQ4_XS: 16 non-linear levels (``tab``) -------------------------------

    @triton.jit
    def iq4_nl(src, off, j, mask, tab):
        d = f16f(src, off, mask)
        nib = (u8(src, off + 2 + (j % 16), mask) >> ((j // 16) * 4)) & 0x0F
        return d * tl.load(tab + nib)

    @triton.jit
    def iq4_xs(src, off, j, mask, tab):
        d = f16f(src, off, mask)
        ib = j // 32
        sh = u8(src, off + 2, mask) | (u8(src, off + 3, mask) << 8)
        lo = (u8(src, off + 4 + ib // 2, mask) >> ((ib % 2) * 4)) & 0x0F
        hi = (sh >> (ib * 2)) & 0x03
        dl = d * ((lo | (hi << 4)) - 32).to(tl.float32)
        nib = (u8(src, off + 8 + ib * 16 + (j % 16), mask) >> (((j // 16) % 2) * 4)) & 0x0F
        return dl * tl.load(tab + nib)

    _reg(T.IQ4_NL, iq4_nl, _levels(IQ4NL_LEVELS))
    _reg(T.IQ4_XS, iq4_xs, _levels(IQ4NL_LEVELS))

    # -- ternary --------------------------------------------------------------------

    @triton.jit
    def tq1_0(src, off, j, mask, tab):
        # digit k of a byte: (byte * 3**k mod 256) * 3 >> 8; weights 0..159 from bytes
        # 0..31 (5 digits), 160..239 from 32..47 (5 digits), 240..255 from 48..51 (4)
        k = tl.where(j < 160, j // 32, tl.where(j < 240, (j - 160) // 16, (j - 240) // 4))
        byte = tl.where(j < 160, j % 32, tl.where(j < 240, 32 + (j - 160) % 16, 48 + (j - 240) % 4))
        p3 = tl.where(k == 0, 1, tl.where(k == 1, 3, tl.where(k == 2, 9, tl.where(k == 3, 27, 81))))
        x = (u8(src, off + byte, mask) * p3) & 0xFF
        t = ((x * 3) >> 8) - 1
        return f16f(src, off + 52, mask) * t.to(tl.float32)

    @triton.jit
    def tq2_0(src, off, j, mask, tab):
        q = (u8(src, off + (j // 128) * 32 + (j % 32), mask) >> (((j // 32) % 4) * 2)) & 0x03
        return f16f(src, off + 64, mask) * (q - 1).to(tl.float32)

    _reg(T.TQ1_0, tq1_0)
    _reg(T.TQ2_0, tq2_0)

    # -- FP4: E2M1 values doubled (``tab``), the scale carries the 1/2 ------------------

    @triton.jit
    def mxfp4(src, off, j, mask, tab):
        e = u8(src, off, mask)
        bits = tl.where(e < 2, 0x00200000 << e, (e - 1) << 23)
        d = bits.to(tl.float32, bitcast=True)
        nib = (u8(src, off + 1 + (j % 16), mask) >> ((j // 16) * 4)) & 0x0F
        return d * tl.load(tab + nib)

    @triton.jit
    def nvfp4(src, off, j, mask, tab):
        s = j // 16
        x = u8(src, off + s, mask)
        ex = (x >> 3) & 0x0F
        man = (x & 0x07).to(tl.float32)
        p2 = ((ex + 120) << 23).to(tl.float32, bitcast=True)  # 2 ** (ex - 7), exact
        raw = tl.where(ex == 0, man * 0.001953125, (1.0 + man * 0.125) * p2)  # man * 2**-9
        d = tl.where((x == 0) | (x == 0x7F), 0.0, raw * 0.5)
        nib = (u8(src, off + 4 + s * 8 + (j % 8), mask) >> (((j // 8) % 2) * 4)) & 0x0F
        return d * tl.load(tab + nib)

    _reg(T.MXFP4, mxfp4, _levels(E2M1_DOUBLED))
    _reg(T.NVFP4, nvfp4, _levels(E2M1_DOUBLED))

    # -- lattice formats: grid points (``tab``, the grid's rows, row after row) ---------

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
    def iq2_xxs(src, off, j, mask, tab):
        d = f16f(src, off, mask)
        ib = j // 32
        l = (j // 8) % 4
        q = off + 2 + ib * 8
        aux1 = u8(src, q + 4, mask) | (u8(src, q + 5, mask) << 8) | (u8(src, q + 6, mask) << 16) \
            | (u8(src, q + 7, mask) << 24)
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
        return ib, l, f16f(src, off, mask) * (0.5 + sc.to(tl.float32)) * 0.25

    @triton.jit
    def iq2_xs(src, off, j, mask, tab):
        ib, l, db = _iq2_scale(src, off, j, mask, 66)
        p = off + 2 + (ib * 4 + l) * 2
        q16 = u8(src, p, mask) | (u8(src, p + 1, mask) << 8)
        g = tl.load(tab + (q16 & 511) * 8 + (j % 8))
        return db * _signed(g, _ksign(q16 >> 9), j % 8)

    @triton.jit
    def iq2_s(src, off, j, mask, tab):
        ib, l, db = _iq2_scale(src, off, j, mask, 74)
        hi = (u8(src, off + 66 + ib, mask) >> (2 * l)) & 0x03
        idx = u8(src, off + 2 + ib * 4 + l, mask) | (hi << 8)
        g = tl.load(tab + idx * 8 + (j % 8))
        return db * _signed(g, u8(src, off + 34 + ib * 4 + l, mask), j % 8)

    @triton.jit
    def iq3_xxs(src, off, j, mask, tab):
        d = f16f(src, off, mask)
        ib = j // 32
        pp = (j // 4) % 8
        q = off + 66 + ib * 4
        sc = u8(src, q, mask) | (u8(src, q + 1, mask) << 8) | (u8(src, q + 2, mask) << 16) \
            | (u8(src, q + 3, mask) << 24)
        db = d * (0.5 + ((sc >> 28) & 0x0F).to(tl.float32)) * 0.5
        g = tl.load(tab + u8(src, off + 2 + ib * 8 + pp, mask) * 4 + (j % 4))
        signs = _ksign((sc >> (7 * (pp // 2))) & 0x7F)
        return db * _signed(g, signs, (pp % 2) * 4 + (j % 4))

    @triton.jit
    def iq3_s(src, off, j, mask, tab):
        d = f16f(src, off, mask)
        ib = j // 32
        p = j // 4
        sc = (u8(src, off + 106 + ib // 2, mask) >> ((ib % 2) * 4)) & 0x0F
        db = d * (1 + 2 * sc).to(tl.float32)
        hi = (u8(src, off + 66 + ib, mask) >> (p % 8)) & 1
        idx = u8(src, off + 2 + p, mask) | (hi << 8)
        g = tl.load(tab + idx * 4 + (j % 4))
        return db * _signed(g, u8(src, off + 74 + p // 2, mask), (p % 2) * 4 + (j % 4))

    @triton.jit
    def iq1_s(src, off, j, mask, tab):
        d = f16f(src, off, mask)
        ib = j // 32
        l = (j // 8) % 4
        qh = u8(src, off + 34 + ib * 2, mask) | (u8(src, off + 35 + ib * 2, mask) << 8)
        dl = d * (2 * ((qh >> 12) & 7) + 1).to(tl.float32)
        delta = tl.where((qh & 0x8000) == 0, 0.125, -0.125)
        idx = u8(src, off + 2 + ib * 4 + l, mask) | (((qh >> (3 * l)) & 7) << 8)
        g = tl.load(tab + idx * 8 + (j % 8))
        return dl * (g + delta)

    @triton.jit
    def iq1_m(src, off, j, mask, tab):
        s0 = u8(src, off + 48, mask) | (u8(src, off + 49, mask) << 8)
        s1 = u8(src, off + 50, mask) | (u8(src, off + 51, mask) << 8)
        s2 = u8(src, off + 52, mask) | (u8(src, off + 53, mask) << 8)
        s3 = u8(src, off + 54, mask) | (u8(src, off + 55, mask) << 8)
        dbits = ((s0 & 0xF000) >> 12) | ((s1 & 0xF000) >> 8) | ((s2 & 0xF000) >> 4) | (s3 & 0xF000)
        d = dbits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        ib = j // 32
        k = ib // 2
        sk = tl.where(k == 0, s0, tl.where(k == 1, s1, tl.where(k == 2, s2, s3)))
        m = (ib % 2) * 2 + (j // 16) % 2
        dl = d * (2 * ((sk >> (3 * m)) & 7) + 1).to(tl.float32)
        p = j // 8
        nib = (u8(src, off + 32 + p // 2, mask) >> ((p % 2) * 4)) & 0x0F
        delta = tl.where((nib & 8) == 0, 0.125, -0.125)
        idx = u8(src, off + p, mask) | ((nib & 7) << 8)
        g = tl.load(tab + idx * 8 + (j % 8))
        return dl * (g + delta)

    for _t, _fn, _g in ((T.IQ2_XXS, iq2_xxs, "IQ2_XXS"), (T.IQ2_XS, iq2_xs, "IQ2_XS"), (T.IQ2_S, iq2_s, "IQ2_S"),
                        (T.IQ3_XXS, iq3_xxs, "IQ3_XXS"), (T.IQ3_S, iq3_s, "IQ3_S"), (T.IQ1_S, iq1_s, "IQ1_S"),
                        (T.IQ1_M, iq1_m, "IQ1_S")):
        _reg(_t, _fn, _grid_table(_g))
