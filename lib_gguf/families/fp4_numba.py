"""Compiled (numba) dequantizers of MXFP4 and NVFP4 and quantizer of MXFP4, on the
layouts of :mod:`lib_gguf.families.fp4`: the same values and bytes as its torch
kernels (the reference)."""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from ..formats import GGMLType
from ..numba_support import F0, absmax, dequantizer, f32, jit, jit_inline, pjit, prange, put_nibble_levels, quantizer
from .fp4 import E2M1_DOUBLED, MXFP4, NVFP4

E2M1 = np.array(E2M1_DOUBLED, dtype=np.float32)
MX_E, MX_QS = MXFP4.e.offset, MXFP4.qs.offset
NV_D, NV_QS = NVFP4.d.offset, NVFP4.qs.offset
_CHUNK = 128 * 8  # 32-weight blocks a parallel work item (NVFP4's 64-weight blocks: half as many)


@lru_cache(maxsize=None)
def _e8m0_half_table():
    """UE8M0 scale byte -> 2**(e - 128), half its value (the E2M1 values are doubled), exact."""
    return np.array([np.ldexp(1.0, e - 128) for e in range(256)], dtype=np.float32)


@lru_cache(maxsize=None)
def _ue4m3_half_table():
    """Unsigned E4M3 scale byte -> half its value (0 for 0x00 and the NaN code 0x7F), exact."""
    t = np.zeros(256, dtype=np.float32)
    for x in range(256):
        e, m = (x >> 3) & 0xF, x & 7
        if x in (0, 0x7F):
            continue
        t[x] = (m * 2.0 ** -9 if e == 0 else (1.0 + m / 8.0) * 2.0 ** (e - 7)) * 0.5
    return t


@jit_inline
def _dq_mxfp4(r, o, scale, n):
    """``n`` = 16 bytes of codes, low nibbles first, times the block's E8M0 scale."""
    put_nibble_levels(o, 0, r, MX_QS, n, scale[r[MX_E]], E2M1)


@jit_inline
def _dq_nvfp4(r, o, scale, n):
    """4 sub-blocks of 16 weights from ``n`` = 8 bytes each, each with its UE4M3 scale."""
    for s in range(4):
        put_nibble_levels(o, 16 * s, r, NV_QS + 8 * s, n, scale[r[NV_D + s]], E2M1)


@jit
def _blocks(b, out, lo, hi, kind, table):
    """Blocks ``lo:hi`` (``kind`` 1: MXFP4, 2: NVFP4), one loop per format; the lane count
    from the output's width, not a constant (see numba_support)."""
    if kind == 1:
        n = out.shape[1] // 2
        for i in range(lo, hi):
            _dq_mxfp4(b[i], out[i], table, n)
    else:
        n = out.shape[1] // 8
        for i in range(lo, hi):
            _dq_nvfp4(b[i], out[i], table, n)


@pjit
def _q_mxfp4(x, out):
    nb = x.shape[0]
    for i in prange(nb):
        xb = x[i]
        amax = absmax(xb)
        e = 0
        if amax > F0:
            _, ex = math.frexp(float(amax))      # floor(log2(amax)) = ex - 1
            e = max(0, min(255, ex - 1 - 2 + 127))
        out[i, MX_E] = e
        d = f32(math.ldexp(1.0, e - 128))         # 2**(e-128): half the E8M0 value
        for j in range(16):
            a = 0
            b = 0
            ea = abs(f32(f32(E2M1[0]) * d) - xb[j])
            eb = abs(f32(f32(E2M1[0]) * d) - xb[16 + j])
            for k in range(1, 16):
                lv = f32(f32(E2M1[k]) * d)
                err = abs(f32(lv - xb[j]))
                if err < ea:
                    a = k
                    ea = err
                err = abs(f32(lv - xb[16 + j]))
                if err < eb:
                    b = k
                    eb = err
            out[i, MX_QS + j] = a | (b << 4)


@pjit
def _drive(b, out, chunk, kind, table, ksign):
    """The dequantizers' parallel loop over chunks of ``chunk`` blocks; ``table`` the scales."""
    for c in prange((b.shape[0] + chunk - 1) // chunk):
        _blocks(b, out, c * chunk, min(b.shape[0], c * chunk + chunk), kind, table)


DEQUANTIZERS = {
    GGMLType.MXFP4: dequantizer(_drive, 1, _CHUNK, _e8m0_half_table),
    GGMLType.NVFP4: dequantizer(_drive, 2, _CHUNK // 2, _ue4m3_half_table),
}
QUANTIZERS = {
    GGMLType.MXFP4: quantizer(_q_mxfp4, MXFP4.size),
}
