"""Dequantization in torch, on any device: the public entry point and the
kernels for plain element types, the 32-weight "legacy" formats and the K-quants.

The IQ, ternary and micro-scaled FP4 kernels live in :mod:`lib_gguf.dequant_iq`.
Every kernel takes ``(n_blocks, type_size)`` uint8 blocks and returns
``(n_blocks, block_size)`` values; in float32 the result equals
``gguf.quants.dequantize`` bit for bit.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import backend as _bk
from .errors import GGUFFormatError
from .formats import GGMLType, dequantizer_for, get_format, register_dequantizer


# The formats with a compiled dequantizer (lib_gguf.dequant_numba); the legacy, K-quant
# and IQ4 formats have none: their torch kernels already beat the other torch
# dequantizers by 1.5-6x (bench/dequant.py). Checked here, so that a model without
# these formats never imports numba.
COMPILED_TYPES = frozenset(int(t) for t in (
    GGMLType.IQ2_XXS, GGMLType.IQ2_XS, GGMLType.IQ2_S, GGMLType.IQ3_XXS, GGMLType.IQ3_S, GGMLType.IQ1_S,
    GGMLType.IQ1_M, GGMLType.TQ1_0, GGMLType.TQ2_0, GGMLType.MXFP4, GGMLType.NVFP4))


def _compiled(fmt, blocks: torch.Tensor, dtype: torch.dtype):
    """The compiled kernel's values, or None when the torch kernel should run."""
    if blocks.device.type == "cuda" or (_bk.get_backend() == "triton" and blocks.device.type == "cpu"
                                        and _triton_interpreting()):
        return _triton(fmt, blocks, dtype)
    if (fmt.type_id not in COMPILED_TYPES or blocks.device.type != "cpu"
            or dtype not in (torch.float16, torch.float32)):
        return None
    return _bk.try_compiled("dequantizer", fmt, _dequant_numba,
                            lambda m: m.run(fmt.type_id, blocks, fmt.block_size, dtype))


def _dequant_numba():
    from . import dequant_numba

    return dequant_numba


# CUDA tensors of every quantized format: the Triton kernels (lib_gguf.dequant_triton)
# when triton imports, through the same backend choice and fallback (compile errors
# only) as the numba ones.
def _triton(fmt, blocks: torch.Tensor, dtype: torch.dtype):
    if not fmt.is_quantized or dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return None
    m = _dequant_triton()
    return _bk.try_compiled("dequantizer", fmt, lambda: m,
                            lambda m: m.run(fmt.type_id, blocks, fmt.block_size, dtype),
                            required=True, kind="triton", fallback_on=m.COMPILE_ERRORS)


def _dequant_triton():
    from . import dequant_triton

    return dequant_triton


