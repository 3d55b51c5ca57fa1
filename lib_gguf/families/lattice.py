"""The lattice formats IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S and IQ1_M
(256 weights): block layouts, torch dequantizers, and the packing of the
quantizers for IQ3_XXS, IQ3_S, IQ2_S and IQ1_M (the search is
:mod:`lib_gguf.families.lattice_fit`; ggml quantizes IQ2_XXS, IQ2_XS and IQ1_S only
with an importance matrix).

Groups of 8 (IQ2, IQ1) or 4 (IQ3) weights are points of a grid
(:mod:`lib_gguf.families.lattice_grids`) with signs, times a sub-block scale.
Layouts as ``ggml-common.h`` defines them; dequantized float32 values equal
``gguf.quants.dequantize`` bit for bit (every product is exact or one float32
multiplication); quantized bytes equal ggml's.
"""
from __future__ import annotations

import numpy as np
import torch

from ..formats import GGMLType, Layout, register
from .lattice_fit import Spec, fit_blocks, fit_iq1m_sub_blocks, shift_tables, tables
from .lattice_grids import IQ1_DELTA as DELTA, grid, ksigns
from .torch_ops import (cached, f16_bytes, nearest_int, nibbles_interleaved, quant_chunks, rows, scaled_chunks,
                        seq_sum, u16, u32)

IQ2_XXS = Layout(d="f16", qs=64)              # 8 x (4 grid bytes, a uint32 of 4 x 7 sign bits and a 4-bit scale)
IQ2_XS = Layout(d="f16", qs=64, scales=8)     # 32 uint16: 9-bit grid index, 7 sign bits
IQ2_S = Layout(d="f16", qs=32, signs=32, qh=8, scales=8)
IQ3_XXS = Layout(d="f16", qs=64, scales=32)   # scales: 8 uint32 of 4 x 7 sign bits and a 4-bit scale
IQ3_S = Layout(d="f16", qs=64, qh=8, signs=32, scales=4)
IQ1_S = Layout(d="f16", qs=32, qh=16)         # qh: 8 uint16 of 4 x 3 grid bits, a 3-bit scale, the delta sign
IQ1_M = Layout(qs=32, qh=16, scales=8)        # the fp16 d is the top nibbles of the four scale words


def _f16(b: torch.Tensor) -> torch.Tensor:
    """The block's float16 ``d`` (its first two bytes in every layout that has one) as float32 (n, 1)."""
    return b[:, :2].contiguous().view(torch.float16).to(torch.float32)


def _head(b: torch.Tensor):
    """(blocks, device, d) of a chunk of blocks."""
    return b.shape[0], b.device, _f16(b)


def _signed_grid(name: str, device) -> torch.Tensor:
    """(entries * 128, 8) float32: every grid point times every 7-bit sign pattern
    (row ``g * 128 + s``), so one row lookup gives eight signed values. Exact: a
    sign is +-1."""
    return cached(("signed", name, str(device)), lambda: (
        grid(name, device)[:, None, :] * ksigns(device)[None, :, :]).reshape(-1, 8).contiguous())


def _sign_patterns4(device) -> torch.Tensor:
    bits = (torch.arange(16)[:, None] >> torch.arange(4)[None, :]) & 1
    return (1.0 - 2.0 * bits.to(torch.float32)).to(device)


def _signed_grid4(name: str, device) -> torch.Tensor:
    """(entries * 16, 4) float32 for a grid of 4-wide points: every point times every
    4-bit sign pattern (row ``g * 16 + nibble``; bit j set: value j negative)."""
    return cached(("signed4", name, str(device)), lambda: (
        grid(name, device)[:, None, :] * _sign_patterns4(device)[None, :, :]).reshape(-1, 4).contiguous())


def _sign_bytes(device) -> torch.Tensor:
    """(256, 8) float32: bit j of the byte set -> value j is -1."""
    def make():
        bits = (torch.arange(256)[:, None] >> torch.arange(8)[None, :]) & 1
        return (1.0 - 2.0 * bits.to(torch.float32)).to(device)
    return cached(("signs256", str(device)), make)


def _ksign_bytes(device) -> torch.Tensor:
    """(128,) int64: ggml's 7-bit sign index -> the 8 sign bits (the eighth makes the
    count of minus signs even)."""
    def make():
        i = torch.arange(128)
        par = ((i[:, None] >> torch.arange(7)[None, :]) & 1).sum(dim=1) & 1
        return (i | (par << 7)).to(device)
    return cached(("ksignbytes", str(device)), make)


def _shifted(v: torch.Tensor, shifts, device) -> torch.Tensor:
    """``v[..., None] >> shifts``."""
    return v[..., None] >> torch.tensor(shifts, device=device)


