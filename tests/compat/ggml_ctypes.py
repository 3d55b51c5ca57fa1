"""ggml's own quantize / dequantize through ctypes, from a libggml-base built from ggml's sources.

For the local checks only (never in CI): ``GGML_LIB=/path/to/libggml-base.so``. Build it with
``cmake -B build -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=ON && cmake --build build --target ggml-base``
in a checkout of https://github.com/ggml-org/ggml (Q1_0 needs a 2026 checkout).
"""
from __future__ import annotations

import ctypes
import os
from typing import Optional

import numpy as np


class _Traits(ctypes.Structure):
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


class GGML:
    def __init__(self, path: str):
        self.lib = ctypes.CDLL(path)
        self.lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
        self.lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
        self.lib.ggml_quantize_chunk.restype = ctypes.c_size_t
        self.lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                                 ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]

    def traits(self, type_id: int) -> _Traits:
        return self.lib.ggml_get_type_traits(type_id).contents

    def name(self, type_id: int) -> str:
        return self.traits(type_id).type_name.decode()

    def quantize(self, type_id: int, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows, n_per_row = x.shape
        t = self.traits(type_id)
        out = np.zeros(rows * n_per_row // t.blck_size * t.type_size, dtype=np.uint8)
        self.lib.ggml_quantize_chunk(type_id, x.ctypes.data, out.ctypes.data, 0, rows, n_per_row, None)
        return out

    def dequantize(self, type_id: int, raw: np.ndarray, n: int) -> np.ndarray:
        raw = np.ascontiguousarray(raw, dtype=np.uint8)
        out = np.zeros(n, dtype=np.float32)
        fn = _TO_FLOAT(self.traits(type_id).to_float)
        fn(raw.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), n)
        return out


def load() -> Optional[GGML]:
    path = os.environ.get("GGML_LIB")
    if not path or not os.path.exists(path):
        return None
    return GGML(path)
