"""Compiled (numba) dequantizers of IQ4_NL and IQ4_XS, on the layouts of
:mod:`lib_gguf.families.iq4`: each 4-bit code's level times the block's (IQ4_NL) or
sub-block's (IQ4_XS) scale in float32, as its torch kernels (the reference) compute
it, so the same values bit for bit. One pass per block from the file's bytes to the
output. (The quantizers are in :mod:`iq4_numba`.)
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..formats import GGMLType
from ..numba_support import dequantizer, f32, half, jit, jit_inline, pjit, prange, put_nibble_levels
from .iq4 import IQ4_NL, IQ4_XS, LEVELS

NL_D, NL_QS = IQ4_NL.d.offset, IQ4_NL.qs.offset
XS_D, XS_SH, XS_SL, XS_QS = IQ4_XS.d.offset, IQ4_XS.scales_h.offset, IQ4_XS.scales_l.offset, IQ4_XS.qs.offset


@lru_cache(maxsize=None)
def _levels():
    return np.array(LEVELS, dtype=np.float32)


@jit_inline
def _dq_iq4_nl(r, o, levels, n):
    """``d`` times the level of each code, ``n`` = 16 bytes: low nibbles first."""
    put_nibble_levels(o, 0, r, NL_QS, n, half(r[NL_D], r[NL_D + 1]), levels)


@jit_inline
def _dq_iq4_xs(r, o, levels, n):
    """8 sub-blocks of 32 weights from ``n`` = 16 bytes each, each with a 6-bit scale, minus 32."""
    d = half(r[XS_D], r[XS_D + 1])
    sh = np.int64(r[XS_SH]) | (np.int64(r[XS_SH + 1]) << 8)
    for s in range(8):
        ls = ((np.int64(r[XS_SL + s // 2]) >> (4 * (s % 2))) & 0x0F) | (((sh >> (2 * s)) & 0x03) << 4)
        put_nibble_levels(o, 32 * s, r, XS_QS + 16 * s, n, f32(d * f32(ls - 32)), levels)


@jit
def _blocks(b, out, lo, hi, kind, levels):
    """Blocks ``lo:hi``: ``kind`` 1 IQ4_NL, 2 IQ4_XS, one loop per format; the lane count
    from the output's width, not a constant (see numba_support)."""
    n = out.shape[1] // 2 if kind == 1 else out.shape[1] // 16
    if kind == 1:
        for i in range(lo, hi):
            _dq_iq4_nl(b[i], out[i], levels, n)
    else:
        for i in range(lo, hi):
            _dq_iq4_xs(b[i], out[i], levels, n)


@pjit
def _drive(b, out, chunk, kind, table, ksign):
    """The dequantizers' parallel loop over chunks of ``chunk`` blocks; ``table`` the 16 levels."""
    for c in prange((b.shape[0] + chunk - 1) // chunk):
        _blocks(b, out, c * chunk, min(b.shape[0], c * chunk + chunk), kind, table)


DEQUANTIZERS = {
    GGMLType.IQ4_NL: dequantizer(_drive, 1, 1024, _levels),
    GGMLType.IQ4_XS: dequantizer(_drive, 2, 128, _levels),
}
QUANTIZERS: dict = {}
