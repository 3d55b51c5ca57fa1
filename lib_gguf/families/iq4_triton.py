"""Triton value functions of IQ4_NL and IQ4_XS, on the layouts of
:mod:`lib_gguf.families.iq4`; ``tab`` holds the 16 levels (conventions and
exactness: :mod:`lib_gguf.dequant_triton`)."""
from __future__ import annotations

import torch

from ..formats import GGMLType
from ..triton_support import const, triton
from .iq4 import IQ4_NL, IQ4_XS, LEVELS

VALUES: dict = {}


def _levels(device) -> torch.Tensor:
    return torch.tensor(LEVELS, dtype=torch.float32, device=device)


if triton is not None:
    import triton.language as tl

    from ..triton_support import f16f, u8

    NL_D, NL_QS = const(IQ4_NL.d.offset), const(IQ4_NL.qs.offset)
    XS_D, XS_SCALES_H, XS_SCALES_L, XS_QS = (const(IQ4_XS.d.offset), const(IQ4_XS.scales_h.offset),
                                             const(IQ4_XS.scales_l.offset), const(IQ4_XS.qs.offset))

    @triton.jit
    def iq4_nl(src, off, j, mask, tab):
        d = f16f(src, off + NL_D, mask)
        nib = (u8(src, off + NL_QS + (j % 16), mask) >> ((j // 16) * 4)) & 0x0F
        return d * tl.load(tab + nib)

    @triton.jit
    def iq4_xs(src, off, j, mask, tab):
        d = f16f(src, off + XS_D, mask)
        ib = j // 32
        sh = u8(src, off + XS_SCALES_H, mask) | (u8(src, off + XS_SCALES_H + 1, mask) << 8)
        lo = (u8(src, off + XS_SCALES_L + ib // 2, mask) >> ((ib % 2) * 4)) & 0x0F
        hi = (sh >> (ib * 2)) & 0x03
        dl = d * ((lo | (hi << 4)) - 32).to(tl.float32)
        nib = (u8(src, off + XS_QS + ib * 16 + (j % 16), mask) >> (((j // 16) % 2) * 4)) & 0x0F
        return dl * tl.load(tab + nib)

    VALUES = {GGMLType.IQ4_NL: (iq4_nl, _levels), GGMLType.IQ4_XS: (iq4_xs, _levels)}
