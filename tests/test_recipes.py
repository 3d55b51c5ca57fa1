"""Per-layer quantization rules."""
import json

import pytest
import torch


from lib_gguf import GGUFFormatError, get_format
from lib_gguf.recipes import PRESETS, Recipe, count_layers, detect_architecture, parse_rules, plan_model
from lib_gguf.sample import FluxConfig, flux_shapes

FULL_FLUX = FluxConfig(hidden_size=3072, num_heads=24, depth=19, depth_single_blocks=38)


def _plan(recipe, shapes, dtype=torch.bfloat16, rules=None):
    return {p.name: p for p in plan_model({k: (v, dtype) for k, v in shapes.items()}, recipe, rules)}


@pytest.mark.parametrize("names,arch", [
    (flux_shapes().keys(), "flux"),
    (["joint_blocks.0.x_block.attn.qkv.weight", "x_embedder.proj.weight"], "sd3"),
    (["double_layers.0.attn.w1q.weight", "cond_seq_linear.weight"], "auraflow"),
    (["distilled_guidance_layer.in_proj.weight", "double_blocks.0.img_attn.qkv.weight"], "chroma"),
    (["input_blocks.0.0.weight", "label_emb.0.0.weight"], "sdxl"),
    (["input_blocks.0.0.weight", "middle_block.0.in_layers.0.weight"], "sd1"),
    (["blocks.0.self_attn.q.weight", "patch_embedding.weight"], "wan"),
    (["transformer_blocks.0.attn1.to_q.weight", "patchify_proj.weight"], "ltxv"),
    (["layers.0.attention.qkv.weight", "cap_embedder.1.weight"], "lumina2"),
    (["double_stream_blocks.0.block.attn1.to_q.weight"], "hidream"),
    (["encoder.layer.0.weight"], "generic"),
])
def test_detect_architecture(names, arch):
    assert detect_architecture(names) == arch


def test_flux_q4_k_s_keeps_sensitive_layers_and_quantizes_blocks():
    plans = _plan("Q4_K_S", flux_shapes(FULL_FLUX))
    for name in ("img_in.weight", "txt_in.weight", "time_in.in_layer.weight", "vector_in.in_layer.weight",
                 "guidance_in.out_layer.weight", "final_layer.linear.weight", "final_layer.adaLN_modulation.1.weight"):
        assert plans[name].format.name == "BF16", name  # bf16 source stays bf16 (f16 could overflow)
    assert plans["double_blocks.0.img_attn.norm.query_norm.scale"].format.name == "F32"
    assert plans["double_blocks.3.img_attn.qkv.bias"].format.name == "F32"
    for name in ("double_blocks.0.img_attn.qkv.weight", "double_blocks.18.img_mlp.2.weight",
                 "single_blocks.37.linear1.weight", "single_blocks.0.linear2.weight"):
        assert plans[name].format.name == "Q4_K", name
    # F32 source: high precision means F16 for 2-D tensors
    assert _plan("Q4_K_S", flux_shapes(FULL_FLUX), torch.float32)["img_in.weight"].format.name == "F16"


def test_m_mix_raises_ffn_down_in_some_layers_l_mix_in_all():
    shapes = flux_shapes(FULL_FLUX)
    m = _plan("Q4_K_M", shapes)
    raised = [i for i in range(19) if m[f"double_blocks.{i}.img_mlp.2.weight"].format.name == "Q5_K"]
    assert 0 in raised and 18 in raised and 0 < len(raised) < 19
    assert m["double_blocks.1.img_mlp.0.weight"].format.name == "Q4_K"  # FFN-up is not raised
    s = _plan("Q4_K_S", shapes)
    assert all(s[f"double_blocks.{i}.img_mlp.2.weight"].format.name == "Q4_K" for i in range(19))
    l = _plan("Q3_K_L", shapes)
    assert all(l[f"double_blocks.{i}.img_mlp.2.weight"].format.name == "Q4_K" for i in range(19))
    assert all(l[f"single_blocks.{i}.linear2.weight"].format.name == "Q4_K" for i in range(38))
    s = _plan("Q3_K_S", shapes)
    assert all(s[f"double_blocks.{i}.img_mlp.2.weight"].format.name == "Q3_K" for i in range(19))