def _triton_interpreting() -> bool:  # Triton's CPU interpreter: CPU tensors may take the Triton kernels (tests)
    import os

    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def as_uint8(data) -> torch.Tensor:
    """The bytes of ``data`` as a uint8 tensor (no copy for a torch tensor)."""
    if not isinstance(data, torch.Tensor):
        import numpy as np

        data = torch.from_numpy(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
    if isinstance(data, torch.nn.Parameter):
        data = data.data
    if data.dtype != torch.uint8:
        data = data.contiguous().view(torch.uint8)
    return data


def dequantize(data, qtype=None, shape: Optional[Sequence[int]] = None,
               dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Turn GGUF bytes into a tensor of logical ``shape`` and ``dtype`` (float16 by default).

    ``data``: a uint8 tensor (any shape) holding the tensor's GGUF bytes, on any
    device. ``qtype``: an int type id, a ``GGMLQuantizationType`` or a name.
    ``data`` may also be a :class:`~lib_gguf.parameter.GGUFParameter`, which knows its
    format and shape: ``dequantize(w)``, ``dequantize(w, torch.float32)`` or
    ``dequantize(w, dtype=torch.float32)`` (its ``computation_dtype`` by default).
    """
    if getattr(data, "gguf_cls", None) is not None and isinstance(data, torch.Tensor):
        if isinstance(qtype, torch.dtype):
            qtype, dtype = None, qtype
        if qtype is not None and get_format(qtype) is not data.gguf_cls:
            raise GGUFFormatError(f"dequantize: the weight is {data.gguf_cls.name}, not {get_format(qtype).name}")
        shape = shape if shape is not None else (getattr(data, "gguf_shape", None) or data.real_shape)
        dtype = dtype or getattr(data, "computation_dtype", None) or torch.float16
        qtype = data.gguf_cls
        data = data.data
    if qtype is None or shape is None:
        raise TypeError("dequantize(data, qtype, shape[, dtype]): raw bytes need their format and logical shape "
                        "(a GGUFParameter carries both)")
    dtype = dtype or torch.float16
    fmt = get_format(qtype)
    shape = tuple(int(s) for s in shape)
    n = 1
    for s in shape:
        n *= s
    data = as_uint8(data)
    if n % fmt.block_size:
        raise GGUFFormatError(f"{fmt.name}: {n} weights are not a whole number of {fmt.block_size}-weight blocks")
    n_blocks = n // fmt.block_size
    if data.numel() != n_blocks * fmt.type_size:
        raise GGUFFormatError(
            f"{fmt.name}: shape {list(shape)} needs {n_blocks * fmt.type_size} bytes, got {data.numel()}"
        )
    fn = dequantizer_for(fmt.type_id)
    blocks = data.reshape(n_blocks, fmt.type_size)
    out = _compiled(fmt, blocks, dtype)
    if out is None:
        out = fn(blocks, dtype)
    return out.reshape(shape)


# -- plain element types ----------------------------------------------------------

def _viewer(src: torch.dtype):
    def fn(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return blocks.contiguous().view(src).to(dtype)

    return fn


for _t, _src in (
    (GGMLType.F32, torch.float32),
    (GGMLType.F16, torch.float16),
    (GGMLType.BF16, torch.bfloat16),
    (GGMLType.F64, torch.float64),
    (GGMLType.I8, torch.int8),
    (GGMLType.I16, torch.int16),
    (GGMLType.I32, torch.int32),
    (GGMLType.I64, torch.int64),
):
    register_dequantizer(_t)(_viewer(_src))


# -- quantized formats ----------------------------------------------------------
#
# Every kernel below computes in float32, in the same order of operations as
# gguf-py's numpy reference (so float32 output is bit-identical to it), on
# cache-sized chunks of blocks, and casts each chunk once into the output.
# Small integer codes are unpacked with integer ops on contiguous uint8 data and
# converted to float32 in a single pass: torch's CPU int->float16 conversion and
# float16 arithmetic are several times slower than float32 ones.

# weights per chunk on the CPU (a few MiB of float32 scratch, in L2/L3), by block
# size: the K-quants' kernels have more small per-chunk ops to amortize.
_CHUNK_WEIGHTS_CPU = {32: 1 << 19, 256: 1 << 20}
_CHUNK_WEIGHTS_OTHER = 1 << 24  # on accelerators: few large kernels, bounded float32 scratch


def _chunked(block_size: int):
    """Decorator: wrap ``fn(blocks_u8_contiguous, out_f32_or_None) -> float32
    (n, block_size)`` into a dequantizer that runs it chunk by chunk."""
    return lambda fn: _chunk_runner(fn, block_size)


def _chunk_runner(fn, block_size: int):
    def kernel(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if blocks.dtype != torch.uint8 or blocks.dim() != 2:
            raise GGUFFormatError(f"expected uint8 blocks of shape (n_blocks, type_size), got {blocks.dtype} {tuple(blocks.shape)}")
        nb = blocks.shape[0]
        out = torch.empty((nb, block_size), dtype=dtype, device=blocks.device)
        if nb == 0:
            return out
        if blocks.device.type == "cpu":
            per = _CHUNK_WEIGHTS_CPU
            per = per.get(block_size, 1 << 18) if isinstance(per, dict) else per
        else:
            per = _CHUNK_WEIGHTS_OTHER
        cs = max(1, per // block_size)
        direct = dtype == torch.float32
        for s in range(0, nb, cs):
            b = blocks[s : s + cs].contiguous()
            if direct:
                fn(b, out[s : s + cs])
            else:
                out[s : s + cs].copy_(fn(b, None))
        return out

    kernel.__name__ = getattr(fn, "__name__", "kernel")
    kernel.__doc__ = fn.__doc__
    return kernel


def _f16(b: torch.Tensor, offset: int) -> torch.Tensor:
    """The float16 field at byte ``offset`` of every block, as float32 (n, 1)."""
    if b.shape[1] % 2 == 0 and offset % 2 == 0:
        v = b.view(torch.int16)[:, offset // 2]  # 1-D: no per-row loop overhead
    else:
        v = b[:, offset : offset + 2].contiguous().view(torch.int16).view(-1)
    return v.view(torch.float16).to(torch.float32).unsqueeze(1)


def _f32buf(out, shape, device) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=torch.float32, device=device)
    return out.view(shape)


_SHIFTS: dict = {}


def _unpack(src: torch.Tensor, shifts, mask: int) -> torch.Tensor:
    """``out[..., i, :] = (src[..., :] >> shifts[i]) & mask`` for uint8 ``src``
    (..., L) with L a multiple of 8, as a new contiguous uint8 (..., len(shifts), L).

    Works on 8 bytes at a time (an int64 view): ``shifts[i] + bits(mask) <= 8``
    keeps every byte's result inside its own byte.
    """
    *lead, L = src.shape
    w = src.contiguous().view(torch.int64).unsqueeze(-2)  # (..., 1, L/8)
    key = (str(src.device), tuple(shifts))
    sh = _SHIFTS.get(key)
    if sh is None:
        sh = torch.tensor(list(shifts), dtype=torch.int64, device=src.device).view(-1, 1)
        _SHIFTS[key] = sh
    out = torch.bitwise_right_shift(w, sh)  # (..., S, L/8)
    out.bitwise_and_(mask * 0x0101010101010101)
    return out.view(torch.uint8).view(*lead, len(shifts), L)


_LUT_CACHE: dict = {}


def _bits_lut(device, value: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """(256, 8) ``dtype``: row ``v`` holds bit ``i`` of ``v`` times ``value`` at column i."""
    key = (str(device), value, dtype)
    t = _LUT_CACHE.get(key)
    if t is None:
        v = torch.arange(256, dtype=torch.int32).view(256, 1)
        t = (((v >> torch.arange(8, dtype=torch.int32).view(1, 8)) & 1) * value).to(dtype).to(device)
        _LUT_CACHE[key] = t
    return t


def _lo_hi(b: torch.Tensor, add: int = 0):
    """Low and high nibbles of every byte of the blocks (+ ``add``, wrapping), as
    two contiguous uint8 (n, type_size): whole-row ops, which torch vectorizes."""
    lo = b & 0x0F
    hi = b >> 4
    if add:
        lo.add_(add)
        hi.add_(add)
    return lo, hi


def _nibbles(b: torch.Tensor, off: int, add: int = 0) -> torch.Tensor:
    """Legacy 4-bit codes at byte ``off``: (n, 32) uint8, low nibbles first."""
    n = b.shape[0]
    lo, hi = _lo_hi(b, add)
    buf = torch.empty((n, 2, 16), dtype=torch.uint8, device=b.device)
    buf[:, 0].copy_(lo[:, off : off + 16])
    buf[:, 1].copy_(hi[:, off : off + 16])
    return buf.view(n, 32)


def _nibbles_f32(b: torch.Tensor, off: int, f: torch.Tensor, add: int = 0) -> torch.Tensor:
    """Legacy 4-bit codes at byte ``off`` (+ ``add`` as int8 when given) into float32 ``f`` (n, 32)."""
    lo, hi = _lo_hi(b, add)
    if add:
        lo, hi = lo.view(torch.int8), hi.view(torch.int8)
    f[:, :16].copy_(lo[:, off : off + 16])
    f[:, 16:].copy_(hi[:, off : off + 16])
    return f


def _legacy_high_bits(qh: torch.Tensor, n: int) -> torch.Tensor:
    """Q5 high bits: (n, 4) bytes (a little-endian uint32) -> (n, 32) of 0 or 16."""
    lut = _bits_lut(qh.device, 16)
    return torch.index_select(lut, 0, qh.reshape(-1).to(torch.int32)).view(n, 32)


@_chunked(32)
def _dq_q4_0(b, out):
    n = b.shape[0]
    d = _f16(b, 0)
    f = _nibbles_f32(b, 2, _f32buf(out, (n, 32), b.device), add=248)  # q - 8 (uint8 wrap-around)
    return f.mul_(d)  # d * (q - 8)



def _q4_1_like(b, out, qs_off):
    n = b.shape[0]
    d, m = _f16(b, 0), _f16(b, 2)
    f = _nibbles_f32(b, qs_off, _f32buf(out, (n, 32), b.device))
    return f.mul_(d).add_(m)  # (d * q) + m


@register_dequantizer(GGMLType.Q4_1)
@_chunked(32)
def _dq_q4_1(b, out):
    return _q4_1_like(b, out, 4)


@_chunked(32)
def _dq_q5_0(b, out):
    n = b.shape[0]
    d = _f16(b, 0)
    q = _nibbles(b, 6)
    q.bitwise_or_(_legacy_high_bits(b[:, 2:6], n))
    q.add_(240)  # uint8 wrap-around: q - 16 as int8
    f = _f32buf(out, (n, 32), b.device)
    f.copy_(q.view(torch.int8))
    return f.mul_(d)  # d * (q - 16)


@register_dequantizer(GGMLType.Q5_1)
@_chunked(32)
def _dq_q5_1(b, out):
    n = b.shape[0]
    d, m = _f16(b, 0), _f16(b, 2)
    q = _nibbles(b, 8)
    q.bitwise_or_(_legacy_high_bits(b[:, 4:8], n))
    f = _f32buf(out, (n, 32), b.device)
    f.copy_(q)
    return f.mul_(d).add_(m)  # (d * q) + m


def _int8_times(b, out, d, off, block):
    n = b.shape[0]
    f = _f32buf(out, (n, block), b.device)
    f.copy_(b[:, off : off + block].view(torch.int8))
    return f.mul_(d)  # q * d


@_chunked(32)
def _dq_q8_0_f32(b, out):
    return _int8_times(b, out, _f16(b, 0), 2, 32)


@_chunked(32)
def _dq_q8_1_f32(b, out):
    return _int8_times(b, out, _f16(b, 0), 4, 32)


def _int8_f16_direct(blocks: torch.Tensor, off: int) -> torch.Tensor:
    """float16 output of ``d * q`` (f16 d at byte 0, 32 int8 at ``off``), built in
    the output itself: each byte widened to int16 and xor-ed with 0x6480 is the
    float16 ``1152 + q`` ("magic number" conversion, no int->float pass), minus
    1152 is exactly ``q``, times ``d`` is one rounding of the exact product: the
    same value as the float32 result cast to float16, in fewer, cheaper passes."""
    nb = blocks.shape[0]
    out = torch.empty((nb, 32), dtype=torch.float16, device=blocks.device)
    cs = max(1, _direct_chunk(blocks) // 32)
    for s in range(0, nb, cs):
        b = blocks[s : s + cs]
        o = out[s : s + cs]
        o.view(torch.int16).copy_(b[:, off : off + 32])
        o.view(-1).view(torch.int32).bitwise_xor_(0x64806480)
        d = b.view(torch.int16)[:, :1].view(torch.float16)  # type sizes 34 and 36 are even
        o.sub_(1152).mul_(d)
    return out


def _nibbles_f16_direct(blocks: torch.Tensor, qs_off: int, qh_off, offset: int) -> torch.Tensor:
    """float16 output of ``d * (q - offset)`` for Q4_0 (``qh_off`` None) and Q5_0:
    the codes are written as int16 into the output, or-ed with 0x6400 (float16
    ``1024 + q``), then ``- (1024 + offset)`` (exact) and ``* d`` (one rounding of
    an exact product): equal to the float32 result cast to float16."""
    nb = blocks.shape[0]
    out = torch.empty((nb, 32), dtype=torch.float16, device=blocks.device)
    cs = max(1, _direct_chunk(blocks) // 32)
    lut = _bits_lut(blocks.device, 16, torch.int16) if qh_off is not None else None
    for s in range(0, nb, cs):
        b = blocks[s : s + cs]
        n = b.shape[0]
        o = out[s : s + cs]
        oi = o.view(torch.int16)
        lo, hi = _lo_hi(b)
        oi[:, :16].copy_(lo[:, qs_off : qs_off + 16])
        oi[:, 16:].copy_(hi[:, qs_off : qs_off + 16])
        if lut is not None:
            qh = b[:, qh_off : qh_off + 4].reshape(-1).to(torch.int32)
            oi.bitwise_or_(torch.index_select(lut, 0, qh).view(n, 32))
        o.view(-1).view(torch.int32).bitwise_or_(0x64006400)
        d = b.view(torch.int16)[:, :1].view(torch.float16)  # type sizes 18 and 22 are even
        o.sub_(1024 + offset).mul_(d)
    return out


def _direct_chunk(blocks: torch.Tensor) -> int:
    """Weights per chunk for the float16-direct kernels: they keep one int16 /
    float16 buffer (the output itself), so chunks can be larger."""
    if blocks.device.type != "cpu":
        return _CHUNK_WEIGHTS_OTHER
    per = _CHUNK_WEIGHTS_CPU
    return 4 * per.get(32, 1 << 19) if isinstance(per, dict) else per


def _f16_direct_kernel(f32_kernel, direct):
    """float16 output through ``direct(contiguous_blocks)``, other dtypes through
    the float32 kernel."""

    def kernel(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if dtype == torch.float16 and blocks.dtype == torch.uint8 and blocks.dim() == 2 and blocks.shape[0]:
            return direct(blocks.contiguous())
        return f32_kernel(blocks, dtype)

    return kernel


register_dequantizer(GGMLType.Q4_0)(_f16_direct_kernel(_dq_q4_0, lambda b: _nibbles_f16_direct(b, 2, None, 8)))
register_dequantizer(GGMLType.Q5_0)(_f16_direct_kernel(_dq_q5_0, lambda b: _nibbles_f16_direct(b, 6, 2, 16)))
register_dequantizer(GGMLType.Q8_0)(_f16_direct_kernel(_dq_q8_0_f32, lambda b: _int8_f16_direct(b, 2)))
# ggml's block_q8_1: f16 d, f16 s (= d * sum(q), unused here), 32 int8
register_dequantizer(GGMLType.Q8_1)(_f16_direct_kernel(_dq_q8_1_f32, lambda b: _int8_f16_direct(b, 4)))


# -- K-quants: 256-weight super-blocks ------------------------------------------

@register_dequantizer(GGMLType.Q2_K)
@_chunked(256)
def _dq_q2_k(b, out):
    n = b.shape[0]
    sc = b[:, :16]
    d, dmin = _f16(b, 80), _f16(b, 82)
    dl = d * (sc & 0x0F).to(torch.float32)  # (n, 16)
    ml = dmin * (sc >> 4).to(torch.float32)
    q = _unpack(b[:, 16:80].reshape(n, 2, 32), (0, 2, 4, 6), 0x03)  # (n, 2, 4, 32)
    f = _f32buf(out, (n, 16, 16), b.device)
    f.copy_(q.view(n, 16, 16))
    return f.mul_(dl.unsqueeze(-1)).sub_(ml.unsqueeze(-1)).view(n, 256)  # dl * q - ml


@register_dequantizer(GGMLType.Q3_K)
@_chunked(256)
def _dq_q3_k(b, out):
    n = b.shape[0]
    d = _f16(b, 108)
    s = b[:, 96:108]
    lo = _unpack(s[:, :8], (0, 4), 0x0F)  # (n, 2, 8)
    hi = s[:, 8:12].contiguous().view(torch.int32).view(n, 1)
    hi = torch.stack([hi, hi >> 2, hi >> 4, hi >> 6], 1).bitwise_and_(0x03030303).view(torch.uint8)  # (n, 4, 4)
    scales = lo.view(n, 16) | (hi.view(n, 16) << 4)
    dl = d * (scales.view(torch.int8) - 32).to(torch.float32)  # (n, 16)
    q = _unpack(b[:, 32:96].reshape(n, 2, 32), (0, 2, 4, 6), 0x03).view(n, 256)
    h = _unpack(b[:, :32], range(8), 0x01).view(n, 256)
    # q - 4 where the hmask bit is clear: (q | h << 2) - 4, bytewise
    qv = q.view(torch.int64)
    qv.bitwise_or_(h.view(torch.int64).bitwise_left_shift_(2))
    q.add_(252)  # uint8 wrap-around: q - 4 as int8
    f = _f32buf(out, (n, 16, 16), b.device)
    f.copy_(q.view(torch.int8).view(n, 16, 16))
    return f.mul_(dl.unsqueeze(-1)).view(n, 256)  # dl * q


def _k_scale_min(s: torch.Tensor):
    """Q4_K / Q5_K: 12 bytes -> (sc, m), each (n, 8) uint8 of 6 bits."""
    n = s.shape[0]
    s = s.reshape(n, 3, 4)
    a, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([a & 0x3F, (md & 0x0F) | ((a >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _k_scales(b):
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scale_min(b[:, 4:16])
    return d * sc.to(torch.float32), dmin * mn.to(torch.float32)  # (n, 8) each


@register_dequantizer(GGMLType.Q4_K)
@_chunked(256)
def _dq_q4_k(b, out):
    n = b.shape[0]
    dl, ml = _k_scales(b)
    lo, hi = _lo_hi(b)
    f = _f32buf(out, (n, 4, 2, 32), b.device)
    f[:, :, 0].copy_(lo[:, 16:144].view(n, 4, 32))
    f[:, :, 1].copy_(hi[:, 16:144].view(n, 4, 32))
    f = f.view(n, 8, 32)
    return f.mul_(dl.unsqueeze(-1)).sub_(ml.unsqueeze(-1)).view(n, 256)  # d * q - dm


@register_dequantizer(GGMLType.Q5_K)
@_chunked(256)
def _dq_q5_k(b, out):
    n = b.shape[0]
    dl, ml = _k_scales(b)
    q = _unpack(b[:, 48:176].reshape(n, 4, 32), (0, 4), 0x0F)  # (n, 4, 2, 32)
    h = _unpack(b[:, 16:48], range(8), 0x01)  # (n, 8, 32)
    q.view(n, 256).view(torch.int64).bitwise_or_(h.view(n, 256).view(torch.int64).bitwise_left_shift_(4))
    f = _f32buf(out, (n, 8, 32), b.device)
    f.copy_(q.view(n, 8, 32))
    return f.mul_(dl.unsqueeze(-1)).sub_(ml.unsqueeze(-1)).view(n, 256)


@register_dequantizer(GGMLType.Q6_K)
@_chunked(256)
def _dq_q6_k(b, out):
    n = b.shape[0]
    d = _f16(b, 208)
    dl = d * b[:, 192:208].view(torch.int8).to(torch.float32)  # (n, 16)
    ql = _unpack(b[:, :128].reshape(n, 2, 64), (0, 4), 0x0F)  # (n, 2, 2, 64)
    qh = _unpack(b[:, 128:192].reshape(n, 2, 32), (0, 2, 4, 6), 0x03)  # (n, 2, 4, 32)
    ql.view(n, 256).view(torch.int64).bitwise_or_(qh.view(n, 256).view(torch.int64).bitwise_left_shift_(4))
    ql.add_(224)  # uint8 wrap-around: q - 32 as int8
    f = _f32buf(out, (n, 16, 16), b.device)
    f.copy_(ql.view(torch.int8).view(n, 16, 16))
    return f.mul_(dl.unsqueeze(-1)).view(n, 256)  # d * q


@register_dequantizer(GGMLType.Q8_K)
@_chunked(256)
def _dq_q8_k(b, out):
    """ggml's block_q8_K: f32 d, 256 int8, 16 int16 block sums (unused here)."""
    n = b.shape[0]
    d = b[:, :4].contiguous().view(torch.float32)
    return _int8_times(b, out, d, 4, 256)