# -- dequantizing ----------------------------------------------------------------------------

@scaled_chunks(256)
def _dq_iq2_xxs(blocks: torch.Tensor):
    n, dev, d = _head(blocks)
    q = u32(blocks[:, IQ2_XXS.qs.slice]).reshape(n, 8, 2)
    aux0, aux1 = q[..., 0], q[..., 1]
    db = d * (0.5 + (aux1 >> 28).to(torch.float32)) * 0.25  # (n, 8)
    sidx = _shifted(aux1, [0, 7, 14, 21], dev) & 0x7F  # (n, 8, 4)
    gidx = _shifted(aux0, [0, 8, 16, 24], dev) & 0xFF
    gs = rows(_signed_grid("IQ2_XXS", dev), (gidx << 7) | sidx)  # (n, 8, 4, 8)
    return db[:, :, None, None], gs


@scaled_chunks(256)
def _dq_iq2_xs(blocks: torch.Tensor):
    n = blocks.shape[0]
    d = _f16(blocks)
    qs = u16(blocks[:, IQ2_XS.qs.slice]).reshape(n, 8, 4)
    sc = nibbles_interleaved(blocks[:, IQ2_XS.scales.slice])  # (n, 16)
    db = (d * (0.5 + sc.to(torch.float32)) * 0.25).reshape(n, 8, 2, 1, 1)
    gs = rows(_signed_grid("IQ2_XS", blocks.device), ((qs & 511) << 7) | (qs >> 9)).reshape(n, 8, 2, 2, 8)
    return db, gs


@scaled_chunks(256)
def _dq_iq2_s(blocks: torch.Tensor):
    n, dev, d = _head(blocks)
    qs, signs, qh, scales = IQ2_S.split(blocks, "qs", "signs", "qh", "scales")
    sc = nibbles_interleaved(scales)
    db = (d * (0.5 + sc.to(torch.float32)) * 0.25).reshape(n, 8, 2, 1, 1)
    s = rows(_sign_bytes(dev), signs.to(torch.int64)).reshape(n, 8, 2, 2, 8)
    hi = _shifted(qh.to(torch.int64), [0, 2, 4, 6], dev) & 0x03  # (n, 8, 4)
    idx = qs.to(torch.int64) | (hi.reshape(n, 32) << 8)
    g = rows(grid("IQ2_S", dev), idx).reshape(n, 8, 2, 2, 8)
    return db, g * s


@scaled_chunks(256)
def _dq_iq3_xxs(blocks: torch.Tensor):
    n, dev, d = _head(blocks)
    qs = blocks[:, IQ3_XXS.qs.slice].to(torch.int64)
    sc = u32(blocks[:, IQ3_XXS.scales.slice])  # (n, 8)
    db = (d * (0.5 + (sc >> 28).to(torch.float32)) * 0.5).reshape(n, 8, 1, 1)
    sidx = _shifted(sc, [0, 7, 14, 21], dev) & 0x7F  # (n, 8, 4): 8 values each
    nib = nibbles_interleaved(_ksign_bytes(dev)[sidx]).reshape(n, 64)  # one nibble per grid point
    gs = rows(_signed_grid4("IQ3_XXS", dev), (qs << 4) | nib).reshape(n, 8, 8, 4)
    return db, gs


@scaled_chunks(256)
def _dq_iq3_s(blocks: torch.Tensor):
    n, dev, d = _head(blocks)
    qs, qh, signs, scales = IQ3_S.split(blocks, "qs", "qh", "signs", "scales")
    sc = nibbles_interleaved(scales)  # (n, 8)
    db = (d * (1 + 2 * sc).to(torch.float32)).reshape(n, 8, 1, 1)
    hi = (qh.to(torch.int64)[..., None] >> torch.arange(8, device=dev)) & 1  # (n, 8, 8)
    idx = qs.to(torch.int64) | (hi.reshape(n, 64) << 8)
    nib = nibbles_interleaved(signs).to(torch.int64)  # (n, 64)
    gs = rows(_signed_grid4("IQ3_S", dev), (idx << 4) | nib).reshape(n, 8, 8, 4)
    return db, gs


@scaled_chunks(256)
def _dq_iq1_s(blocks: torch.Tensor):
    n, dev, d = _head(blocks)
    qs, qh = blocks[:, IQ1_S.qs.slice].to(torch.int64), u16(blocks[:, IQ1_S.qh.slice])  # (n, 8)
    dl = (d * (2 * ((qh >> 12) & 7) + 1).to(torch.float32)).reshape(n, 8, 1, 1)
    delta = torch.where((qh & 0x8000) == 0, DELTA, -DELTA).to(torch.float32).reshape(n, 8, 1, 1)
    hi = _shifted(qh, [0, 3, 6, 9], dev) & 7  # (n, 8, 4)
    idx = qs | (hi.reshape(n, 32) << 8)
    g = rows(grid("IQ1_S", dev), idx).reshape(n, 8, 4, 8)
    return dl, g + delta


