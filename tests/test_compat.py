"""Other tools' GGUF conventions (lib_gguf.compat): files laid out as ComfyUI-GGUF's convert.py,
llama.cpp's quantizer and stable-diffusion.cpp write them, made here by our own code; and our
files as those tools' loaders read them."""
import struct

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import lib_gguf
from lib_gguf import GGUFFormatError, GGUFParameter
from lib_gguf.compat import ORIG_SHAPE_PREFIX, restore_shape, storage_shape
from lib_gguf.formats import get_format
from lib_gguf.reader import GGUFFile
from lib_gguf.recipes import file_architecture, model_architecture

# general.architecture values ComfyUI-GGUF's loader accepts for diffusion models (its
# IMG_ARCH_LIST); any other value is refused with "Unexpected architecture type".
COMFY_IMAGE_ARCHS = {"flux", "sd1", "sdxl", "sd3", "aura", "hidream", "cosmos", "ltxv", "hyvid", "wan", "lumina2",
                     "qwen_image"}


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def _write_comfy_style(path, tensors, arch="sdxl"):
    """A file as ComfyUI-GGUF's tools/convert.py writes it (then llama-quantize, which keeps
    the keys and the stored shapes): a tensor of >= 512 weights whose last dimension 256 does not divide, but whose
    size it does, stored as (n/256, 256) with its shape in comfy.gguf.orig_shape.<name>.
    ``tensors``: name -> (float32 array, GGML type name). Returns name -> (raw bytes, stored shape)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    out = {}
    for name, (x, qname) in tensors.items():
        n = x.size
        if x.ndim > 1 and n >= 512 and n % 256 == 0 and x.shape[-1] % 256:
            w.add_array(f"comfy.gguf.orig_shape.{name}", [int(d) for d in x.shape])
            x = x.reshape(n // 256, 256)
        qt = gguf.GGMLQuantizationType[qname]
        if get_format(qname).is_float:  # convert.py's own step
            raw = gguf.quants.quantize(x, qt)
        else:  # llama-quantize's step: ggml's bytes (ours are ggml's, tests/test_quant.py)
            raw = lib_gguf.quantize(torch.from_numpy(x), qname).numpy().reshape(x.shape[0], -1)
        w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qt)
        out[name] = (raw, x.shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _ref(raw, qname, shape):
    """gguf-py's values for ``raw``, reshaped to the model's shape."""
    return torch.from_numpy(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qname]).reshape(shape).copy())


class TinyUNet(torch.nn.Module):
    """A few SDXL UNet tensors with their real names (tiny sizes)."""

    def __init__(self):
        super().__init__()
        self.input_blocks = torch.nn.ModuleList([torch.nn.ModuleList([torch.nn.Conv2d(4, 64, 3, padding=1)])])
        blk = torch.nn.Module()
        blk.proj_in = torch.nn.Linear(64, 64)  # SDXL's transformer proj_in is a Linear
        blk.proj_out = torch.nn.Linear(48, 48, bias=False)
        blk.to_q = torch.nn.Linear(64, 64, bias=False)
        self.middle_block = torch.nn.ModuleList([blk])
        self.label_emb = torch.nn.ModuleList([torch.nn.ModuleList([torch.nn.Linear(8, 16)])])


@pytest.fixture()
def comfy_file(tmp_path):
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)
    spec = {
        "input_blocks.0.0.weight": (f(64, 4, 3, 3), "F16"),         # 2304 = 9 x 256: reshaped
        "input_blocks.0.0.bias": (f(64), "F32"),
        "middle_block.0.proj_in.weight": (f(64, 64), "Q4_K"),       # rows of 64: reshaped, Q4_K blocks span rows
        "middle_block.0.proj_in.bias": (f(64), "F32"),
        "middle_block.0.proj_out.weight": (f(48, 48), "Q8_0"),      # rows of 48: not whole Q8_0 blocks
        "middle_block.0.to_q.weight": (f(64, 64), "Q8_0"),          # reshaped, but rows of 64 are whole Q8_0 blocks
        "label_emb.0.0.weight": (f(16, 8), "F16"),                  # 128 weights: too small to reshape
        "label_emb.0.0.bias": (f(16), "F32"),
    }
    p = tmp_path / "sdxl-comfy.gguf"
    raws = _write_comfy_style(p, spec)
    return p, spec, raws


def test_comfy_orig_shape_gives_the_model_shapes_and_values(comfy_file):
    p, spec, raws = comfy_file
    stored = {t.name: tuple(reversed([int(d) for d in t.shape])) for t in gguf.GGUFReader(str(p)).tensors}
    assert stored["input_blocks.0.0.weight"] == (9, 256)  # the layout under test
    assert stored["middle_block.0.proj_in.weight"] == (16, 256)
    sd = lib_gguf.load_state_dict(p)
    for name, (x, qname) in spec.items():
        assert tuple(sd[name].shape) == x.shape, name
        got = sd[name].dequantize(torch.float32) if hasattr(sd[name], "gguf_cls") else sd[name].float()
        assert torch.equal(got, _ref(raws[name][0], qname, x.shape)), name
    assert sd["middle_block.0.proj_in.weight"].gguf_cls.name == "Q4_K"
    # the bytes keep the model's rows where they are whole blocks (row-wise kernels and merges
    # see rows), and the file's rows where blocks run across the model's rows
    assert tuple(sd["middle_block.0.to_q.weight"].byte_shape) == (64, 2 * 34)
    assert tuple(sd["middle_block.0.proj_in.weight"].byte_shape) == (16, 144)
    # the file as it is, on request
    raw_sd = lib_gguf.load_state_dict(p, compat=False)
    assert tuple(raw_sd["input_blocks.0.0.weight"].shape) == (9, 256)
    f = GGUFFile(p)
    info = f.info("middle_block.0.proj_in.weight")
    assert info.shape == (64, 64) and info.storage_shape == (16, 256) and "orig_shape" in info.note
    assert any("restored" in n for n in f.notes)


def test_comfy_file_loads_into_the_model(comfy_file):
    p, spec, raws = comfy_file
    torch.manual_seed(0)
    model = TinyUNet()
    problems = lib_gguf.load_into(model, p)
    assert problems == {"missing": [], "unexpected": [], "mismatched": []}
    conv = model.input_blocks[0][0]
    assert isinstance(conv.weight, torch.nn.Parameter) and not hasattr(conv.weight, "gguf_cls")  # dequantized once
    assert torch.equal(conv.weight, _ref(raws["input_blocks.0.0.weight"][0], "F16", (64, 4, 3, 3)))
    blk = model.middle_block[0]
    assert isinstance(blk.proj_in, lib_gguf.GGUFLinear) and blk.proj_in.weight.gguf_cls.name == "Q4_K"
    x = torch.randn(3, 64)
    w = _ref(raws["middle_block.0.proj_in.weight"][0], "Q4_K", (64, 64))
    b = torch.from_numpy(spec["middle_block.0.proj_in.bias"][0])
    assert torch.allclose(blk.proj_in(x), x @ w.T + b, atol=1e-5)
    x48 = torch.randn(2, 48)
    w48 = _ref(raws["middle_block.0.proj_out.weight"][0], "Q8_0", (48, 48))
    assert torch.allclose(blk.proj_out(x48), x48 @ w48.T, atol=1e-5)


def test_bad_orig_shape_metadata_names_file_tensor_and_key(tmp_path):
    x = np.ones((2, 256), dtype=np.float32)
    for bad in ([3, 256], ["a"], [0, 512]):
        p = tmp_path / "bad.gguf"
        w = gguf.GGUFWriter(str(p), "sdxl")
        w.add_array("comfy.gguf.orig_shape.t", bad)
        w.add_tensor("t", x)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with pytest.raises(GGUFFormatError) as e:
            lib_gguf.load_state_dict(p)
        msg = str(e.value)
        assert "bad.gguf" in msg and "'t'" in msg and "comfy.gguf.orig_shape.t" in msg
        assert tuple(lib_gguf.load_state_dict(p, compat=False)["t"].shape) == (2, 256)


def _comfy_orig_shape(reader, name):
    """ComfyUI-GGUF's loader's reading of the key (its get_orig_shape): an ARRAY of INT32, or it refuses."""
    field = reader.get_field(f"comfy.gguf.orig_shape.{name}")
    if field is None:
        return None
    assert len(field.types) == 2 and field.types[0] == gguf.GGUFValueType.ARRAY \
        and field.types[1] == gguf.GGUFValueType.INT32
    return tuple(int(field.parts[i][0]) for i in field.data)


def test_we_write_orig_shape_where_we_reshape(comfy_file, tmp_path):
    p, spec, raws = comfy_file
    sd = lib_gguf.load_state_dict(p)
    out = tmp_path / "again.gguf"
    meta = {"general.architecture": "sdxl", "comfy.gguf.orig_shape.label_emb.0.0.weight": [8, 16]}  # stale: dropped
    lib_gguf.save(out, sd, meta)
    r = gguf.GGUFReader(str(out))
    tensors = {t.name: t for t in r.tensors}
    # the Q4_K and Q8_0 weights whose rows are not whole blocks: stored (n/256, 256), as convert.py does
    for name in ("middle_block.0.proj_in.weight", "middle_block.0.proj_out.weight"):
        t = tensors[name]
        n = _numel(spec[name][0].shape)
        assert [int(d) for d in t.shape] == [256, n // 256], name
        assert _comfy_orig_shape(r, name) == spec[name][0].shape
        assert bytes(np.asarray(t.data).reshape(-1)) == bytes(raws[name][0].reshape(-1))
    # what fits is written in its own shape, without a key (Forge and sd.cpp read no key)
    assert [int(d) for d in tensors["input_blocks.0.0.weight"].shape] == [3, 3, 4, 64]
    assert _comfy_orig_shape(r, "input_blocks.0.0.weight") is None
    assert _comfy_orig_shape(r, "label_emb.0.0.weight") is None
    back = lib_gguf.load_state_dict(out)
    for name, (x, _q) in spec.items():
        assert tuple(back[name].shape) == x.shape
        a = back[name].dequantize(torch.float32) if hasattr(back[name], "gguf_cls") else back[name].float()
        b = sd[name].dequantize(torch.float32) if hasattr(sd[name], "gguf_cls") else sd[name].float()
        assert torch.equal(a, b), name


def test_storage_shape(tmp_path):
    q4k, q8, f16 = get_format("Q4_K"), get_format("Q8_0"), get_format("F16")
    assert storage_shape(q4k, (640, 640)) == (1600, 256)
    assert storage_shape(q4k, (256, 512)) is None
    assert storage_shape(f16, (320, 4, 3, 3)) is None
    assert storage_shape(q8, (3, 32 * 3)) is None
    assert storage_shape(q8, (5, 3, 32)) is None
    assert storage_shape(q8, (96, 3)) == (9, 32)  # 288 weights: 256 does not divide, one block a row
    with pytest.raises(GGUFFormatError, match=r"'w'.*not a whole number"):  # 48 weights: no whole blocks at all
        lib_gguf.save(tmp_path / "x.gguf", {"w": GGUFParameter(torch.zeros(1, 34, dtype=torch.uint8), "Q8_0", (2, 24))})
    assert not (tmp_path / "x.gguf").exists()


# -- architecture names -----------------------------------------------------------

def test_architecture_names_written_for_comfyui_read_back_as_ours(tmp_path):
    assert file_architecture("auraflow") == "aura" and file_architecture("chroma") == "flux"
    assert file_architecture("flux") == "flux" and file_architecture("wan") == "wan"
    for ours, theirs in (("auraflow", "aura"), ("chroma", "flux"), ("sdxl", "sdxl")):
        p = tmp_path / f"{ours}.gguf"
        lib_gguf.save(p, {"x": torch.ones(4)}, {"general.architecture": ours})
        assert lib_gguf.read_metadata(p)["general.architecture"] == theirs
        assert theirs in COMFY_IMAGE_ARCHS
    chroma_names = ["distilled_guidance_layer.in_proj.weight", "double_blocks.0.img_attn.qkv.weight"]
    assert model_architecture("flux", chroma_names) == "chroma"
    assert model_architecture("flux", ["double_blocks.0.img_attn.qkv.weight"]) == "flux"
    assert model_architecture("aura", []) == "auraflow"
    # files we wrote before keep reading
    assert model_architecture("auraflow", []) == "auraflow" and model_architecture("chroma", chroma_names) == "chroma"
    assert model_architecture(None, ["blocks.0.self_attn.q.weight"]) == "wan"


def test_converter_writes_names_comfyui_accepts(tmp_path):
    g = torch.Generator().manual_seed(0)
    for arch, names in (("aura", ["double_layers.0.attn.w1q.weight", "cond_seq_linear.weight"]),
                        ("flux", ["distilled_guidance_layer.in_proj.weight", "double_blocks.0.img_attn.qkv.weight"])):
        src = tmp_path / f"{arch}.safetensors"
        save_file({n: torch.randn(64, 64, generator=g) for n in names}, str(src))
        dst = tmp_path / f"{arch}.gguf"
        summary = lib_gguf.convert(src, dst, "Q8_0")
        meta = lib_gguf.read_metadata(dst)
        assert meta["general.architecture"] == arch and arch in COMFY_IMAGE_ARCHS
        assert GGUFFile(dst).architecture == summary.architecture  # auraflow / chroma again


# -- stable-diffusion.cpp's files ---------------------------------------------------

def _q8(x: torch.Tensor) -> GGUFParameter:
    return GGUFParameter(lib_gguf.quantize(x, "Q8_0"), "Q8_0", x.shape)


class TinyWan(torch.nn.Module):
    def __init__(self, dim=32, in_dim=4):
        super().__init__()
        self.patch_embedding = torch.nn.Conv3d(in_dim, dim, (1, 2, 2), stride=(1, 2, 2))
        blk = torch.nn.Module()
        blk.modulation = torch.nn.Parameter(torch.zeros(1, 6, dim))
        blk.self_attn = torch.nn.Module()
        blk.self_attn.q = torch.nn.Linear(dim, dim)
        self.blocks = torch.nn.ModuleList([blk])
        self.head = torch.nn.Module()
        self.head.modulation = torch.nn.Parameter(torch.zeros(1, 2, dim))


def test_sdcpp_wan_file_gets_the_model_shapes(tmp_path):
    """As `sd -M convert` writes Wan: no metadata, every name prefixed, the 5-D
    patch_embedding folded to [out*in, kt, kh, kw], the leading 1 of the modulations dropped
    (and those quantized)."""
    torch.manual_seed(1)
    pe = torch.randn(32, 4, 1, 2, 2)
    mod, head_mod = torch.randn(1, 6, 32), torch.randn(1, 2, 32)
    q = torch.randn(32, 32)
    stored = {
        "patch_embedding.weight": pe.reshape(128, 1, 2, 2).half(),
        "patch_embedding.bias": torch.randn(32),
        "blocks.0.modulation": _q8(mod.reshape(6, 32)),
        "blocks.0.self_attn.q.weight": _q8(q),
        "blocks.0.self_attn.q.bias": torch.randn(32),
        "head.modulation": head_mod.reshape(2, 32),
    }
    p = tmp_path / "wan-sdcpp.gguf"
    lib_gguf.save(p, {"model.diffusion_model." + k: v for k, v in stored.items()}, {})
    assert "general.architecture" not in lib_gguf.read_metadata(p)
    f = GGUFFile(p)
    assert f.architecture == "wan"
    sd = f.state_dict()
    assert set(sd) == set(stored)  # prefix stripped
    assert tuple(sd["patch_embedding.weight"].shape) == (32, 4, 1, 2, 2)
    assert torch.equal(sd["patch_embedding.weight"].float(), pe.half().float())
    assert tuple(sd["blocks.0.modulation"].shape) == (1, 6, 32) and sd["blocks.0.modulation"].gguf_cls.name == "Q8_0"
    assert torch.equal(sd["blocks.0.modulation"].dequantize(torch.float32),
                       stored["blocks.0.modulation"].dequantize(torch.float32).reshape(1, 6, 32))
    assert tuple(sd["head.modulation"].shape) == (1, 2, 32)
    model = TinyWan()
    assert lib_gguf.load_into(model, p) == {"missing": [], "unexpected": [], "mismatched": []}
    assert torch.equal(model.patch_embedding.weight, pe.half().float())
    assert torch.equal(model.head.modulation, head_mod)
    # the raw view keeps the file's names and shapes
    raw = lib_gguf.load_state_dict(p, compat=False)
    assert tuple(raw["model.diffusion_model.patch_embedding.weight"].shape) == (128, 1, 2, 2)


def test_our_wan_file_keeps_5d_and_leading_ones_whole(tmp_path):
    torch.manual_seed(2)
    sd = {"patch_embedding.weight": torch.randn(32, 4, 1, 2, 2).half(), "patch_embedding.bias": torch.randn(32),
          "blocks.0.modulation": torch.randn(1, 6, 32), "blocks.0.self_attn.q.weight": torch.randn(32, 32).half()}
    p = tmp_path / "wan.gguf"
    lib_gguf.save(p, sd, {"general.architecture": "wan"})
    shapes = {t.name: [int(d) for d in t.shape] for t in gguf.GGUFReader(str(p)).tensors}
    assert shapes["patch_embedding.weight"] == [2, 2, 1, 4, 32] and shapes["blocks.0.modulation"] == [32, 6, 1]
    back = lib_gguf.load_state_dict(p)
    assert all(torch.equal(back[k].float(), v.float()) and back[k].shape == v.shape for k, v in sd.items())


def test_five_d_tensor_written_whole_by_gguf_py_reads(tmp_path):
    """ComfyUI-GGUF's fix_5d_tensors.py adds the 5-D weight back whole (F32)."""
    x = np.random.default_rng(3).standard_normal((16, 4, 1, 2, 2)).astype(np.float32)
    p = tmp_path / "fixed.gguf"
    w = gguf.GGUFWriter(str(p), "wan")
    w.add_tensor("patch_embedding.weight", x)
    w.add_tensor("patch_embedding.bias", np.zeros(16, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    sd = lib_gguf.load_state_dict(p)
    assert torch.equal(sd["patch_embedding.weight"], torch.from_numpy(x))


@pytest.mark.parametrize("arch_names, name, stored, want", [
    (["joint_blocks.0.x_block.attn.qkv.weight"], "pos_embed", (16, 8), (1, 16, 8)),
    (["double_layers.0.attn.w1q.weight"], "positional_encoding", (16, 8), (1, 16, 8)),
    (["double_layers.0.attn.w1q.weight"], "register_tokens", (8, 8), (1, 8, 8)),
    (["label_emb.0.0.weight"], "input_blocks.1.1.proj_in.weight", (8, 8, 1, 1), (8, 8)),
    (["layers.0.attention.qkv.weight"], "x_pad_token", (8,), (1, 8)),
])
def test_dropped_dimensions_restored_by_architecture(tmp_path, arch_names, name, stored, want):
    torch.manual_seed(4)
    x = torch.randn(stored)
    sd = {n: torch.randn(8, 8) for n in arch_names}
    sd[name] = x
    p = tmp_path / "m.gguf"
    lib_gguf.save(p, sd, {})
    got = lib_gguf.load_state_dict(p)[name]
    assert tuple(got.shape) == want and torch.equal(got.reshape(stored), x)


def test_restore_shape_leaves_right_shapes_alone():
    assert restore_shape("wan", "blocks.0.modulation", (1, 6, 32), {}) is None
    assert restore_shape("flux", "blocks.0.modulation", (6, 32), {}) is None
    assert restore_shape("sd1", "input_blocks.1.1.proj_in.weight", (8, 8, 1, 1), {}) is None  # SD1's are 1x1 convs
    assert restore_shape("wan", "patch_embedding.weight", (32, 4, 1, 2, 2), {"patch_embedding.bias": (32,)}) is None
    # no bias: no telling what the folded dimensions were
    assert restore_shape("wan", "patch_embedding.weight", (128, 1, 2, 2), {}) is None


def test_prefix_kept_when_not_every_name_has_it(tmp_path):
    p = tmp_path / "full.gguf"
    lib_gguf.save(p, {"model.diffusion_model.input_blocks.0.0.weight": torch.ones(4, 4),
                      "first_stage_model.decoder.conv_in.weight": torch.ones(4, 4)}, {})
    assert set(lib_gguf.load_state_dict(p)) == {"model.diffusion_model.input_blocks.0.0.weight",
                                                "first_stage_model.decoder.conv_in.weight"}


# -- BF16 1-D, NVFP4 companions ---------------------------------------------------------

def test_bf16_1d_tensors_come_out_float32(tmp_path):
    bias = torch.randn(8).bfloat16()
    w2 = torch.randn(4, 8).bfloat16()
    p = tmp_path / "bf16.gguf"
    lib_gguf.save(p, {"b": bias, "w": w2}, {"general.architecture": "flux"})
    sd = lib_gguf.load_state_dict(p)
    assert sd["b"].dtype == torch.float32 and torch.equal(sd["b"], bias.float())
    assert sd["w"].dtype == torch.bfloat16  # 2-D tensors stay as stored
    assert lib_gguf.load_state_dict(p, compat=False)["b"].dtype == torch.bfloat16


def _nvfp4(rows: int, cols: int, seed: int) -> GGUFParameter:
    """NVFP4 bytes: per 64 weights, 4 UE4M3 sub-block scales (finite ones) and 32 bytes of E2M1 codes."""
    g = torch.Generator().manual_seed(seed)
    nb = rows * cols // 64
    scales = torch.tensor([0x30, 0x38, 0x40, 0x28], dtype=torch.uint8)[torch.randint(0, 4, (nb, 4), generator=g)]
    qs = torch.randint(0, 256, (nb, 32), generator=g, dtype=torch.int32).to(torch.uint8)
    return GGUFParameter(torch.cat([scales, qs], 1).reshape(rows, -1), "NVFP4", (rows, cols))


def test_nvfp4_companion_scales(tmp_path):
    a, b = _nvfp4(4, 128, 0), _nvfp4(2, 64, 1)
    p = tmp_path / "nvfp4.gguf"
    lib_gguf.save(p, {
        "double_blocks.0.img_mlp.0.weight": a, "double_blocks.0.img_mlp.0.scale": torch.tensor([0.25]),
        "double_blocks.0.img_mlp.0.input_scale": torch.tensor([3.0]),
        "double_blocks.0.img_mlp.2.weight": b, "double_blocks.0.img_mlp.2.weight.scale": torch.tensor([1.0]),
        "double_blocks.0.img_attn.norm.query_norm.scale": torch.ones(16),  # a model's own .scale: kept
    }, {"general.architecture": "flux"})
    f = GGUFFile(p)
    assert f.companions["double_blocks.0.img_mlp.0.weight"] == {
        "scale": "double_blocks.0.img_mlp.0.scale", "input_scale": "double_blocks.0.img_mlp.0.input_scale"}
    sd = f.state_dict()
    assert set(sd) == {"double_blocks.0.img_mlp.0.weight", "double_blocks.0.img_mlp.2.weight",
                       "double_blocks.0.img_attn.norm.query_norm.scale"}
    w = sd["double_blocks.0.img_mlp.0.weight"]
    assert not hasattr(w, "gguf_cls") and w.dtype == torch.float32
    assert torch.equal(w, a.dequantize(torch.float32) * 0.25)
    assert sd["double_blocks.0.img_mlp.2.weight"].gguf_cls.name == "NVFP4"  # a scale of 1: kept quantized
    assert torch.equal(sd["double_blocks.0.img_mlp.2.weight"].data, b.data)


def test_nvfp4_bad_scale_is_named(tmp_path):
    p = tmp_path / "bad.gguf"
    lib_gguf.save(p, {"l.weight": _nvfp4(1, 64, 2), "l.scale": torch.ones(2)}, {})
    with pytest.raises(GGUFFormatError, match=r"'l.scale'.*one float"):
        lib_gguf.load_state_dict(p)


# -- Q1_0 ------------------------------------------------------------------------------

# ggml's quantize_row_q1_0_ref (ggml-org/ggml, 2026) on x[i] = sin(0.37 i) * (0.5 + 1.5 i / 255),
# 256 weights: two 18-byte blocks.
GGML_Q1_0 = bytes.fromhex("6e38ff01fe03fc07f80ff01fe03fc07f80ff203c00ff01fe03fc07f80ff01fe03fc07f80")


def _q1_input():
    i = np.arange(256, dtype=np.float64)
    return (np.sin(i * 0.37) * np.linspace(0.5, 2, 256)).astype(np.float32)


def test_q1_0_layout_by_hand():
    # block: f16 d, then bit j of the block in byte j // 8, bit j % 8 (least significant first); 1 -> +d, 0 -> -d
    d = torch.tensor([0.75, -2.0], dtype=torch.float16)
    bits = torch.zeros(2, 128, dtype=torch.bool)
    bits[0, [0, 9, 127]] = True
    bits[1, 64:] = True
    qs = torch.zeros(2, 16, dtype=torch.uint8)
    for blk in range(2):
        for j in range(128):
            if bits[blk, j]:
                qs[blk, j // 8] |= 1 << (j % 8)
    raw = torch.cat([d.view(torch.uint8).view(2, 2), qs], 1)
    want = torch.where(bits, d.float().view(2, 1), -d.float().view(2, 1))
    assert get_format("Q1_0").can_dequantize
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        got = lib_gguf.dequantize(raw, "Q1_0", (2, 128), dtype)
        assert got.dtype == dtype and torch.equal(got.float(), want.to(dtype).float())


def test_q1_0_matches_ggml_bytes(tmp_path):
    x = _q1_input()
    raw = torch.frombuffer(bytearray(GGML_Q1_0), dtype=torch.uint8)
    got = lib_gguf.dequantize(raw, "Q1_0", (256,), torch.float32)
    # what ggml's quantizer means: per 128 weights, +-mean(|x|) (float16) by sign
    blocks = x.reshape(2, 128)
    d = np.abs(blocks).astype(np.float32).mean(axis=1, dtype=np.float32).astype(np.float16).astype(np.float32)
    want = np.where(blocks >= 0, d[:, None], -d[:, None]).reshape(-1)
    assert torch.equal(got, torch.from_numpy(want))
    # through a file, with the GGUFParameter API
    p = tmp_path / "q1.gguf"
    lib_gguf.save(p, {"w": GGUFParameter(raw.reshape(2, 18), "Q1_0", (2, 128))}, {})
    w = lib_gguf.load_state_dict(p)["w"]
    assert w.gguf_cls.name == "Q1_0" and torch.equal(w.dequantize(torch.float32).reshape(-1), got)


def test_q1_0_against_a_built_ggml():
    """Only where GGML_LIB names a libggml-base built from ggml's sources (tests/compat/ggml_ctypes.py)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "compat"))
    try:
        import ggml_ctypes
    finally:
        sys.path.pop(0)
    g = ggml_ctypes.load()
    if g is None:
        pytest.skip("GGML_LIB not set")
    x = np.random.default_rng(5).standard_normal((8, 384)).astype(np.float32)
    q = g.quantize(41, x)
    rnd = np.random.default_rng(6).integers(0, 256, size=18 * 64, dtype=np.uint8)  # any bytes, NaN scales too
    for raw, n in ((q, x.size), (rnd, 64 * 128)):
        ref = g.dequantize(41, raw, n)
        ours = lib_gguf.dequantize(torch.from_numpy(raw), "Q1_0", (n,), torch.float32).numpy()
        assert np.array_equal(ref.view(np.uint32), ours.view(np.uint32))
