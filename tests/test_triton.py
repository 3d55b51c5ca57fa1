"""The Triton kernels (lib_gguf.dequant_triton, the families' *_triton value functions, linear_triton).

Without a GPU they run on CPU tensors under Triton's interpreter: this module sets
``TRITON_INTERPRET=1`` before anything imports the kernels (the interpreter is chosen
when a kernel is defined). ``LIB_GGUF_TRITON_DEVICE=cuda`` runs the same tests on a
GPU with the compiled kernels (bench/gpu_check.sh).

In CI (``CI`` set) a missing triton is an error, not a skip.
"""
import logging
import os
import sys

import pytest
import torch
import torch.nn.functional as F

DEVICE = os.environ.get("LIB_GGUF_TRITON_DEVICE", "cpu")
if DEVICE == "cpu":
    if "lib_gguf.triton_support" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("lib_gguf's Triton kernels were imported before tests/test_triton.py could set "
                           "TRITON_INTERPRET=1; run this module on its own")
    os.environ["TRITON_INTERPRET"] = "1"

try:
    import triton  # noqa: F401
except ImportError:
    if os.environ.get("CI"):
        raise ImportError("triton is not installed: CI must run the Triton kernels' tests (requirements-test.txt)")
    pytest.skip("triton is not installed", allow_module_level=True)

import lib_gguf  # noqa: E402
from lib_gguf import backend as bk  # noqa: E402
from lib_gguf import dequant, dequant_triton, linear_triton  # noqa: E402
from lib_gguf.formats import FORMATS, dequantizer_for, get_format  # noqa: E402

QUANTIZED = sorted(f.name for f in FORMATS.values() if f.is_quantized and f.can_dequantize)
COMMON = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture
def triton_backend():
    old = bk.set_backend("triton")
    yield
    bk.set_backend(old)


def _scale_fields(name):
    """Byte offsets of the float16 scales of a block (set to tame values in half the blocks)."""
    layout = get_format(name).layout
    return [f.offset for f in layout.float_fields() if f.kind == "f16"] if layout is not None else []


def _blocks(name, n=13, seed=0):
    """Random bytes (every bit pattern, non-finite scales included), with the scales of
    every other block replaced by moderate float16 values, and ggml-made blocks where
    we can quantize."""
    fmt = get_format(name)
    g = torch.Generator().manual_seed(seed)
    b = torch.randint(0, 256, (n, fmt.type_size), dtype=torch.uint8, generator=g)
    for off in _scale_fields(name):
        d = (torch.rand(n, generator=g) * 0.1 + 0.001).to(torch.float16).view(torch.uint8).view(n, 2)
        b[::2, off:off + 2] = d[::2]
    if name == "Q8_K":  # a float32 scale
        b[::2, fmt.layout.d.slice] = torch.full((n,), 0.01).view(torch.uint8).view(n, 4)[::2]
    if fmt.can_quantize and not fmt.needs_imatrix:
        q = lib_gguf.quantize(torch.randn(3, fmt.block_size, generator=g), name).reshape(3, fmt.type_size)
        b = torch.cat([b, q])
    return b


def _same(a, b):
    """Bit-equal, NaN where NaN (payloads aside)."""
    iv = {4: torch.int32, 2: torch.int16}[a.element_size()]
    return (a.view(iv) == b.view(iv)) | (a.isnan() & b.isnan())


@pytest.mark.parametrize("name", QUANTIZED)
def test_dequant_equals_torch_kernels(name):
    """float32: the torch kernels' values bit for bit; float16 / bfloat16: their cast."""
    fmt = get_format(name)
    assert dequant_triton.has_kernel(fmt.type_id), f"no Triton dequantizer for {name}"
    blocks = _blocks(name)
    ref32 = dequantizer_for(fmt.type_id)(blocks, torch.float32)
    assert torch.isfinite(ref32[::2]).any()
    for dtype in DTYPES:
        out = dequant_triton.run(fmt.type_id, blocks.to(DEVICE), fmt.block_size, dtype).cpu()
        assert out.dtype == dtype and out.shape == ref32.shape
        same = _same(out, ref32.to(dtype))
        assert bool(same.all()), f"{name} {dtype}: {int((~same).sum())} of {same.numel()} values differ"


def test_triton_table_matches_the_registry():
    """The families that say they have a Triton dequantizer (``triton=True``) are the ones
    dequant_triton's table holds, and every quantized format we dequantize has one."""
    have = {t for t in FORMATS if dequant_triton.has_kernel(t)}
    assert have == {t for t, f in FORMATS.items() if f.kernels.triton}
    assert have == {t for t, f in FORMATS.items() if f.is_quantized and f.can_dequantize}