@scaled_chunks(256)
def _dq_iq1_m(blocks: torch.Tensor):
    """IQ1_M: bit 3 of each ``qh`` nibble set means the group's delta is minus."""
    n, dev = blocks.shape[0], blocks.device
    qs, qh = blocks[:, IQ1_M.qs.slice].to(torch.int64), blocks[:, IQ1_M.qh.slice].to(torch.int64)
    scales = u16(blocks[:, IQ1_M.scales.slice])
    parts = (scales & 0xF000) >> torch.tensor([12, 8, 4, 0], device=dev)
    dbits = parts[:, 0] | parts[:, 1] | parts[:, 2] | parts[:, 3]
    d = dbits.to(torch.int16).view(torch.float16).to(torch.float32).reshape(n, 1)
    sc = _shifted(scales, [0, 3, 6, 9], dev) & 7  # (n, 4, 4)
    dl = (d * (2 * sc.reshape(n, 16) + 1).to(torch.float32)).reshape(n, 8, 2, 1, 1)
    nib = nibbles_interleaved(qh)  # (n, 32)
    idx = qs | ((nib & 7) << 8)
    delta = torch.where((nib & 8) == 0, DELTA, -DELTA).to(torch.float32).reshape(n, 8, 2, 2, 1)
    g = rows(grid("IQ1_S", dev), idx).reshape(n, 8, 2, 2, 8)
    return dl, g + delta


# -- quantizing: packing what lattice_fit found --------------------------------------------------

SPECS = {
    "IQ3_XXS": Spec("IQ3_XXS", 32, 4, 3, 8, 2, (-15, 15, 0.2), 1e-8, True, False, False),
    "IQ3_S": Spec("IQ3_S", 32, 4, 3, 8, 3, (-9, 9, 0.2), 0.0, False, True, False),
    "IQ2_S": Spec("IQ2_S", 16, 8, 2, 3, 1, (-9, 9, 0.1), 1e-8, False, False, True),
}
_CHUNK = 1024  # blocks of 256 a pass: bounds the neighbour-search temporaries (tens of MB)


def _bytes_of(v: torch.Tensor, width: int) -> torch.Tensor:
    """(n, k) little-endian integers of ``width`` bytes -> (n, k * width) uint8."""
    return torch.stack([(v >> (8 * j)) & 0xFF for j in range(width)], dim=-1).reshape(v.shape[0], -1).to(torch.uint8)


