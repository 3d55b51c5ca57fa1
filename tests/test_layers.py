"""GGUFLinear and load_into on a small Flux-shaped module."""
import pytest
import torch
import torch.nn.functional as F

import lib_gguf
from lib_gguf import GGUFFormatError, GGUFLinear, load_into
from lib_gguf.sample import build_module, flux_shapes, tiny_flux_state_dict


def _quantized(sd, fmt="Q8_0"):
    out = {}
    for k, v in sd.items():
        if v.ndim == 2 and v.shape[1] % 32 == 0:
            out[k] = lib_gguf.GGUFParameter(lib_gguf.quantize(v, fmt), fmt, v.shape)
        else:
            out[k] = v.half()
    return out


def test_load_into_flux_and_run(tmp_path):
    sd = tiny_flux_state_dict()
    q = _quantized(sd)
    path = tmp_path / "flux.gguf"
    lib_gguf.save(path, q)
    m = build_module(flux_shapes())
    report = load_into(m, path)
    assert report == {"missing": [], "unexpected": [], "mismatched": []}
    qkv = m.get_submodule("double_blocks.0.img_attn.qkv")
    assert isinstance(qkv, GGUFLinear) and qkv.weight.gguf_cls.name == "Q8_0"
    x = torch.randn(3, 256)
    ref = F.linear(x, lib_gguf.dequantize(q["double_blocks.0.img_attn.qkv.weight"].data, "Q8_0", (768, 256),
                                          torch.float32), sd["double_blocks.0.img_attn.qkv.bias"].half().float())
    assert torch.allclose(qkv(x), ref, atol=1e-4)
    assert qkv(x.half()).dtype == torch.float16
    # float tensors are copied with the file's values
    scale = m.get_parameter("double_blocks.0.img_attn.norm.query_norm.scale")
    assert torch.equal(scale, sd["double_blocks.0.img_attn.norm.query_norm.scale"].half().float())


def test_no_bias_layer():
    w = torch.randn(64, 128)
    lin = torch.nn.Linear(128, 64, bias=False)
    g = GGUFLinear.from_linear(lin, lib_gguf.GGUFParameter(lib_gguf.quantize(w, "Q8_0"), "Q8_0", w.shape))
    assert g.bias is None
    x = torch.randn(2, 128)
    assert torch.allclose(g(x), x @ g.weight.dequantize(torch.float32).T, atol=1e-5)


def test_forward_hook_can_add_into_a_slice():
    w = torch.randn(96, 32)
    g = GGUFLinear.from_linear(torch.nn.Linear(32, 96, bias=False), lib_gguf.GGUFParameter(lib_gguf.quantize(w, "Q8_0"), "Q8_0", w.shape))
    x = torch.randn(2, 32)
    base = g(x)

    def hook(mod, inp, out):
        out[..., 32:64] += 1.0
        return out

    h = g.register_forward_hook(hook)
    y = g(x)
    h.remove()
    assert torch.allclose(y[..., 32:64], base[..., 32:64] + 1) and torch.equal(y[..., :32], base[..., :32])


def test_mismatches_are_all_reported_before_any_change():
    sd = _quantized(tiny_flux_state_dict())
    sd.pop("txt_in.weight")
    sd["not.a.param"] = torch.zeros(3)
    sd["img_in.bias"] = torch.zeros(7)
    m = build_module(flux_shapes())
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(GGUFFormatError) as e:
        load_into(m, sd)
    msg = str(e.value)
    assert "txt_in.weight" in msg and "not.a.param" in msg and "img_in.bias" in msg
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    report = load_into(m, sd, strict=False)
    assert report["missing"] == ["txt_in.weight"] and report["unexpected"] == ["not.a.param"]
