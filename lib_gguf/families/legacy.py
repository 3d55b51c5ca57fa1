"""The 32-weight "legacy" formats Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, and Q1_0
(128 one-bit weights): block layouts, torch dequantizers and quantizers.

Layouts as ``ggml-common.h`` defines them. Dequantized float32 values equal
``gguf.quants.dequantize`` bit for bit; quantized bytes equal ggml's
``quantize_row_*_ref`` (Q8_1 is only read: ggml makes it for its own dot products).
Q1_0: weight ``j`` is bit ``j % 8`` of byte ``j // 8`` of ``qs``, ``+d`` when set and
``-d`` when clear (gguf-py has no Q1_0 code; ggml's ``dequantize_row_q1_0``).
"""
from __future__ import annotations

import torch

from ..formats import GGMLType, Layout, register
from .torch_ops import (CHUNK_WEIGHTS_OTHER, bits_lut, chunk_weights, dequant_chunks, f16_at, f16_bytes,
                        f32_buffer, inv, lo_hi, pack_nibbles, quant_chunks, roundf, signed_absmax)

Q4_0 = Layout(d="f16", qs=16)
Q4_1 = Layout(d="f16", m="f16", qs=16)
Q5_0 = Layout(d="f16", qh=4, qs=16)
Q5_1 = Layout(d="f16", m="f16", qh=4, qs=16)
Q8_0 = Layout(d="f16", qs=32)
Q8_1 = Layout(d="f16", s="f16", qs=32)  # s = d * sum(q): unused when dequantizing
Q1_0 = Layout(d="f16", qs=16)


# -- dequantizing ----------------------------------------------------------------------------

def _nibbles(b: torch.Tensor, qs: int, add: int = 0) -> torch.Tensor:
    """4-bit codes of the 16 bytes at ``qs``: (n, 32) uint8, low nibbles first."""
    n = b.shape[0]
    lo, hi = lo_hi(b, add)
    buf = torch.empty((n, 2, 16), dtype=torch.uint8, device=b.device)
    buf[:, 0].copy_(lo[:, qs : qs + 16])
    buf[:, 1].copy_(hi[:, qs : qs + 16])
    return buf.view(n, 32)


def _nibbles_f32(b: torch.Tensor, qs: int, f: torch.Tensor, add: int = 0) -> torch.Tensor:
    """4-bit codes of the 16 bytes at ``qs`` (+ ``add`` as int8 when given) into float32 ``f`` (n, 32)."""
    lo, hi = lo_hi(b, add)
    if add:
        lo, hi = lo.view(torch.int8), hi.view(torch.int8)
    f[:, :16].copy_(lo[:, qs : qs + 16])
    f[:, 16:].copy_(hi[:, qs : qs + 16])
    return f


def _high_bits(qh: torch.Tensor, n: int) -> torch.Tensor:
    """Q5 high bits: (n, 4) bytes (a little-endian uint32) -> (n, 32) of 0 or 16."""
    lut = bits_lut(qh.device, 16)
    return torch.index_select(lut, 0, qh.reshape(-1).to(torch.int32)).view(n, 32)


@dequant_chunks(32)
def _dq_q4_0(b, out):
    d = f16_at(b, Q4_0.d.offset)
    f = _nibbles_f32(b, Q4_0.qs.offset, f32_buffer(out, (b.shape[0], 32), b.device), add=248)  # q - 8 (uint8 wrap)
    return f.mul_(d)  # d * (q - 8)


@dequant_chunks(32)
def _dq_q4_1(b, out):
    d, m = f16_at(b, Q4_1.d.offset), f16_at(b, Q4_1.m.offset)
    f = _nibbles_f32(b, Q4_1.qs.offset, f32_buffer(out, (b.shape[0], 32), b.device))
    return f.mul_(d).add_(m)  # (d * q) + m


@dequant_chunks(32)
def _dq_q5_0(b, out):
    n = b.shape[0]
    d = f16_at(b, Q5_0.d.offset)
    q = _nibbles(b, Q5_0.qs.offset)
    q.bitwise_or_(_high_bits(b[:, Q5_0.qh.slice], n))
    q.add_(240)  # uint8 wrap-around: q - 16 as int8
    f = f32_buffer(out, (n, 32), b.device)
    f.copy_(q.view(torch.int8))
    return f.mul_(d)  # d * (q - 16)


@dequant_chunks(32)
def _dq_q5_1(b, out):
    n = b.shape[0]
    d, m = f16_at(b, Q5_1.d.offset), f16_at(b, Q5_1.m.offset)
    q = _nibbles(b, Q5_1.qs.offset)
    q.bitwise_or_(_high_bits(b[:, Q5_1.qh.slice], n))
    f = f32_buffer(out, (n, 32), b.device)
    f.copy_(q)
    return f.mul_(d).add_(m)  # (d * q) + m


