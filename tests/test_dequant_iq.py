"""The IQ, ternary and FP4 formats: bit-exact with gguf.quants.dequantize, with the torch
kernels and with the compiled (numba) ones."""
import gguf
import numpy as np
import pytest
import torch

import lib_gguf
from lib_gguf import dequant_numba, get_format

FORMATS = ["IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "MXFP4", "NVFP4", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S",
           "IQ1_S", "IQ1_M"]
FP16_FIELDS = {"IQ4_NL": [0], "IQ4_XS": [0], "TQ1_0": [52], "TQ2_0": [64], "IQ2_XXS": [0], "IQ2_XS": [0],
               "IQ2_S": [0], "IQ3_XXS": [0], "IQ3_S": [0], "IQ1_S": [0]}
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
    if name == "IQ1_M":
        b[:, 55] &= 0xBF  # the fp16 scale's top nibble sits in byte 55: keep it finite
        b[:, 32:48] |= 0x88  # delta sign bits set: see test_iq1_m_delta_signs_follow_ggml
    return b


def _check(name, raw):
    f = get_format(name)
    ref = gguf.quants.dequantize(raw.reshape(-1), gguf.GGMLQuantizationType[name]).astype(np.float32)
    got = lib_gguf.dequantize(torch.from_numpy(raw.copy()), name, (raw.shape[0] * f.block_size,), torch.float32)
    assert torch.equal(got, torch.from_numpy(ref.reshape(-1))), name
    half = lib_gguf.dequantize(torch.from_numpy(raw.copy()), name, (raw.shape[0] * f.block_size,), torch.float16)
    assert torch.equal(half, got.to(torch.float16))


def _skip_without_kernel(name, backend):
    if backend == "numba" and not dequant_numba.has_kernel(get_format(name).type_id):
        pytest.skip(f"no compiled dequantizer for {name}: the torch one runs")


@pytest.mark.parametrize("name", FORMATS)
def test_random_bytes_match_gguf(name, backend):
    _skip_without_kernel(name, backend)
    if not _gguf_has(name):
        pytest.skip(f"this gguf ({getattr(gguf, '__version__', 'old')}) has no {name} dequantizer to compare with")
    _check(name, _random_blocks(name))


ORACLE_FORMATS = ["IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "IQ3_XXS", "IQ3_S", "IQ2_S"]


@pytest.mark.parametrize("name", ORACLE_FORMATS)
def test_ggml_made_blocks_match_gguf(oracle, name, backend):
    _skip_without_kernel(name, backend)
    if not _gguf_has(name):
        pytest.skip(f"this gguf has no {name} dequantizer to compare with")
    for kind in KINDS:
        _check(name, oracle[f"{kind}.{name}"].reshape(-1, get_format(name).type_size))


@pytest.mark.skipif(not dequant_numba.available(), reason="numba is not installed")
@pytest.mark.parametrize("name", [n for n in FORMATS if n not in ("IQ4_NL", "IQ4_XS")])
def test_compiled_and_torch_kernels_agree_on_any_bytes(name):
    """Every byte pattern, non-finite scales included: the same values (NaN where the
    torch kernel gives NaN), in float32 and float16, across several parallel chunks."""
    from lib_gguf import backend as bk

    f = get_format(name)
    raw = torch.from_numpy(np.random.default_rng(7).integers(0, 256, (1500, f.type_size), dtype=np.uint8))
    shape = (3, 1500 * f.block_size // 3)
    assert dequant_numba.has_kernel(f.type_id)
    for dtype in (torch.float32, torch.float16):
        old = bk.set_backend("torch")
        try:
            want = lib_gguf.dequantize(raw, name, shape, dtype)
            bk.set_backend("numba")
            got = lib_gguf.dequantize(raw, name, shape, dtype)
        finally:
            bk.set_backend(old)
        assert got.shape == want.shape and got.dtype == dtype
        nan = want.isnan()
        assert torch.equal(got.isnan(), nan)
        assert torch.equal(got[~nan], want[~nan])


@pytest.mark.skipif(not dequant_numba.available(), reason="numba is not installed")
@pytest.mark.parametrize("name", ["MXFP4", "NVFP4"])
def test_compiled_fp4_scales_equal_torch_for_every_scale_byte(name):
    """The compiled FP4 kernels read their scales from 256-entry tables: every byte,
    subnormal, NaN-code and extreme ones included, gives the torch kernel's values."""
    from lib_gguf import backend as bk

    f = get_format(name)
    raw = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (256, f.type_size), dtype=np.uint8))
    if name == "MXFP4":
        raw[:, 0] = torch.arange(256, dtype=torch.uint8)
    else:
        raw[:, :4] = torch.arange(256, dtype=torch.uint8)[:, None]
    shape = (256, f.block_size)
    old = bk.set_backend("torch")
    try:
        want = lib_gguf.dequantize(raw, name, shape, torch.float32)
        bk.set_backend("numba")
        got = lib_gguf.dequantize(raw, name, shape, torch.float32)
    finally:
        bk.set_backend(old)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got[~want.isnan()], want[~want.isnan()])


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


