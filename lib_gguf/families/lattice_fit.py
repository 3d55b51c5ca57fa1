"""The grid search of the lattice quantizers (IQ3_XXS, IQ3_S, IQ2_S, IQ1_M): ggml's
method without an importance matrix, in torch. :mod:`lib_gguf.families.lattice`
packs what it finds into blocks.

For each sub-block of 16 or 32 weights:

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
The neighbour lists are built here from the grids of
:mod:`lib_gguf.families.lattice_grids`, sorted by (distance, index), as ggml orders
them. The compiled quantizers (:mod:`lib_gguf.families.lattice_search_numba`,
:mod:`lib_gguf.families.lattice_iq1m_numba`) compute the same fits.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from .lattice_grids import GRIDS, IQ1_DELTA, grid_indices
from .torch_ops import nearest_int, seq_sum, sqrtf


def _shape(name: str):
    return GRIDS[name][1]


@lru_cache(maxsize=None)
def tables_np(name: str, nlevels: int, bits: int, nwant: int):
    """(kmap, neighbours, levels) for grid ``name``.

    ``kmap[u]`` is the grid index of the point whose packed level code is ``u``
    (``bits`` bits a coordinate), or -1. ``neighbours[u]`` lists, for an off-grid
    ``u`` whose levels are all below ``nlevels``, the grid points at its ``nwant``
    smallest squared distances, by (distance, index), padded with -1.
    """
    n, dim = _shape(name)
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


class _Tables:
    """A grid's lookup tables on one device. The neighbour lists are kept ragged
    (``flat[start[u]:start[u] + count[u]]``): they hold 5 to 72 entries on average
    against a longest of 36 to 205, and the search is the quantizers' main cost."""

    def __init__(self, name, nlevels, bits, nwant, device):
        kmap, nb, lev = tables_np(name, nlevels, bits, nwant)
        count = (nb >= 0).sum(axis=1)
        start = np.concatenate([[0], np.cumsum(count)[:-1]])
        self.kmap = torch.from_numpy(kmap).to(device)
        self.flat = torch.from_numpy(nb[nb >= 0]).to(device)           # row-major: each list in order
        self.start = torch.from_numpy(start).to(device)
        self.count = torch.from_numpy(count).to(device)
        self.lev = torch.from_numpy(lev).to(device)
        self.odd = torch.from_numpy(2 * lev + 1).to(torch.float32).to(device)

    def best_neighbour(self, u, scale, xv, wv, values):
        """ggml's ``find_best_neighbour`` for each off-grid code ``u`` (k,): the first
        of its neighbours with the smallest ``sum_i wv_i * (scale * q_i - xv_i)**2``
        (summed in order, float32). ``values(cand, owner)`` gives the ``q`` of each
        candidate grid point for the group that owns it. Returns grid indices (k,)."""
        k = u.shape[0]
        cnt = self.count.index_select(0, u)
        owner = torch.repeat_interleave(torch.arange(k, device=u.device), cnt)
        first = torch.cumsum(cnt, 0) - cnt
        pos = torch.arange(owner.shape[0], device=u.device) - first.index_select(0, owner)
        cand = self.flat.index_select(0, self.start.index_select(0, u).index_select(0, owner) + pos)
        q = values(cand, owner)                                        # (total, D)
        diff = scale.index_select(0, owner)[:, None] * q - xv.index_select(0, owner)
        t = (wv.index_select(0, owner) * diff) * diff
        d2 = seq_sum(t[:, i] for i in range(t.shape[1]))
        d2 = torch.where(d2 < np.finfo(np.float32).max, d2, torch.full_like(d2, float("inf")))
        best = torch.full((k,), float("inf"), device=u.device).scatter_reduce(0, owner, d2, "amin")
        best = best.index_select(0, owner)
        idx = torch.arange(owner.shape[0], device=u.device)
        big = torch.full_like(idx, owner.shape[0])
        pick = torch.full((k,), owner.shape[0], dtype=idx.dtype, device=u.device).scatter_reduce(
            0, owner, torch.where(d2 == best, idx, big), "amin")
        return cand.index_select(0, pick.clamp(max=max(owner.shape[0] - 1, 0)))


def tables(name, nlevels, bits, nwant, device) -> _Tables:
    key = (name, str(device))
    t = _dev_cache.get(key)
    if t is None:
        t = _Tables(name, nlevels, bits, nwant, device)
        _dev_cache[key] = t
    return t


@dataclass(frozen=True)
class Spec:
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


