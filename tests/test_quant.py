"""Quantizers: byte-identical to ggml's own (the no-importance-matrix path) on the oracle inputs,
with the torch kernels and with the compiled (numba) ones."""
import logging
import zlib

import numpy as np
import pytest
import torch

import lib_gguf
from lib_gguf import GGUFFormatError, get_format
from lib_gguf import backend as bk, quant, quant_numba
from lib_gguf.formats import _QUANTIZERS, _load_kernels

KINDS = ["normal", "weights", "laplace_outliers", "positive", "negative", "sparse_zero_const_rows", "tiny", "huge",
         "integers"]
_load_kernels()
ORACLE_FORMATS = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL",
                  "IQ4_XS", "TQ1_0", "TQ2_0", "IQ3_XXS", "IQ3_S", "IQ2_S", "IQ1_M"]


def _skip_without_kernel(fmt, backend):
    if backend == "numba" and not quant_numba.has_kernel(get_format(fmt).type_id):
        pytest.skip(f"no compiled kernel for {fmt}: the torch one runs")


def _scale_fields(fmt):
    """Byte offsets (within a block) of fp16 scale fields, where -0 and +0 are the same scale."""
    return {"Q4_0": [0], "Q5_0": [0], "Q8_0": [0], "Q4_1": [0, 2], "Q5_1": [0, 2], "Q4_K": [0, 2], "Q5_K": [0, 2],
            "Q2_K": [80, 82], "Q3_K": [108], "Q6_K": [208], "IQ4_NL": [0], "IQ4_XS": [0], "TQ1_0": [52],
            "TQ2_0": [64], "IQ3_XXS": [0], "IQ3_S": [0], "IQ2_S": [0]}.get(fmt, [])


def _normalise_zero_scales(blocks: np.ndarray, fmt: str) -> np.ndarray:
    b = blocks.copy()
    for off in _scale_fields(fmt):
        v = b[:, off:off + 2].copy().view(np.uint16)
        v[v == 0x8000] = 0
        b[:, off:off + 2] = v.view(np.uint8)
    return b


@pytest.mark.parametrize("fmt", ORACLE_FORMATS)
def test_byte_identical_to_ggml(oracle, fmt, backend):
    if get_format(fmt).type_id not in _QUANTIZERS:
        pytest.skip(f"no quantizer for {fmt} yet")
    _skip_without_kernel(fmt, backend)
    f = get_format(fmt)
    for kind in KINDS:
        x = torch.from_numpy(oracle[f"{kind}.x"])
        ref = oracle[f"{kind}.{fmt}"].reshape(-1, f.type_size)
        got = lib_gguf.quantize(x, fmt).numpy().reshape(-1, f.type_size)
        got, ref = _normalise_zero_scales(got, fmt), _normalise_zero_scales(ref, fmt)
        bad = np.where((got != ref).any(axis=1))[0]
        assert len(bad) == 0, f"{fmt} {kind}: {len(bad)} of {len(ref)} blocks differ, first {bad[:5]}"


@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q6_K", "IQ4_NL", "IQ4_XS",
                                 "IQ3_XXS", "IQ3_S", "IQ2_S", "IQ1_M"])
