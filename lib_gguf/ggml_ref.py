"""ggml's own C quantizer, when the optional ``ggml-python`` package is installed.

Used by the tests (a live byte comparison beyond the stored oracle) and by
``bench/quantize.py`` (ggml's speed beside ours). Nothing else depends on it:
``available()`` is False without the package, and the extension never needs it.
"""
from __future__ import annotations

import ctypes
import time

import numpy as np

from .formats import get_format

try:  # pragma: no cover - depends on the environment
    import ggml as _ggml
except Exception:  # ImportError, or a broken shared library
    _ggml = None


def available() -> bool:
    return _ggml is not None


def version() -> str:
    if _ggml is None:
        return "not installed"
    try:
        from importlib.metadata import version as v

        return f"ggml-python {v('ggml-python')}"
    except Exception:
        return "ggml-python"


def quantize(x: np.ndarray, qtype) -> np.ndarray:
    """ggml's bytes for ``x`` (float32, (rows, n)) in ``qtype``, no importance matrix,
    single thread: uint8 (rows, bytes per row)."""
    if _ggml is None:
        raise RuntimeError("ggml-python is not installed")
    fmt = get_format(qtype)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    rows, n = x.shape
    row_bytes = n // fmt.block_size * fmt.type_size
    out = np.zeros((rows, row_bytes), dtype=np.uint8)
    _ggml.ggml_quantize_init(fmt.type_id)
    src = x.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    written = _ggml.ggml_quantize_chunk(fmt.type_id, src, out.ctypes.data_as(ctypes.c_void_p), 0, rows, n, None)
    if written != out.nbytes:
        raise RuntimeError(f"ggml wrote {written} bytes for {fmt.name}, expected {out.nbytes}")
    return out


def rate(x: np.ndarray, qtype, repeat: int = 2) -> float:
    """Mweights/s of ggml's quantizer on ``x`` (best of ``repeat``)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        quantize(x, qtype)
        best = min(best, time.perf_counter() - t)
    return x.size / best / 1e6
