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
