"""IQ4_NL, IQ4_XS, TQ1_0, TQ2_0, MXFP4, NVFP4: bit-exact with gguf.quants.dequantize."""
import gguf
import numpy as np
import pytest
import torch

import lib_gguf
from lib_gguf import get_format

FORMATS = ["IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "MXFP4", "NVFP4"]
FP16_FIELDS = {"IQ4_NL": [0], "IQ4_XS": [0], "TQ1_0": [52], "TQ2_0": [64]}
KINDS = ["normal", "weights", "laplace_outliers", "positive", "negative", "sparse_zero_const_rows", "tiny", "huge",
         "integers"]


def _gguf_has(name):
    return hasattr(gguf.GGMLQuantizationType, name) and hasattr(gguf.quants, name)


def _random_blocks(name, n=600, seed=0):
    f = get_format(name)
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, size=(n, f.type_size), dtype=np.uint8)
    for off in FP16_FIELDS.get(name, []):  # finite fp16 scales: clear the top exponent bit
        b[:, off + 1] &= 0xBF
    if name == "NVFP4":
        b[:, :4] &= 0x7F  # unsigned E4M3 scales
    return b


def _check(name, raw):
    f = get_format(name)
    ref = gguf.quants.dequantize(raw.reshape(-1), gguf.GGMLQuantizationType[name]).astype(np.float32)
    got = lib_gguf.dequantize(torch.from_numpy(raw.copy()), name, (raw.shape[0] * f.block_size,), torch.float32)
    assert torch.equal(got, torch.from_numpy(ref.reshape(-1))), name
    half = lib_gguf.dequantize(torch.from_numpy(raw.copy()), name, (raw.shape[0] * f.block_size,), torch.float16)
    assert torch.equal(half, got.to(torch.float16))


@pytest.mark.parametrize("name", FORMATS)
def test_random_bytes_match_gguf(name):
    if not _gguf_has(name):
        pytest.skip(f"this gguf ({getattr(gguf, '__version__', 'old')}) has no {name} dequantizer to compare with")
    _check(name, _random_blocks(name))


@pytest.mark.parametrize("name", [n for n in FORMATS if n not in ("MXFP4", "NVFP4")])
def test_ggml_made_blocks_match_gguf(oracle, name):
    if not _gguf_has(name):
        pytest.skip(f"this gguf has no {name} dequantizer to compare with")
    for kind in KINDS:
        _check(name, oracle[f"{kind}.{name}"].reshape(-1, get_format(name).type_size))


@pytest.mark.parametrize("name", FORMATS)
def test_runs_everywhere_with_right_shapes(name):
    f = get_format(name)
    raw = torch.from_numpy(_random_blocks(name, 8))
    out = lib_gguf.dequantize(raw, name, (2, 4 * f.block_size), torch.bfloat16)
    assert out.shape == (2, 4 * f.block_size) and out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_ternary_values_are_ternary(oracle):
    for name in ("TQ1_0", "TQ2_0"):
        raw = torch.from_numpy(oracle[f"normal.{name}"].copy())
        f = get_format(name)
        vals = lib_gguf.dequantize(raw.reshape(-1), name, (raw.numel() // f.type_size * f.block_size,), torch.float32)
        d = raw.reshape(-1, f.type_size)[:, -2:].contiguous().view(torch.float16).float()
        q = vals.reshape(-1, f.block_size) / d
        assert set(torch.unique(q[torch.isfinite(q)]).tolist()) <= {-1.0, 0.0, 1.0}
