"""Quantizers: byte-identical to ggml's own (the no-importance-matrix path) on the oracle inputs,
with the torch kernels and with the compiled (numba) ones."""
import logging
import zlib

import numpy as np
import pytest
import torch

import lib_gguf
from lib_gguf import GGUFFormatError, get_format
from lib_gguf import backend as bk, numba_kernels, quant
from lib_gguf.formats import FORMATS

KINDS = ["normal", "weights", "laplace_outliers", "positive", "negative", "sparse_zero_const_rows", "tiny", "huge",
         "integers"]
# every format we quantize (the registry's list); ggml's oracle holds bytes for all but MXFP4, whose
# reference is gguf-py's quantizer (test_mxfp4_matches_gguf_py)
QUANTIZED = sorted(f.name for f in FORMATS.values() if f.is_quantized and f.can_quantize)
ORACLE_FORMATS = [f for f in QUANTIZED if f != "MXFP4"]


def _scale_fields(fmt):
    """The fp16 scale fields of a block (from its layout), where -0 and +0 are the same scale."""
    return [f for f in get_format(fmt).layout.float_fields() if f.kind == "f16"]


def _normalise_zero_scales(blocks: np.ndarray, fmt: str) -> np.ndarray:
    b = blocks.copy()
    for field in _scale_fields(fmt):
        off = field.offset
        v = b[:, off:off + 2].copy().view(np.uint16)
        v[v == 0x8000] = 0
        b[:, off:off + 2] = v.view(np.uint8)
    return b


@pytest.mark.parametrize("fmt", ORACLE_FORMATS)
def test_byte_identical_to_ggml(oracle, fmt, backend):
    f = get_format(fmt)
    assert backend == "torch" or f.kernels.numba_quantize, f"{fmt} has no compiled quantizer"
    for kind in KINDS:
        x = torch.from_numpy(oracle[f"{kind}.x"])
        ref = oracle[f"{kind}.{fmt}"].reshape(-1, f.type_size)
        got = lib_gguf.quantize(x, fmt).numpy().reshape(-1, f.type_size)
        got, ref = _normalise_zero_scales(got, fmt), _normalise_zero_scales(ref, fmt)
        bad = np.where((got != ref).any(axis=1))[0]
        assert len(bad) == 0, f"{fmt} {kind}: {len(bad)} of {len(ref)} blocks differ, first {bad[:5]}"