def int8_times(b, out, d, qs: int, block: int):
    """``d * q`` for the ``block`` int8 codes at byte ``qs`` (Q8_0, Q8_1, Q8_K)."""
    f = f32_buffer(out, (b.shape[0], block), b.device)
    f.copy_(b[:, qs : qs + block].view(torch.int8))
    return f.mul_(d)


@dequant_chunks(32)
def _dq_q8_0(b, out):
    return int8_times(b, out, f16_at(b, Q8_0.d.offset), Q8_0.qs.offset, 32)


@dequant_chunks(32)
def _dq_q8_1(b, out):
    return int8_times(b, out, f16_at(b, Q8_1.d.offset), Q8_1.qs.offset, 32)


def _direct_chunk(blocks: torch.Tensor) -> int:
    """Weights per chunk for the float16-direct kernels: they keep one int16 /
    float16 buffer (the output itself), so chunks can be larger."""
    if blocks.device.type != "cpu":
        return CHUNK_WEIGHTS_OTHER
    return 4 * chunk_weights(blocks.device, 32)


def _int8_f16_direct(blocks: torch.Tensor, qs: int) -> torch.Tensor:
    """float16 output of ``d * q`` (f16 d at byte 0, 32 int8 at ``qs``), built in
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
        o.view(torch.int16).copy_(b[:, qs : qs + 32])
        o.view(-1).view(torch.int32).bitwise_xor_(0x64806480)
        d = b.view(torch.int16)[:, :1].view(torch.float16)  # type sizes 34 and 36 are even
        o.sub_(1152).mul_(d)
    return out


def _nibbles_f16_direct(blocks: torch.Tensor, qs: int, qh, offset: int) -> torch.Tensor:
    """float16 output of ``d * (q - offset)`` for Q4_0 (``qh`` None) and Q5_0:
    the codes are written as int16 into the output, or-ed with 0x6400 (float16
    ``1024 + q``), then ``- (1024 + offset)`` (exact) and ``* d`` (one rounding of
    an exact product): equal to the float32 result cast to float16."""
    nb = blocks.shape[0]
    out = torch.empty((nb, 32), dtype=torch.float16, device=blocks.device)
    cs = max(1, _direct_chunk(blocks) // 32)
    lut = bits_lut(blocks.device, 16, torch.int16) if qh is not None else None
    for s in range(0, nb, cs):
        b = blocks[s : s + cs]
        n = b.shape[0]
        o = out[s : s + cs]
        oi = o.view(torch.int16)
        lo, hi = lo_hi(b)
        oi[:, :16].copy_(lo[:, qs : qs + 16])
        oi[:, 16:].copy_(hi[:, qs : qs + 16])
        if lut is not None:
            h = b[:, qh.slice].reshape(-1).to(torch.int32)
            oi.bitwise_or_(torch.index_select(lut, 0, h).view(n, 32))
        o.view(-1).view(torch.int32).bitwise_or_(0x64006400)
        d = b.view(torch.int16)[:, :1].view(torch.float16)  # type sizes 18 and 22 are even
        o.sub_(1024 + offset).mul_(d)
    return out


def _f16_direct(f32_kernel, direct):
    """float16 output through ``direct(contiguous_blocks)``, other dtypes through
    the float32 kernel."""

    def kernel(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if dtype == torch.float16 and blocks.dtype == torch.uint8 and blocks.dim() == 2 and blocks.shape[0]:
            return direct(blocks.contiguous())
        return f32_kernel(blocks, dtype)

    kernel.__name__ = f32_kernel.__name__
    return kernel


_Q1_CHUNK_BLOCKS = 1 << 13  # 1 Mi weights per chunk on the CPU


def _dq_q1_0(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``d`` where a weight's bit is set, ``-d`` (``d`` with its sign flipped) where it
    is clear: exact in every float dtype that holds ``d``."""
    n = blocks.shape[0]
    out = torch.empty((n, 128), dtype=dtype, device=blocks.device)
    if n == 0:
        return out
    lut = bits_lut(blocks.device, 1, torch.bool)
    step = _Q1_CHUNK_BLOCKS if blocks.device.type == "cpu" else n
    for s in range(0, n, step):
        b = blocks[s:s + step].contiguous()
        m = b.shape[0]
        d = b[:, Q1_0.d.slice].contiguous().view(torch.float16).to(dtype)  # (m, 1)
        bits = torch.index_select(lut, 0, b[:, Q1_0.qs.slice].reshape(-1).to(torch.int64)).view(m, 128)
        torch.where(bits, d, torch.neg(d), out=out[s:s + m])
    return out


# -- quantizing (ggml's quantize_row_*_ref) -------------------------------------------------

