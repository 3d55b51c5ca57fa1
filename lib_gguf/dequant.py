"""Dequantization in torch, on any device: the public entry point and the
kernels for plain element types, the 32-weight "legacy" formats and the K-quants.

The IQ, ternary and micro-scaled FP4 kernels live in :mod:`lib_gguf.dequant_iq`.
Every kernel takes ``(n_blocks, type_size)`` uint8 blocks and returns
``(n_blocks, block_size)`` values; in float32 the result equals
``gguf.quants.dequantize`` bit for bit.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .errors import GGUFFormatError
from .formats import GGMLType, dequantizer_for, get_format, register_dequantizer


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


def dequantize(data, qtype, shape: Sequence[int], dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Turn GGUF bytes into a tensor of logical ``shape`` and ``dtype``.

    ``data``: a uint8 tensor (any shape) holding the tensor's GGUF bytes, on any
    device. ``qtype``: an int type id, a ``GGMLQuantizationType`` or a name.
    """
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
