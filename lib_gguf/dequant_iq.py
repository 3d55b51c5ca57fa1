"""Dequantizers for the non-linear, ternary and micro-scaled FP4 formats:
IQ4_NL, IQ4_XS, TQ1_0, TQ2_0, MXFP4 and NVFP4 (torch, any device).

Each follows the block layout of ggml-common.h; in float32 the values equal
``gguf.quants.dequantize`` bit for bit (every product here is exact or a single
float32 multiplication, as in gguf-py).
"""
from __future__ import annotations

import torch

from .formats import GGMLType, register_dequantizer


# weights per chunk on the CPU: the per-chunk scratch (indices, looked-up rows) stays
# in cache; on accelerators a few large kernels
_CHUNK_CPU = 1 << 20
_CHUNK_OTHER = 1 << 24


def _in_chunks(block_size: int):
    """Decorator for a kernel ``fn(blocks) -> (scale, values)`` whose output is
    ``scale * values`` (float32 factors, broadcasting to (n, ..., block_size)). Runs
    it over cache-sized chunks of blocks, and writes each product straight into the
    output in its final dtype: the multiply runs in float32 and rounds once on store,
    so float32 output is the exact product and float16 output is that, rounded."""
    def deco(fn):
        def kernel(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            nb = blocks.shape[0]
            out = torch.empty((nb, block_size), dtype=dtype, device=blocks.device)
            per = _CHUNK_CPU if blocks.device.type == "cpu" else _CHUNK_OTHER
            cs = max(1, per // block_size)
            for s in range(0, nb, cs):
                a, b = fn(blocks[s:s + cs].contiguous())
                dst = out[s:s + cs]
                shape = torch.broadcast_shapes(a.shape, b.shape)
                if dtype in (torch.float32, torch.float16, torch.bfloat16):
                    torch.mul(a, b, out=dst.view(shape))
                else:
                    dst.copy_((a * b).reshape(dst.shape))
            return out
        kernel.__name__, kernel.__doc__ = fn.__name__, fn.__doc__
        return kernel
    return deco


# IQ4_NL / IQ4_XS: the 16 non-linear levels (a format constant of ggml).
IQ4NL_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
# FP4 (E2M1) values, doubled so that they are integers; the block scales carry the 1/2.
E2M1_DOUBLED = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)

_tables: dict = {}


def _table(values, device) -> torch.Tensor:
    key = (values, str(device))
    t = _tables.get(key)
    if t is None:
        t = torch.tensor(values, dtype=torch.float32, device=device)
        _tables[key] = t
    return t


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) uint8 -> (n, 1) float32 from fp16 bits."""
    return b.contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(n, k) bytes -> (n, 2k): the k low nibbles, then the k high nibbles."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1).long()


def _nibble_values(values, qs: torch.Tensor) -> torch.Tensor:
    """(..., k) bytes -> (..., 2, k) float32 levels: the k low nibbles' values, then
    the k high nibbles'. One row lookup a byte in a (256, 2) table of level pairs."""
    key = ("pairs", values, str(qs.device))
    t = _tables.get(key)
    if t is None:
        v = torch.tensor(values, dtype=torch.float32)
        b = torch.arange(256)
        t = torch.stack([v[b & 15], v[b >> 4]], dim=1).to(qs.device)
        _tables[key] = t
    pairs = t.index_select(0, qs.reshape(-1).to(torch.int64)).reshape(*qs.shape, 2)
    return pairs.transpose(-1, -2)


@register_dequantizer(GGMLType.IQ4_NL)
@_in_chunks(32)
def _iq4_nl(blocks: torch.Tensor):
    n = blocks.shape[0]
    d = _f16(blocks[:, :2])
    vals = _nibble_values(IQ4NL_LEVELS, blocks[:, 2:])  # (n, 2, 16)
    return d[:, :, None], vals


