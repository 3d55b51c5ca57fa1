"""Dequantization: the public entry point, on any device.

``dequantize`` validates the bytes and runs the format's kernel: a compiled one
where it may run (Triton for CUDA tensors; numba for CPU tensors of the formats
whose families have one), else the family's torch kernel, which is the reference
(:mod:`lib_gguf.families`). Every kernel takes ``(n_blocks, type_size)`` uint8
blocks and returns ``(n_blocks, block_size)`` values; in float32 the result equals
``gguf.quants.dequantize`` bit for bit.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

from .backend import get_backend, try_compiled
from .families import FAMILIES  # noqa: F401  (every format's kernels, registered)
from .errors import GGUFFormatError
from .formats import FORMATS, dequantizer_for, get_format, set_entry_point

# The formats with a compiled (numba) dequantizer, as their families registered them.
# Checked here, so that a model without these formats never imports numba.
COMPILED_TYPES = frozenset(t for t, f in FORMATS.items() if f.kernels.numba_dequantize)


def _compiled(fmt, blocks: torch.Tensor, dtype: torch.dtype):
    """The compiled kernel's values, or None when the torch kernel should run."""
    if blocks.device.type == "cuda" or (get_backend() == "triton" and blocks.device.type == "cpu"
                                        and _triton_interpreting()):
        return _triton(fmt, blocks, dtype)
    if (fmt.type_id not in COMPILED_TYPES or blocks.device.type != "cpu"
            or dtype not in (torch.float16, torch.float32)):
        return None
    return try_compiled("dequantizer", fmt, "numba", lambda: _numba(fmt), lambda fn: fn(blocks, fmt.block_size, dtype))


def _numba(fmt):
    from .numba_kernels import find_dequantizer

    return find_dequantizer(fmt.type_id)


# CUDA tensors of every quantized format: the Triton kernels (lib_gguf.dequant_triton)
# when triton imports, through the same backend choice and fallback (compile errors
# only) as the numba ones.
def _triton(fmt, blocks: torch.Tensor, dtype: torch.dtype):
    if not fmt.is_quantized or dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return None
    return try_compiled("dequantizer", fmt, "triton", lambda: _triton_kernel(fmt),
                        lambda run: run(fmt.type_id, blocks, fmt.block_size, dtype), required=True)


def _triton_kernel(fmt):
    from .dequant_triton import find

    return find(fmt.type_id)


def _triton_interpreting() -> bool:  # Triton's CPU interpreter: CPU tensors may take the Triton kernels (tests)
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


set_entry_point("dequantize", dequantize)
