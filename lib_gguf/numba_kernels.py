"""The compiled (numba) CPU kernels of every family, in one table: imported by
:mod:`lib_gguf.dequant` and :mod:`lib_gguf.quant` only when one may run, so that a
model without such formats never imports numba. Which formats have one is what the
families registered (``numba=`` in :func:`lib_gguf.formats.register`); the tables
here must match it (a test checks)."""
from __future__ import annotations

from .families import (fp4_numba, iq4_dequant_numba, iq4_numba, kquant_dequant_numba, kquant_numba, kquant_q3_numba,
                       lattice_numba, legacy_dequant_numba, legacy_numba, ternary_numba)
from .numba_support import COMPILE_ERRORS, available  # noqa: F401  (the backend's protocol)

_MODULES = (legacy_numba, legacy_dequant_numba, kquant_numba, kquant_q3_numba, kquant_dequant_numba, iq4_numba,
            iq4_dequant_numba, lattice_numba, ternary_numba, fp4_numba)
DEQUANTIZERS = {int(t): fn for m in _MODULES for t, fn in m.DEQUANTIZERS.items()}
QUANTIZERS = {int(t): fn for m in _MODULES for t, fn in m.QUANTIZERS.items()}


def dequantizer(type_id: int):
    """``fn(blocks, block_size, dtype)`` for CPU uint8 blocks, float16 or float32 out; None without one."""
    return DEQUANTIZERS.get(int(type_id)) if available() else None


def quantizer(type_id: int):
    """``fn(values) -> blocks`` for CPU float32 values; None without one."""
    return QUANTIZERS.get(int(type_id)) if available() else None


def find_dequantizer(type_id: int):
    """What :func:`lib_gguf.backend.try_compiled` asks: (kernel or None, available, compile errors)."""
    return dequantizer(type_id), available(), COMPILE_ERRORS


def find_quantizer(type_id: int):
    return quantizer(type_id), available(), COMPILE_ERRORS