def test_bfloat16_rounds_to_nearest_even():
    """The kernels' own bfloat16 rounding (the interpreter's cast truncates): ties to
    even, carries into the exponent, inf stays inf, NaN stays NaN."""
    vals = torch.tensor([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.0 + 2 ** -8 + 2 ** -20, 2.0 - 2 ** -9, 3.0e38, -3.4e38,
                         float("inf"), float("-inf"), float("nan"), 1e-40, -0.0], dtype=torch.float32)
    n = vals.numel()
    # Q8_K: float32 scale times int8 1: the value is the scale itself
    blocks = torch.zeros((n, get_format("Q8_K").type_size), dtype=torch.uint8)
    blocks[:, :4] = vals.view(torch.uint8).view(n, 4)
    blocks[:, 4] = 1
    out = dequant_triton.run(int(get_format("Q8_K").type_id), blocks.to(DEVICE), 256, torch.bfloat16).cpu()[:, 0]
    assert bool(_same(out, vals.to(torch.bfloat16)).all())


def test_dequantize_dispatches_to_triton(monkeypatch, triton_backend):
    """lib_gguf.dequantize takes the Triton kernels where they may run (CUDA tensors; CPU
    tensors only under the interpreter with the backend choice "triton")."""
    calls = []
    real = dequant_triton.run
    monkeypatch.setattr(dequant_triton, "run", lambda *a: calls.append(a[0]) or real(*a))
    x = torch.randn(4, 256)
    for name in ("Q4_K", "Q8_0", "IQ4_NL"):
        q = lib_gguf.quantize(x, name)
        w = lib_gguf.GGUFParameter(q.to(DEVICE), name, x.shape)
        got = lib_gguf.dequantize(w, torch.bfloat16)
        bk.set_backend("torch")
        want = lib_gguf.dequantize(q, name, x.shape, torch.float32).to(torch.bfloat16)
        bk.set_backend("triton")
        assert torch.equal(got.cpu(), want)
    assert calls == [int(get_format(n).type_id) for n in ("Q4_K", "Q8_0", "IQ4_NL")]
    if DEVICE == "cpu":
        calls.clear()
        bk.set_backend("auto")  # CPU tensors under "auto": numba / torch, never the interpreter
        lib_gguf.dequantize(lib_gguf.quantize(x, "Q4_K"), "Q4_K", x.shape, torch.float16)
        assert calls == []
        # plain element types have no Triton kernel and need none
        bk.set_backend("triton")
        assert torch.equal(lib_gguf.dequantize(x.half().view(torch.uint8), "F16", x.shape, torch.float32),
                           x.half().float())


def test_compile_error_falls_back_once_with_a_warning(monkeypatch, caplog):
    fmt = get_format("Q5_K")
    blocks = _blocks("Q5_K", n=4)
    want = dequantizer_for(fmt.type_id)(blocks, torch.float16)
    calls = []
    class err(dequant_triton.COMPILE_ERRORS[0]):  # what triton raises when a kernel does not compile
        def __init__(self):
            Exception.__init__(self, "ptxas could not compile")

        def __str__(self):
            return "ptxas could not compile"

    def broken(*a, **k):
        calls.append(1)
        raise err()

    monkeypatch.setattr(dequant_triton, "run", broken)
    monkeypatch.setattr(bk, "_failed", set())
    old = bk.set_backend("auto")
    try:
        with caplog.at_level(logging.WARNING, logger="lib_gguf.backend"):
            for _ in range(2):
                out = dequant._triton(fmt, blocks, torch.float16)
                assert out is None  # the caller runs the torch kernel
        assert len(calls) == 1 and "Q5_K" in caplog.text and "triton" in caplog.text
        bk.set_backend("triton")  # asked for explicitly: not hidden
        with pytest.raises(err):
            dequant._triton(fmt, blocks, torch.float16)
        # other errors are never swallowed
        bk.set_backend("auto")
        bk._failed.clear()
        monkeypatch.setattr(dequant_triton, "run", lambda *a: (_ for _ in ()).throw(RuntimeError("device fault")))
        with pytest.raises(RuntimeError, match="device fault"):
            dequant._triton(fmt, blocks, torch.float16)
    finally:
        bk.set_backend(old)
    assert torch.equal(lib_gguf.dequantize(blocks, "Q5_K", (blocks.shape[0] * 256,), torch.float16), want.reshape(-1))


