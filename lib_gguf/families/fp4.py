"""The micro-scaled 4-bit float formats MXFP4 (32 weights, one UE8M0 exponent) and
NVFP4 (64 weights, four UE4M3 scales of 16): block layouts, torch dequantizers and
the MXFP4 quantizer.

Each 4-bit code is an E2M1 value; :data:`E2M1_DOUBLED` holds them doubled, so that
they are integers, and the scale readers here return half the stored scale.
Dequantized float32 values equal ``gguf.quants.dequantize`` bit for bit; MXFP4's
quantized bytes equal gguf-py's reference quantizer.
"""
from __future__ import annotations

import torch

from ..formats import GGMLType, Layout, register
from .torch_ops import nibble_values, scaled_chunks

MXFP4 = Layout(e=1, qs=16)
NVFP4 = Layout(d=4, qs=32)
E2M1_DOUBLED = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


def e8m0_half(e: torch.Tensor) -> torch.Tensor:
    """UE8M0 scale byte -> float32 2**(e-128) (half the E8M0 value), exact, subnormals included."""
    e = e.to(torch.int32)
    bits = torch.where(e < 2, torch.tensor(0x00200000, dtype=torch.int32, device=e.device) << e, (e - 1) << 23)
    return bits.view(torch.float32)


def ue4m3_half(x: torch.Tensor) -> torch.Tensor:
    """Unsigned E4M3 scale byte -> float32, times 1/2 (the doubled-E2M1 convention)."""
    x = x.to(torch.int32)
    exp = (x >> 3) & 0xF
    man = (x & 0x7).to(torch.float32)
    normal = (1.0 + man / 8.0) * torch.pow(2.0, (exp - 7).to(torch.float32))
    raw = torch.where(exp == 0, man * 2.0 ** -9, normal)
    return torch.where((x == 0) | (x == 0x7F), torch.zeros_like(raw), raw * 0.5)


@scaled_chunks(32)
def _dq_mxfp4(blocks: torch.Tensor):
    d = e8m0_half(blocks[:, MXFP4.e.slice])
    vals = nibble_values(E2M1_DOUBLED, blocks[:, MXFP4.qs.slice])  # (n, 2, 16)
    return d[:, :, None], vals


@scaled_chunks(64)
def _dq_nvfp4(blocks: torch.Tensor):
    n = blocks.shape[0]
    d = ue4m3_half(blocks[:, NVFP4.d.slice]).reshape(n, 4, 1)
    vals = nibble_values(E2M1_DOUBLED, blocks[:, NVFP4.qs.slice].reshape(n, 4, 8))  # (n, 4, 2, 8)
    return d[..., None], vals


def _mxfp4(x: torch.Tensor) -> torch.Tensor:
    """Shared UE8M0 exponent floor(log2(absmax)) - 2 (so the largest E2M1 level, 6,
    covers the block), then each weight to its nearest doubled-E2M1 level (the first
    on a tie), as gguf-py's reference quantizer does."""
    amax = x.abs().amax(dim=1)
    _, exp = torch.frexp(amax)  # amax = m * 2**exp, m in [0.5, 1): floor(log2(amax)) = exp - 1
    e = torch.where(amax > 0, (exp - 1 - 2 + 127).clamp(0, 255), torch.zeros_like(exp)).to(torch.uint8)
    d = e8m0_half(e)
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
    return MXFP4.pack(e=e[:, None], qs=best[:, :16] | (best[:, 16:] << 4))


register(GGMLType.MXFP4, layout=MXFP4, dequantize=_dq_mxfp4, quantize=_mxfp4, numba=("dequantize", "quantize"),
         triton=True, fallback=("Q4_0",))
register(GGMLType.NVFP4, layout=NVFP4, dequantize=_dq_nvfp4, numba=("dequantize",), triton=True)
