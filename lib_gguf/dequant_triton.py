"""Triton dequantizers for CUDA tensors: the value functions of every family, in one
table, and the whole-tensor kernel.

Each format is one ``@triton.jit`` function ``value(src, off, j, mask, tab)`` in its
family's ``families/*_triton.py``: the float32 value of weight ``j`` (0 <= j < block
size) of the block whose first byte is at byte offset ``off`` of ``src`` (uint8),
``tab`` its lookup table. :func:`run` (the whole tensor) and the fused
dequantize-matmul of :mod:`lib_gguf.linear_triton` (one weight tile at a time, in
registers) both call them.

Exactness: every value is computed in float32 with the same operations, in the same
order, as the family's torch kernel (the reference: the float16 scales widened
exactly, integer codes converted exactly, then the same float32 multiplications and
additions), and kernels are compiled without multiply-add contraction
(``enable_fp_fusion=False``): float32 output equals the torch kernels bit for bit.
Float16 output is the float32 value rounded once to nearest even; bfloat16 output is
rounded to nearest even with integer operations (the same bits on a GPU and under
Triton's CPU interpreter, whose own bfloat16 cast truncates): both equal the torch
kernels' float32 result cast to that dtype. NaN payloads are not guaranteed (a NaN
stays a NaN).
"""
from __future__ import annotations

from typing import Dict

import torch

from .families import fp4_triton, iq4_triton, kquant_triton, lattice_triton, legacy_triton, ternary_triton
from .formats import get_format
from .triton_support import COMPILE_ERRORS, interpreting, on_device, triton  # noqa: F401

# type id -> (value function, table factory or None, block size, type size)
_SPECS: Dict[int, tuple] = {
    int(t): (fn, table, get_format(t).block_size, get_format(t).type_size)
    for m in (legacy_triton, kquant_triton, iq4_triton, lattice_triton, ternary_triton, fp4_triton)
    for t, (fn, table) in m.VALUES.items()
}


def spec(type_id: int):
    return _SPECS.get(int(type_id))


def available() -> bool:
    return triton is not None


def has_kernel(type_id: int) -> bool:
    return triton is not None and spec(type_id) is not None


def find(type_id: int):
    """What :func:`lib_gguf.backend.try_compiled` asks: (:func:`run` or None, available, compile errors)."""
    return (run if has_kernel(type_id) else None), available(), COMPILE_ERRORS


_DUMMY: dict = {}
_TABLES: dict = {}


def table_for(type_id: int, device) -> torch.Tensor:
    """The format's lookup table on ``device`` (a one-element dummy when it has none)."""
    fn, table, _bs, _ts = spec(type_id)
    key = (int(type_id), str(device))
    t = _TABLES.get(key)
    if t is None:
        t = table(device) if table is not None else _DUMMY.get(str(device))
        if t is None:
            t = _DUMMY[str(device)] = torch.zeros(1, dtype=torch.float32, device=device)
        _TABLES[key] = t
    return t


_OUT_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

if triton is not None:
    import triton.language as tl

    from .triton_support import bf16_bits

    @triton.jit
    def _dequant_kernel(src, dst, n_blocks, tab, VALUE: tl.constexpr, BS: tl.constexpr, TS: tl.constexpr,
                        BP: tl.constexpr, OUT: tl.constexpr):
        """Blocks ``BP * pid .. BP * pid + BP - 1``: ``dst[b * BS + j] = value(b, j)``."""
        b = tl.program_id(0).to(tl.int64) * BP + tl.arange(0, BP)[:, None]
        j = tl.arange(0, BS)[None, :]
        mask = b < n_blocks
        v = VALUE(src, b * TS, j, mask, tab)
        o = dst + b * BS + j
        if OUT == 0:
            tl.store(o, v, mask=mask)
        elif OUT == 1:
            tl.store(o, v.to(tl.float16), mask=mask)
        else:
            tl.store(o, bf16_bits(v), mask=mask)


# weights a program of the whole-tensor kernel writes
_WEIGHTS_PER_PROGRAM = 4096


def run(type_id: int, blocks: torch.Tensor, block_size: int, dtype: torch.dtype) -> torch.Tensor:
    """``(n_blocks, block_size)`` values of ``dtype`` (float32, float16 or bfloat16)
    from ``(n_blocks, type_size)`` uint8 blocks on a CUDA device (or the CPU, under
    the interpreter)."""
    fn, _table, bs, ts = spec(type_id)
    if bs != block_size or blocks.dim() != 2 or blocks.shape[1] != ts or blocks.dtype != torch.uint8:
        raise ValueError(f"expected uint8 blocks of shape (n, {ts}), got {blocks.dtype} {tuple(blocks.shape)}")
    kind = _OUT_KIND[dtype]
    nb = blocks.shape[0]
    out = torch.empty((nb, bs), dtype=dtype, device=blocks.device)
    if nb == 0:
        return out
    blocks = blocks.contiguous()
    bp = max(1, _WEIGHTS_PER_PROGRAM // bs)
    dst = out.view(torch.int16) if kind == 2 else out
    grid = (triton.cdiv(nb, bp),)
    with on_device(blocks):
        _dequant_kernel[grid](blocks, dst, nb, table_for(type_id, blocks.device), VALUE=fn, BS=bs, TS=ts, BP=bp,
                              OUT=kind, enable_fp_fusion=False)
    return out
