"""GGUFParameter survives torch's machinery; plain tensors pass through every helper."""
import copy
import io

import gguf
import numpy as np
import pytest
import torch

from lib_gguf import GGUFParameter, dequantize_tensor, get_format, is_gguf


@pytest.fixture()
def param():
    x = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    raw = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
    return GGUFParameter(torch.from_numpy(raw), "Q8_0", (8, 64)), x


def _same(a, b):
    return isinstance(a, GGUFParameter) and a.gguf_cls is b.gguf_cls and a.shape == b.shape and torch.equal(a.data, b.data)


def test_reports_logical_shape_and_dequantizes(param):
    p, x = param
    assert p.shape == (8, 64) and p.real_shape == (8, 64) and p.byte_shape == (8, 68)
    assert p.gguf_cls is get_format("Q8_0") and not p.requires_grad
    ref = gguf.quants.dequantize(p.data.numpy(), gguf.GGMLQuantizationType.Q8_0)
    assert torch.equal(p.dequantize(torch.float32), torch.from_numpy(ref))
    assert p.dequantize().dtype == torch.float16


def test_moves_and_copies_keep_the_bytes(param):
    p, _ = param
    for q in (p.to("cpu"), p.to("cpu", torch.bfloat16), p.to(device="cpu", dtype=torch.float16, non_blocking=True),
              p.to(torch.zeros(1)), p.to(copy=True), p.to(torch.uint8), p.detach(), p.clone(), p.cpu(),
              copy.deepcopy(p), p.contiguous(), torch.nn.Parameter(p, requires_grad=False)):
        assert _same(q, p)  # a dtype beside a device is the host's cast of every weight: the bytes move
    # a dtype alone asks for the values
    ref = p.dequantize(torch.float32)
    assert torch.equal(p.to(torch.float32), ref) and not is_gguf(p.to(dtype=torch.float32))
    assert torch.equal(p.to(torch.float16), ref.half())
    if torch.cuda.is_available():
        assert _same(p.cuda().cpu(), p)
        assert _same(p.pin_memory(), p)


def test_pickle_and_state_dict_round_trips(param):
    p, _ = param
    buf = io.BytesIO()
    torch.save({"w": p}, buf)
    buf.seek(0)
    assert _same(torch.load(buf, weights_only=False)["w"], p)
    lin = torch.nn.Linear(64, 8, bias=False)
    lin.weight = p
    sd = lin.state_dict()
    assert _same(sd["weight"], p)
    other = torch.nn.Linear(64, 8, bias=False)
    other.weight = GGUFParameter(torch.zeros_like(p.data), "Q8_0", (8, 64))
    other.load_state_dict(sd)
    assert _same(other.weight, p)
    lin.to(torch.float16)  # Module.to converts floats, never GGUF bytes
    assert _same(lin.weight, p)


def test_plain_tensors_pass_through():
    t = torch.randn(3, 4)
    lora = torch.nn.Parameter(torch.randn(4, 2))
    assert not is_gguf(t) and not is_gguf(lora) and not is_gguf(None)
    assert dequantize_tensor(t) is t and dequantize_tensor(lora) is lora and dequantize_tensor(None) is None
    assert dequantize_tensor(t, torch.float16).dtype == torch.float16


def test_forge_style_gguf_cls_calls(param):
    p, _ = param
    fmt = p.gguf_cls
    before, ptr, shape = p.data.clone(), p.data.data_ptr(), p.shape
    fmt.bake(p)
    # baking keeps the GGUF bytes as they are (no private repacking): same storage, bytes, format, shape
    assert p.baked and p.data.data_ptr() == ptr and torch.equal(p.data, before)
    assert p.gguf_cls is fmt and p.shape == shape
    w = fmt.dequantize_pytorch(p)
    assert w.shape == (8, 64) and w.dtype == torch.float16
    before = p.data.clone()
    fmt.quantize_pytorch(w.float() * 2, p)
    assert p.data.shape == before.shape and not torch.equal(p.data, before)
    assert torch.allclose(p.dequantize(torch.float32), w.float() * 2, atol=0.05)


def test_a_hosts_empty_like_and_copy_keep_the_format(param):
    """Forge Neo's low-VRAM ``cast_to`` copies a weight to the compute device as
    ``r = torch.empty_like(w, dtype=..., device=...); r.copy_(w)``: the copy must be
    the same GGUF weight (format, logical shape, bytes), never raw bytes."""
    p, _ = param
    for kw in ({}, {"dtype": torch.float16}, {"device": "cpu", "dtype": torch.bfloat16}):
        r = torch.empty_like(p, **kw)
        assert isinstance(r, GGUFParameter) and r.dtype == torch.uint8 and r.byte_shape == p.byte_shape
        assert r.gguf_cls is p.gguf_cls and r.shape == p.shape
        out = r.copy_(p, non_blocking=False)
        assert out is r and _same(r, p)
        assert torch.equal(dequantize_tensor(r, torch.float32), p.dequantize(torch.float32))