@pytest.mark.parametrize("fmt", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_compiled_k_quants_leave_non_finite_blocks_to_the_torch_kernel(fmt):
    """The side-by-side numba fits skip a block with an infinite weight; the torch kernel
    (the reference) writes it, so both paths give the same bytes, block for block. (On a
    block with a NaN no path writes ggml's bytes, and the torch kernel's depend on the
    blocks beside it; convert, bake and the LoRA merge refuse NaN first.)"""
    x = torch.randn(6, 512, generator=torch.Generator().manual_seed(3))
    x[1, 3], x[2, 300], x[4, 7] = float("inf"), float("-inf"), float("inf")
    old = bk.set_backend("numba")
    try:
        fast = lib_gguf.quantize(x, fmt)
    finally:
        bk.set_backend("torch")
    try:
        ref = lib_gguf.quantize(x, fmt)
    finally:
        bk.set_backend(old)
    assert torch.equal(fast, ref)


@pytest.mark.parametrize("fmt", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_k_quants_match_live_ggml_on_tiny_and_huge_weights(fmt, backend):
    """Subnormal and huge weights: the inverse scales overflow, and ggml's rounding trick
    (``nearest_int``) then gives its own values, not a rounding; a NaN magnitude never wins
    ggml's largest-magnitude search. Both paths must write ggml's bytes there too. (ggml's
    lattice quantizers abort on such rows, so only the K-quants are compared.)"""
    from lib_gguf import ggml_ref

    rng = np.random.default_rng(zlib.crc32(fmt.encode()) + 1)
    x = rng.standard_normal((4, 512)).astype(np.float32)
    x *= np.array([[1e-40], [1e-38], [1e-20], [1e20]], dtype=np.float32)
    ref = ggml_ref.quantize(x, fmt)
    got = lib_gguf.quantize(torch.from_numpy(x), fmt).numpy()
    bad = np.where((got.reshape(len(ref), -1) != ref).any(axis=1))[0]
    assert len(bad) == 0, f"{fmt}: rows {bad.tolist()} differ from ggml's bytes"


@pytest.mark.parametrize("fmt", QUANTIZED)
def test_round_trip_and_shapes(fmt):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 512, generator=g)
    q = lib_gguf.quantize(x, fmt)
    f = get_format(fmt)
    assert q.dtype == torch.uint8 and q.shape == (3, 4, 512 // f.block_size * f.type_size)
    back = lib_gguf.dequantize(q, fmt, x.shape, torch.float32)
    rel = ((back - x).norm() / x.norm()).item()
    bound = {"Q8_0": 0.01, "Q6_K": 0.02, "Q5_K": 0.05, "Q5_0": 0.07, "Q5_1": 0.07, "Q3_K": 0.25, "Q2_K": 0.4,
             "IQ3_XXS": 0.25, "IQ3_S": 0.25, "IQ2_S": 0.35, "IQ1_M": 0.65, "TQ1_0": 0.9, "TQ2_0": 0.9,
             "MXFP4": 0.2}.get(fmt, 0.12)
    assert rel < bound, rel
    # half-precision inputs quantize like their float32 values
    assert torch.equal(lib_gguf.quantize(x.half(), fmt), lib_gguf.quantize(x.half().float(), fmt))


@pytest.mark.parametrize("fmt", QUANTIZED + ["F32", "F16", "BF16"])
def test_a_weight_with_no_rows_quantizes_to_no_bytes(fmt):
    """An empty weight (0 rows) is valid: its bytes are empty, with the row width of its format."""
    f = get_format(fmt)
    q = lib_gguf.quantize(torch.empty(0, 512), fmt)
    assert q.dtype == torch.uint8 and q.shape == (0, 512 // f.block_size * f.type_size)
    assert lib_gguf.dequantize(q, fmt, (0, 512), torch.float32).shape == (0, 512)


def test_rows_not_divisible_are_a_clear_error():
    with pytest.raises(GGUFFormatError) as e:
        lib_gguf.quantize(torch.randn(4, 4544 + 16), "Q8_0", name="blocks.0.mlp.weight")
    assert "blocks.0.mlp.weight" in str(e.value) and "32" in str(e.value)


def test_imatrix_formats_say_so():
    for fmt in sorted(f.name for f in FORMATS.values() if f.needs_imatrix):
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
    from lib_gguf.families.torch_ops import rdiv, sqrtf

    x = torch.rand(100000, generator=torch.Generator().manual_seed(1)) * 100 + 1e-3
    xn = x.numpy()
    assert np.array_equal(rdiv(63.0, x).numpy(), np.float32(63.0) / xn)
    assert np.array_equal(sqrtf(x).numpy(), np.sqrt(xn))
    assert sqrtf(torch.tensor([46.369140625])).item() == float(np.sqrt(np.float32(46.369140625)))


@pytest.mark.parametrize("fmt", ORACLE_FORMATS + ["MXFP4"])
def test_byte_identical_to_live_ggml(fmt, backend):
    """Beyond the stored oracle: ggml's own quantizer through ggml-python (requirements-test.txt),
    on rows of mixed scales, zero runs, exact ties and fp16-edge magnitudes."""
    from lib_gguf import ggml_ref

    assert ggml_ref.available(), "ggml-python does not import: pip install -r requirements-test.txt (needs cmake, cc)"
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


@pytest.mark.parametrize("fmt", QUANTIZED)
def test_compiled_and_torch_kernels_agree(fmt):
    """Both paths, fresh random rows in a (2, 3, n) layout, wider than one thread's share."""
    g = torch.Generator().manual_seed(zlib.crc32(fmt.encode()))
    x = torch.randn(2, 3, 2048, generator=g) * torch.rand(2, 3, 1, generator=g) * 10
    x[0, 1, :700] = 0
    assert numba_kernels.quantizer(get_format(fmt).type_id) is not None
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

    def broken(blocks):
        calls.append(1)
        raise numba_kernels.COMPILE_ERRORS[0]("LLVM could not compile")

    monkeypatch.setitem(numba_kernels.QUANTIZERS, get_format("Q4_K").type_id, broken)
    monkeypatch.setattr(bk, "_failed", set())
    try:
        with caplog.at_level(logging.WARNING, logger="lib_gguf.backend"):
            assert torch.equal(lib_gguf.quantize(x, "Q4_K"), want)
            assert torch.equal(lib_gguf.quantize(x, "Q4_K"), want)
        assert len(calls) == 1, "a kernel that failed once is not tried again"
        assert "Q4_K" in caplog.text and "torch" in caplog.text
        quant.set_backend("numba")  # asked for explicitly: the failure is not hidden
        bk._failed.clear()
        with pytest.raises(numba_kernels.COMPILE_ERRORS[0], match="LLVM"):
            lib_gguf.quantize(x, "Q4_K")
    finally:
        quant.set_backend(old)


def test_a_data_error_keeps_the_compiled_kernel(monkeypatch):
    """IQ1_M has no fit for non-finite weights: the error is the caller's, on either path,
    and the compiled kernel stays in use for the next (finite) tensor."""
    monkeypatch.setattr(bk, "_failed", set())
    calls = []
    real = numba_kernels.QUANTIZERS[get_format("IQ1_M").type_id]
    monkeypatch.setitem(numba_kernels.QUANTIZERS, get_format("IQ1_M").type_id,
                        lambda b: calls.append(1) or real(b))
    bad = torch.randn(2, 256)
    bad[1, 7] = float("nan")
    old = quant.set_backend("auto")
    try:
        with pytest.raises(FloatingPointError, match="IQ1_M"):
            lib_gguf.quantize(bad, "IQ1_M")
        assert not bk._failed
        good = torch.randn(2, 256, generator=torch.Generator().manual_seed(4))
        got = lib_gguf.quantize(good, "IQ1_M")
        assert len(calls) == 2, "the compiled kernel ran again after the data error"
        quant.set_backend("torch")
        assert torch.equal(got, lib_gguf.quantize(good, "IQ1_M"))
        with pytest.raises(FloatingPointError, match="IQ1_M"):
            lib_gguf.quantize(bad, "IQ1_M")
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
        monkeypatch.delitem(numba_kernels.QUANTIZERS, get_format("Q4_K").type_id)
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


def test_compiled_kernels_from_several_threads():
    """A web UI may convert in two threads at once, or load a model while baking; numba's
    workqueue threading layer (the one every install has) aborts the process on
    concurrent parallel launches unless, under that layer, every compiled kernel,
    quantizer or dequantizer, takes turns."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue")
    r = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT, str(Path(__file__).resolve().parents[1])],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and "layer workqueue same True" in r.stdout, r.stdout + r.stderr[-2000:]


_NO_LOCK_SCRIPT = """
import sys, threading, torch
sys.path.insert(0, sys.argv[1])
import lib_gguf
from lib_gguf import numba_support
x = torch.randn(64, 1024)
raw = torch.randint(0, 256, (64, 110), dtype=torch.uint8)
raw[:, :2] = torch.tensor([0x00, 0x14], dtype=torch.uint8)  # a finite fp16 scale
lib_gguf.quantize(x, "Q4_K")  # the first launch tells which threading layer runs
lib_gguf.dequantize(raw, "IQ3_S", (64, 256))
done = []
with numba_support._WORKQUEUE_LOCK:  # held, as by a long launch in another thread
    t = threading.Thread(target=lambda: done.append((lib_gguf.quantize(x, "Q4_K"),
                                                     lib_gguf.dequantize(raw, "IQ3_S", (64, 256)))))
    t.start()
    t.join(120)
import numba
print("layer", numba.threading_layer(), "ran", bool(done))
"""


def test_compiled_kernels_do_not_take_turns_under_a_threadsafe_layer():
    """Under numba's omp (or tbb) threading layer a conversion and an inference's
    dequantizing run side by side: no lock is held around their launches."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    try:
        from numba.np.ufunc import omppool  # noqa: F401
    except ImportError:
        pytest.skip("numba's OpenMP threading layer does not load here")
    env = dict(os.environ, NUMBA_THREADING_LAYER="omp")
    r = subprocess.run([sys.executable, "-c", _NO_LOCK_SCRIPT, str(Path(__file__).resolve().parents[1])],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and "layer omp ran True" in r.stdout, r.stdout + r.stderr[-2000:]


_NO_NUMBA_SCRIPT = """
import sys
sys.modules["numba"] = None  # as where numba is not installed (or llvmlite does not load)
sys.path.insert(0, sys.argv[1])
import torch, lib_gguf
from lib_gguf import backend, numba_kernels
raw = torch.randint(0, 256, (4, 110), dtype=torch.uint8)
raw[:, :2] = torch.tensor([0x00, 0x14], dtype=torch.uint8)
backend.set_backend("torch")
want = (lib_gguf.dequantize(raw, "IQ3_S", (4, 256)), lib_gguf.quantize(torch.ones(4, 256), "Q4_K"))
backend.set_backend("auto")
got = (lib_gguf.dequantize(raw, "IQ3_S", (4, 256)), lib_gguf.quantize(torch.ones(4, 256), "Q4_K"))
print("available", numba_kernels.available(), "same", all(torch.equal(a, b) for a, b in zip(want, got)))
backend.set_backend("numba")
try:
    lib_gguf.quantize(torch.ones(4, 256), "Q4_K")
except lib_gguf.GGUFFormatError as e:
    print("error:", e)
"""


def test_without_numba():
    """numba missing: the compiled modules still import, "auto" runs the torch kernels, and
    "numba" asked for is a clear error."""
    import subprocess
    import sys
    from pathlib import Path

    r = subprocess.run([sys.executable, "-c", _NO_NUMBA_SCRIPT, str(Path(__file__).resolve().parents[1])],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "available False same True" in r.stdout and "numba is not installed" in r.stdout, r.stdout


_STAMP_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
import torch, lib_gguf
from lib_gguf import backend
from lib_gguf.families import ternary_numba
backend.set_backend("numba")
lib_gguf.quantize(torch.randn(4, 256), "TQ2_0")
print("hits", sum(ternary_numba._quantize.stats.cache_hits.values()))
"""


def test_compiled_kernels_are_recompiled_when_their_layout_changes(tmp_path):
    """numba's disk cache checks only a kernel's own file; ours also depend on the family's
    layout (another file) and the shared helpers: a change to either is a cache miss."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "lib_gguf"
    shutil.copytree(src, tmp_path / "lib_gguf", ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))

    def hits():
        r = subprocess.run([sys.executable, "-c", _STAMP_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                           env=env, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout.split()[-1]

    assert hits() == "0"  # compiled
    assert hits() == "1"  # from the disk cache
    layout = tmp_path / "lib_gguf" / "families" / "ternary.py"
    os.utime(layout, ns=(layout.stat().st_atime_ns, layout.stat().st_mtime_ns + 10 ** 9))
    assert hits() == "0", "a change to the layout's file must not reuse the compiled kernel"


_TORCH_THREADS_SCRIPT = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import numba, lib_gguf
torch.set_num_threads(1)
x = torch.randn(64, 256)
for _ in range(2):
    lib_gguf.dequantize(lib_gguf.quantize(x, "Q4_K"), "Q4_K", (64, 256))
    print(torch.get_num_threads(), numba.get_num_threads())
"""


def test_compiled_kernels_keep_the_users_torch_thread_count():
    """Starting numba's OpenMP pool resets the OpenMP thread count torch reads: a
    ``torch.set_num_threads(1)`` must stay 1 for torch and for the kernels after it."""
    import subprocess
    import sys
    from pathlib import Path

    r = subprocess.run([sys.executable, "-c", _TORCH_THREADS_SCRIPT, str(Path(__file__).resolve().parents[1])],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["1", "1", "1", "1"], r.stdout