def _pack_high_bits(q: torch.Tensor) -> torch.Tensor:
    """(n, 32) 5-bit values -> (n, 4) bytes: bit 4 of value j at bit j of a little-endian uint32.

    Eight 0/1 bytes read as one int64 and multiplied by 0x0102040810204080 (the sum of
    2**(56 - 7i)) put byte i's bit at bit 56 + i, with no carries (every partial
    product has its own bit)."""
    bits = ((q.to(torch.uint8) >> 4) & 1).contiguous().view(torch.int64)   # (n, 4): 8 values each
    return ((bits * 0x0102040810204080) >> 56 & 0xFF).to(torch.uint8)


@quant_chunks(8192)
def _q8_0(x: torch.Tensor) -> torch.Tensor:
    d = x.abs().amax(dim=-1) / 127
    q = roundf(x * inv(d)[:, None]).to(torch.int8).view(torch.uint8)
    return torch.cat([f16_bytes(d), q], dim=1)


def _symmetric(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Q4_0 / Q5_0: d = the signed absmax / -2**(bits-1)."""
    half = 1 << (bits - 1)
    d = signed_absmax(x) / -half
    # C's (int8_t) cast truncates toward zero; x * id + half + 0.5 lies in [0.5, 2 * half + 0.5]
    q = (x * inv(d)[:, None] + (half + 0.5)).to(torch.int8).clamp_(max=2 * half - 1)
    parts = [f16_bytes(d)]
    if bits == 5:
        parts.append(_pack_high_bits(q))
    parts.append(pack_nibbles(q))
    return torch.cat(parts, dim=1)


def _asymmetric(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Q4_1 / Q5_1: d = (max - min) / (2**bits - 1), m = min."""
    lo, hi = torch.aminmax(x, dim=-1)
    # A running min/max in C keeps the first zero it meets: a zero result takes that
    # zero's sign, so the stored fp16 matches ggml's bit for bit.
    zero = (lo == 0) | (hi == 0)
    if bool(zero.any()):
        first_zero = (x == 0).to(torch.int8).argmax(dim=-1, keepdim=True)
        z = x.gather(-1, first_zero).squeeze(-1)
        lo = torch.where(lo == 0, z, lo)
        hi = torch.where(hi == 0, z, hi)
    d = (hi - lo) / ((1 << bits) - 1)
    q = ((x - lo[:, None]) * inv(d)[:, None] + 0.5).to(torch.int8)  # C's (int8_t): truncation
    if bits == 4:
        q = q.clamp_(max=15)
    parts = [f16_bytes(d), f16_bytes(lo)]
    if bits == 5:
        parts.append(_pack_high_bits(q))
    parts.append(pack_nibbles(q))
    return torch.cat(parts, dim=1)


# Every format here but Q1_0 dequantizes compiled too (legacy_dequant_numba.py); the torch
# kernels (their float16-direct passes included) run without numba and are its reference
_COMPILED = ("quantize", "dequantize")
# 8192 blocks (262144 weights) a pass: the few full passes stay in the CPU's cache
register(GGMLType.Q4_0, layout=Q4_0, numba=_COMPILED, triton=True,
         dequantize=_f16_direct(_dq_q4_0, lambda b: _nibbles_f16_direct(b, Q4_0.qs.offset, None, 8)),
         quantize=quant_chunks(8192)(lambda x: _symmetric(x, 4)))
register(GGMLType.Q4_1, layout=Q4_1, numba=_COMPILED, triton=True,
         dequantize=_dq_q4_1, quantize=quant_chunks(8192)(lambda x: _asymmetric(x, 4)))
register(GGMLType.Q5_0, layout=Q5_0, numba=_COMPILED, triton=True,
         dequantize=_f16_direct(_dq_q5_0, lambda b: _nibbles_f16_direct(b, Q5_0.qs.offset, Q5_0.qh, 16)),
         quantize=quant_chunks(8192)(lambda x: _symmetric(x, 5)))
register(GGMLType.Q5_1, layout=Q5_1, numba=_COMPILED, triton=True,
         dequantize=_dq_q5_1, quantize=quant_chunks(8192)(lambda x: _asymmetric(x, 5)))
register(GGMLType.Q8_0, layout=Q8_0, numba=_COMPILED, triton=True,
         dequantize=_f16_direct(_dq_q8_0, lambda b: _int8_f16_direct(b, Q8_0.qs.offset)), quantize=_q8_0)
register(GGMLType.Q8_1, layout=Q8_1, numba=("dequantize",), triton=True,
         dequantize=_f16_direct(_dq_q8_1, lambda b: _int8_f16_direct(b, Q8_1.qs.offset)))
register(GGMLType.Q1_0, layout=Q1_0, triton=True, dequantize=_dq_q1_0)
