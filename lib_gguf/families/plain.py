"""Plain element types: F32, F16, BF16, F64 and the integers I8, I16, I32, I64.

No blocks and no scales: a weight is stored as its torch dtype
(:attr:`~lib_gguf.formats.GGMLFormat.torch_dtype`). Dequantizing is a view and a
cast; quantizing a cast into the float types (the integer types are only read).
"""
from __future__ import annotations

import torch

from ..formats import FORMATS, register


def _viewer(src: torch.dtype):
    def dequantize(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return blocks.contiguous().view(src).to(dtype)

    return dequantize


def _caster(dst: torch.dtype):
    def quantize(values: torch.Tensor) -> torch.Tensor:
        out = values.to(dst).contiguous()
        # the row width spelled out: -1 cannot be inferred for a weight with no rows
        return out.view(torch.uint8).reshape(values.shape[0], values.shape[1:].numel() * out.element_size())

    return quantize


for _fmt in FORMATS.values():
    if _fmt.torch_dtype is not None:
        register(_fmt.type_id, dequantize=_viewer(_fmt.torch_dtype),
                 quantize=_caster(_fmt.torch_dtype) if _fmt.is_float else None)
