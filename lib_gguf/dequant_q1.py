"""Q1_0 (GGML type 41): one sign bit per weight and one float16 scale per 128 weights.

The layout, as ggml's reference code (``ggml-common.h``'s ``block_q1_0``, and
``dequantize_row_q1_0`` in ``ggml-quants.c``) defines it: a block is 18 bytes, the
float16 ``d`` (little-endian) and then 16 bytes of bits; weight ``j`` of the block is
bit ``j % 8`` (least significant first) of byte ``j // 8``, and is ``+d`` when that
bit is set and ``-d`` when it is clear. (ggml's quantizer sets ``d`` to the block's
mean absolute value and the bit for every weight >= 0.) gguf-py has no Q1_0 code.

Both values are ``d`` itself or its negation, so the result is exact in every float
dtype that holds ``d``: float32 and float16 are bit-equal to ggml's float32 output
(float16 after the cast), bfloat16 is that value rounded.
"""
from __future__ import annotations

import torch

from .formats import GGMLType, register_dequantizer

QK1_0 = 128
TYPE_SIZE = 2 + QK1_0 // 8

_BITS: dict = {}


def _bits(device) -> torch.Tensor:
    """(256, 8) bool: row ``v`` holds bit ``i`` of ``v`` at column ``i``."""
    key = str(device)
    t = _BITS.get(key)
    if t is None:
        v = torch.arange(256, dtype=torch.int32).view(256, 1)
        t = ((v >> torch.arange(8, dtype=torch.int32).view(1, 8)) & 1).to(torch.bool).to(device)
        _BITS[key] = t
    return t


_CHUNK_BLOCKS = 1 << 13  # 1 Mi weights per chunk on the CPU


@register_dequantizer(GGMLType.Q1_0)
def dequantize_q1_0(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(n, 18)`` uint8 blocks -> ``(n, 128)`` values of ``dtype``: ``d`` where a
    weight's bit is set, ``-d`` (``d`` with its sign flipped, as ggml's ``neg_d``) where
    it is clear."""
    if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[1] != TYPE_SIZE:
        raise ValueError(f"Q1_0: expected uint8 blocks of shape (n, {TYPE_SIZE}), got {blocks.dtype} "
                         f"{tuple(blocks.shape)}")
    n = blocks.shape[0]
    out = torch.empty((n, QK1_0), dtype=dtype, device=blocks.device)
    if n == 0:
        return out
    lut = _bits(blocks.device)
    step = _CHUNK_BLOCKS if blocks.device.type == "cpu" else n
    for s in range(0, n, step):
        b = blocks[s:s + step].contiguous()
        m = b.shape[0]
        d = b[:, :2].contiguous().view(torch.float16).to(dtype)  # (m, 1); exact in float32 and float16
        bits = torch.index_select(lut, 0, b[:, 2:].reshape(-1).to(torch.int64)).view(m, QK1_0)
        torch.where(bits, d, torch.neg(d), out=out[s:s + m])
    return out
