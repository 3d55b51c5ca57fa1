"""The ternary formats TQ1_0 and TQ2_0 (256 weights, each -1, 0 or +1 times the
block's float16 ``d``): block layouts, torch dequantizers and quantizers.

TQ1_0 packs five trits a byte in ``qs`` (weights 0-159 from its first 32 bytes,
160-239 from the next 16) and four in ``qh`` (240-255), each byte
``ceil(value * 256 / 243)`` of the trits read as a base-3 number, first most
significant. TQ2_0 stores 2-bit codes (trit + 1), four a byte. Dequantized float32
values equal ``gguf.quants.dequantize``; quantized bytes equal ggml's
``quantize_row_tq*_ref`` (d = absmax, trit = roundf(x / d)).
"""
from __future__ import annotations

import torch

from ..formats import GGMLType, Layout, register
from .torch_ops import cached, f16_bytes, inv, pack_crumbs, roundf, scaled_chunks, unpack

TQ1_0 = Layout(qs=48, qh=4, d="f16")
TQ2_0 = Layout(qs=64, d="f16")


# -- dequantizing ----------------------------------------------------------------------------

def _f16(b: torch.Tensor, field) -> torch.Tensor:
    return b[:, field.slice].contiguous().view(torch.float16).to(torch.float32)


@scaled_chunks(256)
def _dq_tq1_0(blocks: torch.Tensor):
    """Base-3 digits: a byte times 3**k (uint8 arithmetic, so mod 256) brings digit k
    to the top, and ``(x * 3) >> 8`` reads it, here as ``floor(x * 3/256)`` in
    float32 (exact: x has 8 bits, 3/256 two). Minus one: the ternary value."""
    n = blocks.shape[0]
    p = cached(("pow3", str(blocks.device)),
               lambda: torch.tensor([[1], [3], [9], [27], [81]], dtype=torch.uint8, device=blocks.device))
    qs, qh = blocks[:, TQ1_0.qs.slice], blocks[:, TQ1_0.qh.slice]
    q = torch.cat([(qs[:, None, :32] * p).reshape(n, 160),       # 32 bytes x 5 digits
                   (qs[:, None, 32:48] * p).reshape(n, 80),      # 16 bytes x 5 digits
                   (qh[:, None, :] * p[:4]).reshape(n, 16)],     # 4 bytes x 4 digits
                  dim=1)
    t = q.to(torch.float32).mul_(3.0 / 256.0).floor_().sub_(1.0)
    return _f16(blocks, TQ1_0.d), t


@scaled_chunks(256)
def _dq_tq2_0(blocks: torch.Tensor):
    n = blocks.shape[0]
    q = unpack(blocks[:, TQ2_0.qs.slice].reshape(n, 2, 32), (0, 2, 4, 6), 0x03)  # (n, 2, 4, 32) 2-bit codes
    t = q.to(torch.float32).sub_(1.0)
    return _f16(blocks, TQ2_0.d).reshape(n, 1, 1, 1), t


# -- quantizing (ggml's quantize_row_tq*_ref) -------------------------------------------------

def _ternary(x: torch.Tensor):
    """(d, trits 0..2 as int32) per 256-weight block: d = absmax, trit = roundf(x/d) + 1."""
    d = x.abs().amax(dim=1)
    t = (roundf(x * inv(d)[:, None]) + 1).to(torch.int32)
    return d, t


def _base3(trits: torch.Tensor) -> torch.Tensor:
    """(..., k) trits, first most significant -> the byte ggml stores: ceil(q * 256 / 243)."""
    q = torch.zeros(trits.shape[:-1], dtype=torch.int32, device=trits.device)
    for i in range(trits.shape[-1]):
        q = q * 3 + trits[..., i]
    return ((q * 256 + 242) // 243).to(torch.uint8)


def _tq1_0(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    d, t = _ternary(x)
    # 32 bytes of 5 trits (value m + 32*k), then 16 bytes of 5 (m + 16*k), then 4 bytes of 4 (j + 4*k)
    a = t[:, :160].reshape(n, 5, 32).transpose(1, 2)
    b = t[:, 160:240].reshape(n, 5, 16).transpose(1, 2)
    c = t[:, 240:].reshape(n, 4, 4).transpose(1, 2)
    c = torch.cat([c, torch.zeros_like(c[..., :1])], dim=-1)  # "shift the first value to the top trit"
    return TQ1_0.pack(qs=torch.cat([_base3(a), _base3(b)], dim=1), qh=_base3(c), d=f16_bytes(d))


def _tq2_0(x: torch.Tensor) -> torch.Tensor:
    d, t = _ternary(x)
    return TQ2_0.pack(qs=pack_crumbs(t & 3), d=f16_bytes(d))


register(GGMLType.TQ1_0, layout=TQ1_0, dequantize=_dq_tq1_0, quantize=_tq1_0, numba=("dequantize", "quantize"),
         triton=True, fallback=("Q4_0",))
register(GGMLType.TQ2_0, layout=TQ2_0, dequantize=_dq_tq2_0, quantize=_tq2_0, numba=("dequantize", "quantize"),
         triton=True, fallback=("Q4_0",))