@quant_chunks(_CHUNK)
def quantize_iq3_xxs(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    gi, signs, skipped, dh, l, live = fit_blocks(x, SPECS["IQ3_XXS"], 1.0125)   # gi: (n*8, 8)
    gi = torch.where(skipped[:, None], torch.zeros_like(gi), gi)
    s4 = signs.reshape(n * 8, 4)
    packed = s4[:, 0] | (s4[:, 1] << 7) | (s4[:, 2] << 14) | (s4[:, 3] << 21)
    packed = torch.where(skipped, torch.zeros_like(packed), packed).reshape(n, 8) | (l << 28)
    packed = torch.where(live[:, None], packed, torch.zeros_like(packed))
    gi = torch.where(live[:, None], gi.reshape(n, 64), torch.zeros_like(gi.reshape(n, 64)))
    return IQ3_XXS.pack(d=f16_bytes(dh), qs=gi.to(torch.uint8), scales=_bytes_of(packed, 4))


@quant_chunks(_CHUNK)
def quantize_iq3_s(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    gi, signs, skipped, dh, l, _ = fit_blocks(x, SPECS["IQ3_S"], 1.033)
    gi = gi.reshape(n, 8, 8)                                          # (block, sub, group)
    sg = signs.reshape(n, 8, 4)
    live_sub = ~skipped.reshape(n, 8)
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
    return IQ3_S.pack(d=f16_bytes(dh), qs=qs[:, :8].reshape(n, 64).to(torch.uint8), qh=qh.to(torch.uint8),
                      signs=sgn[:, :8].reshape(n, 32).to(torch.uint8), scales=scales.to(torch.uint8))


@quant_chunks(_CHUNK)
def quantize_iq2_s(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    gi, signs, skipped, dh, l, _ = fit_blocks(x, SPECS["IQ2_S"], 0.9875)
    live_g = (~skipped).repeat_interleave(2).reshape(n, 32)
    gi = gi.reshape(n, 32) * live_g                                   # 16 sub-blocks x 2 groups
    sg = signs.reshape(n, 32) * live_g
    qh = (((gi >> 8) & 3).reshape(n, 8, 4) << (2 * torch.arange(4, device=x.device))).sum(-1)
    scales = l[:, 0::2] | (l[:, 1::2] << 4)
    return IQ2_S.pack(d=f16_bytes(dh), qs=(gi & 255).to(torch.uint8), signs=sg.to(torch.uint8),
                      qh=qh.to(torch.uint8), scales=scales.to(torch.uint8))


_IQ1M_MASKS = (0x00, 0x80, 0x08, 0x88)  # the delta-sign bits of a qh byte, by shift choice (0: +,+ ... 3: -,-)


@quant_chunks(_CHUNK)
def quantize_iq1_m(x: torch.Tensor) -> torch.Tensor:
    dev = x.device
    n = x.shape[0]
    m = n * 16
    xs = x.reshape(m, 16)
    scale, bk, gi, skipped = fit_iq1m_sub_blocks(xs)
    # ggml leaves the shift of a sub-block it skips (all |x| < 1e-7) unset; the ggml
    # build that made our oracle reads it as 0, so a skipped sub-block gets shift 0
    # (no mask bits).
    bk = torch.where(skipped, torch.zeros_like(bk), bk)
    lev = tables("IQ1_S", 3, 2, 3, dev).lev
    sc = scale.reshape(n, 16)
    max_scale = sc.amax(dim=1)
    live = max_scale > 0
    d = max_scale / 15
    idv = 1 / torch.where(live, d, torch.ones_like(d))
    l = nearest_int(0.5 * (idv[:, None] * sc - 1)).clamp(0, 7).long()        # (n, 16)
    tab = shift_tables(bk, dev)                                              # (m, 2, 3)
    q = torch.gather(tab, 2, lev[gi]).reshape(n, 256) * (2 * l + 1).repeat_interleave(16, dim=1).to(torch.float32)
    w = x * x
    wq = w * q
    fx = seq_sum(wq[:, i] * x[:, i] for i in range(256))
    f2 = seq_sum(wq[:, i] * q[:, i] for i in range(256))
    d = torch.where(f2 > 0, fx / torch.where(f2 > 0, f2, torch.ones_like(f2)), d)
    dbits = (d * np.float32(1.1125)).to(torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF

    l4 = l.reshape(n, 4, 4)
    sc16 = (l4 << (3 * torch.arange(4, device=dev))).sum(-1)                 # (n, 4) 12 bits each
    sc16 = sc16 | (((dbits[:, None] >> (4 * torch.arange(4, device=dev))) & 0xF) << 12)
    sc16 = torch.where(live[:, None], sc16, torch.zeros_like(sc16))
    masks = torch.tensor(_IQ1M_MASKS, device=dev)[bk].reshape(n, 16)
    g = gi.reshape(n, 16, 2)
    qh = (g[..., 0] >> 8) | ((g[..., 1] >> 8) << 4)
    qh = torch.where(live[:, None], qh | masks, qh)
    return IQ1_M.pack(qs=(gi & 255).reshape(n, 32).to(torch.uint8), qh=qh.to(torch.uint8), scales=_bytes_of(sc16, 2))


register(GGMLType.IQ2_XXS, layout=IQ2_XXS, dequantize=_dq_iq2_xxs, numba=("dequantize",), triton=True)
register(GGMLType.IQ2_XS, layout=IQ2_XS, dequantize=_dq_iq2_xs, numba=("dequantize",), triton=True)
register(GGMLType.IQ2_S, layout=IQ2_S, dequantize=_dq_iq2_s, quantize=quantize_iq2_s, numba=("dequantize", "quantize"),
         triton=True, fallback=("IQ4_NL", "Q5_0"))
register(GGMLType.IQ3_XXS, layout=IQ3_XXS, dequantize=_dq_iq3_xxs, quantize=quantize_iq3_xxs,
         numba=("dequantize", "quantize"), triton=True, fallback=("IQ4_NL", "Q5_0"))
register(GGMLType.IQ3_S, layout=IQ3_S, dequantize=_dq_iq3_s, quantize=quantize_iq3_s, numba=("dequantize", "quantize"),
         triton=True, fallback=("IQ4_NL", "Q5_0"))
register(GGMLType.IQ1_S, layout=IQ1_S, dequantize=_dq_iq1_s, numba=("dequantize",), triton=True)
register(GGMLType.IQ1_M, layout=IQ1_M, dequantize=_dq_iq1_m, quantize=quantize_iq1_m, numba=("dequantize", "quantize"),
         triton=True, fallback=("IQ4_NL", "Q5_0"))
