"""lib_lora on a small Flux-shaped module with LoRA files in the published key formats."""
import gc
import os

import pytest
import torch
from safetensors.torch import save_file

import lib_gguf
from lib_gguf import GGUFParameter
from lib_gguf.layers import load_into
from lib_gguf.sample import build_module, flux_shapes, tiny_flux_state_dict
from lib_lora import LoraError, LoraOptions, apply_loras, load_lora

SHAPES = flux_shapes()
H = 256
R = 8


def _model(fmt="Q8_0"):
    sd = tiny_flux_state_dict()
    q = {}
    for k, v in sd.items():
        if v.ndim == 2 and lib_gguf.get_format(fmt).fits(v.shape[1]):
            q[k] = GGUFParameter(lib_gguf.quantize(v, fmt), fmt, v.shape)
        else:
            q[k] = v
    m = build_module(SHAPES)
    load_into(m, q)
    return m


def _lr(out_f, in_f, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, R, generator=g) * scale, torch.randn(R, in_f, generator=g) * scale


def _bytes(m):
    return {k: (v.data.clone() if isinstance(v, GGUFParameter) else v.detach().clone())
            for k, v in m.named_parameters()}


def _kohya(tmp_path):
    up, down = _lr(3 * H, H, 1)
    up2, down2 = _lr(H, 4 * H, 2)
    sd = {"lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up,
          "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down,
          "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(4.0),
          "lora_unet_double_blocks_0_img_mlp_2.lora_up.weight": up2,
          "lora_unet_double_blocks_0_img_mlp_2.lora_down.weight": down2}
    p = tmp_path / "kohya.safetensors"
    save_file(sd, str(p))
    expected = {"double_blocks.0.img_attn.qkv.weight": (up @ down) * (4.0 / R),
                "double_blocks.0.img_mlp.2.weight": up2 @ down2}
    return p, expected


def _diffusers(tmp_path, prefix="transformer."):
    sd, expected = {}, {}
    qkv = torch.zeros(3 * H, H)
    for j, n in enumerate("qkv"):
        up, down = _lr(H, H, 10 + j)
        sd[f"{prefix}transformer_blocks.0.attn.to_{n}.lora_A.weight"] = down
        sd[f"{prefix}transformer_blocks.0.attn.to_{n}.lora_B.weight"] = up
        qkv[j * H:(j + 1) * H] = up @ down
    expected["double_blocks.0.img_attn.qkv.weight"] = qkv
    lin1 = torch.zeros(7 * H, H)
    up, down = _lr(4 * H, H, 20)
    sd[f"{prefix}single_transformer_blocks.0.proj_mlp.lora_A.weight"] = down
    sd[f"{prefix}single_transformer_blocks.0.proj_mlp.lora_B.weight"] = up
    lin1[3 * H:] = up @ down
    expected["single_blocks.0.linear1.weight"] = lin1
    p = tmp_path / "diffusers.safetensors"
    save_file(sd, str(p))
    return p, expected


def _one_pair(tmp_path, kind, down_key, up_key, target, out_f, seed):
    """A file with one LoRA pair under the key names of ``kind``, and its expected delta."""
    up, down = _lr(out_f, H, seed)
    p = tmp_path / f"{kind}.safetensors"
    save_file({down_key: down, up_key: up}, str(p))
    return p, {target: up @ down}


def _bfl(tmp_path):
    return _one_pair(tmp_path, "bfl", "diffusion_model.double_blocks.0.txt_attn.proj.lora_A.weight",
                     "diffusion_model.double_blocks.0.txt_attn.proj.lora_B.weight",
                     "double_blocks.0.txt_attn.proj.weight", H, 30)


def _xlabs(tmp_path):
    return _one_pair(tmp_path, "xlabs", "double_blocks.0.processor.qkv_lora2.down.weight",
                     "double_blocks.0.processor.qkv_lora2.up.weight", "double_blocks.0.txt_attn.qkv.weight", 3 * H, 40)


