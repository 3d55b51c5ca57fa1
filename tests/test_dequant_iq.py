"""The IQ, ternary and FP4 formats: bit-exact with gguf.quants.dequantize, with the torch
kernels and with the compiled (numba) ones."""
import gguf
import numpy as np
import pytest
import torch

import lib_gguf
from lib_gguf import get_format, numba_kernels
from lib_gguf.families import lattice, lattice_grids
from lib_gguf.formats import FORMATS as ALL

FORMATS = sorted(f.name for f in ALL.values() if f.family in ("iq", "ternary", "fp4") and f.can_dequantize)
COMPILED = sorted(f.name for f in ALL.values() if f.kernels.numba_dequantize)
KINDS = ["normal", "weights", "laplace_outliers", "positive", "negative", "sparse_zero_const_rows", "tiny", "huge",
         "integers"]


def _gguf_has(name):
    return hasattr(gguf.GGMLQuantizationType, name) and hasattr(gguf.quants, name)


def _random_blocks(name, n=600, seed=0):
    f = get_format(name)
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, size=(n, f.type_size), dtype=np.uint8)
    for field in f.layout.float_fields():  # finite fp16 scales: clear the top exponent bit
        b[:, field.offset + 1] &= 0xBF
    if name == "NVFP4":
        b[:, f.layout.d.slice] &= 0x7F  # unsigned E4M3 scales
    if name == "IQ1_M":
        b[:, f.layout.scales.end - 1] &= 0xBF  # the fp16 scale's top nibble is the last byte's: keep it finite
    return b


def _check(name, raw):
    f = get_format(name)
    ref = gguf.quants.dequantize(raw.reshape(-1), gguf.GGMLQuantizationType[name]).astype(np.float32)
    got = lib_gguf.dequantize(torch.from_numpy(raw.copy()), name, (raw.shape[0] * f.block_size,), torch.float32)
    assert torch.equal(got, torch.from_numpy(ref.reshape(-1))), name
    half = lib_gguf.dequantize(torch.from_numpy(raw.copy()), name, (raw.shape[0] * f.block_size,), torch.float16)
    assert torch.equal(half, got.to(torch.float16))


@pytest.mark.parametrize("name", FORMATS)
def test_random_bytes_match_gguf(name, backend):
    if not _gguf_has(name):
        pytest.skip(f"this gguf ({getattr(gguf, '__version__', 'old')}) has no {name} dequantizer to compare with")
    _check(name, _random_blocks(name))


ORACLE_FORMATS = ["IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "IQ3_XXS", "IQ3_S", "IQ2_S"]


@pytest.mark.parametrize("name", ORACLE_FORMATS)
def test_ggml_made_blocks_match_gguf(oracle, name, backend):
    if not _gguf_has(name):
        pytest.skip(f"this gguf has no {name} dequantizer to compare with")
    for kind in KINDS:
        _check(name, oracle[f"{kind}.{name}"].reshape(-1, get_format(name).type_size))


@pytest.mark.parametrize("name", COMPILED)
def test_compiled_and_torch_kernels_agree_on_any_bytes(name):
    """Every byte pattern, non-finite scales included: the same values (NaN where the
    torch kernel gives NaN), in float32 and float16, across several parallel chunks."""
    from lib_gguf import backend as bk

    f = get_format(name)
    raw = torch.from_numpy(np.random.default_rng(7).integers(0, 256, (1500, f.type_size), dtype=np.uint8))
    shape = (3, 1500 * f.block_size // 3)
    assert numba_kernels.dequantizer(f.type_id) is not None
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


def test_iq1_m_delta_signs_follow_ggml(backend):
    """ggml: bit 3 of each qh nibble set means the group's delta is -1/8, clear +1/8;
    gguf-py reads it the same way. Random bytes, both states in every block."""
    if not _gguf_has("IQ1_M"):
        pytest.skip("this gguf has no IQ1_M dequantizer to compare with")
    raw = _random_blocks("IQ1_M", 64, seed=5)
    nib = np.stack([raw[:, lattice.IQ1_M.qh.slice] & 0x0F, raw[:, lattice.IQ1_M.qh.slice] >> 4], -1)
    minus = (nib & 8) != 0
    assert minus.any(axis=(1, 2)).all() and (~minus).any(axis=(1, 2)).all()
    _check("IQ1_M", raw)


@pytest.mark.parametrize("name", sorted(lattice_grids.GRIDS))
def test_grids_equal_gguf_py_grids(name):
    """Every entry of our compact grids equals gguf-py's lattice (all entries, not only those random bytes hit)."""
    grid = lattice_grids.grid
    cls = getattr(gguf.quants, name, None)
    if cls is None:
        pytest.skip(f"this gguf has no {name} grid to compare with")
    cls.init_grid()
    ours = grid(name)
    ref = torch.from_numpy(np.asarray(cls.grid, dtype=np.float32).reshape(ours.shape))
    assert torch.equal(ours, ref)


def test_ksigns_equal_gguf_py():
    ksigns = lattice_grids.ksigns

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
        raise numba_kernels.COMPILE_ERRORS[0]("LLVM could not compile")

    monkeypatch.setitem(numba_kernels.DEQUANTIZERS, get_format("IQ3_S").type_id, broken)
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
        with pytest.raises(numba_kernels.COMPILE_ERRORS[0], match="LLVM"):
            lib_gguf.dequantize(raw, "IQ3_S", (16 * 256,), torch.float16)
    finally:
        bk.set_backend(old)


def test_compiled_kernel_tables_match_the_registry():
    """What the families say they have (``numba=`` in formats.register) is what the
    compiled tables hold, both ways."""
    from lib_gguf import dequant

    assert set(numba_kernels.DEQUANTIZERS) == set(dequant.COMPILED_TYPES)
    assert set(numba_kernels.DEQUANTIZERS) == {t for t, f in ALL.items() if f.kernels.numba_dequantize}
    assert set(numba_kernels.QUANTIZERS) == {t for t, f in ALL.items() if f.kernels.numba_quantize}
    assert all(ALL[t].can_quantize for t in numba_kernels.QUANTIZERS)


_NO_NUMBA_SCRIPT = """
import os, sys, torch
sys.path.insert(0, sys.argv[1])
import lib_gguf
lib_gguf.dequantize(torch.zeros(4 * 292, dtype=torch.uint8), "Q8_K", (4, 256))   # no compiled kernel
lib_gguf.quantize(torch.randn(2, 256), "F16")                                    # a plain type
print("after Q8_K", "numba" in sys.modules)
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
    assert "after Q8_K False" in r.stdout and "after torch choice False" in r.stdout, r.stdout