def test_iq1_m_delta_signs_follow_ggml():
    """ggml: bit 3 of each qh nibble set means delta -1/8, clear means +1/8."""
    raw = _random_blocks("IQ1_M", 4, seed=5)
    set_bits = lib_gguf.dequantize(torch.from_numpy(raw.copy()), "IQ1_M", (1024,), torch.float32)
    raw[:, 32:48] &= 0x77
    clear = lib_gguf.dequantize(torch.from_numpy(raw.copy()), "IQ1_M", (1024,), torch.float32)
    from lib_gguf.grids import grid
    # same grid points and scales, delta flipped: the difference is 2 * 1/8 * dl everywhere
    diff = (clear - set_bits).reshape(4, 16, 16)
    assert torch.all(diff.reshape(4, 16, 16).std(dim=-1) < 1e-3 * diff.abs().amax().clamp(min=1e-30))
    assert torch.all(diff.reshape(4, 16, 16).mean(dim=-1) * torch.sign(diff.reshape(4, 16, 16)[..., 0]) >= 0)


@pytest.mark.parametrize("name", ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M"])
def test_grids_equal_gguf_py_grids(name):
    """Every entry of our compact grids equals gguf-py's lattice (all entries, not only those random bytes hit)."""
    from lib_gguf.grids import grid

    cls = getattr(gguf.quants, name, None)
    if cls is None:
        pytest.skip(f"this gguf has no {name} grid to compare with")
    cls.init_grid()
    ours = grid(name)
    ref = torch.from_numpy(np.asarray(cls.grid, dtype=np.float32).reshape(ours.shape))
    assert torch.equal(ours, ref)


def test_ksigns_equal_gguf_py():
    from lib_gguf.grids import ksigns

    ks = np.frombuffer(bytes(gguf.quants.IQ2_XXS.ksigns), dtype=np.uint8)
    bits = ((ks[:, None] >> np.arange(8)) & 1).astype(np.float32)
    assert torch.equal(ksigns(), torch.from_numpy(1 - 2 * bits))


def test_compiled_dequantizer_failure_falls_back_to_torch(monkeypatch, caplog):
    import logging

    from lib_gguf import backend as bk

    raw = torch.from_numpy(_random_blocks("IQ3_S", 16))
    old = bk.set_backend("torch")
    want = lib_gguf.dequantize(raw, "IQ3_S", (16 * 256,), torch.float16)
    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise RuntimeError("LLVM could not compile")

    monkeypatch.setattr(dequant_numba, "has_kernel", lambda type_id: True)
    monkeypatch.setattr(dequant_numba, "run", broken)
    monkeypatch.setattr(bk, "_failed", set())
    try:
        bk.set_backend("auto")
        with caplog.at_level(logging.WARNING, logger="lib_gguf.backend"):
            for _ in range(2):
                assert torch.equal(lib_gguf.dequantize(raw, "IQ3_S", (16 * 256,), torch.float16), want)
        assert len(calls) == 1 and "IQ3_S" in caplog.text
        # bfloat16 output and the torch choice never reach the compiled kernels
        bk.set_backend("numba")
        bk._failed.clear()
        lib_gguf.dequantize(raw, "IQ3_S", (16 * 256,), torch.bfloat16)
        assert len(calls) == 1
        with pytest.raises(RuntimeError, match="LLVM"):
            lib_gguf.dequantize(raw, "IQ3_S", (16 * 256,), torch.float16)
    finally:
        bk.set_backend(old)


@pytest.mark.skipif(not dequant_numba.available(), reason="numba is not installed")
def test_compiled_type_list_matches_the_compiled_kernels():
    from lib_gguf import dequant

    assert set(dequant_numba._kernels()) == set(dequant.COMPILED_TYPES)


_NO_NUMBA_SCRIPT = """
import os, sys, torch
sys.path.insert(0, sys.argv[1])
import lib_gguf
lib_gguf.dequantize(torch.zeros(4 * 144, dtype=torch.uint8), "Q4_K", (4, 256))   # no compiled kernel
lib_gguf.quantize(torch.randn(2, 256), "F16")                                    # a plain type
print("after K-quant", "numba" in sys.modules)
from lib_gguf import backend; backend.set_backend("torch")
lib_gguf.dequantize(torch.zeros(4 * 110, dtype=torch.uint8), "IQ3_S", (4, 256))
lib_gguf.quantize(torch.randn(2, 256), "Q4_K")
print("after torch choice", "numba" in sys.modules)
"""


def test_numba_is_imported_only_when_a_compiled_kernel_may_run():
    """A Q4_K model, or the torch choice, never pays for importing numba."""
    import subprocess
    import sys
    from pathlib import Path

    r = subprocess.run([sys.executable, "-c", _NO_NUMBA_SCRIPT, str(Path(__file__).resolve().parents[1])],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "after K-quant False" in r.stdout and "after torch choice False" in r.stdout, r.stdout
