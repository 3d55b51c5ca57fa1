"""The non-linear 4-bit formats IQ4_NL (32 weights) and IQ4_XS (256): block layouts,
torch dequantizers and quantizers.

Each 4-bit code indexes the 16 levels of :data:`LEVELS` (a format constant of ggml),
times the block's (IQ4_NL) or sub-block's (IQ4_XS: a 6-bit scale, low 4 bits in
``scales_l``, high 2 in ``scales_h``) scale. Dequantized float32 values equal
``gguf.quants.dequantize`` bit for bit; quantized bytes equal ggml's
``quantize_iq4_nl`` / ``quantize_iq4_xs`` without an importance matrix (weights x*x,
7 tries each side of the first scale), with sums in element order in float32 as in
C, each step vectorized over every 32-weight sub-block at once.
"""
from __future__ import annotations

import torch

from ..formats import GGMLType, Layout, register
from .torch_ops import f16_bytes, max_magnitude, nearest_int, nibble_values, pack_nibbles, quant_chunks, scaled_chunks

IQ4_NL = Layout(d="f16", qs=16)
IQ4_XS = Layout(d="f16", scales_h=2, scales_l=4, qs=128)
LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


# -- dequantizing ----------------------------------------------------------------------------

def _f16(b: torch.Tensor, field) -> torch.Tensor:
    return b[:, field.slice].contiguous().view(torch.float16).to(torch.float32)


@scaled_chunks(32)
def _dq_iq4_nl(blocks: torch.Tensor):
    d = _f16(blocks, IQ4_NL.d)
    vals = nibble_values(LEVELS, blocks[:, IQ4_NL.qs.slice])  # (n, 2, 16)
    return d[:, :, None], vals


@scaled_chunks(256)
def _dq_iq4_xs(blocks: torch.Tensor):
    n = blocks.shape[0]
    d = _f16(blocks, IQ4_XS.d)
    scales_h = blocks[:, IQ4_XS.scales_h.slice].contiguous().view(torch.int16).to(torch.int32) & 0xFFFF  # (n, 1)
    scales_l = blocks[:, IQ4_XS.scales_l.slice].to(torch.int32)  # 8 four-bit lows
    ib = torch.arange(8, device=blocks.device)
    lo = (scales_l[:, ib // 2] >> (4 * (ib % 2))) & 0x0F
    hi = (scales_h >> (2 * ib)) & 0x03
    ls = (lo | (hi << 4)) - 32
    dl = d * ls.to(torch.float32)  # (n, 8)
    vals = nibble_values(LEVELS, blocks[:, IQ4_XS.qs.slice].reshape(n, 8, 16))  # (n, 8, 2, 16)
    return dl[:, :, None, None], vals


# -- quantizing -------------------------------------------------------------------------------

_NTRY = 7
_LEVELS_CACHE: dict = {}


def _levels(device) -> torch.Tensor:
    key = str(device)
    t = _LEVELS_CACHE.get(key)
    if t is None:
        t = torch.tensor(LEVELS, dtype=torch.float32, device=device)
        _LEVELS_CACHE[key] = t
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


def _sub_block_scales(xt: torch.Tensor) -> torch.Tensor:
    """The scale of each 32-weight sub-block, columns of ``xt`` (32, m): ggml's search.

    The first guess and the 15 tries around it are independent until the choice, so
    they run as one batch: each element-order sum is 32 steps over a (tries, 2, m)
    slab."""
    v = _levels(xt.device)
    w = xt * xt
    mx, amax = max_magnitude(xt, 0)
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


@quant_chunks(8192)
def _iq4_nl(x: torch.Tensor) -> torch.Tensor:
    v = _levels(x.device)
    scale = _sub_block_scales(x.t().contiguous())  # (n,)
    iscale = torch.where(scale != 0, 1.0 / torch.where(scale != 0, scale, torch.ones_like(scale)),
                         torch.zeros_like(scale))
    L = best_index(v, iscale[:, None] * x)
    return IQ4_NL.pack(d=f16_bytes(scale), qs=pack_nibbles(L))


@quant_chunks(1024)
def _iq4_xs(x: torch.Tensor) -> torch.Tensor:
    v = _levels(x.device)
    n = x.shape[0]
    sub = x.reshape(n * 8, 32)
    scales = _sub_block_scales(sub.t().contiguous()).reshape(n, 8)
    max_scale, max_abs = max_magnitude(scales, 1)
    max_scale = torch.where(max_abs > 0, max_scale, torch.zeros_like(max_scale))
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
    return IQ4_XS.pack(d=f16_bytes(d), scales_h=sh, scales_l=scales_l, qs=pack_nibbles(L))


_COMPILED = ("quantize", "dequantize")  # iq4_numba.py, iq4_dequant_numba.py
register(GGMLType.IQ4_NL, layout=IQ4_NL, dequantize=_dq_iq4_nl, quantize=_iq4_nl, numba=_COMPILED, triton=True)
register(GGMLType.IQ4_XS, layout=IQ4_XS, dequantize=_dq_iq4_xs, quantize=_iq4_xs, numba=_COMPILED, triton=True,
         fallback=("IQ4_NL", "Q5_0"))