@pytest.mark.parametrize("preset,row,expected", [
    ("Q4_K_S", 4544, "Q5_0"), ("Q2_K", 4544, "Q5_0"), ("Q3_K_S", 4544, "Q5_0"),
    ("Q5_K_S", 4544, "Q5_1"), ("Q6_K", 4544, "Q8_0"), ("Q4_0", 4544, "Q4_0"),
    ("Q4_K_S", 100, "F16"), ("Q8_0", 100, "F16"),
    ("IQ3_S", 4544, "IQ4_NL"), ("IQ1_M", 4544, "IQ4_NL"), ("TQ2_0", 4544, "Q4_0"), ("MXFP4", 4544, "MXFP4"),
    ("MXFP4", 100, "F16"),
])
def test_rows_the_block_does_not_divide_fall_back(preset, row, expected):
    """The Falcon 4544 lesson: never an assertion, always the nearest format that fits."""
    plan = Recipe(preset).plan("blocks.0.attn.qkv.weight", (128, row), torch.float16)
    assert plan.format.name == expected
    if expected != PRESETS[preset][0]:
        assert plan.is_fallback and "fallback" in plan.reason and str(row) in plan.reason


def test_user_rules_override_presets(tmp_path):
    shapes = flux_shapes(FULL_FLUX)
    txt = tmp_path / "rules.txt"
    txt.write_text("# keep the first block high\n"
                   "double_blocks.0.* = Q8_0\n"
                   "re:single_blocks\\.\\d+\\.linear1\\.weight$  Q6_K\n"
                   "txt_in.weight = keep\n")
    plans = _plan("Q4_K_S", shapes, rules=str(txt))
    assert plans["double_blocks.0.img_attn.qkv.weight"].format.name == "Q8_0"
    assert plans["double_blocks.1.img_attn.qkv.weight"].format.name == "Q4_K"
    assert plans["single_blocks.5.linear1.weight"].format.name == "Q6_K"
    assert plans["txt_in.weight"].format.name == "BF16"
    js = tmp_path / "rules.json"
    js.write_text(json.dumps({"*.img_mlp.*": "Q5_K"}))
    assert _plan("Q4_K_S", shapes, rules=str(js))["double_blocks.2.img_mlp.0.weight"].format.name == "Q5_K"


def test_bad_rules_and_presets_are_clear_errors(tmp_path):
    with pytest.raises(GGUFFormatError, match="Q9_Z"):
        parse_rules({"*": "Q9_Z"})
    bad = tmp_path / "r.txt"
    bad.write_text("only-one-token\n")
    with pytest.raises(GGUFFormatError, match="line 1"):
        parse_rules(str(bad))
    with pytest.raises(GGUFFormatError, match="not found"):
        parse_rules(str(tmp_path / "missing.txt"))
    with pytest.raises(GGUFFormatError, match="unknown recipe"):
        Recipe("Q4_K_XL")


def test_count_layers_per_block_list():
    assert count_layers(flux_shapes(FULL_FLUX)) == {"double_blocks": 19, "single_blocks": 38}


def test_presets_cover_what_lib_gguf_quantizes():
    """Every preset's base format quantizes, every quantized format we quantize has a preset,
    and the whole-format presets after the named ones run from most to fewest bits."""
    from lib_gguf.formats import FORMATS

    bases = [get_format(base) for base, _ in PRESETS.values()]
    assert all(f.can_quantize for f in bases)
    assert {f for f in FORMATS.values() if f.is_quantized and f.can_quantize} <= set(bases)
    tail = [get_format(base) for base, _ in list(PRESETS.values())[list(PRESETS).index("Q2_K") + 1:]]
    assert tail and [f.bits_per_weight for f in tail] == sorted((f.bits_per_weight for f in tail), reverse=True)