def fit_sub_blocks(x: torch.Tensor, spec: Spec):
    """Fit every sub-block of ``x`` (nblocks, 256).

    Returns (scale (m,), L (m, sub) int64 levels, signs (m, sub/8) int64 bits,
    skipped (m,) bool), m = nblocks * 256 / sub.
    """
    dev = x.device
    tabs = tables(spec.grid, spec.kmaxq, spec.bits, spec.nwant, dev)
    kmap, lev, odd = tabs.kmap, tabs.lev, tabs.odd
    S, D = spec.sub, spec.dim
    xs = x.reshape(-1, S)
    m = xs.shape[0]
    ng = S // D
    if spec.sigma_weight:
        xx = x * x
        sumx2 = seq_sum(xx[:, i] for i in range(x.shape[1]))
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
            gx, gw = xg.index_select(0, rows), wg.index_select(0, rows)
            gid = id_.index_select(0, rows // ng)
            gsc = scale_.index_select(0, rows // ng)
        Lg = nearest_int(0.5 * (gid[:, None] * gx - 1)).clamp(0, spec.kmaxq - 1).long()
        u = (Lg << shifts).sum(dim=1)
        gi = kmap.index_select(0, u)
        off = gi < 0
        oi = off.nonzero().squeeze(1)
        if oi.numel():
            best = tabs.best_neighbour(u.index_select(0, oi), gsc.index_select(0, oi), gx.index_select(0, oi),
                                       gw.index_select(0, oi), lambda cand, owner: odd.index_select(0, cand))
            Lg[oi] = lev.index_select(0, best)
        return Lg, ~off

    def fit(Lt):
        q = (2 * Lt + 1).to(torch.float32)
        sumqx = seq_sum(wx[i] * q[i] for i in range(S))
        sumq2 = seq_sum((wt[i] * q[i]) * q[i] for i in range(S))
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


def fit_blocks(x: torch.Tensor, spec: Spec, fudge: float):
    """Everything a lattice format stores, before packing: grid indices (m, groups),
    signs (m, sub/8), skipped (m,), the fp16-bound block scale (n,), the 4-bit
    sub-block scales (n, per) and whether each block has any (n,)."""
    scale, L, signs, skipped, kmap = fit_sub_blocks(x, spec)
    m = L.shape[0]
    shifts = spec.bits * torch.arange(spec.dim, device=L.device)
    gi = kmap[(L.reshape(m, -1, spec.dim) << shifts).sum(-1)]
    dh, l, live = block_scales(scale, x.shape[0], m // x.shape[0], fudge)
    return gi, signs, skipped, dh, l, live


def block_scales(scale, nblk, per, fudge):
    """4-bit sub-block scales and the fp16 super-block scale, as ggml derives them."""
    sc = scale.reshape(nblk, per)
    max_scale = sc.amax(dim=1)
    d = max_scale / 31
    dh = torch.where(max_scale > 0, d * np.float32(fudge), torch.zeros_like(d))
    idv = 1 / torch.where(max_scale > 0, d, torch.ones_like(d))
    l = nearest_int(0.5 * (idv[:, None] * sc - 1)).clamp(0, 15).long()
    return dh, l, max_scale > 0


# -- IQ1_M ------------------------------------------------------------------------------
#
# Three levels a weight (-1, 0, 1), shifted by +-IQ1M_DELTA per group of 8. For each
# 16-weight sub-block ggml sorts the weights and tries every pair of boundaries that
# split them into the three levels, for the four combinations of shift directions of
# its two groups, keeping the best weighted fit; a group whose levels are not a grid
# point goes to its best neighbour. The block scale is then refitted over all 256.

_DELTA = np.float32(IQ1_DELTA)
IQ1_PLUS = np.array([-1 + _DELTA, _DELTA, 1 + _DELTA], dtype=np.float32)   # the three levels, shifted up
IQ1_MINUS = np.array([-1 - _DELTA, -_DELTA, 1 - _DELTA], dtype=np.float32)  # and down
IQ1_EPS = 1e-7


@lru_cache(maxsize=None)
def _splits():
    """Every (i1, i2) boundary pair in ggml's loop order, as the level (0, 1, 2) of each
    sorted position: (pairs, 16)."""
    pairs = [(i1, i2) for i1 in range(17) for i2 in range(i1, 17)]
    j = np.arange(16)
    seg = np.stack([np.where(j < a, 0, np.where(j < b, 1, 2)) for a, b in pairs])
    return seg


def shift_tables(best_k: torch.Tensor, device):
    """(m, 2, 3) level values of each group: group 0 uses +delta when k < 2, group 1
    when k is even."""
    xp = torch.from_numpy(IQ1_PLUS).to(device)
    xm = torch.from_numpy(IQ1_MINUS).to(device)
    g0 = torch.where((best_k < 2)[:, None], xp, xm)
    g1 = torch.where((best_k % 2 == 0)[:, None], xp, xm)
    return torch.stack([g0, g1], dim=1)


def fit_iq1m_sub_blocks(xs: torch.Tensor):
    """Fit every 16-weight sub-block (rows of ``xs``). Returns (scale, best_k, grid
    index (m, 2), skipped)."""
    dev = xs.device
    m = xs.shape[0]
    tabs = tables("IQ1_S", 3, 2, 3, dev)
    kmap, lev = tabs.kmap, tabs.lev
    w = xs * xs
    mx = xs.abs().amax(dim=1)
    skipped = mx < IQ1_EPS

    order = torch.sort(xs, dim=1, stable=True).indices
    xsrt = xs.gather(1, order)
    wsrt = w.gather(1, order)
    second = order >= 8                                          # the weight's group
    xp = torch.from_numpy(IQ1_PLUS).to(dev)
    xm = torch.from_numpy(IQ1_MINUS).to(dev)
    # value of level s for accumulator k at each sorted position: (4, 3, m, 16)
    # accumulators: 0 (+,+), 1 (+,-), 2 (-,+), 3 (-,-): the first sign is group 0's
    use_p = torch.stack([torch.ones_like(second), ~second, second, torch.zeros_like(second)])
    vals = torch.where(use_p[:, None], xp[None, :, None, None], xm[None, :, None, None])   # (4, 3, m, 16)
    wv = wsrt[None, None] * vals
    tqx = wv * xsrt[None, None]
    tq2 = wv * vals
    seg = torch.from_numpy(_splits()).to(dev)                                # (P, 16)
    P = seg.shape[0]
    sqx = sq2 = None
    for j in range(16):
        s = seg[:, j]                                                        # (P,)
        ax = tqx[:, :, :, j].index_select(1, s)                             # (4, P, m)
        a2 = tq2[:, :, :, j].index_select(1, s)
        sqx = ax if sqx is None else sqx + ax
        sq2 = a2 if sq2 is None else sq2 + a2
    best = torch.full((m,), -np.finfo(np.float32).tiny, device=dev)
    scale = mx.clone()
    bp = torch.full((m,), -1, dtype=torch.long, device=dev)
    bk = torch.full((m,), -1, dtype=torch.long, device=dev)
    for p in range(P):
        for k in range(4):
            qx, q2 = sqx[k, p], sq2[k, p]
            better = (q2 > 0) & (qx * qx > best * q2)
            nd = qx / torch.where(q2 > 0, q2, torch.ones_like(q2))
            scale = torch.where(better, nd, scale)
            best = torch.where(better, nd * qx, best)
            bp = torch.where(better, torch.full_like(bp, p), bp)
            bk = torch.where(better, torch.full_like(bk, k), bk)
    found = bp >= 0
    bp = bp.clamp(min=0)
    bk = bk.clamp(min=0)
    Ls = seg[bp]                                                             # levels by sorted position
    L = torch.empty_like(Ls).scatter_(1, order, Ls)
    neg = scale < 0
    L = torch.where(neg[:, None], 2 - L, L)
    scale = scale.abs()
    bk = torch.where(neg, 3 - bk, bk)

    tab = shift_tables(bk, dev)                                             # (m, 2, 3)
    shifts = 2 * torch.arange(8, device=dev)
    u = (L.reshape(m, 2, 8) << shifts).sum(-1)                               # (m, 2)
    gi = kmap[u]
    off = (gi < 0) & ~skipped[:, None]
    if off.any():
        r, g = off.nonzero(as_tuple=True)
        gtab = tab[r, g]                                                     # (k, 3) level values
        gi[r, g] = tabs.best_neighbour(u[r, g], scale[r], xs.reshape(m, 2, 8)[r, g], w.reshape(m, 2, 8)[r, g],
                                       lambda cand, owner: gtab[owner].gather(1, lev[cand]))
        # refit the scale over both groups' grid points
        rows = off.any(dim=1)
        qv = torch.gather(tab, 2, lev[gi.clamp(min=0)])                      # (m, 2, 8)
        qv = qv.reshape(m, 16)
        wq = w * qv
        fx = seq_sum(wq[:, i] * xs[:, i] for i in range(16))
        f2 = seq_sum(wq[:, i] * qv[:, i] for i in range(16))
        ok = rows & (fx > 0) & (f2 > 0)
        scale = torch.where(ok, fx / torch.where(ok, f2, torch.ones_like(f2)), scale)
    if not bool(found[~skipped].all()):
        raise FloatingPointError("IQ1_M: no fit for a sub-block (non-finite weights?)")
    gi = torch.where(skipped[:, None], torch.zeros_like(gi), gi)
    scale = torch.where(skipped, torch.zeros_like(scale), scale)
    return scale, bk, gi, skipped
