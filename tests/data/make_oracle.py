"""Makes tests/data/ggml_quants.npz: ggml's own quantized bytes, the oracle the exactness tests compare with.

    pip install ggml-python==0.0.45
    python tests/data/make_oracle.py [OUT.npz]      # default: tests/data/ggml_quants.npz

For each input kind below, 16 rows of 1024 float32 values (seeded: the same inputs on every run) are
quantized by ggml's C quantizer (``ggml_quantize_chunk``, no importance matrix, as ``llama-quantize``
does without ``--imatrix``) into every format of FORMATS. The file holds, per kind, ``KIND.x`` (the
inputs) and ``KIND.FORMAT`` (uint8, one row of blocks per input row), plus ``ggml_version``.
Running it again gives the same arrays, byte for byte (``--check OLD.npz`` compares every array).
"""
from __future__ import annotations

import argparse
import ctypes
import sys
import zlib
from importlib.metadata import version
from pathlib import Path

import numpy as np

ROWS, COLS = 16, 1024
GGML_PYTHON = "0.0.45"
FORMATS = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
           "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "IQ3_XXS", "IQ3_S", "IQ2_S", "IQ1_M"]


def _normal(rng):
    return rng.standard_normal((ROWS, COLS))


def _laplace_outliers(rng):
    x = rng.laplace(0.0, 1.0, (ROWS, COLS))
    hit = rng.random((ROWS, COLS)) < 1e-3  # about one value in a thousand, 20-100x larger
    x[hit] = np.sign(x[hit]) * rng.uniform(20.0, 100.0, int(hit.sum()))
    return x


def _sparse_zero_const_rows(rng):
    x = rng.standard_normal((ROWS, COLS)) * (rng.random((ROWS, COLS)) < 0.05)
    x[0] = 0.0  # an all-zero row: every scale is 0
    x[1] = 1.25  # a constant row: max == min in every block
    return x


# kind -> inputs; each kind has its own generator, seeded by the crc32 of its name
KINDS = {
    "normal": _normal,
    "weights": lambda rng: rng.standard_normal((ROWS, COLS)) * 0.02,  # a trained layer's scale
    "laplace_outliers": _laplace_outliers,
    "positive": lambda rng: 0.5 + np.abs(rng.standard_normal((ROWS, COLS))),
    "negative": lambda rng: -0.5 - np.abs(rng.standard_normal((ROWS, COLS))),
    "sparse_zero_const_rows": _sparse_zero_const_rows,
    "tiny": lambda rng: rng.standard_normal((ROWS, COLS)) * 1e-7,  # fp16 scales underflow
    "huge": lambda rng: rng.standard_normal((ROWS, COLS)) * 3000.0,
    "integers": lambda rng: rng.integers(-8, 8, (ROWS, COLS)).astype(np.float64),  # exact ties
}


def inputs(kind: str) -> np.ndarray:
    return np.ascontiguousarray(KINDS[kind](np.random.default_rng(zlib.crc32(kind.encode()))), dtype=np.float32)


def quantize(ggml, x: np.ndarray, fmt: str) -> np.ndarray:
    """ggml's bytes for x (rows, n) in fmt: uint8 (rows, bytes per row)."""
    t = getattr(ggml, f"GGML_TYPE_{fmt}")
    rows, n = x.shape
    out = np.zeros((rows, int(ggml.ggml_row_size(t, n))), dtype=np.uint8)
    ggml.ggml_quantize_init(t)
    src = x.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    written = ggml.ggml_quantize_chunk(t, src, out.ctypes.data_as(ctypes.c_void_p), 0, rows, n, None)
    if written != out.nbytes:
        raise RuntimeError(f"ggml wrote {written} bytes for {fmt}, expected {out.nbytes}")
    return out


def make() -> dict:
    import ggml

    have = version("ggml-python")
    if have != GGML_PYTHON:
        raise SystemExit(f"ggml-python {have} is installed; the oracle is made with {GGML_PYTHON}")
    arrays = {"ggml_version": np.array(f"ggml-python {have}")}
    for kind in KINDS:
        x = inputs(kind)
        arrays[f"{kind}.x"] = x
        for fmt in FORMATS:
            arrays[f"{kind}.{fmt}"] = quantize(ggml, x, fmt)
    return arrays


def differences(a: dict, b: dict) -> list:
    """The keys whose arrays are not identical (dtype, shape and every byte)."""
    bad = sorted(set(a) ^ set(b))
    for k in sorted(set(a) & set(b)):
        x, y = np.asarray(a[k]), np.asarray(b[k])
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            bad.append(k)
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", nargs="?", default=str(Path(__file__).with_name("ggml_quants.npz")))
    ap.add_argument("--check", metavar="OLD.npz", help="also compare every array with this oracle")
    args = ap.parse_args(argv)
    arrays = make()
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out}: {len(arrays)} arrays, {len(KINDS)} kinds x {len(FORMATS)} formats")
    if args.check:
        with np.load(args.check, allow_pickle=False) as old:
            bad = differences(arrays, dict(old))
        if bad:
            print(f"{len(bad)} arrays differ from {args.check}: {', '.join(bad[:10])}")
            return 1
        print(f"every array equals {args.check}'s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
