"""Compiled (numba) kernels of the lattice formats, on the layouts of
:mod:`lib_gguf.families.lattice`: dequantizers for all seven, and the per-sub-block
fits of :mod:`lib_gguf.families.lattice_fit` (IQ3_XXS, IQ3_S, IQ2_S, IQ1_M), which
the torch quantizers then pack. Same values and bytes as the torch kernels (the
reference), bit for bit.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from ..formats import GGMLType
from ..numba_support import (F0, F1, F_FLT_MAX, F_HALF, F_QUARTER, dequantizer, emit, f32, half, jit, jit_inline, launch,
                             nearest_int, pjit, prange, u16, u32)
from .lattice import (IQ1_M, IQ1_S, IQ2_S, IQ2_XS, IQ2_XXS, IQ3_S, IQ3_XXS, quantize_iq1_m, quantize_iq2_s,
                      quantize_iq3_s, quantize_iq3_xxs)
from .lattice_fit import IQ1_EPS, IQ1_MINUS, IQ1_PLUS, tables, tables_np
from .lattice_grids import IQ1_DELTA, grid

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



# -- quantizing: the per-sub-block fits of lattice_fit, compiled -------------------------

ODD_LEVELS = np.arange(1, 17, 2).astype(np.float32)  # the value of level l: 2l + 1


@jit_inline
def _best_neighbour(cands, lev, values, scale, x, w, o, D):
    """ggml's find_best_neighbour: the first of the grid points ``cands`` (ended by -1)
    with the smallest ``sum_i w[o+i] * (scale * values[level_i] - x[o+i])**2``."""
    best = F_FLT_MAX
    pick = cands[0]
    for j in range(cands.shape[0]):
        cand = cands[j]
        if cand < 0:
            break
        d2 = F0
        for i in range(D):
            diff = f32(f32(scale * values[lev[cand, i]]) - x[o + i])
            d2 = f32(d2 + f32(f32(w[o + i] * diff) * diff))
        if d2 < best:
            best = d2
            pick = cand
    return pick


@jit
def _round_group(xval, waux, o, D, bits, kmaxq, idv, scale, kmap, nbr, lev, Lg, go):
    """Levels of the group at ``xval[o:o+D]`` for inverse scale ``idv`` into
    ``Lg[go:go+D]``; an off-grid group takes its best neighbour at ``scale``
    (ggml's find_best_neighbour). Returns whether it was on the grid."""
    u = 0
    for i in range(D):
        l = max(0, min(kmaxq - 1, nearest_int(f32(F_HALF * f32(f32(idv * xval[o + i]) - F1)))))
        Lg[go + i] = l
        u |= l << (bits * i)
    if kmap[u] >= 0:
        return True
    pick = _best_neighbour(nbr[u], lev, ODD_LEVELS, scale, xval, waux, o, D)
    for i in range(D):
        Lg[go + i] = lev[pick, i]
    return False


@jit
def _fit_levels(weight, xval, L, S):
    sqx = F0
    sq2 = F0
    for i in range(S):
        q = f32(2 * L[i] + 1)
        sqx = f32(sqx + f32(f32(weight[i] * xval[i]) * q))
        sq2 = f32(sq2 + f32(f32(weight[i] * q) * q))
    return sqx, sq2


@pjit
def _lattice(x, S, D, bits, kmaxq, lo, hi, step, eps, parity, refit_all, sigma_weight, kmap, nbr, lev,
             scale_o, L_o, signs_o, skipped_o):
    """lattice_fit.fit_sub_blocks, one sub-block at a time (the same outputs)."""
    nb = x.shape[0]
    per = 256 // S
    ng = S // D
    base = f32(2 * kmaxq - 1)
    nchunk = (nb + 7) // 8
    for c in prange(nchunk):
        weight = np.empty(S, dtype=np.float32)
        waux = np.empty(S, dtype=np.float32)
        xval = np.empty(S, dtype=np.float32)
        neg = np.empty(S, dtype=np.bool_)
        L = np.empty(S, dtype=np.int64)
        La = np.empty(S, dtype=np.int64)
        on_grid = np.empty(ng, dtype=np.bool_)
        ong = np.empty(ng, dtype=np.bool_)
        for blk in range(c * 8, min(nb, c * 8 + 8)):
            quarter_sigma = F0
            if sigma_weight:
                sx2 = F0
                for i in range(256):
                    sx2 = f32(sx2 + f32(x[blk, i] * x[blk, i]))
                quarter_sigma = f32(f32(0.25) * f32(f32(f32(2.0) * sx2) / f32(256.0)))
            for sb in range(per):
                m = blk * per + sb
                o = sb * S
                for i in range(S):
                    xi = x[blk, o + i]
                    w = f32(xi * xi)
                    if sigma_weight:
                        w = f32(quarter_sigma + w)
                    weight[i] = w
                    waux[i] = np.sqrt(w)
                    neg[i] = xi < F0
                    xval[i] = -xi if neg[i] else xi
                if parity:
                    for k in range(S // 8):
                        cnt = 0
                        for i in range(8):
                            cnt += neg[8 * k + i]
                        if cnt % 2 == 1:
                            imin = 8 * k
                            kmin = f32(f32(weight[imin] * x[blk, o + imin]) * x[blk, o + imin])
                            for i in range(8 * k + 1, 8 * k + 8):
                                kv = f32(f32(weight[i] * x[blk, o + i]) * x[blk, o + i])
                                if kv < kmin:
                                    kmin = kv
                                    imin = i
                            xval[imin] = -xval[imin]
                            neg[imin] = not neg[imin]
                smask = 127 if parity else 255
                for k in range(S // 8):
                    s = 0
                    for i in range(8):
                        if neg[8 * k + i]:
                            s |= 1 << i
                    signs_o[m, k] = s & smask
                mx = xval[0]
                for i in range(1, S):
                    if xval[i] > mx:
                        mx = xval[i]
                skipped = (mx < eps) if eps > F0 else (mx == F0)
                skipped_o[m] = skipped
                if skipped:
                    scale_o[m] = F0
                    for i in range(S):
                        L_o[m, i] = 0
                    continue
                best = F0
                scale = f32(mx / base)
                for i in range(S):
                    L[i] = 0
                for g in range(ng):
                    on_grid[g] = not refit_all
                for i_s in range(lo, hi + 1):
                    cc = f32(base + f32(f32(i_s) * step))
                    idv = f32(cc / mx)
                    ths = f32(F1 / idv)
                    for g in range(ng):
                        ong[g] = _round_group(xval, waux, g * D, D, bits, kmaxq, idv, ths, kmap, nbr, lev, La, g * D)
                    sqx, sq2 = _fit_levels(weight, xval, La, S)
                    if sq2 > F0 and f32(sqx * sqx) > f32(best * sq2):
                        scale = f32(sqx / sq2)
                        best = f32(scale * sqx)
                        for i in range(S):
                            L[i] = La[i]
                        for g in range(ng):
                            on_grid[g] = ong[g]
                need = False
                for g in range(ng):
                    if not on_grid[g]:
                        need = True
                if need and scale > F0:
                    id2 = f32(F1 / scale)
                    for i in range(S):
                        La[i] = L[i]
                    for g in range(ng):
                        if refit_all or not on_grid[g]:
                            _round_group(xval, waux, g * D, D, bits, kmaxq, id2, scale, kmap, nbr, lev, La, g * D)
                    sqx, sq2 = _fit_levels(weight, xval, La, S)
                    if sq2 > F0:
                        scale = f32(sqx / sq2)
                    for i in range(S):
                        L[i] = La[i]
                if scale < F0:
                    scale = -scale
                    for k in range(S // 8):
                        signs_o[m, k] = (~signs_o[m, k]) & smask
                scale_o[m] = scale
                for i in range(S):
                    L_o[m, i] = L[i]


def lattice_fit(x, spec):
    """lattice_fit.fit_sub_blocks's outputs from the compiled fit: (scale, L, signs, skipped, kmap)
    as torch tensors, for a CPU float32 ``x`` (nblocks, 256)."""
    kmap, nbr, lev = tables_np(spec.grid, spec.kmaxq, spec.bits, spec.nwant)
    xn = x.detach().contiguous().numpy()
    m = xn.shape[0] * (256 // spec.sub)
    scale = np.empty(m, dtype=np.float32)
    L = np.empty((m, spec.sub), dtype=np.int64)
    signs = np.empty((m, spec.sub // 8), dtype=np.int64)
    skipped = np.empty(m, dtype=np.bool_)
    lo, hi, step = spec.steps
    if xn.shape[0]:
        launch(_lattice, xn, spec.sub, spec.dim, spec.bits, spec.kmaxq, lo, hi, f32(step), f32(spec.eps), spec.parity,
                 spec.refit_all, spec.sigma_weight, kmap, nbr, lev, scale, L, signs, skipped)
    tk = tables(spec.grid, spec.kmaxq, spec.bits, spec.nwant, x.device).kmap
    return (torch.from_numpy(scale), torch.from_numpy(L), torch.from_numpy(signs), torch.from_numpy(skipped), tk)


# -- IQ1_M: the per-sub-block fit ----------------------------------------------------------

_IQ1_XP = IQ1_PLUS
_IQ1_XM = IQ1_MINUS
F_IQ1_EPS = f32(IQ1_EPS)
F_NEG_TINY = f32(-np.finfo(np.float32).tiny)


@jit
def _iq1_levels(k, group):
    """The three level values of group ``group`` under shift choice ``k`` (0: +,+  1: +,-  2: -,+  3: -,-)."""
    plus = (k < 2) if group == 0 else (k % 2 == 0)
    return _IQ1_XP if plus else _IQ1_XM


@jit
def _iq1_value(k, group, s):
    return _iq1_levels(k, group)[s]


@pjit
def _iq1m_fit(xs, kmap, nbr, lev, scale_o, bk_o, gi_o, skipped_o, failed_o):
    m = xs.shape[0]
    nchunk = (m + 63) // 64
    for c in prange(nchunk):
        w = np.empty(16, dtype=np.float32)
        order = np.empty(16, dtype=np.int64)
        tqx = np.empty((4, 3, 16), dtype=np.float32)
        tq2 = np.empty((4, 3, 16), dtype=np.float32)
        L = np.empty(16, dtype=np.int64)
        sqx = np.empty(4, dtype=np.float32)
        sq2 = np.empty(4, dtype=np.float32)
        for r in range(c * 64, min(m, c * 64 + 64)):
            x = xs[r]
            mx = F0
            for i in range(16):
                w[i] = f32(x[i] * x[i])
                if abs(x[i]) > mx:
                    mx = abs(x[i])
            if mx < F_IQ1_EPS:
                skipped_o[r] = True
                scale_o[r] = F0
                bk_o[r] = 0
                gi_o[r, 0] = 0
                gi_o[r, 1] = 0
                continue
            skipped_o[r] = False
            for i in range(16):          # stable insertion sort of the positions by value
                order[i] = i
                j = i
                while j > 0 and x[order[j - 1]] > x[i]:
                    order[j] = order[j - 1]
                    j -= 1
                order[j] = i
            for j in range(16):
                i = order[j]
                grp = 1 if i >= 8 else 0
                for k in range(4):
                    for s in range(3):
                        v = _iq1_value(k, grp, s)
                        wv = f32(w[i] * v)
                        tqx[k, s, j] = f32(wv * x[i])
                        tq2[k, s, j] = f32(wv * v)
            best = F_NEG_TINY
            scale = mx
            b1 = -1
            b2 = -1
            bk = -1
            for i1 in range(17):
                for i2 in range(i1, 17):
                    for k in range(4):
                        sqx[k] = F0
                        sq2[k] = F0
                    for j in range(16):
                        s = 0 if j < i1 else (1 if j < i2 else 2)
                        for k in range(4):
                            sqx[k] = f32(sqx[k] + tqx[k, s, j])
                            sq2[k] = f32(sq2[k] + tq2[k, s, j])
                    for k in range(4):
                        if sq2[k] > F0 and f32(sqx[k] * sqx[k]) > f32(best * sq2[k]):
                            scale = f32(sqx[k] / sq2[k])
                            best = f32(scale * sqx[k])
                            b1 = i1
                            b2 = i2
                            bk = k
            if b1 < 0:
                failed_o[r] = True
                bk = 0
                b1 = 0
                b2 = 0
            for j in range(16):
                L[order[j]] = 0 if j < b1 else (1 if j < b2 else 2)
            if scale < F0:
                for j in range(16):
                    L[j] = 2 - L[j]
                scale = -scale
                bk = 3 - bk
            any_off = False
            for g in range(2):
                u = 0
                for j in range(8):
                    u |= L[8 * g + j] << (2 * j)
                gi = kmap[u]
                if gi < 0:
                    any_off = True
                    gi = _best_neighbour(nbr[u], lev, _iq1_levels(bk, g), scale, x, w, 8 * g, 8)
                gi_o[r, g] = gi
            if any_off:
                fx = F0
                f2 = F0
                for g in range(2):
                    for j in range(8):
                        q = _iq1_value(bk, g, lev[gi_o[r, g], j])
                        wq = f32(w[8 * g + j] * q)
                        fx = f32(fx + f32(wq * x[8 * g + j]))
                        f2 = f32(f2 + f32(wq * q))
                if fx > F0 and f2 > F0:
                    scale = f32(fx / f2)
            scale_o[r] = scale
            bk_o[r] = bk


def iq1m_fit(xs):
    """lattice_fit.fit_iq1m_sub_blocks's outputs from the compiled fit:
    (scale, best_k, grid index (m, 2), skipped) for a CPU float32 ``xs`` (m, 16)."""
    kmap, nbr, lev = tables_np("IQ1_S", 3, 2, 3)
    xn = xs.detach().contiguous().numpy()
    m = xn.shape[0]
    scale = np.empty(m, dtype=np.float32)
    bk = np.empty(m, dtype=np.int64)
    gi = np.empty((m, 2), dtype=np.int64)
    skipped = np.empty(m, dtype=np.bool_)
    failed = np.zeros(m, dtype=np.bool_)
    if m:
        launch(_iq1m_fit, xn, kmap, nbr, lev, scale, bk, gi, skipped, failed)
    if failed.any():
        raise FloatingPointError("IQ1_M: no fit for a sub-block (non-finite weights?)")
    return torch.from_numpy(scale), torch.from_numpy(bk), torch.from_numpy(gi), torch.from_numpy(skipped)


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
# the compiled fit inside the torch quantizer (the packing after it is a few vector steps)
QUANTIZERS = {
    GGMLType.IQ3_XXS: lambda b: quantize_iq3_xxs(b, fit=lattice_fit),
    GGMLType.IQ3_S: lambda b: quantize_iq3_s(b, fit=lattice_fit),
    GGMLType.IQ2_S: lambda b: quantize_iq2_s(b, fit=lattice_fit),
    GGMLType.IQ1_M: lambda b: quantize_iq1_m(b, fit=iq1m_fit),
}