def test_without_triton(monkeypatch):
    """triton missing: torch kernels under "auto", a clear error when "triton" is asked for."""
    monkeypatch.setattr(dequant_triton, "triton", None)
    fmt = get_format("Q4_0")
    blocks = _blocks("Q4_0", n=2)
    old = bk.set_backend("auto")
    try:
        assert dequant._triton(fmt, blocks, torch.float16) is None
        bk.set_backend("triton")
        with pytest.raises(lib_gguf.GGUFFormatError, match="triton is not installed"):
            dequant._triton(fmt, blocks, torch.float16)
    finally:
        bk.set_backend(old)
    assert not linear_triton.supported("Q4_0", torch.float16) or linear_triton.triton is not None


# -- the fused dequantize-matmul --------------------------------------------------------

def _weight(name, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    wf = torch.randn(n, k, generator=g) * 0.05
    return lib_gguf.GGUFParameter(lib_gguf.quantize(wf, name).to(DEVICE), name, (n, k))


def _close(y, ref, dtype):
    """Within a few roundings of the output dtype at the output's magnitude."""
    tol = 4 * torch.finfo(dtype).eps * float(ref.abs().max())
    err = float((y.float().cpu() - ref).abs().max())
    assert err <= tol, f"max error {err:.4g} > {tol:.4g}"


@pytest.mark.parametrize("name", linear_triton.FUSED_FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_fused_matches_dequantize_then_linear(name, dtype):
    n, k, m = 40, 512, 21  # tiles with ragged edges in M and N, two super-blocks in K
    w = _weight(name, n, k)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    down = (torch.randn(5, k, generator=g) * 0.05).to(dtype)
    up = (torch.randn(n, 5, generator=g) * 0.5).to(dtype)
    wd = lib_gguf.dequantize(w, torch.float32).cpu().to(dtype).float()
    base = F.linear(x.float(), wd, bias.float())
    y = linear_triton.fused_linear(x.to(DEVICE), w, bias.to(DEVICE))
    assert y.shape == (3, 7, n) and y.dtype == dtype
    _close(y, base, dtype)
    y = linear_triton.fused_linear(x.to(DEVICE), w, bias.to(DEVICE), (down.to(DEVICE), up.to(DEVICE)))
    lora = (x.float() @ down.float().T).to(dtype).float() @ up.float().T
    assert float(lora.abs().max()) > 0.2 * float(base.abs().max())  # the delta is not lost in the tolerance
    _close(y, base + lora, dtype)


def _lora_module(fmt, seed=0):
    from lib_gguf.layers import GGUFLinear

    n, k = 96, 256
    lin = torch.nn.Linear(k, n)
    torch.nn.init.normal_(lin.bias, std=0.5)
    w = _weight(fmt, n, k, seed)
    layer = GGUFLinear.from_linear(lin, w, torch.nn.Parameter(lin.bias.detach().to(DEVICE), requires_grad=False))
    model = torch.nn.Module()
    model.qkv = layer
    return model


def _lora_sd(n, k, r=4, seed=2):
    g = torch.Generator().manual_seed(seed)
    return {"qkv.lora_up.weight": torch.randn(n, r, generator=g) * 0.3,
            "qkv.lora_down.weight": torch.randn(r, k, generator=g) * 0.3,
            "qkv.alpha": torch.tensor(float(r))}


def test_fused_layer_adds_runtime_lora_once(monkeypatch, triton_backend):
    """GGUFLinear's fused forward folds the run-time LoRA into the kernel and the hook
    adds nothing more; strengths follow; removing the LoRA gives the plain layer."""
    from lib_lora import apply_loras

    monkeypatch.setenv("LIB_GGUF_FUSED", "always")
    calls = []
    real = linear_triton.fused_linear
    monkeypatch.setattr(linear_triton, "fused_linear", lambda *a, **k: calls.append(a[3] is not None) or real(*a, **k))
    model = _lora_module("Q4_K")
    layer = model.qkv
    x = torch.randn(2, 9, 256, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).to(DEVICE)

    def reference(strength):
        wd = lib_gguf.dequantize(layer.weight, torch.float32).cpu().to(torch.bfloat16).float()
        sd = _lora_sd(96, 256)
        delta = strength * (x.float().cpu() @ sd["qkv.lora_down.weight"].T) @ sd["qkv.lora_up.weight"].T
        return F.linear(x.float().cpu(), wd, layer.bias.float().cpu()) + delta

    plain = model.qkv(x)
    assert calls == [False]
    _close(plain, reference(0.0), torch.bfloat16)
    handle = apply_loras(model, [(_lora_sd(96, 256), 0.8)], mode="runtime")
    y = model.qkv(x)
    assert calls[-1] is True
    _close(y, reference(0.8), torch.bfloat16)
    handle.set_strength(0, -0.5)
    _close(model.qkv(x), reference(-0.5), torch.bfloat16)
    # a direct forward() call (no hooks run) must not leave the next call without its delta
    layer.forward(x)
    _close(model.qkv(x), reference(-0.5), torch.bfloat16)
    # the unfused path (torch kernels + F.linear + the hook) gives the same output
    bk.set_backend("torch")
    _close(model.qkv(x), reference(-0.5), torch.bfloat16)
    bk.set_backend("triton")
    handle.remove()
    assert torch.equal(model.qkv(x), plain)


def test_fused_layer_leaves_non_lowrank_deltas_to_the_hook(monkeypatch, triton_backend):
    """A hook that cannot hand over low-rank factors (another compute dtype here) adds
    its delta after the fused forward, as before."""
    from lib_lora import LoraOptions, apply_loras

    monkeypatch.setenv("LIB_GGUF_FUSED", "always")
    model = _lora_module("Q8_0")
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(4)).to(torch.float16).to(DEVICE)
    bk.set_backend("torch")
    apply_loras(model, [(_lora_sd(96, 256), 1.0)], mode="runtime", options=LoraOptions(compute_dtype="float32"))
    want = model.qkv(x)
    bk.set_backend("triton")
    got = model.qkv(x)
    assert not any(getattr(h, "fused_pending", None) for h in model.qkv._forward_hooks.values())
    _close(got, want.float().cpu(), torch.float16)


def test_rule(monkeypatch):
    monkeypatch.delenv("LIB_GGUF_FUSED", raising=False)
    old = linear_triton.set_rule({})
    try:
        d = linear_triton.DEFAULT_MAX_TOKENS
        assert linear_triton.choose("Q8_0", d, 3072, 3072, torch.bfloat16) == "fused"
        assert linear_triton.choose("Q8_0", d + 1, 3072, 3072, torch.bfloat16) == "dequant"
        linear_triton.set_rule({("Q8_0", "bfloat16"): [(256, 3072, 3072, "dequant"), (4096, 3072, 3072, "fused"),
                                                        (4096, 12288, 3072, "dequant")]})
        assert linear_triton.choose("Q8_0", 4000, 3072, 3072, torch.bfloat16) == "fused"
        assert linear_triton.choose("Q8_0", 300, 3072, 3072, torch.bfloat16) == "dequant"
        assert linear_triton.choose("Q8_0", 4096, 12288, 3072, torch.bfloat16) == "dequant"
        assert linear_triton.choose("Q4_K", 8, 3072, 3072, torch.bfloat16) == "fused"  # not measured: default
        monkeypatch.setenv("LIB_GGUF_FUSED", "never")
        assert linear_triton.choose("Q8_0", 4000, 3072, 3072, torch.bfloat16) == "dequant"
        monkeypatch.setenv("LIB_GGUF_FUSED", "always")
        assert linear_triton.choose("Q8_0", 300, 3072, 3072, torch.bfloat16) == "fused"
    finally:
        linear_triton.set_rule(old)


def test_rows_that_are_not_whole_blocks_take_the_dequantize_path(monkeypatch, triton_backend):
    """Another tool's file may store a weight whose rows are not whole blocks as
    (n/256, 256) rows of bytes (ComfyUI-GGUF's reshape, `comfy.gguf.orig_shape`): the
    fused kernel, which reads a row's blocks, never takes it; the layer still computes
    F.linear with the dequantized weight."""
    from lib_gguf.layers import GGUFLinear

    monkeypatch.setenv("LIB_GGUF_FUSED", "always")
    g = torch.Generator().manual_seed(5)
    w = torch.randn(256, 320, generator=g)  # 320 weights a row: not whole Q4_K blocks
    data = lib_gguf.quantize(w.reshape(-1, 256), "Q4_K")  # stored as 320 rows of one block
    p = lib_gguf.GGUFParameter(data.to(DEVICE), "Q4_K", (256, 320))
    layer = GGUFLinear.from_linear(torch.nn.Linear(320, 256), p, None).to(DEVICE)
    x = torch.randn(3, 320, generator=g).to(torch.bfloat16).to(DEVICE)
    assert linear_triton.layer_forward(layer, x) is None
    with pytest.raises(ValueError, match="not whole blocks"):
        linear_triton.fused_linear(x, p)
    want = F.linear(x.float().cpu(), lib_gguf.dequantize(p, torch.float32).cpu().to(torch.bfloat16).float())
    _close(layer(x), want, torch.bfloat16)
