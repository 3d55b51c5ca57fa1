"""Triton value functions of MXFP4 and NVFP4, on the layouts of
:mod:`lib_gguf.families.fp4`; ``tab`` holds the doubled E2M1 values, the scale
readers return half the scale (conventions and exactness: :mod:`lib_gguf.dequant_triton`)."""
from __future__ import annotations

import torch

from ..formats import GGMLType
from ..triton_support import const, triton
from .fp4 import E2M1_DOUBLED, MXFP4, NVFP4

VALUES: dict = {}


def _values(device) -> torch.Tensor:
    return torch.tensor(E2M1_DOUBLED, dtype=torch.float32, device=device)


if triton is not None:
    import triton.language as tl

    from ..triton_support import u8

    MX_E, MX_QS = const(MXFP4.e.offset), const(MXFP4.qs.offset)
    NV_D, NV_QS = const(NVFP4.d.offset), const(NVFP4.qs.offset)

    @triton.jit
    def mxfp4(src, off, j, mask, tab):
        e = u8(src, off + MX_E, mask)
        bits = tl.where(e < 2, 0x00200000 << e, (e - 1) << 23)
        d = bits.to(tl.float32, bitcast=True)
        nib = (u8(src, off + MX_QS + (j % 16), mask) >> ((j // 16) * 4)) & 0x0F
        return d * tl.load(tab + nib)

    @triton.jit
    def nvfp4(src, off, j, mask, tab):
        s = j // 16
        x = u8(src, off + NV_D + s, mask)
        ex = (x >> 3) & 0x0F
        man = (x & 0x07).to(tl.float32)
        p2 = ((ex + 120) << 23).to(tl.float32, bitcast=True)  # 2 ** (ex - 7), exact
        raw = tl.where(ex == 0, man * 0.001953125, (1.0 + man * 0.125) * p2)  # man * 2**-9
        d = tl.where((x == 0) | (x == 0x7F), 0.0, raw * 0.5)
        nib = (u8(src, off + NV_QS + s * 8 + (j % 8), mask) >> (((j // 8) % 2) * 4)) & 0x0F
        return d * tl.load(tab + nib)

    VALUES = {GGMLType.MXFP4: (mxfp4, _values), GGMLType.NVFP4: (nvfp4, _values)}
