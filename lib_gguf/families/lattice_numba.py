"""Compiled (numba) kernels of the lattice formats, on the layouts of
:mod:`lib_gguf.families.lattice`: dequantizers for all seven here, and the
quantizers of IQ3_XXS, IQ3_S, IQ2_S (:mod:`lib_gguf.families.lattice_search_numba`)
and IQ1_M (:mod:`lib_gguf.families.lattice_iq1m_numba`). Same values and bytes as
the torch kernels (the reference), bit for bit.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from ..formats import GGMLType
from ..numba_support import F_HALF, F_QUARTER, dequantizer, emit, f32, half, jit, pjit, prange, u16, u32
from .lattice import IQ1_M, IQ1_S, IQ2_S, IQ2_XS, IQ2_XXS, IQ3_S, IQ3_XXS
from .lattice_grids import IQ1_DELTA, grid
from .lattice_iq1m_numba import quantize_iq1_m
from .lattice_search_numba import quantize_iq2_s, quantize_iq3_s, quantize_iq3_xxs

LAT_D = IQ2_XXS.d.offset
if any(L.d.offset != LAT_D for L in (IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S)):
    raise ImportError("the lattice block functions read d at one offset")
X2XXS_QS = IQ2_XXS.qs.offset
X2XS_QS, X2XS_SCALES = IQ2_XS.qs.offset, IQ2_XS.scales.offset
X2S_QS, X2S_SIGNS, X2S_QH, X2S_SCALES = IQ2_S.qs.offset, IQ2_S.signs.offset, IQ2_S.qh.offset, IQ2_S.scales.offset
X3XXS_QS, X3XXS_SCALES = IQ3_XXS.qs.offset, IQ3_XXS.scales.offset
X3S_QS, X3S_QH, X3S_SIGNS, X3S_SCALES = IQ3_S.qs.offset, IQ3_S.qh.offset, IQ3_S.signs.offset, IQ3_S.scales.offset
X1S_QS, X1S_QH = IQ1_S.qs.offset, IQ1_S.qh.offset
X1M_QH, X1M_SCALES = IQ1_M.qh.offset, IQ1_M.scales.offset
F_IQ1_DELTA = f32(IQ1_DELTA)
_CHUNK = 128  # 256-weight blocks a parallel work item


# -- dequantizing: block functions for _drive (below) ------------------------------
#
# ``r`` is one block's bytes, ``tmp`` its float32 values, ``grid`` the format's grid
# and ``ksign`` ggml's sign table. Row views (``r``, ``gr = grid[g]``) keep the
# indexing 1-D, which numba compiles to faster code than 2-D indexing.

@jit
def _put_signed(tmp, o, db, gr, s, n):
    """``tmp[o + j] = db * gr[j]``, negated where bit j of ``s`` is set, for j < n."""
    for j in range(n):
        v = f32(db * gr[j])
        tmp[o + j] = -v if (s >> j) & 1 else v


@jit
def _iq2_xxs(r, tmp, grid, ksign):
    d = half(r[LAT_D], r[LAT_D + 1])
    for ib in range(8):
        aux0 = u32(r, X2XXS_QS + 8 * ib)
        aux1 = u32(r, X2XXS_QS + 4 + 8 * ib)
        db = f32(f32(d * f32(F_HALF + f32(aux1 >> 28))) * F_QUARTER)
        for l in range(4):
            gr = grid[(aux0 >> (8 * l)) & 0xFF]
            s = ksign[(aux1 >> (7 * l)) & 0x7F]
            _put_signed(tmp, 32 * ib + 8 * l, db, gr, s, 8)


@jit
def _iq2_scale(d, r, off, k2):
    """IQ2_XS / IQ2_S: the scale of 16-weight group ``k2``, from the 4-bit fields at ``off``."""
    sb = np.int64(r[off + k2 // 2])
    sc = (sb >> 4) if k2 % 2 else (sb & 0xF)
    return f32(f32(d * f32(F_HALF + f32(sc))) * F_QUARTER)


@jit
def _iq2_xs(r, tmp, grid, ksign):
    d = half(r[LAT_D], r[LAT_D + 1])
    for k2 in range(16):
        db = _iq2_scale(d, r, X2XS_SCALES, k2)
        for h in range(2):
            k = 2 * k2 + h
            q = u16(r, X2XS_QS + 2 * k)
            gr = grid[q & 511]
            _put_signed(tmp, 8 * k, db, gr, ksign[q >> 9], 8)


@jit
def _iq2_s(r, tmp, grid, ksign):
    d = half(r[LAT_D], r[LAT_D + 1])
    for k2 in range(16):
        db = _iq2_scale(d, r, X2S_SCALES, k2)
        qh = np.int64(r[X2S_QH + k2 // 2])
        for h in range(2):
            k = 2 * k2 + h
            gr = grid[np.int64(r[X2S_QS + k]) | (((qh >> (2 * (k % 4))) & 3) << 8)]
            _put_signed(tmp, 8 * k, db, gr, np.int64(r[X2S_SIGNS + k]), 8)


@jit
def _iq3_xxs(r, tmp, grid, ksign):
    d = half(r[LAT_D], r[LAT_D + 1])
    for ib in range(8):
        sc = u32(r, X3XXS_SCALES + 4 * ib)
        db = f32(f32(d * f32(F_HALF + f32(sc >> 28))) * F_HALF)
        for l in range(4):
            s = ksign[(sc >> (7 * l)) & 0x7F]
            for h in range(2):
                gr = grid[r[X3XXS_QS + 8 * ib + 2 * l + h]]
                _put_signed(tmp, 32 * ib + 8 * l + 4 * h, db, gr, s >> (4 * h), 4)


@jit
def _iq3_s(r, tmp, grid, ksign):
    d = half(r[LAT_D], r[LAT_D + 1])
    for ib in range(8):
        sb = np.int64(r[X3S_SCALES + ib // 2])
        sc = (sb >> 4) if ib % 2 else (sb & 0xF)
        db = f32(d * f32(1 + 2 * sc))
        qh = np.int64(r[X3S_QH + ib])
        for t2 in range(4):
            sg = np.int64(r[X3S_SIGNS + 4 * ib + t2])    # the sign nibbles of two grid points
            for h in range(2):
                t = 2 * t2 + h
                p = 8 * ib + t
                gr = grid[np.int64(r[X3S_QS + p]) | (((qh >> t) & 1) << 8)]
                _put_signed(tmp, 4 * p, db, gr, (sg >> (4 * h)) & 0xF, 4)


@jit
def _iq1_s(r, tmp, grid, ksign):
    d = half(r[LAT_D], r[LAT_D + 1])
    for ib in range(8):
        qh = u16(r, X1S_QH + 2 * ib)
        dl = f32(d * f32(2 * ((qh >> 12) & 7) + 1))
        delta = F_IQ1_DELTA if (qh & 0x8000) == 0 else -F_IQ1_DELTA
        for l in range(4):
            gr = grid[np.int64(r[X1S_QS + 4 * ib + l]) | (((qh >> (3 * l)) & 7) << 8)]
            o = 32 * ib + 8 * l
            for j in range(8):
                tmp[o + j] = f32(dl * f32(gr[j] + delta))


@jit
def _iq1_m(r, tmp, grid, ksign):
    # the block scale's 16 bits are the top nibbles of the four scale words
    dbits = (((u16(r, X1M_SCALES) & 0xF000) >> 12) | ((u16(r, X1M_SCALES + 2) & 0xF000) >> 8)
             | ((u16(r, X1M_SCALES + 4) & 0xF000) >> 4) | (u16(r, X1M_SCALES + 6) & 0xF000))
    d = half(dbits & 0xFF, dbits >> 8)
    for q4 in range(4):
        sw = u16(r, X1M_SCALES + 2 * q4)
        for g4 in range(4):
            g16 = 4 * q4 + g4
            dl = f32(d * f32(2 * ((sw >> (3 * g4)) & 7) + 1))
            qb = np.int64(r[X1M_QH + g16])
            for h in range(2):
                k = 2 * g16 + h
                nib = (qb >> (4 * h)) & 0xF
                gr = grid[np.int64(r[k]) | ((nib & 7) << 8)]
                delta = F_IQ1_DELTA if (nib & 8) == 0 else -F_IQ1_DELTA
                for j in range(8):
                    tmp[8 * k + j] = f32(dl * f32(gr[j] + delta))



@lru_cache(maxsize=None)
def _grid(name: str) -> np.ndarray:
    return np.ascontiguousarray(grid(name, torch.device("cpu")).numpy())


@lru_cache(maxsize=None)
def _ksign() -> np.ndarray:
    i = np.arange(128)
    par = np.zeros(128, dtype=np.int64)
    for k in range(7):
        par ^= (i >> k) & 1
    return (i | (par << 7)).astype(np.int64)


@pjit
def _drive(b, out, chunk, kind, grid, ksign):
    """The dequantizers' parallel loop: block function ``kind`` (the order of _KINDS)."""
    for c in prange((b.shape[0] + chunk - 1) // chunk):
        tmp = np.empty(out.shape[1], np.float32)
        for i in range(c * chunk, min(b.shape[0], c * chunk + chunk)):
            r = b[i]
            if kind == 0:
                _iq2_xxs(r, tmp, grid, ksign)
            elif kind == 1:
                _iq2_xs(r, tmp, grid, ksign)
            elif kind == 2:
                _iq2_s(r, tmp, grid, ksign)
            elif kind == 3:
                _iq3_xxs(r, tmp, grid, ksign)
            elif kind == 4:
                _iq3_s(r, tmp, grid, ksign)
            elif kind == 5:
                _iq1_s(r, tmp, grid, ksign)
            else:
                _iq1_m(r, tmp, grid, ksign)
            emit(out, i, tmp)


# (format, its grid), in _drive's order of block functions
_KINDS = ((GGMLType.IQ2_XXS, "IQ2_XXS"), (GGMLType.IQ2_XS, "IQ2_XS"), (GGMLType.IQ2_S, "IQ2_S"),
          (GGMLType.IQ3_XXS, "IQ3_XXS"), (GGMLType.IQ3_S, "IQ3_S"), (GGMLType.IQ1_S, "IQ1_S"),
          (GGMLType.IQ1_M, "IQ1_S"))
DEQUANTIZERS = {t: dequantizer(_drive, kind, _CHUNK, (lambda name=name: _grid(name)), _ksign)
                for kind, (t, name) in enumerate(_KINDS)}
# the whole quantizers, compiled (fit and packing): lattice_search_numba, lattice_iq1m_numba
QUANTIZERS = {
    GGMLType.IQ3_XXS: quantize_iq3_xxs,
    GGMLType.IQ3_S: quantize_iq3_s,
    GGMLType.IQ2_S: quantize_iq2_s,
    GGMLType.IQ1_M: quantize_iq1_m,
}
