"""Quantizers for the lattice formats that ggml quantizes without an importance
matrix: IQ3_XXS, IQ3_S and IQ2_S (and the neighbour tables IQ1_M shares).

ggml's method, for each sub-block of 16 or 32 weights:

1. Take magnitudes and keep the signs apart (IQ3_XXS stores seven sign bits per
   eight weights and makes the count of minus signs even, flipping the weight
   that matters least).
2. Try a ladder of scales around ``max / (2*kMaxQ - 1)``. For each, round every
   group of 4 or 8 magnitudes to the odd lattice ``2l + 1``; a group that is not a
   grid point is moved to the best of its precomputed neighbours (the grid points
   at the nearest few distances). Keep the scale with the best weighted fit.
3. Re-round the groups that were off the grid with the fitted scale, refit.
4. Store a 4-bit scale per sub-block relative to the largest.

Everything here runs vectorized over all sub-blocks at once, in float32, with the
per-weight sums taken in element order as C takes them, so the bytes are ggml's.
The neighbour lists are built here from the grids in :mod:`lib_gguf.grids`,
sorted by (distance, index), as ggml orders them.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from .formats import GGMLType, register_quantizer
from .grids import grid_indices
from .quant import _f16_bytes, nearest_int, sqrtf

_SHAPES = {"IQ3_XXS": (256, 4), "IQ3_S": (512, 4), "IQ2_S": (1024, 8)}


@lru_cache(maxsize=None)
def _tables_np(name: str, nlevels: int, bits: int, nwant: int):
    """(kmap, neighbours, levels) for grid ``name``.

    ``kmap[u]`` is the grid index of the point whose packed level code is ``u``
    (``bits`` bits a coordinate), or -1. ``neighbours[u]`` lists, for an off-grid
    ``u`` whose levels are all below ``nlevels``, the grid points at its ``nwant``
    smallest squared distances, by (distance, index), padded with -1.
    """
    n, dim = _SHAPES[name]
    lev = np.frombuffer(grid_indices(name), dtype=np.uint8).reshape(n, dim).astype(np.int64)
    shifts = bits * np.arange(dim)
    codes = (lev << shifts).sum(axis=1)
    kmap = np.full(1 << (bits * dim), -1, dtype=np.int64)
    kmap[codes] = np.arange(n)
    # every reachable code: levels 0..nlevels-1 in each coordinate
    pts = np.stack(np.meshgrid(*[np.arange(nlevels)] * dim, indexing="ij"), -1).reshape(-1, dim)
    pcodes = (pts << shifts).sum(axis=1)
    off = kmap[pcodes] < 0
    pts, pcodes = pts[off], pcodes[off]
    d2 = ((2 * pts[:, None, :] - 2 * lev[None, :, :]) ** 2).sum(-1)  # (2l+1) differences
    order = np.argsort(d2, axis=1, kind="stable")
    sd = np.take_along_axis(d2, order, axis=1)
    # rank of each distinct distance along the row; keep the first nwant of them
    rank = np.concatenate([np.zeros((len(sd), 1), np.int64), np.cumsum(sd[:, 1:] > sd[:, :-1], axis=1)], axis=1)
    keep = rank < nwant
    width = int(keep.sum(axis=1).max())
    nb = np.where(keep[:, :width], order[:, :width], -1)
    neighbours = np.full((1 << (bits * dim), width), -1, dtype=np.int64)
    neighbours[pcodes] = nb
    return kmap, neighbours, lev


_dev_cache: dict = {}


def _tables(name, nlevels, bits, nwant, device):
    key = (name, str(device))
    t = _dev_cache.get(key)
    if t is None:
        kmap, nb, lev = _tables_np(name, nlevels, bits, nwant)
        t = (torch.from_numpy(kmap).to(device), torch.from_numpy(nb).to(device),
             torch.from_numpy(lev).to(device), torch.from_numpy(2 * lev + 1).to(torch.float32).to(device))
        _dev_cache[key] = t
    return t


def _seq(terms):
    acc = None
    for t in terms:
        acc = t if acc is None else acc + t
    return acc


@dataclass(frozen=True)
class _Spec:
    grid: str
    sub: int            # weights per sub-block
    dim: int            # weights per grid group
    bits: int           # bits a coordinate in the packed level code
    kmaxq: int          # levels a coordinate can take
    nwant: int          # distinct neighbour distances kept
    steps: tuple        # the scale ladder: (first, last, step)
    eps: float          # sub-blocks whose max is below this are all zero (0: only exact zero)
    parity: bool        # IQ3_XXS: an even count of minus signs per 8
    refit_all: bool     # IQ3_S re-rounds every group with the fitted scale, the others only off-grid ones
    sigma_weight: bool  # IQ2_S: weight = sigma2/4 + x^2, else x^2


_IQ3_XXS = _Spec("IQ3_XXS", 32, 4, 3, 8, 2, (-15, 15, 0.2), 1e-8, True, False, False)
_IQ3_S = _Spec("IQ3_S", 32, 4, 3, 8, 3, (-9, 9, 0.2), 0.0, False, True, False)
_IQ2_S = _Spec("IQ2_S", 16, 8, 2, 3, 1, (-9, 9, 0.1), 1e-8, False, False, True)


def _lattice(x: torch.Tensor, spec: _Spec):
    """Fit every sub-block of ``x`` (nblocks, 256).

    Returns (scale (m,), L (m, sub) int64 levels, signs (m, sub/8) int64 bits,
    skipped (m,) bool), m = nblocks * 256 / sub.
    """
    dev = x.device
    kmap, nbrs, lev, odd = _tables(spec.grid, spec.kmaxq, spec.bits, spec.nwant, dev)
    S, D = spec.sub, spec.dim
    nblk = x.shape[0]
    xs = x.reshape(-1, S)
    m = xs.shape[0]
    ng = S // D
    if spec.sigma_weight:
        xx = x * x
        sumx2 = _seq(xx[:, i] for i in range(x.shape[1]))
        sigma2 = (2 * sumx2) / 256
        weight = (0.25 * sigma2).repeat_interleave(256 // S)[:, None] + xs * xs
    else:
        weight = xs * xs
    waux = sqrtf(weight)
    neg = xs < 0
    xval = torch.where(neg, -xs, xs)
    if spec.parity:
        n8 = neg.reshape(m, S // 8, 8)
        odd_count = (n8.sum(-1) % 2) == 1
        key = ((weight * xs) * xs).reshape(m, S // 8, 8)
        imin = key.argmin(dim=-1)
        flip = torch.zeros_like(n8)
        flip.scatter_(-1, imin[..., None], odd_count[..., None])
        flip = flip.reshape(m, S)
        xval = torch.where(flip, -xval, xval)
        neg = neg ^ flip
    signs = (neg.reshape(m, S // 8, 8).long() << torch.arange(8, device=dev)).sum(-1)
    if spec.parity:
        signs = signs & 127
    mx = xval.amax(dim=1)
    skipped = (mx < spec.eps) if spec.eps > 0 else (mx == 0)
    mx_safe = torch.where(skipped, torch.ones_like(mx), mx)

    xt = xval.t().contiguous()       # (S, m): element-order sums stay contiguous
    wt = weight.t().contiguous()
    wx = wt * xt
    xg = xval.reshape(m * ng, D)
    wg = waux.reshape(m * ng, D)
    shifts = spec.bits * torch.arange(D, device=dev)
    base = np.float32(2 * spec.kmaxq - 1)

    def round_groups(id_, scale_, rows=None):
        """Levels (len, D) of every group (or the groups ``rows``) at inverse scale
        ``id_`` per sub-block; off-grid groups take their best neighbour at ``scale_``."""
        if rows is None:
            gx, gw = xg, wg
            gid = id_.repeat_interleave(ng)
            gsc = scale_.repeat_interleave(ng)
        else:
            gx, gw = xg[rows], wg[rows]
            gid = id_[rows // ng]
            gsc = scale_[rows // ng]
        Lg = nearest_int(0.5 * (gid[:, None] * gx - 1)).clamp(0, spec.kmaxq - 1).long()
        u = (Lg << shifts).sum(dim=1)
        gi = kmap[u]
        off = gi < 0
        oi = off.nonzero().squeeze(1)
        if oi.numel():
            cand = nbrs[u[oi]]                                   # (k, width)
            pts = odd[cand.clamp(min=0)]                         # (k, width, D)
            diff = gsc[oi][:, None, None] * pts - gx[oi][:, None, :]
            t = (gw[oi][:, None, :] * diff) * diff
            d2 = _seq(t[..., i] for i in range(D))
            d2 = torch.where((cand >= 0) & ~torch.isnan(d2), d2, torch.full_like(d2, float("inf")))
            best = d2.argmin(dim=1)
            Lg[oi] = lev[cand.gather(1, best[:, None]).squeeze(1)]
        return Lg, ~off

    def fit(Lt):
        q = (2 * Lt + 1).to(torch.float32)
        sumqx = _seq(wx[i] * q[i] for i in range(S))
        sumq2 = _seq((wt[i] * q[i]) * q[i] for i in range(S))
        return sumqx, sumq2

    best = torch.zeros(m, device=dev)
    scale = mx_safe / base
    L = torch.zeros(m, S, dtype=torch.long, device=dev)
    on_grid = torch.full((m, ng), not spec.refit_all, dtype=torch.bool, device=dev)
    updated = torch.zeros(m, dtype=torch.bool, device=dev)
    lo, hi, step = spec.steps
    for i_s in range(lo, hi + 1):
        c = base + np.float32(i_s) * np.float32(step)
        # a tensor divided into (not scalar / tensor, which torch computes as a
        # reciprocal times the scalar and rounds differently from C's division)
        id_ = torch.full_like(mx_safe, float(c)) / mx_safe
        this_scale = 1 / id_
        Lg, ong = round_groups(id_, this_scale)
        La = Lg.reshape(m, S)
        sqx, sq2 = fit(La.t())
        better = (sq2 > 0) & (sqx * sqx > best * sq2)
        nd = sqx / torch.where(sq2 > 0, sq2, torch.ones_like(sq2))
        scale = torch.where(better, nd, scale)
        best = torch.where(better, nd * sqx, best)
        L = torch.where(better[:, None], La, L)
        on_grid = torch.where(better[:, None], ong.reshape(m, ng), on_grid)
        updated |= better

    # second pass: re-round with the fitted scale
    need = (~on_grid).any(dim=1) & (scale > 0) & ~skipped
    if need.any():
        sel_g = (need[:, None] & ~on_grid) if not spec.refit_all else need[:, None].expand(m, ng)
        rows = sel_g.reshape(-1).nonzero().squeeze(1)
        id2 = 1 / scale
        Lg, _ = round_groups(id2, scale, rows)
        Lflat = L.reshape(m * ng, D).clone()
        Lflat[rows] = Lg
        L2 = Lflat.reshape(m, S)
        sqx, sq2 = fit(L2.t())
        refit = need & (sq2 > 0)
        scale = torch.where(refit, sqx / torch.where(sq2 > 0, sq2, torch.ones_like(sq2)), scale)
        L = torch.where(need[:, None], L2, L)
    negs = scale < 0
    if negs.any():
        scale = scale.abs()
        signs = torch.where(negs[:, None], (~signs) & (127 if spec.parity else 255), signs)
    scale = torch.where(skipped, torch.zeros_like(scale), scale)
    L = torch.where(skipped[:, None], torch.zeros_like(L), L)
    return scale, L, signs, skipped, kmap


def _grid_codes(L, kmap, spec):
    m = L.shape[0]
    shifts = spec.bits * torch.arange(spec.dim, device=L.device)
    u = (L.reshape(m, -1, spec.dim) << shifts).sum(-1)
    return kmap[u]  # (m, groups)


def _block_scales(scale, nblk, per, fudge):
    """4-bit sub-block scales and the fp16 super-block scale, as ggml derives them."""
    sc = scale.reshape(nblk, per)
    max_scale = sc.amax(dim=1)
    d = max_scale / 31
    dh = torch.where(max_scale > 0, d * np.float32(fudge), torch.zeros_like(d))
    idv = 1 / torch.where(max_scale > 0, d, torch.ones_like(d))
    l = nearest_int(0.5 * (idv[:, None] * sc - 1)).clamp(0, 15).long()
    return dh, l, max_scale > 0


@register_quantizer(GGMLType.IQ3_XXS)
def _iq3_xxs(x: torch.Tensor) -> torch.Tensor:
    spec = _IQ3_XXS
    n = x.shape[0]
    scale, L, signs, skipped, kmap = _lattice(x, spec)
    gi = _grid_codes(L, kmap, spec)                                   # (n*8, 8)
    gi = torch.where(skipped[:, None], torch.zeros_like(gi), gi)
    dh, l, live = _block_scales(scale, n, 8, 1.0125)
    s4 = signs.reshape(n * 8, 4)
    packed = s4[:, 0] | (s4[:, 1] << 7) | (s4[:, 2] << 14) | (s4[:, 3] << 21)
    packed = torch.where(skipped, torch.zeros_like(packed), packed).reshape(n, 8) | (l << 28)
    packed = torch.where(live[:, None], packed, torch.zeros_like(packed))
    gi = torch.where(live[:, None], gi.reshape(n, 64), torch.zeros_like(gi.reshape(n, 64)))
    sas = torch.stack([(packed >> (8 * j)) & 0xFF for j in range(4)], dim=-1).reshape(n, 32)
    return torch.cat([_f16_bytes(dh), gi.to(torch.uint8), sas.to(torch.uint8)], dim=1)


@register_quantizer(GGMLType.IQ3_S)
def _iq3_s(x: torch.Tensor) -> torch.Tensor:
    spec = _IQ3_S
    n = x.shape[0]
    scale, L, signs, skipped, kmap = _lattice(x, spec)
    gi = _grid_codes(L, kmap, spec).reshape(n, 8, 8)                   # (block, sub, group)
    sg = signs.reshape(n, 8, 4)
    live_sub = ~skipped.reshape(n, 8)
    dh, l, _ = _block_scales(scale, n, 8, 1.033)
    # qh: bit k of byte ib is the ninth bit of group k of sub-block ib (by position)
    hi = ((gi >> 8) & 1) * live_sub[..., None]
    qh = (hi << torch.arange(8, device=x.device)).sum(-1)
    # ggml advances its qs/signs pointers only past sub-blocks it did not skip, so the
    # later sub-blocks' bytes move down over a skipped one; the tail stays zero.
    slot = torch.cumsum(live_sub.long(), dim=1) - 1
    slot = torch.where(live_sub, slot, torch.full_like(slot, 8))     # 8: a scratch slot
    qs = torch.zeros(n, 9, 8, dtype=torch.long, device=x.device)
    qs.scatter_(1, slot[..., None].expand(n, 8, 8), gi & 255)
    sgn = torch.zeros(n, 9, 4, dtype=torch.long, device=x.device)
    sgn.scatter_(1, slot[..., None].expand(n, 8, 4), sg)
    scales = l[:, 0::2] | (l[:, 1::2] << 4)
    return torch.cat([_f16_bytes(dh), qs[:, :8].reshape(n, 64).to(torch.uint8), qh.to(torch.uint8),
                      sgn[:, :8].reshape(n, 32).to(torch.uint8), scales.to(torch.uint8)], dim=1)


@register_quantizer(GGMLType.IQ2_S)
def _iq2_s(x: torch.Tensor) -> torch.Tensor:
    spec = _IQ2_S
    n = x.shape[0]
    scale, L, signs, skipped, kmap = _lattice(x, spec)
    gi = _grid_codes(L, kmap, spec).reshape(n, 32)                     # 16 sub-blocks x 2 groups
    live_g = (~skipped).repeat_interleave(2).reshape(n, 32)
    gi = gi * live_g
    sg = signs.reshape(n, 32) * live_g
    dh, l, _ = _block_scales(scale, n, 16, 0.9875)
    qh = (((gi >> 8) & 3).reshape(n, 8, 4) << (2 * torch.arange(4, device=x.device))).sum(-1)
    scales = l[:, 0::2] | (l[:, 1::2] << 4)
    return torch.cat([_f16_bytes(dh), (gi & 255).to(torch.uint8), sg.to(torch.uint8), qh.to(torch.uint8),
                      scales.to(torch.uint8)], dim=1)
