"""Compiled (numba) quantizers of IQ3_XXS, IQ3_S and IQ2_S: the search of
:func:`lib_gguf.families.lattice_fit.fit_sub_blocks` and the packing of
:mod:`lib_gguf.families.lattice` in one pass over each block, with the same float32
operations in the same order, so the same bytes (ggml's). Also the neighbour tables
and search that :mod:`lib_gguf.families.lattice_iq1m_numba` shares.

Where the time goes is rounding groups of 4 or 8 magnitudes to the lattice for each
trial scale (19 or 31 of them a sub-block) and, for a group off the grid, the
search of its neighbours. So:

* The sub-block and group widths are constants of each kernel (one for IQ3_XXS and
  IQ3_S, whose sub-blocks have one shape, one for IQ2_S), everything inlined into it.
* A group is rounded in one vector step, and its neighbours are compared eight at
  a time, one vector lane each (:mod:`lib_gguf.families.lattice_lanes_numba`): the
  neighbour lists are stored in blocks of eight, transposed, with each candidate's
  lattice values (float32) beside its grid index.
* A group's weighted sums are added as soon as the group is rounded.
* The whole quantizer, packing included, runs compiled, scratch allocated once per
  work item.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from ..numba_support import F0, F1, F_FLT_MAX, F_HALF, f32, jit_inline, launch, nearest_int, pjit, prange, put_f16
from .lattice import IQ2_S, IQ3_S, IQ3_XXS, SPECS
from .lattice_fit import tables_np
from .lattice_lanes_numba import block_min, block_min_shifted, round4, round8

_CHUNK = 16  # 256-weight blocks a parallel work item


@lru_cache(maxsize=None)
def search_tables(name: str, nlevels: int, bits: int, nwant: int, centred: bool = False):
    """(kmap, start, index, values) for the compiled search. ``kmap`` is
    :func:`lattice_fit.tables_np`'s (int32). The neighbours of code ``u`` are the
    blocks ``start[u]:start[u + 1]`` of eight: lane ``j`` of block ``b`` is candidate
    ``8 b + j``, its grid index ``index[8 b + j]``, its coordinate ``i`` ``values[8 dim b
    + 8 i + j]`` (float32: ``2l + 1``, or ``l - 1`` if ``centred``). A list is padded
    to a whole block with copies of its first candidate, which never win: a copy's
    distance equals the first's, and only a smaller one replaces the best."""
    kmap, nb, lev = tables_np(name, nlevels, bits, nwant)
    dim = lev.shape[1]
    count = (nb >= 0).sum(axis=1)
    blocks = (count + 7) // 8
    start = np.zeros(len(kmap) + 1, dtype=np.int32)
    start[1:] = np.cumsum(blocks)
    codes = np.repeat(np.arange(len(kmap)), 8 * blocks)                  # the code of each slot
    k = np.arange(len(codes)) - 8 * start[codes].astype(np.int64)         # the slot's place in its list
    index = nb[codes, np.where(k < count[codes], k, 0)]
    lv = lev[index]
    vals = (lv - 1) if centred else (2 * lv + 1)
    vals = vals.astype(np.float32).reshape(-1, 8, dim).transpose(0, 2, 1)
    return kmap.astype(np.int32), start, index.astype(np.int32), np.ascontiguousarray(vals.reshape(-1))


@jit_inline
def nearest(b0, b1, vals, delta, scale, x, o, w, ow, D, shifted):
    """The first candidate of the blocks ``b0:b1`` with the smallest weighted distance
    to ``x[o:o+D]``, weights ``w[ow:ow+D]`` (ggml's find_best_neighbour): its slot.
    ``shifted``: the stored values plus ``delta`` (IQ1_M's grid)."""
    best = F_FLT_MAX
    pick = 8 * b0
    for b in range(b0, b1):
        if shifted:
            m, lane = block_min_shifted(vals, 8 * D * b, delta, scale, x, w, o, ow, D)
        else:
            m, lane = block_min(vals, 8 * D * b, delta, scale, x, w, o, ow, D)
        if m < best:
            best = m
            pick = 8 * b + lane
    return pick


