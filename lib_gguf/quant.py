"""Quantization: the public entry point, on any device.

``quantize`` checks the shape and runs the format's quantizer: the compiled (numba)
one for CPU float32 values where the family has one, else the family's torch
kernel, which is the reference (:mod:`lib_gguf.families`). Kernels take float32
``(n_blocks, block_size)`` values and return ``(n_blocks, type_size)`` uint8
blocks, byte-identical to ggml's own quantizer (the no-importance-matrix path of
``ggml_quantize_chunk``).
"""
from __future__ import annotations

import torch

from .families import FAMILIES  # noqa: F401  (every format's kernels, registered)
from .backend import get_backend, set_backend, try_compiled  # noqa: F401  (lib_gguf.quant.set_backend)
from .errors import GGUFFormatError
from .formats import get_format, quantizer_for, set_entry_point

# plain types whose values float32 does not hold exactly: quantized from the input's own dtype
_WIDE = (torch.float64, torch.int8, torch.int16, torch.int32, torch.int64)


def _compiled(fmt, blocks: torch.Tensor):
    """The numba kernel's bytes, or None when the torch kernel should run."""
    if not fmt.is_quantized or blocks.device.type != "cpu" or blocks.dtype != torch.float32:
        return None
    return try_compiled("quantizer", fmt, "numba", lambda: _numba(fmt), lambda fn: fn(blocks), required=True)


def _numba(fmt):
    from .numba_kernels import find_quantizer

    return find_quantizer(fmt.type_id)


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
    if x.dtype != torch.float32 and fmt.torch_dtype not in _WIDE:
        x = x.to(torch.float32)
    lead = tuple(x.shape[:-1])
    blocks = x.reshape(-1, fmt.block_size)
    out = _compiled(fmt, blocks)
    if out is None:
        out = fn(blocks)
    return out.reshape(*lead, n_per_row // fmt.block_size * fmt.type_size)


set_entry_point("quantize", quantize)