def _lycoris(tmp_path):
    g = torch.Generator().manual_seed(50)
    a1, b1, a2, b2 = (torch.randn(s, generator=g) * 0.1 for s in [(H, 4), (4, H), (H, 4), (4, H)])
    w1, w2 = torch.randn(4, 4, generator=g) * 0.1, torch.randn(H // 4, H // 4, generator=g) * 0.1
    diff = torch.randn(H, generator=g) * 0.01
    sd = {"lycoris_double_blocks_0_img_attn_proj.hada_w1_a": a1, "lycoris_double_blocks_0_img_attn_proj.hada_w1_b": b1,
          "lycoris_double_blocks_0_img_attn_proj.hada_w2_a": a2, "lycoris_double_blocks_0_img_attn_proj.hada_w2_b": b2,
          "lycoris_double_blocks_0_img_attn_proj.alpha": torch.tensor(4.0),
          "lycoris_double_blocks_0_txt_attn_proj.lokr_w1": w1, "lycoris_double_blocks_0_txt_attn_proj.lokr_w2": w2,
          "lycoris_double_blocks_0_img_attn_proj.diff_b": diff}
    p = tmp_path / "lycoris.safetensors"
    save_file(sd, str(p))
    return p, {"double_blocks.0.img_attn.proj.weight": (a1 @ b1) * (a2 @ b2),
               "double_blocks.0.txt_attn.proj.weight": torch.kron(w1, w2),
               "double_blocks.0.img_attn.proj.bias": diff}


FORMATS = {"kohya": _kohya, "diffusers": _diffusers, "bfl": _bfl, "xlabs": _xlabs, "lycoris": _lycoris}


@pytest.mark.parametrize("kind", FORMATS)
def test_key_formats_place_every_key_with_the_right_delta(tmp_path, kind):
    path, expected = FORMATS[kind](tmp_path)
    lf = load_lora(path, SHAPES)
    assert not lf.unplaced, lf.report()
    assert set(lf.patches) == set(expected)
    for name, want in expected.items():
        got = torch.zeros(SHAPES[name])
        for p in lf.patches[name]:
            region = got if p.slice is None else got.narrow(*p.slice)
            region += p.delta(tuple(region.shape))
        assert torch.allclose(got, want, atol=1e-6), name


@pytest.mark.parametrize("kind", ["kohya", "diffusers", "xlabs"])
def test_runtime_output_and_exact_removal(tmp_path, kind):
    m = _model("Q4_0")
    before = _bytes(m)
    path, expected = FORMATS[kind](tmp_path)
    name = next(iter(expected))
    layer = m.get_submodule(name.rpartition(".")[0])
    x = torch.randn(5, layer.in_features)
    w = layer.weight.dequantize(torch.float32)
    b = layer.bias
    h = apply_loras(m, [(path, 0.8)], mode="runtime")
    assert all(r.mode == "runtime" for r in h.report)
    assert torch.equal(layer.weight.data, before[name])  # bytes untouched
    ref = x @ (w + 0.8 * expected[name]).T + b
    assert torch.allclose(layer(x), ref, atol=1e-4)
    h.set_strength(0, 0.3)
    assert torch.allclose(layer(x), x @ (w + 0.3 * expected[name]).T + b, atol=1e-4)
    h.remove()
    assert torch.allclose(layer(x), x @ w.T + b, atol=1e-5)
    after = _bytes(m)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0", "Q5_1"])
def test_merge_requantizes_into_the_format_and_removes_exactly(tmp_path, fmt):
    m = _model(fmt)
    before = _bytes(m)
    path, expected = _kohya(tmp_path)
    h = apply_loras(m, [(path, 1.0)], mode="merge")
    name = "double_blocks.0.img_attn.qkv.weight"
    p = m.get_parameter(name)
    assert isinstance(p, GGUFParameter) and p.gguf_cls.name == fmt
    ref = before_w = lib_gguf.dequantize(before[name], fmt, SHAPES[name], torch.float32)
    want = lib_gguf.dequantize(lib_gguf.quantize(before_w + expected[name], fmt), fmt, SHAPES[name], torch.float32)
    assert torch.equal(p.dequantize(torch.float32), want)
    h.remove()
    after = _bytes(m)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_float_params_merge_and_bias_diff(tmp_path):
    m = _model("Q8_0")
    path, expected = _lycoris(tmp_path)
    bias_before = m.get_parameter("double_blocks.0.img_attn.proj.bias").detach().clone()
    h = apply_loras(m, [(path, 1.0)], mode="auto")
    modes = h.modes()
    assert modes["double_blocks.0.img_attn.proj.bias"] == "merge"
    assert torch.allclose(m.get_parameter("double_blocks.0.img_attn.proj.bias"),
                          bias_before + expected["double_blocks.0.img_attn.proj.bias"])
    h.remove()
    assert torch.equal(m.get_parameter("double_blocks.0.img_attn.proj.bias"), bias_before)


def test_stacking_two_loras(tmp_path):
    m = _model("Q8_0")
    p1, e1 = _kohya(tmp_path)
    p2, e2 = _diffusers(tmp_path)
    name = "double_blocks.0.img_attn.qkv.weight"
    layer = m.get_submodule("double_blocks.0.img_attn.qkv")
    x = torch.randn(3, H)
    w = layer.weight.dequantize(torch.float32)
    h = apply_loras(m, [(p1, 0.5), (p2, 1.0)], mode="runtime")
    assert torch.allclose(layer(x), x @ (w + 0.5 * e1[name] + e2[name]).T + layer.bias, atol=1e-4)
    h.remove()


def test_auto_policy_and_options(tmp_path):
    m = _model("Q4_0")
    path, _ = _kohya(tmp_path)
    h = apply_loras(m, [(path, 1.0)], mode="auto")  # default: GGUF formats at run time
    assert set(h.modes().values()) == {"runtime"}
    h.remove()
    opts = LoraOptions(mode_by_format={"Q4_0": "auto"}, keep_threshold=0.0)
    h = apply_loras(m, [(path, 1.0)], mode="auto", options=opts)  # auto without a host's switch: merge
    assert set(h.modes().values()) == {"merge"}
    h.remove()
    # a tiny delta is rounded away by a Q4_0 merge: auto moves the layer to run time and says so
    tiny = {k: v * (0.01 if "up" in k else 1.0) for k, v in load_lora_sd(path).items()}
    h = apply_loras(m, [(tiny, 1.0)], mode="auto", options=LoraOptions(mode_by_format={"Q4_0": "auto"}))
    moved = [r for r in h.report if r.mode == "runtime"]
    assert moved and all("would keep" in r.why for r in moved) and "moved to run time" in h.summary()
    assert all(r.kept is not None and r.kept < 0.9 for r in moved)
    h.remove()
    # the format's own "merge" is a merge, however little it keeps (the README's "merge")
    h = apply_loras(m, [(tiny, 1.0)], mode="auto", options=LoraOptions(mode_by_format={"Q4_0": "merge"}))
    assert set(h.modes().values()) == {"merge"} and all(r.kept is None for r in h.report)
    h.remove()
    # an explicit mode is every format's choice
    h = apply_loras(m, [(tiny, 1.0)], mode="merge", options=LoraOptions(mode_by_format={"Q4_0": "runtime"}))
    assert set(h.modes().values()) == {"merge"}
    h.remove()
    assert LoraOptions.from_dict(opts.to_dict()) == opts
    with pytest.raises(ValueError):
        LoraOptions(mode_by_format={"Q4_0": "sometimes"})


def load_lora_sd(path):
    from safetensors.torch import load_file
    return load_file(str(path))


def test_errors_name_the_key_and_leave_the_module_alone(tmp_path):
    m = _model("Q8_0")
    before = _bytes(m)
    bad = {"lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(3 * H, R),
           "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(R, H + 1)}
    with pytest.raises(LoraError, match="double_blocks_0_img_attn_qkv"):
        apply_loras(m, [(bad, 1.0)])
    foreign = {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, R),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(R, 8)}
    with pytest.raises(LoraError, match="another architecture"):
        load_lora(foreign, SHAPES)
    with pytest.raises(LoraError, match="not found"):
        load_lora(tmp_path / "missing.safetensors", SHAPES)
    # an error part-way (the second LoRA) leaves everything as it was
    good, _ = _kohya(tmp_path)
    with pytest.raises(LoraError):
        apply_loras(m, [(good, 1.0), (bad, 1.0)], mode="merge")
    after = _bytes(m)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not m.get_submodule("double_blocks.0.img_attn.qkv")._forward_hooks


def test_unknown_keys_are_reported_not_dropped(tmp_path):
    path, _ = _kohya(tmp_path)
    sd = load_lora_sd(path)
    sd["lora_unet_double_blocks_0_nonexistent.lora_up.weight"] = torch.zeros(4, R)
    sd["lora_unet_double_blocks_0_nonexistent.lora_down.weight"] = torch.zeros(R, 4)
    sd["some.random.tensor"] = torch.zeros(3)
    lf = load_lora(sd, SHAPES)
    assert "some.random.tensor" in lf.unplaced
    assert "lora_unet_double_blocks_0_nonexistent.up" in lf.unplaced or \
        any("nonexistent" in k for k in lf.unplaced)


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_200_apply_remove_cycles_keep_memory_flat(tmp_path):
    m = _model("Q8_0")
    path, _ = _kohya(tmp_path)
    lf = load_lora(path, SHAPES)
    x = torch.randn(2, H)
    for mode in ("runtime", "merge"):
        apply_loras(m, [(lf, 1.0)], mode=mode).remove()
    gc.collect()
    start = _rss()
    for i in range(200):
        h = apply_loras(m, [(lf, 1.0)], mode="runtime" if i % 2 else "merge")
        m.get_submodule("double_blocks.0.img_attn.qkv")(x)
        h.remove()
    gc.collect()
    assert _rss() - start < 20 * 2**20


def test_dora_merge_and_runtime_agree_with_the_formula(tmp_path):
    m = _model("Q8_0")
    name = "double_blocks.0.img_attn.proj.weight"
    layer = m.get_submodule("double_blocks.0.img_attn.proj")
    w = layer.weight.dequantize(torch.float32)
    up, down = _lr(H, H, 60, scale=0.1)
    mag = torch.rand(H, 1, generator=torch.Generator().manual_seed(61)) + 0.5
    sd = {"lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": up,
          "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": down,
          "lora_unet_double_blocks_0_img_attn_proj.dora_scale": mag}
    strength = 0.7
    new = w + up @ down
    dora_w = mag * new / new.norm(dim=1, keepdim=True)
    want_w = w + strength * (dora_w - w)
    x = torch.randn(4, H)
    want = x @ want_w.T + layer.bias
    h = apply_loras(m, [(sd, strength)], mode="runtime")
    assert torch.allclose(layer(x), want, atol=1e-4)
    h.remove()
    h = apply_loras(m, [(sd, strength)], mode="merge")
    merged = m.get_parameter(name).dequantize(torch.float32)
    assert (merged - want_w).abs().max() < 2 * (want_w.abs().amax(dim=1, keepdim=True) / 127).max()
    h.remove()


def test_other_architectures_kohya_names_map_to_their_own_keys():
    """AuraFlow (no biases) and an SDXL-style UNet: kohya names are the model's own with dots as underscores."""
    shapes = {"double_layers.0.attn.w1q.weight": (64, 64), "double_layers.0.mlpX.c_fc1.weight": (128, 64),
              "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight": (64, 64)}
    up, down = torch.randn(64, 4), torch.randn(4, 64)
    sd = {"lora_unet_double_layers_0_attn_w1q.lora_up.weight": up,
          "lora_unet_double_layers_0_attn_w1q.lora_down.weight": down,
          "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": up,
          "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": down}
    lf = load_lora(sd, shapes)
    assert not lf.unplaced
    assert set(lf.patches) == {"double_layers.0.attn.w1q.weight",
                               "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"}
    m = build_module(shapes)
    layer = m.get_submodule("double_layers.0.attn.w1q")
    assert layer.bias is None
    x = torch.randn(2, 64)
    base = layer(x)
    h = apply_loras(m, [(lf, 1.0)], mode="runtime")
    assert torch.allclose(layer(x), base + x @ (up @ down).T, atol=1e-3)
    h.remove()


def test_fused_low_rank_merge_matches_the_formula_and_never_touches_the_weight():
    """merged_weight adds a plain LoRA as one fused product (no full-size delta): the
    same values as ``w + strength * scale * up @ down`` to float32 rounding; a float32
    weight is merged on a copy; a strength whose product with alpha/rank leaves float32
    takes the general path, which refuses the inf it makes."""
    from lib_lora.loader import Patch
    from lib_lora.merge import merged_weight

    g = torch.Generator().manual_seed(3)
    w = torch.randn(96, 64, generator=g)
    up, down = torch.randn(96, 4, generator=g), torch.randn(4, 64, generator=g)
    patch = Patch("x.weight", "lora", {"up": up.bfloat16(), "down": down.bfloat16()}, alpha=2.0)
    before = w.clone()
    got = merged_weight(torch.nn.Parameter(w, requires_grad=False), [(patch, 0.7)], "x.weight")
    want = before + 0.7 * 0.5 * (up.bfloat16().float() @ down.bfloat16().float())
    assert torch.equal(w, before)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    q = GGUFParameter(lib_gguf.quantize(w, "Q8_0"), "Q8_0", w.shape)
    raw = q.data.clone()
    got_q = merged_weight(q, [(patch, 0.7)], "x.weight")
    torch.testing.assert_close(got_q, lib_gguf.dequantize(q, dtype=torch.float32) + (want - before),
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(q.data, raw)
    with pytest.raises(LoraError, match="inf or NaN"):
        merged_weight(torch.nn.Parameter(w, requires_grad=False), [(patch, 1e38)], "x.weight")
    assert torch.equal(w, before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_runtime_lora_on_cpu_half_inputs_runs_in_float32_and_rounds_once(tmp_path, dtype):
    """A CPU's half-precision matrix products are many times slower than float32 ones:
    the run-time delta of a float16 / bfloat16 input is computed in float32 and added
    to the layer's output in place, one rounding: exactly
    ``(base.float() + s * (x.float() @ down.T) @ up.T).to(dtype)``."""
    m = _model("Q8_0")
    path, expected = _kohya(tmp_path)
    name = "double_blocks.0.img_mlp.2.weight"
    layer = m.get_submodule(name.rpartition(".")[0])
    x = torch.randn(7, layer.in_features, generator=torch.Generator().manual_seed(5)).to(dtype)
    base = layer(x)
    lf = load_lora(path, SHAPES)
    patch = lf.patches[name][0]
    h = apply_loras(m, [(lf, 0.8)], mode="runtime")
    got = layer(x)
    h.remove()
    up = patch.tensors["up"].flatten(1).float()
    down = (patch.tensors["down"].flatten(1) * patch.scale).float()
    want = base.float().add_((x.float() @ down.T) @ up.T, alpha=0.8).to(dtype)
    assert got.dtype == dtype
    assert torch.equal(got, want)
    assert torch.equal(layer(x), base)