# -- IQ3_XXS, IQ3_S, IQ2_S ------------------------------------------------------------------

@jit_inline
def _round_group(xv, wa, o, D, bits, kmaxq, idv, scale, kmap, start, index, vals, q, gi, g):
    """Round the group at ``xv[o:o+D]`` with inverse scale ``idv``: its lattice values
    into ``q[o:o+D]``, its grid index into ``gi[g]``. An off-grid group takes its best
    neighbour at ``scale``. Returns whether it was on the grid."""
    if D == 4:
        u = round4(xv, o, idv, kmaxq - 1, bits, q)
    else:
        u = round8(xv, o, idv, kmaxq - 1, bits, q)
    k = kmap[u]
    if k >= 0:
        gi[g] = k
        return True
    p = nearest(np.int64(start[u]), np.int64(start[u + 1]), vals, F0, scale, xv, o, wa, o, D, False)
    gi[g] = index[p]
    base = 8 * D * (p // 8) + p % 8
    for i in range(D):
        q[o + i] = vals[base + 8 * i]
    return False


@jit_inline
def _group_sums(w, wx, q, o, D, sqx, sq2):
    """Add a group's terms to the running weighted sums, in element order."""
    for i in range(D):
        sqx = f32(sqx + f32(wx[o + i] * q[o + i]))
        sq2 = f32(sq2 + f32(f32(w[o + i] * q[o + i]) * q[o + i]))
    return sqx, sq2


@jit_inline
def _fit_sub(xb, o, S, D, bits, kmaxq, lo, hi, step, eps, parity, refit_all, sigma_weight, quarter_sigma,
             tabs, sc, signs, so):
    """One sub-block ``xb[o:o+S]`` (lattice_fit.fit_sub_blocks): its grid indices into
    the scratch ``gi``, sign bytes into ``signs[so:]``; returns (scale, skipped)."""
    kmap, start, index, vals = tabs
    w, wa, wx, xv, q, qa, neg, gi, ga, ong, onga = sc
    ng = S // D
    for i in range(S):
        xi = xb[o + i]
        wi = f32(xi * xi)
        if sigma_weight:
            wi = f32(quarter_sigma + wi)
        w[i] = wi
        wa[i] = np.sqrt(wi)
        neg[i] = xi < F0
        xv[i] = -xi if xi < F0 else xi
    if parity:  # an even count of minus signs per 8: flip the weight that matters least
        for k in range(S // 8):
            cnt = 0
            for i in range(8):
                cnt += neg[8 * k + i]
            if cnt % 2 == 1:
                imin = 8 * k
                kmin = f32(f32(w[imin] * xb[o + imin]) * xb[o + imin])
                for i in range(8 * k + 1, 8 * k + 8):
                    kv = f32(f32(w[i] * xb[o + i]) * xb[o + i])
                    if kv < kmin:
                        kmin = kv
                        imin = i
                xv[imin] = -xv[imin]
                neg[imin] = not neg[imin]
    smask = 127 if parity else 255
    for k in range(S // 8):
        s = 0
        for i in range(8):
            if neg[8 * k + i]:
                s |= 1 << i
        signs[so + k] = s & smask
    mx = xv[0]
    for i in range(1, S):
        if xv[i] > mx:
            mx = xv[i]
    if (mx < eps) if eps > F0 else (mx == F0):
        for g in range(ng):
            gi[g] = kmap[0]
        return F0, True
    for i in range(S):
        wx[i] = f32(w[i] * xv[i])
    base = f32(2 * kmaxq - 1)
    best = F0
    scale = f32(mx / base)
    for i in range(S):
        q[i] = F1
    for g in range(ng):
        gi[g] = kmap[0]         # all levels 0, as q
        ong[g] = not refit_all
    for i_s in range(lo, hi + 1):
        idv = f32(f32(base + f32(f32(i_s) * step)) / mx)
        ths = f32(F1 / idv)
        sqx = F0
        sq2 = F0
        for g in range(ng):
            onga[g] = _round_group(xv, wa, g * D, D, bits, kmaxq, idv, ths, kmap, start, index, vals, qa, ga, g)
            sqx, sq2 = _group_sums(w, wx, qa, g * D, D, sqx, sq2)
        if sq2 > F0 and f32(sqx * sqx) > f32(best * sq2):
            scale = f32(sqx / sq2)
            best = f32(scale * sqx)
            for i in range(S):
                q[i] = qa[i]
            for g in range(ng):
                gi[g] = ga[g]
                ong[g] = onga[g]
    need = False
    for g in range(ng):
        if not ong[g]:
            need = True
    if need and scale > F0:  # re-round with the fitted scale (the off-grid groups, or all) and refit
        id2 = f32(F1 / scale)
        sqx = F0
        sq2 = F0
        for g in range(ng):
            if refit_all or not ong[g]:
                _round_group(xv, wa, g * D, D, bits, kmaxq, id2, scale, kmap, start, index, vals, q, gi, g)
            sqx, sq2 = _group_sums(w, wx, q, g * D, D, sqx, sq2)
        if sq2 > F0:
            scale = f32(sqx / sq2)
    if scale < F0:
        scale = -scale
        for k in range(S // 8):
            signs[so + k] = (~signs[so + k]) & smask
    return scale, False


def _spec_args(name):
    s = SPECS[name]
    return (s.sub, s.dim, s.bits, s.kmaxq, s.steps[0], s.steps[1], f32(s.steps[2]), f32(s.eps), s.parity,
            s.refit_all, s.sigma_weight)


S3X, D3X, B3X, K3X, LO3X, HI3X, ST3X, EPS3X, PAR3X, ALL3X, SIG3X = _spec_args("IQ3_XXS")
S3S, D3S, B3S, K3S, LO3S, HI3S, ST3S, EPS3S, PAR3S, ALL3S, SIG3S = _spec_args("IQ3_S")
S2S, D2S, B2S, K2S, LO2S, HI2S, ST2S, EPS2S, PAR2S, ALL2S, SIG2S = _spec_args("IQ2_S")
if (S3S, D3S, B3S, K3S, SIG3S) != (S3X, D3X, B3X, K3X, SIG3X):
    raise ImportError("IQ3_XXS and IQ3_S share one compiled kernel: their sub-blocks must have one shape")
if any(L.d.offset != 0 for L in (IQ3_XXS, IQ3_S, IQ2_S)):
    raise ImportError("the compiled lattice quantizers write d at byte 0")
X3XXS_QS, X3XXS_SCALES = IQ3_XXS.qs.offset, IQ3_XXS.scales.offset
X3S_QS, X3S_QH, X3S_SIGNS, X3S_SCALES = IQ3_S.qs.offset, IQ3_S.qh.offset, IQ3_S.signs.offset, IQ3_S.scales.offset
X2S_QS, X2S_SIGNS, X2S_QH, X2S_SCALES = IQ2_S.qs.offset, IQ2_S.signs.offset, IQ2_S.qh.offset, IQ2_S.scales.offset
F_FUDGE_3XXS, F_FUDGE_3S, F_FUDGE_2S = f32(1.0125), f32(1.033), f32(0.9875)


@jit_inline
def _fit_block(xb, S, D, bits, kmaxq, lo, hi, step, eps, parity, refit_all, sigma_weight, tabs, sc, scales, gis,
               signs, skipped):
    """Every sub-block of one 256-weight block: scales, grid indices (sub-block after
    sub-block), sign bytes and skipped flags into the block's scratch."""
    gi = sc[7]
    quarter_sigma = F0
    if sigma_weight:
        sx2 = F0
        for i in range(256):
            sx2 = f32(sx2 + f32(xb[i] * xb[i]))
        quarter_sigma = f32(f32(0.25) * f32(f32(f32(2.0) * sx2) / f32(256.0)))
    ng = S // D
    for sb in range(256 // S):
        scl, skp = _fit_sub(xb, sb * S, S, D, bits, kmaxq, lo, hi, step, eps, parity, refit_all, sigma_weight,
                            quarter_sigma, tabs, sc, signs, sb * (S // 8))
        scales[sb] = scl
        skipped[sb] = skp
        for g in range(ng):
            gis[sb * ng + g] = gi[g]


@jit_inline
def _scratch(S, D):
    """A work item's scratch, allocated once: per weight w, sqrt(w), w*|x|, |x|, the best
    and the trial lattice values, the signs; per group the best and trial grid indices
    and whether they were on the grid."""
    ng = S // D
    return (np.empty(S, np.float32), np.empty(S, np.float32), np.empty(S, np.float32), np.empty(S, np.float32),
            np.empty(S, np.float32), np.empty(S, np.float32), np.empty(S, np.bool_), np.empty(ng, np.int64),
            np.empty(ng, np.int64), np.empty(ng, np.bool_), np.empty(ng, np.bool_))


@jit_inline
def _block_scale(out, i, scales, n, fudge, nmax, l):
    """lattice.block_scales for one block: the fp16 ``d`` into ``out[i]`` (at byte 0) and
    the 4-bit sub-block scales into ``l``; returns whether the block has any."""
    mx = scales[0]
    for j in range(1, n):
        if scales[j] > mx or scales[j] != scales[j]:
            mx = scales[j]
    live = mx > F0
    d = f32(mx / f32(nmax))
    put_f16(out, i, 0, f32(d * fudge) if live else F0)
    idv = f32(F1 / d) if live else F1
    for j in range(n):
        l[j] = max(0, min(15, nearest_int(f32(F_HALF * f32(f32(idv * scales[j]) - F1)))))
    return live


@jit_inline
def _pack_iq3_xxs(out, i, live, gis, signs, skipped, l):
    per = 256 // S3X
    ng = S3X // D3X
    for sb in range(per):
        keep = live and not skipped[sb]
        for g in range(ng):
            out[i, X3XXS_QS + ng * sb + g] = gis[ng * sb + g] if keep else 0
        packed = 0
        if keep:  # four 7-bit sign fields, then the 4-bit scale
            packed = signs[4 * sb] | (signs[4 * sb + 1] << 7) | (signs[4 * sb + 2] << 14) | (signs[4 * sb + 3] << 21)
        if live:
            packed |= l[sb] << 28
        for b in range(4):
            out[i, X3XXS_SCALES + 4 * sb + b] = (packed >> (8 * b)) & 0xFF


@jit_inline
def _pack_iq3_s(out, i, gis, signs, skipped, l):
    """ggml moves the grid and sign bytes of the sub-blocks after a skipped one down
    over it; the tail stays zero."""
    per = 256 // S3S
    ng = S3S // D3S
    nsg = S3S // 8
    slot = 0
    for sb in range(per):
        qh = 0
        if not skipped[sb]:
            for g in range(ng):
                gv = gis[ng * sb + g]
                qh |= ((gv >> 8) & 1) << g
                out[i, X3S_QS + ng * slot + g] = gv & 0xFF
            for k in range(nsg):
                out[i, X3S_SIGNS + nsg * slot + k] = signs[nsg * sb + k]
            slot += 1
        out[i, X3S_QH + sb] = qh
    for s in range(slot, per):
        for g in range(ng):
            out[i, X3S_QS + ng * s + g] = 0
        for k in range(nsg):
            out[i, X3S_SIGNS + nsg * s + k] = 0
    for j in range(per // 2):
        out[i, X3S_SCALES + j] = l[2 * j] | (l[2 * j + 1] << 4)


@pjit
def _quantize_iq3(x, out, xxs, kmap, start, index, vals):
    """IQ3_XXS (``xxs``) or IQ3_S: one kernel, as their sub-blocks have one shape; their
    ladders, sign parity and second pass are arguments of the fit. (Each kernel is
    compiled whole: in a parallel kernel numba tells LLVM that the arrays do not
    overlap, which a separately compiled helper would lose, at twice the time.)"""
    per = 256 // S3X
    lo, hi, step, eps, parity, refit_all = ((LO3X, HI3X, ST3X, EPS3X, PAR3X, ALL3X) if xxs else
                                            (LO3S, HI3S, ST3S, EPS3S, PAR3S, ALL3S))
    for c in prange((x.shape[0] + _CHUNK - 1) // _CHUNK):
        sc = _scratch(S3X, D3X)
        scales = np.empty(per, np.float32)
        gis = np.empty(per * (S3X // D3X), np.int64)
        signs = np.empty(per * (S3X // 8), np.int64)
        skipped = np.empty(per, np.bool_)
        l = np.empty(per, np.int64)
        for i in range(c * _CHUNK, min(x.shape[0], c * _CHUNK + _CHUNK)):
            _fit_block(x[i], S3X, D3X, B3X, K3X, lo, hi, step, eps, parity, refit_all, SIG3X,
                       (kmap, start, index, vals), sc, scales, gis, signs, skipped)
            if xxs:
                live = _block_scale(out, i, scales, per, F_FUDGE_3XXS, 31, l)
                _pack_iq3_xxs(out, i, live, gis, signs, skipped, l)
            else:
                _block_scale(out, i, scales, per, F_FUDGE_3S, 31, l)
                _pack_iq3_s(out, i, gis, signs, skipped, l)


@pjit
def _quantize_iq2_s(x, out, kmap, start, index, vals):
    per = 256 // S2S
    ng = S2S // D2S
    nsg = S2S // 8
    for c in prange((x.shape[0] + _CHUNK - 1) // _CHUNK):
        sc = _scratch(S2S, D2S)
        scales = np.empty(per, np.float32)
        gis = np.empty(per * ng, np.int64)
        signs = np.empty(per * nsg, np.int64)
        skipped = np.empty(per, np.bool_)
        l = np.empty(per, np.int64)
        for i in range(c * _CHUNK, min(x.shape[0], c * _CHUNK + _CHUNK)):
            _fit_block(x[i], S2S, D2S, B2S, K2S, LO2S, HI2S, ST2S, EPS2S, PAR2S, ALL2S, SIG2S,
                       (kmap, start, index, vals), sc, scales, gis, signs, skipped)
            _block_scale(out, i, scales, per, F_FUDGE_2S, 31, l)
            for j in range(per * ng // 4):
                out[i, X2S_QH + j] = 0
            for sb in range(per):
                for g in range(ng):
                    k = ng * sb + g
                    gv = 0 if skipped[sb] else gis[k]
                    out[i, X2S_QS + k] = gv & 0xFF
                    out[i, X2S_QH + k // 4] |= ((gv >> 8) & 3) << (2 * (k % 4))
                for k in range(nsg):
                    out[i, X2S_SIGNS + nsg * sb + k] = 0 if skipped[sb] else signs[nsg * sb + k]
            for j in range(per // 2):
                out[i, X2S_SCALES + j] = l[2 * j] | (l[2 * j + 1] << 4)


# -- entry points -----------------------------------------------------------------------------

def run(kernel, blocks, type_size, *tables):
    """``kernel(x, out, *tables)`` on CPU float32 blocks (n, 256): uint8 (n, type_size)."""
    x = blocks.detach().contiguous().numpy()
    out = np.empty((x.shape[0], type_size), dtype=np.uint8)
    if x.shape[0]:
        launch(kernel, x, out, *tables)
    return out


def _lattice_tables(name):
    s = SPECS[name]
    return search_tables(s.grid, s.kmaxq, s.bits, s.nwant)


def quantize_iq3_xxs(blocks):
    return torch.from_numpy(run(_quantize_iq3, blocks, IQ3_XXS.size, True, *_lattice_tables("IQ3_XXS")))


def quantize_iq3_s(blocks):
    return torch.from_numpy(run(_quantize_iq3, blocks, IQ3_S.size, False, *_lattice_tables("IQ3_S")))


def quantize_iq2_s(blocks):
    return torch.from_numpy(run(_quantize_iq2_s, blocks, IQ2_S.size, *_lattice_tables("IQ2_S")))
