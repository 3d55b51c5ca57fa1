"""Quantizers for the non-linear 4-bit formats IQ4_NL and IQ4_XS, byte-identical to
ggml's own (``quantize_iq4_nl`` / ``quantize_iq4_xs`` without an importance matrix:
weights x*x, 7 tries each side of the first scale).

Sums run in element order in float32, as in C, each step vectorized over every
32-weight sub-block at once (the (32, n) transposed layout keeps it contiguous).
"""
from __future__ import annotations

import torch

from .dequant_iq import IQ4NL_LEVELS
from .formats import GGMLType, register_quantizer
from .quant import _f16_bytes, chunked, nearest_int

_NTRY = 7
_levels_cache: dict = {}


def _levels(device) -> torch.Tensor:
    key = str(device)
    t = _levels_cache.get(key)
    if t is None:
        t = torch.tensor(IQ4NL_LEVELS, dtype=torch.float32, device=device)
        _levels_cache[key] = t
    return t


_mu_cache: dict = {}


def best_index(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """ggml's best_index_int8 over the sorted integer levels ``v``: the nearest level,
    the lower one on a tie (int64 indices), with its float32 differences.

    The bracketing pair is looked up from floor(x) (the levels are integers, so the
    levels <= x are the levels <= floor(x)) instead of a binary search."""
    n = v.numel()
    key = (str(v.device), n, float(v[0]), float(v[-1]))
    mu_t = _mu_cache.get(key)
    if mu_t is None:
        k = torch.arange(-129, 129, dtype=torch.float32, device=v.device)
        mu_t = torch.searchsorted(v, k, right=True).clamp(1, n - 1)
        _mu_cache[key] = mu_t
    flat = x.reshape(-1)
    fk = torch.floor(flat).clamp_(-129, 128).to(torch.int64) + 129
    mu = mu_t.index_select(0, fk)
    lo = v.index_select(0, mu - 1)
    hi = v.index_select(0, mu)
    idx = torch.where((flat - lo) < (hi - flat), mu - 1, mu)
    idx = torch.where(flat <= v[0], torch.zeros_like(idx), idx)
    idx = torch.where(flat >= v[-1], torch.full_like(idx, n - 1), idx)
    return idx.reshape(x.shape)


def _seq(terms):
    acc = None
    for t in terms:
        acc = t if acc is None else acc + t
    return acc


def _sub_block_scales(xt: torch.Tensor) -> torch.Tensor:
    """The scale of each 32-weight sub-block, columns of ``xt`` (32, m): ggml's search.

    The first guess and the 15 tries around it are independent until the choice, so
    they run as one batch: each element-order sum is 32 steps over a (tries, 2, m)
    slab."""
    v = _levels(xt.device)
    w = xt * xt
    ax = xt.abs()
    idx = ax.argmax(dim=0, keepdim=True)
    amax = ax.gather(0, idx).squeeze(0)
    mx = xt.gather(0, idx).squeeze(0)
    zero = amax < 1e-15
    mx_safe = torch.where(zero, torch.ones_like(mx), mx)
    d0 = -mx_safe / v[0]
    iscales = torch.stack([1.0 / d0] + [(float(t) + v[0]) / mx_safe for t in range(-_NTRY, _NTRY + 1)])  # (T, m)
    y = iscales[:, None, :] * xt[None]                                     # (T, 32, m)
    q = v.index_select(0, best_index(v, y).reshape(-1)).reshape(y.shape)
    prod = torch.empty((y.shape[0], 2) + tuple(xt.shape), device=xt.device)
    torch.mul(w, q, out=prod[:, 1])
    torch.mul(prod[:, 1], xt, out=prod[:, 0])   # (w*q)*x
    prod[:, 1] *= q                             # (w*q)*q
    acc = prod[:, :, 0].clone()
    for j in range(1, xt.shape[0]):
        acc += prod[:, :, j]
    sumqx, sumq2 = acc[:, 0], acc[:, 1]
    d = sumqx[0] / sumq2[0]
    best = d * sumqx[0]
    for t in range(1, y.shape[0]):
        sqx, sq2 = sumqx[t], sumq2[t]
        better = (sq2 > 0) & (sqx * sqx > best * sq2)
        nd = sqx / torch.where(sq2 > 0, sq2, torch.ones_like(sq2))
        d = torch.where(better, nd, d)
        best = torch.where(better, nd * sqx, best)
    return torch.where(zero, torch.zeros_like(d), d)


def _pack(L: torch.Tensor) -> torch.Tensor:
    """(n, k*32) level indices -> (n, k*16) bytes: low nibble j, high nibble j + 16 of each 32."""
    L = L.to(torch.uint8).reshape(L.shape[0], -1, 2, 16)
    return (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(L.shape[0], -1)


@register_quantizer(GGMLType.IQ4_NL)
@chunked(8192)
def _iq4_nl(x: torch.Tensor) -> torch.Tensor:
    v = _levels(x.device)
    scale = _sub_block_scales(x.t().contiguous())  # (n,)
    iscale = torch.where(scale != 0, 1.0 / torch.where(scale != 0, scale, torch.ones_like(scale)),
                         torch.zeros_like(scale))
    L = best_index(v, iscale[:, None] * x)
    return torch.cat([_f16_bytes(scale), _pack(L)], dim=1)


@register_quantizer(GGMLType.IQ4_XS)
@chunked(1024)
def _iq4_xs(x: torch.Tensor) -> torch.Tensor:
    v = _levels(x.device)
    n = x.shape[0]
    sub = x.reshape(n * 8, 32)
    scales = _sub_block_scales(sub.t().contiguous()).reshape(n, 8)
    sa = scales.abs()
    idx = sa.argmax(dim=1, keepdim=True)
    max_scale = torch.where(sa.gather(1, idx).squeeze(1) > 0, scales.gather(1, idx).squeeze(1),
                            torch.zeros(n, device=x.device))
    d = -max_scale / 32
    inv = torch.where(d != 0, 1.0 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))
    l = nearest_int(inv[:, None] * scales).clamp(-32, 31)
    dl = d[:, None] * l
    idl = torch.where(dl != 0, 1.0 / torch.where(dl != 0, dl, torch.ones_like(dl)), torch.zeros_like(dl))
    L = best_index(v, idl[:, :, None] * x.reshape(n, 8, 32)).reshape(n, 256)
    li = (l + 32).to(torch.int32)
    lo = (li & 0xF).to(torch.uint8).reshape(n, 4, 2)
    scales_l = lo[:, :, 0] | (lo[:, :, 1] << 4)
    hi = (li >> 4) & 3
    scales_h = (hi << (2 * torch.arange(8, device=x.device, dtype=torch.int32))).sum(dim=1)
    sh = torch.stack([scales_h & 0xFF, scales_h >> 8], dim=1).to(torch.uint8)
    return torch.cat([_f16_bytes(d), sh, scales_l, _pack(L)], dim=1)


# -- ternary formats (ggml's quantize_row_tq*_ref) ------------------------------------

def _ternary(x: torch.Tensor):
    """(d, trits 0..2 as int32) per 256-weight block: d = absmax, trit = roundf(x/d) + 1."""
    from .quant import _inv, roundf

    d = x.abs().amax(dim=1)
    t = (roundf(x * _inv(d)[:, None]) + 1).to(torch.int32)
    return d, t


def _base3(trits: torch.Tensor) -> torch.Tensor:
    """(..., k) trits, first most significant -> the byte ggml stores: ceil(q * 256 / 243)."""
    q = torch.zeros(trits.shape[:-1], dtype=torch.int32, device=trits.device)
    for i in range(trits.shape[-1]):
        q = q * 3 + trits[..., i]
    return (q * 256 + 242) // 243


@register_quantizer(GGMLType.TQ1_0)
def _tq1_0(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    d, t = _ternary(x)
    # 32 bytes of 5 trits (value m + 32*k), then 16 bytes of 5 (m + 16*k), then 4 bytes of 4 (j + 4*k)
    a = t[:, :160].reshape(n, 5, 32).transpose(1, 2)
    b = t[:, 160:240].reshape(n, 5, 16).transpose(1, 2)
    c = t[:, 240:].reshape(n, 4, 4).transpose(1, 2)
    c = torch.cat([c, torch.zeros_like(c[..., :1])], dim=-1)  # "shift the first value to the top trit"
    qs = torch.cat([_base3(a), _base3(b), _base3(c)], dim=1)
    return torch.cat([qs.to(torch.uint8), _f16_bytes(d)], dim=1)


@register_quantizer(GGMLType.TQ2_0)
def _tq2_0(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    d, t = _ternary(x)
    t = (t & 3).reshape(n, 2, 4, 32)
    qs = t[:, :, 0] | (t[:, :, 1] << 2) | (t[:, :, 2] << 4) | (t[:, :, 3] << 6)
    return torch.cat([qs.reshape(n, 64).to(torch.uint8), _f16_bytes(d)], dim=1)


# -- MXFP4 ------------------------------------------------------------------------------

@register_quantizer(GGMLType.MXFP4)
def _mxfp4(x: torch.Tensor) -> torch.Tensor:
    """Shared UE8M0 exponent floor(log2(absmax)) - 2 (so the largest E2M1 level, 6,
    covers the block), then each weight to its nearest doubled-E2M1 level (the first
    on a tie), as gguf-py's reference quantizer does."""
    from .dequant_iq import E2M1_DOUBLED, _e8m0_half

    amax = x.abs().amax(dim=1)
    _, exp = torch.frexp(amax)  # amax = m * 2**exp, m in [0.5, 1): floor(log2(amax)) = exp - 1
    e = torch.where(amax > 0, (exp - 1 - 2 + 127).clamp(0, 255), torch.zeros_like(exp)).to(torch.uint8)
    d = _e8m0_half(e)
    # The first level with the smallest |d * level - x| in the table's order. A negative
    # level's error equals its magnitude's against |x| (negation is exact), and the
    # table lists 0 first and each sign's magnitudes in increasing order: so the pick is
    # the first of the eight magnitudes nearest to |x|, on x's side of zero.
    ax = x.abs()
    dd = d[:, None]
    best = torch.zeros(ax.shape, dtype=torch.uint8, device=x.device)
    best_err = ax.clone()  # magnitude 0
    for i, mag in enumerate(E2M1_DOUBLED[1:8], start=1):
        err = (dd * float(mag) - ax).abs()
        better = err < best_err
        best = torch.where(better, torch.full_like(best, i), best)
        best_err = torch.where(better, err, best_err)
    best = torch.where((x < 0) & (best > 0), best + 8, best)
    qs = best[:, :16] | (best[:, 16:] << 4)
    return torch.cat([e[:, None], qs], dim=1)
