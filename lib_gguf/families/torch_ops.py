"""The torch pieces every family's kernels share: chunk runners, field readers, bit
unpacking and packing, and C's float rounding (``roundf``, ``sqrtf``, division).

The kernels compute in float32 in the same order of operations as ggml's C (and
gguf-py's numpy reference), on cache-sized chunks of blocks. Small integer codes
are unpacked with integer ops on contiguous uint8 data and converted to float32 in
a single pass: torch's CPU int->float16 conversion and float16 arithmetic are
slower than float32 ones.
"""
from __future__ import annotations

import torch

from ..errors import GGUFFormatError

# -- chunk runners ----------------------------------------------------------------------

# weights per chunk on the CPU (a few MiB of float32 scratch, in L2/L3), by block
# size: the K-quants' kernels have more small per-chunk ops to amortize.
CHUNK_WEIGHTS_CPU = {32: 1 << 19, 256: 1 << 20}
CHUNK_WEIGHTS_OTHER = 1 << 24  # on accelerators: few large kernels, bounded float32 scratch


def chunk_weights(device, block_size: int) -> int:
    if device.type == "cpu":
        return CHUNK_WEIGHTS_CPU.get(block_size, 1 << 18)
    return CHUNK_WEIGHTS_OTHER


def dequant_chunks(block_size: int):
    """Decorator: wrap ``fn(blocks_u8_contiguous, out_f32_or_None) -> float32
    (n, block_size)`` into a dequantizer that runs it chunk by chunk (float32 output
    is written in place, other dtypes are cast once per chunk)."""
    def deco(fn):
        def kernel(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            if blocks.dtype != torch.uint8 or blocks.dim() != 2:
                raise GGUFFormatError(f"expected uint8 blocks of shape (n_blocks, type_size), got {blocks.dtype} "
                                      f"{tuple(blocks.shape)}")
            nb = blocks.shape[0]
            out = torch.empty((nb, block_size), dtype=dtype, device=blocks.device)
            cs = max(1, chunk_weights(blocks.device, block_size) // block_size)
            direct = dtype == torch.float32
            for s in range(0, nb, cs):
                b = blocks[s : s + cs].contiguous()
                if direct:
                    fn(b, out[s : s + cs])
                else:
                    out[s : s + cs].copy_(fn(b, None))
            return out

        kernel.__name__, kernel.__doc__ = getattr(fn, "__name__", "kernel"), fn.__doc__
        return kernel
    return deco


def scaled_chunks(block_size: int):
    """Decorator for a kernel ``fn(blocks) -> (scale, values)`` whose output is
    ``scale * values`` (float32 factors, broadcasting to (n, ..., block_size)). Runs
    it over cache-sized chunks of blocks, and writes each product straight into the
    output in its final dtype: the multiply runs in float32 and rounds once on store,
    so float32 output is the exact product and float16 output is that, rounded."""
    def deco(fn):
        def kernel(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            nb = blocks.shape[0]
            out = torch.empty((nb, block_size), dtype=dtype, device=blocks.device)
            per = (1 << 20) if blocks.device.type == "cpu" else CHUNK_WEIGHTS_OTHER
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


def quant_chunks(blocks: int):
    """Run a per-block quantizer over at most ``blocks`` blocks at a time. Every block
    is independent, and slabs that stay in the CPU's cache make the many small
    element-order steps faster than one pass over a whole tensor."""
    def wrap(fn):
        def run(x: torch.Tensor, **kw) -> torch.Tensor:
            if x.shape[0] <= blocks:
                return fn(x, **kw)
            return torch.cat([fn(x[i:i + blocks], **kw) for i in range(0, x.shape[0], blocks)], dim=0)
        run.__name__, run.__doc__, run.__wrapped__ = fn.__name__, fn.__doc__, fn
        return run
    return wrap


# -- reading fields ------------------------------------------------------------------------

_CACHE: dict = {}


def cached(key, make):
    """A small table (``make()``), built once per key (keys name the device)."""
    t = _CACHE.get(key)
    if t is None:
        t = _CACHE[key] = make()
    return t


def f16_at(b: torch.Tensor, offset: int) -> torch.Tensor:
    """The float16 field at byte ``offset`` of every block, as float32 (n, 1)."""
    if b.shape[1] % 2 == 0 and offset % 2 == 0:
        v = b.view(torch.int16)[:, offset // 2]  # 1-D: no per-row loop overhead
    else:
        v = b[:, offset : offset + 2].contiguous().view(torch.int16).view(-1)
    return v.view(torch.float16).to(torch.float32).unsqueeze(1)


def f32_buffer(out, shape, device) -> torch.Tensor:
    """``out`` viewed as ``shape``, or a new float32 tensor when there is none."""
    if out is None:
        return torch.empty(shape, dtype=torch.float32, device=device)
    return out.view(shape)


def u32(b: torch.Tensor) -> torch.Tensor:
    """(n, 4k) bytes -> (n, k) int64 little-endian uint32 values."""
    b = b.to(torch.int64)
    return b[:, 0::4] | (b[:, 1::4] << 8) | (b[:, 2::4] << 16) | (b[:, 3::4] << 24)


def u16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2k) bytes -> (n, k) int64 little-endian uint16 values."""
    b = b.to(torch.int64)
    return b[:, 0::2] | (b[:, 1::2] << 8)


def rows(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``table[idx]`` for a 2-D table, as one ``index_select`` of whole rows (faster
    than advanced indexing on the CPU): shape (*idx.shape, width)."""
    return table.index_select(0, idx.reshape(-1)).reshape(*idx.shape, table.shape[1])


# -- unpacking codes -----------------------------------------------------------------------

def unpack(src: torch.Tensor, shifts, mask: int) -> torch.Tensor:
    """``out[..., i, :] = (src[..., :] >> shifts[i]) & mask`` for uint8 ``src``
    (..., L) with L a multiple of 8, as a new contiguous uint8 (..., len(shifts), L).

    Works on 8 bytes at a time (an int64 view): ``shifts[i] + bits(mask) <= 8``
    keeps every byte's result inside its own byte.
    """
    *lead, L = src.shape
    w = src.contiguous().view(torch.int64).unsqueeze(-2)  # (..., 1, L/8)
    sh = cached(("shifts", str(src.device), tuple(shifts)),
                lambda: torch.tensor(list(shifts), dtype=torch.int64, device=src.device).view(-1, 1))
    out = torch.bitwise_right_shift(w, sh)  # (..., S, L/8)
    out.bitwise_and_(mask * 0x0101010101010101)
    return out.view(torch.uint8).view(*lead, len(shifts), L)


def bits_lut(device, value: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """(256, 8) ``dtype``: row ``v`` holds bit ``i`` of ``v`` times ``value`` at column i."""
    def make():
        v = torch.arange(256, dtype=torch.int32).view(256, 1)
        return (((v >> torch.arange(8, dtype=torch.int32).view(1, 8)) & 1) * value).to(dtype).to(device)
    return cached(("bits", str(device), value, dtype), make)


def lo_hi(b: torch.Tensor, add: int = 0):
    """Low and high nibbles of every byte of the blocks (+ ``add``, wrapping), as
    two contiguous uint8 (n, type_size): whole-row ops, which torch vectorizes."""
    lo = b & 0x0F
    hi = b >> 4
    if add:
        lo.add_(add)
        hi.add_(add)
    return lo, hi


def nibbles_interleaved(b: torch.Tensor) -> torch.Tensor:
    """(..., k) bytes -> (..., 2k): low, high nibble of byte 0, then of byte 1, ..."""
    return torch.stack([b & 0x0F, b >> 4], dim=-1).reshape(*b.shape[:-1], -1)


def nibble_values(values, qs: torch.Tensor) -> torch.Tensor:
    """(..., k) bytes -> (..., 2, k) float32 levels: the k low nibbles' values, then
    the k high nibbles'. One row lookup a byte in a (256, 2) table of level pairs."""
    def make():
        v = torch.tensor(values, dtype=torch.float32)
        b = torch.arange(256)
        return torch.stack([v[b & 15], v[b >> 4]], dim=1).to(qs.device)
    t = cached(("pairs", values, str(qs.device)), make)
    pairs = t.index_select(0, qs.reshape(-1).to(torch.int64)).reshape(*qs.shape, 2)
    return pairs.transpose(-1, -2)


# -- writing fields ------------------------------------------------------------------------

def f16_bytes(v: torch.Tensor) -> torch.Tensor:
    """float32 (n,) -> (n, 2) uint8, the fp16 bits (round to nearest even, as ggml)."""
    return v.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def f16_round(v: torch.Tensor) -> torch.Tensor:
    """``v`` through float16 and back (the scale a block stores)."""
    return v.to(torch.float16).to(torch.float32)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(n, 32k) values 0..15 -> (n, 16k) bytes: in each 32, low nibble j, high nibble j + 16."""
    q = q.to(torch.uint8).reshape(q.shape[0], -1, 2, 16)
    return ((q[:, :, 0] & 0x0F) | ((q[:, :, 1] & 0x0F) << 4)).reshape(q.shape[0], -1)


def pack_crumbs(q: torch.Tensor) -> torch.Tensor:
    """(n, 128k) 2-bit values -> (n, 32k) bytes: in each 128, byte m holds values
    m, m + 32, m + 64, m + 96 in bits 0-1, 2-3, 4-5, 6-7."""
    q = q.to(torch.uint8).reshape(q.shape[0], -1, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(q.shape[0], -1)


# -- C's float arithmetic ------------------------------------------------------------------

def inv(d: torch.Tensor) -> torch.Tensor:
    """``d ? 1/d : 0`` in float32."""
    return torch.where(d != 0, 1.0 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))


def rdiv(c: float, t: torch.Tensor) -> torch.Tensor:
    """``c / t`` rounded as C rounds it. torch computes ``scalar / tensor`` as
    ``t.reciprocal() * scalar``, which differs in the last bit about a quarter of the
    time for constants that are not powers of two (63, 15, 31...)."""
    return torch.full_like(t, float(c)) / t


def sqrtf(t: torch.Tensor) -> torch.Tensor:
    """C's sqrtf, correctly rounded. torch's float32 sqrt on the CPU is not always
    (46.369140625 gives one ulp below the nearest float), so take it in float64:
    a float64 square root of a float32 rounds back to the nearest float32. (Apple's
    MPS has no float64: there the float32 square root is used.)"""
    if t.device.type == "mps":
        return t.sqrt()
    return t.double().sqrt().to(t.dtype)


def roundf(v: torch.Tensor) -> torch.Tensor:
    """C's roundf (half away from zero), exactly, in float32."""
    r = torch.round(v)  # half to even
    t = torch.trunc(v)
    tie = (v - t).abs() == 0.5
    return torch.where(tie, t + torch.sign(v), r)


def nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int, its magic-number trick itself, as float32: ``v + 1.5 * 2**23`` in
    float32, whose low 23 bits minus 2**22 are the result. Below 2**22 in magnitude that
    is round half to even; beyond it, and for inf and NaN (the overflowed inverse scales
    of sub-blocks of tiny or huge weights), it is ggml's own value, not a rounding."""
    bits = (v.to(torch.float32) + 12582912.0).view(torch.int32)
    return ((bits & 0x7FFFFF) - 0x400000).to(torch.float32)


def seq_sum(terms) -> torch.Tensor:
    """``terms[0] + terms[1] + ...`` in that order (C's element-order float sum)."""
    acc = None
    for t in terms:
        acc = t if acc is None else acc + t
    return acc


def max_magnitude(x: torch.Tensor, dim: int):
    """(the value of largest magnitude along ``dim``, the first one on ties; that magnitude).

    As C's ``if (fabsf(v) > amax)`` loop from ``amax = 0``: a NaN never counts (a row of
    NaN gives (0, 0)); torch's argmax would pick it."""
    ax = x.abs()
    ax = torch.where(torch.isnan(ax), torch.full_like(ax, -1.0), ax)
    idx = ax.argmax(dim=dim, keepdim=True)
    mag = ax.gather(dim, idx).squeeze(dim)
    none = mag < 0
    zero = torch.zeros_like(mag)
    return torch.where(none, zero, x.gather(dim, idx).squeeze(dim)), torch.where(none, zero, mag)


def signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude in each block (the first one on ties; +0 when all are 0)."""
    m = max_magnitude(x, -1)[0]
    return torch.where(m == 0, torch.zeros_like(m), m)