@register_dequantizer(GGMLType.IQ4_XS)
@_in_chunks(256)
def _iq4_xs(blocks: torch.Tensor):
    n = blocks.shape[0]
    d = _f16(blocks[:, :2])
    scales_h = blocks[:, 2:4].contiguous().view(torch.int16).to(torch.int32) & 0xFFFF  # (n, 1)
    scales_l = blocks[:, 4:8].to(torch.int32)  # 8 four-bit lows
    ib = torch.arange(8, device=blocks.device)
    lo = (scales_l[:, ib // 2] >> (4 * (ib % 2))) & 0x0F
    hi = (scales_h >> (2 * ib)) & 0x03
    ls = (lo | (hi << 4)) - 32
    dl = d * ls.to(torch.float32)  # (n, 8)
    qs = blocks[:, 8:].reshape(n, 8, 16)
    vals = _nibble_values(IQ4NL_LEVELS, qs)  # (n, 8, 2, 16)
    return dl[:, :, None, None], vals


def _pow3(device) -> torch.Tensor:
    """(5, 1) uint8: 1, 3, 9, 27, 81."""
    key = ("pow3", str(device))
    t = _tables.get(key)
    if t is None:
        t = torch.tensor([[1], [3], [9], [27], [81]], dtype=torch.uint8, device=device)
        _tables[key] = t
    return t


@register_dequantizer(GGMLType.TQ1_0)
@_in_chunks(256)
def _tq1_0(blocks: torch.Tensor):
    """Base-3 digits: a byte times 3**k (uint8 arithmetic, so mod 256) brings digit k
    to the top, and ``(x * 3) >> 8`` reads it, here as ``floor(x * 3/256)`` in
    float32 (exact: x has 8 bits, 3/256 two). Minus one: the ternary value."""
    n = blocks.shape[0]
    p = _pow3(blocks.device)
    q = torch.cat([(blocks[:, None, :32] * p).reshape(n, 160),       # 32 bytes x 5 digits
                   (blocks[:, None, 32:48] * p).reshape(n, 80),      # 16 bytes x 5 digits
                   (blocks[:, None, 48:52] * p[:4]).reshape(n, 16)],  # 4 bytes x 4 digits
                  dim=1)
    t = q.to(torch.float32).mul_(3.0 / 256.0).floor_().sub_(1.0)
    return _f16(blocks[:, 52:54]), t


@register_dequantizer(GGMLType.TQ2_0)
@_in_chunks(256)
def _tq2_0(blocks: torch.Tensor):
    from .dequant import _unpack

    n = blocks.shape[0]
    q = _unpack(blocks[:, :64].reshape(n, 2, 32), (0, 2, 4, 6), 0x03)  # (n, 2, 4, 32) 2-bit codes
    t = q.to(torch.float32).sub_(1.0)
    return _f16(blocks[:, 64:66]).reshape(n, 1, 1, 1), t


def _e8m0_half(e: torch.Tensor) -> torch.Tensor:
    """UE8M0 scale byte -> float32 2**(e-128) (half the E8M0 value), exact, subnormals included."""
    e = e.to(torch.int32)
    bits = torch.where(e < 2, torch.tensor(0x00200000, dtype=torch.int32, device=e.device) << e, (e - 1) << 23)
    return bits.view(torch.float32)


@register_dequantizer(GGMLType.MXFP4)
@_in_chunks(32)
def _mxfp4(blocks: torch.Tensor):
    n = blocks.shape[0]
    d = _e8m0_half(blocks[:, :1])
    vals = _nibble_values(E2M1_DOUBLED, blocks[:, 1:])  # (n, 2, 16)
    return d[:, :, None], vals


def _ue4m3_half(x: torch.Tensor) -> torch.Tensor:
    """Unsigned E4M3 scale byte -> float32, times 1/2 (the doubled-E2M1 convention)."""
    x = x.to(torch.int32)
    exp = (x >> 3) & 0xF
    man = (x & 0x7).to(torch.float32)
    normal = (1.0 + man / 8.0) * torch.pow(2.0, (exp - 7).to(torch.float32))
    raw = torch.where(exp == 0, man * 2.0 ** -9, normal)
    return torch.where((x == 0) | (x == 0x7F), torch.zeros_like(raw), raw * 0.5)


@register_dequantizer(GGMLType.NVFP4)
@_in_chunks(64)
def _nvfp4(blocks: torch.Tensor):
    n = blocks.shape[0]
    d = _ue4m3_half(blocks[:, :4]).reshape(n, 4, 1)
    qs = blocks[:, 4:].reshape(n, 4, 8)
    vals = _nibble_values(E2M1_DOUBLED, qs)  # (n, 4, 2, 8)
    return d[..., None], vals


# -- lattice formats: IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M ----------------

def _u32(b: torch.Tensor) -> torch.Tensor:
    """(n, 4k) bytes -> (n, k) int64 little-endian uint32 values."""
    b = b.to(torch.int64)
    return b[:, 0::4] | (b[:, 1::4] << 8) | (b[:, 2::4] << 16) | (b[:, 3::4] << 24)


def _u16(b: torch.Tensor) -> torch.Tensor:
    b = b.to(torch.int64)
    return b[:, 0::2] | (b[:, 1::2] << 8)


def _rows(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``table[idx]`` for a 2-D table, as one ``index_select`` of whole rows (several
    times faster than advanced indexing on the CPU): shape (*idx.shape, width)."""
    return table.index_select(0, idx.reshape(-1)).reshape(*idx.shape, table.shape[1])


def _sign_bytes(device) -> torch.Tensor:
    """(256, 8) float32: bit j of the byte set -> value j is -1."""
    key = ("signs256", str(device))
    t = _tables.get(key)
    if t is None:
        bits = (torch.arange(256)[:, None] >> torch.arange(8)[None, :]) & 1
        t = (1.0 - 2.0 * bits.to(torch.float32)).to(device)
        _tables[key] = t
    return t


def _signed_grid(name: str, device) -> torch.Tensor:
    """(entries * 128, 8) float32: every grid point times every 7-bit sign pattern
    (row ``g * 128 + s``), so one row lookup gives eight signed values. Exact: a
    sign is +-1."""
    from .grids import grid, ksigns

    key = ("signed", name, str(device))
    t = _tables.get(key)
    if t is None:
        t = (grid(name, device)[:, None, :] * ksigns(device)[None, :, :]).reshape(-1, 8).contiguous()
        _tables[key] = t
    return t


def _signed_grid4(name: str, device) -> torch.Tensor:
    """(entries * 16, 4) float32 for a grid of 4-wide points: every point times every
    4-bit sign pattern (row ``g * 16 + nibble``; bit j set: value j negative)."""
    from .grids import grid

    key = ("signed4", name, str(device))
    t = _tables.get(key)
    if t is None:
        bits = (torch.arange(16)[:, None] >> torch.arange(4)[None, :]) & 1
        s4 = (1.0 - 2.0 * bits.to(torch.float32)).to(device)
        t = (grid(name, device)[:, None, :] * s4[None, :, :]).reshape(-1, 4).contiguous()
        _tables[key] = t
    return t


def _ksign_bytes(device) -> torch.Tensor:
    """(128,) int64: ggml's 7-bit sign index -> the 8 sign bits (the eighth makes the
    count of minus signs even)."""
    key = ("ksignbytes", str(device))
    t = _tables.get(key)
    if t is None:
        i = torch.arange(128)
        par = ((i[:, None] >> torch.arange(7)[None, :]) & 1).sum(dim=1) & 1
        t = (i | (par << 7)).to(device)
        _tables[key] = t
    return t


def _nibble_pairs(b: torch.Tensor) -> torch.Tensor:
    """(..., k) sign bytes -> (..., 2k): low nibble, then high nibble, byte by byte."""
    return torch.stack([b & 0x0F, b >> 4], dim=-1).reshape(*b.shape[:-1], -1)


@register_dequantizer(GGMLType.IQ2_XXS)
@_in_chunks(256)
def _iq2_xxs(blocks: torch.Tensor):
    n, dev = blocks.shape[0], blocks.device
    d = _f16(blocks[:, :2])
    q = _u32(blocks[:, 2:]).reshape(n, 8, 2)
    aux0, aux1 = q[..., 0], q[..., 1]
    db = d * (0.5 + (aux1 >> 28).to(torch.float32)) * 0.25  # (n, 8)
    sidx = (aux1[..., None] >> torch.tensor([0, 7, 14, 21], device=dev)) & 0x7F  # (n, 8, 4)
    gidx = (aux0[..., None] >> torch.tensor([0, 8, 16, 24], device=dev)) & 0xFF
    gs = _rows(_signed_grid("IQ2_XXS", dev), (gidx << 7) | sidx)  # (n, 8, 4, 8)
    return db[:, :, None, None], gs


@register_dequantizer(GGMLType.IQ2_XS)
@_in_chunks(256)
def _iq2_xs(blocks: torch.Tensor):
    n = blocks.shape[0]
    d = _f16(blocks[:, :2])
    qs = _u16(blocks[:, 2:66]).reshape(n, 8, 4)
    sc = _nibbles_interleaved(blocks[:, 66:74])  # (n, 16)
    db = (d * (0.5 + sc.to(torch.float32)) * 0.25).reshape(n, 8, 2, 1, 1)
    gs = _rows(_signed_grid("IQ2_XS", blocks.device), ((qs & 511) << 7) | (qs >> 9)).reshape(n, 8, 2, 2, 8)
    return db, gs


def _nibbles_interleaved(b: torch.Tensor) -> torch.Tensor:
    """(n, k) bytes -> (n, 2k): low, high nibble of byte 0, then of byte 1, ..."""
    return torch.stack([b & 0x0F, b >> 4], dim=-1).reshape(b.shape[0], -1)


@register_dequantizer(GGMLType.IQ2_S)
@_in_chunks(256)
def _iq2_s(blocks: torch.Tensor):
    from .grids import grid

    n, dev = blocks.shape[0], blocks.device
    d = _f16(blocks[:, :2])
    qs, signs, qh, scales = blocks[:, 2:34], blocks[:, 34:66], blocks[:, 66:74], blocks[:, 74:82]
    sc = _nibbles_interleaved(scales)
    db = (d * (0.5 + sc.to(torch.float32)) * 0.25).reshape(n, 8, 2, 1, 1)
    s = _rows(_sign_bytes(dev), signs.to(torch.int64)).reshape(n, 8, 2, 2, 8)
    hi = (qh.to(torch.int64)[..., None] >> torch.tensor([0, 2, 4, 6], device=dev)) & 0x03  # (n, 8, 4)
    idx = qs.to(torch.int64) | (hi.reshape(n, 32) << 8)
    g = _rows(grid("IQ2_S", dev), idx).reshape(n, 8, 2, 2, 8)
    return db, g * s


@register_dequantizer(GGMLType.IQ3_XXS)
@_in_chunks(256)
def _iq3_xxs(blocks: torch.Tensor):
    n, dev = blocks.shape[0], blocks.device
    d = _f16(blocks[:, :2])
    qs = blocks[:, 2:66].to(torch.int64)
    sc = _u32(blocks[:, 66:98])  # (n, 8)
    db = (d * (0.5 + (sc >> 28).to(torch.float32)) * 0.5).reshape(n, 8, 1, 1)
    sidx = (sc[..., None] >> torch.tensor([0, 7, 14, 21], device=dev)) & 0x7F  # (n, 8, 4): 8 values each
    nib = _nibble_pairs(_ksign_bytes(dev)[sidx]).reshape(n, 64)       # one nibble per grid point
    gs = _rows(_signed_grid4("IQ3_XXS", dev), (qs << 4) | nib).reshape(n, 8, 8, 4)
    return db, gs


@register_dequantizer(GGMLType.IQ3_S)
@_in_chunks(256)
def _iq3_s(blocks: torch.Tensor):
    n, dev = blocks.shape[0], blocks.device
    d = _f16(blocks[:, :2])
    qs, qh, signs, scales = blocks[:, 2:66], blocks[:, 66:74], blocks[:, 74:106], blocks[:, 106:110]
    sc = _nibbles_interleaved(scales)  # (n, 8)
    db = (d * (1 + 2 * sc).to(torch.float32)).reshape(n, 8, 1, 1)
    hi = (qh.to(torch.int64)[..., None] >> torch.arange(8, device=dev)) & 1  # (n, 8, 8)
    idx = qs.to(torch.int64) | (hi.reshape(n, 64) << 8)
    nib = _nibble_pairs(signs).to(torch.int64)                          # (n, 64)
    gs = _rows(_signed_grid4("IQ3_S", dev), (idx << 4) | nib).reshape(n, 8, 8, 4)
    return db, gs


IQ1_DELTA = 0.125


@register_dequantizer(GGMLType.IQ1_S)
@_in_chunks(256)
def _iq1_s(blocks: torch.Tensor):
    from .grids import grid

    n, dev = blocks.shape[0], blocks.device
    d = _f16(blocks[:, :2])
    qs, qh = blocks[:, 2:34].to(torch.int64), _u16(blocks[:, 34:50])  # (n, 8)
    dl = (d * (2 * ((qh >> 12) & 7) + 1).to(torch.float32)).reshape(n, 8, 1, 1)
    delta = torch.where((qh & 0x8000) == 0, IQ1_DELTA, -IQ1_DELTA).to(torch.float32).reshape(n, 8, 1, 1)
    hi = (qh[..., None] >> torch.tensor([0, 3, 6, 9], device=dev)) & 7  # (n, 8, 4)
    idx = qs | (hi.reshape(n, 32) << 8)
    g = _rows(grid("IQ1_S", dev), idx).reshape(n, 8, 4, 8)
    return dl, g + delta


@register_dequantizer(GGMLType.IQ1_M)
@_in_chunks(256)
def _iq1_m(blocks: torch.Tensor):
    """IQ1_M, with ggml's meaning of the delta sign bits (bit 3 of each qh nibble
    set: minus). gguf-py up to at least 0.19 reads ``qh & 0x08 == 0`` as
    ``qh & (0x08 == 0)`` and always uses minus; where that bit is set the two agree."""
    from .grids import grid

    n, dev = blocks.shape[0], blocks.device
    qs, qh, scales = blocks[:, :32].to(torch.int64), blocks[:, 32:48].to(torch.int64), _u16(blocks[:, 48:56])
    parts = (scales & 0xF000) >> torch.tensor([12, 8, 4, 0], device=dev)
    dbits = parts[:, 0] | parts[:, 1] | parts[:, 2] | parts[:, 3]
    d = dbits.to(torch.int16).view(torch.float16).to(torch.float32).reshape(n, 1)
    sc = (scales[..., None] >> torch.tensor([0, 3, 6, 9], device=dev)) & 7  # (n, 4, 4)
    dl = (d * (2 * sc.reshape(n, 16) + 1).to(torch.float32)).reshape(n, 8, 2, 1, 1)
    nib = torch.stack([qh & 0x0F, qh >> 4], dim=-1).reshape(n, 32)  # (n, 32)
    idx = qs | ((nib & 7) << 8)
    delta = torch.where((nib & 8) == 0, IQ1_DELTA, -IQ1_DELTA).to(torch.float32).reshape(n, 8, 2, 2, 1)
    g = _rows(grid("IQ1_S", dev), idx).reshape(n, 8, 2, 2, 8)
    return dl, g + delta
