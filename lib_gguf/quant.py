"""Quantization in torch, on any device: the public entry point and the kernels
for plain element types, the legacy formats and the K-quants.

Kernels take float32 ``(n_blocks, block_size)`` values and return
``(n_blocks, type_size)`` uint8 blocks, byte-identical to ggml's own quantizer
(the no-importance-matrix path of ``ggml_quantize_chunk``).
The IQ, ternary and MXFP4 quantizers live in :mod:`lib_gguf.quant_iq`.
"""
from __future__ import annotations

import torch

from .errors import GGUFFormatError
from .formats import GGMLType, get_format, quantizer_for, register_quantizer


def quantize(tensor: torch.Tensor, qtype, name: str | None = None) -> torch.Tensor:
    """Quantize ``tensor`` to ``qtype``; returns uint8 of shape
    ``(*tensor.shape[:-1], bytes_per_row)`` on the tensor's device."""
    fmt = get_format(qtype, name)
    if tensor.dim() == 0:
        tensor = tensor.reshape(1)
    n_per_row = tensor.shape[-1]
    if n_per_row % fmt.block_size:
        raise GGUFFormatError(
            f"{fmt.name} needs rows that are a multiple of {fmt.block_size} weights, got {n_per_row} "
            f"(shape {list(tensor.shape)}); the quantization rules fall back to a format that fits",
            tensor=name,
        )
    fn = quantizer_for(fmt.type_id, name)
    x = tensor.detach()
    if x.dtype != torch.float32 and fmt.type_id not in _KEEP_DTYPE:
        x = x.to(torch.float32)
    lead = tuple(x.shape[:-1])
    blocks = x.reshape(-1, fmt.block_size)
    out = fn(blocks)
    return out.reshape(*lead, n_per_row // fmt.block_size * fmt.type_size)


_KEEP_DTYPE = {int(GGMLType.F64), int(GGMLType.I8), int(GGMLType.I16), int(GGMLType.I32), int(GGMLType.I64)}


def _caster(dst: torch.dtype):
    def fn(blocks: torch.Tensor) -> torch.Tensor:
        return blocks.to(dst).contiguous().view(torch.uint8).reshape(blocks.shape[0], -1)

    return fn


for _t, _dst in (
    (GGMLType.F32, torch.float32),
    (GGMLType.F16, torch.float16),
    (GGMLType.BF16, torch.bfloat16),
    (GGMLType.F64, torch.float64),
):
    register_quantizer(_t)(_caster(_dst))


# -- shared pieces -------------------------------------------------------------------

def _f16_bytes(v: torch.Tensor) -> torch.Tensor:
    """float32 (n,) -> (n, 2) uint8, the fp16 bits (round to nearest even, as ggml)."""
    return v.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _inv(d: torch.Tensor) -> torch.Tensor:
    """``d ? 1/d : 0`` in float32."""
    return torch.where(d != 0, 1.0 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))


def roundf(v: torch.Tensor) -> torch.Tensor:
    """C's roundf (half away from zero), exactly, in float32."""
    r = torch.round(v)  # half to even
    t = torch.trunc(v)
    tie = (v - t).abs() == 0.5
    return torch.where(tie, t + torch.sign(v), r)


def _signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude in each block (the first one on ties; +0 when all are 0)."""
    idx = x.abs().argmax(dim=-1, keepdim=True)
    m = x.gather(-1, idx).squeeze(-1)
    return torch.where(m == 0, torch.zeros_like(m), m)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(n, 32) values 0..15 -> (n, 16) bytes: low nibble j, high nibble j + 16."""
    q = q.to(torch.uint8)
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def _pack_high_bits(q: torch.Tensor) -> torch.Tensor:
    """(n, 32) 5-bit values -> (n, 4) bytes: bit 4 of value j at bit j of a little-endian uint32."""
    bits = ((q.to(torch.int32) >> 4) & 1).reshape(-1, 4, 8)
    weights = (1 << torch.arange(8, device=q.device, dtype=torch.int32))
    return (bits * weights).sum(-1).to(torch.uint8)


# -- legacy 32-weight formats (ggml's quantize_row_*_ref) -----------------------------

@register_quantizer(GGMLType.Q8_0)
def _q8_0(x: torch.Tensor) -> torch.Tensor:
    amax = x.abs().amax(dim=-1)
    d = amax / 127
    q = roundf(x * _inv(d)[:, None]).to(torch.int8).view(torch.uint8)
    return torch.cat([_f16_bytes(d), q], dim=1)


def _symmetric(x: torch.Tensor, bits: int) -> torch.Tensor:
    half = 1 << (bits - 1)
    d = _signed_absmax(x) / -half
    q = torch.trunc(x * _inv(d)[:, None] + (half + 0.5)).clamp(max=2 * half - 1)
    parts = [_f16_bytes(d)]
    if bits == 5:
        parts.append(_pack_high_bits(q))
    parts.append(_pack_nibbles(q))
    return torch.cat(parts, dim=1)


def _zero_sign_as_scanned(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A running min/max in C keeps the first zero it meets: give a zero result
    that zero's sign, so the stored fp16 matches ggml's bit for bit."""
    first_zero = (x == 0).to(torch.int8).argmax(dim=-1, keepdim=True)
    return torch.where(v == 0, x.gather(-1, first_zero).squeeze(-1), v)


def _asymmetric(x: torch.Tensor, bits: int) -> torch.Tensor:
    lo = _zero_sign_as_scanned(x, x.amin(dim=-1))
    hi = _zero_sign_as_scanned(x, x.amax(dim=-1))
    d = (hi - lo) / ((1 << bits) - 1)
    q = torch.trunc((x - lo[:, None]) * _inv(d)[:, None] + 0.5)
    if bits == 4:
        q = q.clamp(max=15)
    parts = [_f16_bytes(d), _f16_bytes(lo)]
    if bits == 5:
        parts.append(_pack_high_bits(q))
    parts.append(_pack_nibbles(q))
    return torch.cat(parts, dim=1)


register_quantizer(GGMLType.Q4_0)(lambda x: _symmetric(x, 4))
register_quantizer(GGMLType.Q5_0)(lambda x: _symmetric(x, 5))
register_quantizer(GGMLType.Q4_1)(lambda x: _asymmetric(x, 4))
register_quantizer(GGMLType.Q5_1)(lambda x: _asymmetric(x, 5))