def test_round_trip_and_shapes(fmt):
    if get_format(fmt).type_id not in _QUANTIZERS:
        pytest.skip(f"no quantizer for {fmt} yet")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 512, generator=g)
    q = lib_gguf.quantize(x, fmt)
    f = get_format(fmt)
    assert q.dtype == torch.uint8 and q.shape == (3, 4, 512 // f.block_size * f.type_size)
    back = lib_gguf.dequantize(q, fmt, x.shape, torch.float32)
    rel = ((back - x).norm() / x.norm()).item()
    assert rel < {"Q8_0": 0.01, "Q6_K": 0.02, "IQ3_XXS": 0.25, "IQ3_S": 0.25, "IQ2_S": 0.35, "IQ1_M": 0.65}.get(fmt, 0.12), rel
    # half-precision inputs quantize like their float32 values
    assert torch.equal(lib_gguf.quantize(x.half(), fmt), lib_gguf.quantize(x.half().float(), fmt))


def test_rows_not_divisible_are_a_clear_error():
    with pytest.raises(GGUFFormatError) as e:
        lib_gguf.quantize(torch.randn(4, 4544 + 16), "Q8_0", name="blocks.0.mlp.weight")
    assert "blocks.0.mlp.weight" in str(e.value) and "32" in str(e.value)


def test_imatrix_formats_say_so():
    for fmt in ("IQ2_XXS", "IQ2_XS", "IQ1_S"):
        with pytest.raises(GGUFFormatError, match="importance matrix"):
            lib_gguf.quantize(torch.randn(2, 256), fmt)


def test_mxfp4_matches_gguf_reference_quantizer():
    gguf = pytest.importorskip("gguf")
    if not hasattr(gguf.GGMLQuantizationType, "MXFP4"):
        pytest.skip("this gguf has no MXFP4")
    rng = np.random.default_rng(0)
    for scale in (1e-3, 1.0, 50.0):
        x = (rng.standard_normal((32, 1024)) * scale).astype(np.float32)
        x[3] = 0
        x[5, :7] = [6, 3, 2, 1.5, -6, -3, 0.75]  # exact levels and ties
        ref = gguf.quants.quantize(x, gguf.GGMLQuantizationType.MXFP4)
        assert np.array_equal(lib_gguf.quantize(torch.from_numpy(x), "MXFP4").numpy(), ref)


def test_c_rounding_helpers():
    """torch rounds ``scalar / tensor`` and float32 ``sqrt`` differently from C; the
    helpers the quantizers use do not."""
    from lib_gguf.quant import rdiv, sqrtf

    x = torch.rand(100000, generator=torch.Generator().manual_seed(1)) * 100 + 1e-3
    xn = x.numpy()
    assert np.array_equal(rdiv(63.0, x).numpy(), np.float32(63.0) / xn)
    assert np.array_equal(sqrtf(x).numpy(), np.sqrt(xn))
    assert sqrtf(torch.tensor([46.369140625])).item() == float(np.sqrt(np.float32(46.369140625)))


@pytest.mark.parametrize("fmt", ORACLE_FORMATS + ["MXFP4"])
def test_byte_identical_to_live_ggml(fmt, backend):
    """Beyond the stored oracle: ggml's own quantizer through ggml-python, when installed,
    on rows of mixed scales, zero runs, exact ties and fp16-edge magnitudes."""
    from lib_gguf import ggml_ref

    if not ggml_ref.available():
        pytest.skip("ggml-python is not installed")
    _skip_without_kernel(fmt, backend)
    rng = np.random.default_rng(zlib.crc32(fmt.encode()))
    x = rng.standard_normal((12, 512)).astype(np.float32) * rng.lognormal(0, 2, (12, 1)).astype(np.float32)
    x[1, 40:300] = 0
    x[2] = np.round(x[2] * 2)
    x[3] *= 1e-6
    x[4] = np.abs(x[4])
    x[5] = 3.0
    x[6] *= 3e4
    x[7, ::3] = 0
    ref = ggml_ref.quantize(x, fmt)
    got = lib_gguf.quantize(torch.from_numpy(x), fmt).numpy()
    f = get_format(fmt)
    got, ref = _normalise_zero_scales(got.reshape(-1, f.type_size), fmt), \
        _normalise_zero_scales(ref.reshape(-1, f.type_size), fmt)
    bad = np.where((got != ref).any(axis=1))[0]
    assert len(bad) == 0, f"{fmt}: {len(bad)} of {len(ref)} blocks differ from ggml, first {bad[:5]}"


@pytest.mark.skipif(not quant_numba.available(), reason="numba is not installed")
@pytest.mark.parametrize("fmt", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
                                 "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "MXFP4", "IQ3_XXS", "IQ3_S", "IQ2_S", "IQ1_M"])
def test_compiled_and_torch_kernels_agree(fmt):
    """Both paths, fresh random rows in a (2, 3, n) layout, wider than one thread's share."""
    g = torch.Generator().manual_seed(zlib.crc32(fmt.encode()))
    x = torch.randn(2, 3, 2048, generator=g) * torch.rand(2, 3, 1, generator=g) * 10
    x[0, 1, :700] = 0
    assert quant_numba.has_kernel(get_format(fmt).type_id)
    old = quant.set_backend("torch")
    try:
        want = lib_gguf.quantize(x, fmt)
        quant.set_backend("numba")
        got = lib_gguf.quantize(x, fmt)
    finally:
        quant.set_backend(old)
    assert got.shape == want.shape and got.dtype == torch.uint8
    assert torch.equal(got, want)


def test_compiled_kernel_failure_falls_back_to_torch(monkeypatch, caplog):
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(3))
    old = quant.set_backend("torch")
    want = lib_gguf.quantize(x, "Q4_K")
    quant.set_backend("auto")
    calls = []

    def broken(type_id, blocks, type_size):
        calls.append(type_id)
        raise RuntimeError("LLVM could not compile")

    monkeypatch.setattr(quant_numba, "has_kernel", lambda type_id: True)
    monkeypatch.setattr(quant_numba, "run", broken)
    monkeypatch.setattr(bk, "_failed", set())
    try:
        with caplog.at_level(logging.WARNING, logger="lib_gguf.backend"):
            assert torch.equal(lib_gguf.quantize(x, "Q4_K"), want)
            assert torch.equal(lib_gguf.quantize(x, "Q4_K"), want)
        assert len(calls) == 1, "a kernel that failed once is not tried again"
        assert "Q4_K" in caplog.text and "torch" in caplog.text
        quant.set_backend("numba")  # asked for explicitly: the failure is not hidden
        bk._failed.clear()
        with pytest.raises(RuntimeError, match="LLVM"):
            lib_gguf.quantize(x, "Q4_K")
    finally:
        quant.set_backend(old)


def test_backend_choice_is_checked(monkeypatch):
    with pytest.raises(ValueError, match="auto, torch, numba"):
        quant.set_backend("fast")
    x = torch.randn(2, 256)
    old = quant.set_backend("numba")
    try:
        # plain element types never need a kernel
        assert torch.equal(lib_gguf.quantize(x, "F16").view(torch.float16), x.half())
        # a format with no compiled kernel (or no numba) is a clear error when numba is required
        monkeypatch.setattr(quant_numba, "has_kernel", lambda type_id: False)
        with pytest.raises(GGUFFormatError, match="Q4_K"):
            lib_gguf.quantize(x, "Q4_K")
    finally:
        quant.set_backend(old)


_THREADS_SCRIPT = """
import sys, threading, torch
sys.path.insert(0, sys.argv[1])
import lib_gguf
from lib_gguf import quant
g = torch.Generator().manual_seed(5)
xs = [torch.randn(64, 1024, generator=g) for _ in range(4)]
raw = torch.randint(0, 256, (256, 110), dtype=torch.uint8, generator=g)
raw[:, :2] = torch.tensor([0x00, 0x14], dtype=torch.uint8)  # a finite fp16 scale
quant.set_backend("torch")
want = [lib_gguf.quantize(x, "Q4_K") for x in xs]
want_dq = lib_gguf.dequantize(raw, "IQ3_S", (256, 256))
quant.set_backend("numba")
got = [None] * 4
got_dq = [None] * 2
def work(i):
    for _ in range(10):
        got[i] = lib_gguf.quantize(xs[i], "Q4_K")
def work_dq(i):  # dequantizing (another module's kernels) at the same time
    for _ in range(20):
        got_dq[i] = lib_gguf.dequantize(raw, "IQ3_S", (256, 256))
ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
ts += [threading.Thread(target=work_dq, args=(i,)) for i in range(2)]
[t.start() for t in ts]
[t.join() for t in ts]
import numba
same = all(torch.equal(a, b) for a, b in zip(got, want)) and all(torch.equal(d, want_dq) for d in got_dq)
print("layer", numba.threading_layer(), "same", same)
"""


@pytest.mark.skipif(not quant_numba.available(), reason="numba is not installed")
def test_compiled_kernels_from_several_threads():
    """A web UI may convert in two threads at once, or load a model while baking; numba's
    workqueue threading layer (the one every install has) aborts the process on
    concurrent parallel launches unless every compiled kernel, quantizer or
    dequantizer, takes the same lock."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue")
    r = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT, str(Path(__file__).resolve().parents[1])],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and "layer workqueue same True" in r.stdout, r.stdout + r.stderr[-2000:]
