"""safetensors/GGUF -> GGUF conversion, the CLI, and the inspector."""
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import lib_gguf
from lib_gguf import GGUFFormatError
from lib_gguf.converter import convert
from lib_gguf.sample import FluxConfig, tiny_flux_state_dict

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def flux_sd():
    return tiny_flux_state_dict(seed=3)


@pytest.fixture()
def flux_file(tmp_path, flux_sd):
    p = tmp_path / "flux.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in flux_sd.items()}, str(p))
    return p


def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_convert_q4_k_s_reads_back_everywhere(tmp_path, flux_file, flux_sd):
    dst = tmp_path / "flux-Q4_K_S.gguf"
    seen = []
    summary = convert(flux_file, dst, "Q4_K_S", progress=lambda d, t, n: seen.append((d, t)))
    assert seen[-1] == (len(flux_sd), len(flux_sd)) and len(seen) == len(flux_sd)
    assert summary.n_tensors == len(flux_sd) and summary.architecture == "flux"
    assert summary.formats.get("Q4_K", 0) > 0 and 4 < summary.bits_per_weight < 16
    # our reader
    sd = lib_gguf.load_state_dict(dst)
    assert set(sd) == set(flux_sd)
    qkv = sd["double_blocks.0.img_attn.qkv.weight"]
    assert qkv.gguf_cls.name == "Q4_K" and tuple(qkv.shape) == tuple(flux_sd["double_blocks.0.img_attn.qkv.weight"].shape)
    assert _rel_err(qkv.dequantize(torch.float32), flux_sd["double_blocks.0.img_attn.qkv.weight"]) < 0.1
    assert sd["img_in.weight"].dtype == torch.bfloat16  # sensitive layer kept high
    assert sd["double_blocks.0.img_attn.norm.query_norm.scale"].dtype == torch.float32
    # gguf's own reader agrees on names, types and shapes
    r = gguf.GGUFReader(str(dst))
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["double_blocks.0.img_attn.qkv.weight"] == "Q4_K"
    assert types["img_in.weight"] == "BF16"
    meta = lib_gguf.read_metadata(dst)
    assert meta["forge_gguf_lora.recipe"] == "Q4_K_S"
    assert meta["general.architecture"] == "flux"
    assert json.loads(meta["forge_gguf_lora.tensor_types"])["double_blocks.0.img_attn.qkv.weight"] == "Q4_K"


def test_checkpoint_prefix_stripped_and_other_components_left_out(tmp_path, flux_sd):
    src = tmp_path / "ckpt.safetensors"
    full = {f"model.diffusion_model.{k}": v.half() for k, v in flux_sd.items()}
    full["first_stage_model.decoder.conv_in.weight"] = torch.randn(8, 4, 3, 3).half()
    save_file(full, str(src))
    summary = convert(src, tmp_path / "out.gguf", "Q8_0")
    assert summary.dropped == ["first_stage_model.decoder.conv_in.weight"]
    assert set(lib_gguf.load_state_dict(tmp_path / "out.gguf")) == set(flux_sd)


def test_folder_of_shards_and_gguf_requantize(tmp_path, flux_sd):
    shards = tmp_path / "shards"
    shards.mkdir()
    keys = sorted(flux_sd)
    half = len(keys) // 2
    save_file({k: flux_sd[k] for k in keys[:half]}, str(shards / "a.safetensors"))
    save_file({k: flux_sd[k] for k in keys[half:]}, str(shards / "b.safetensors"))
    q8 = tmp_path / "q8.gguf"
    convert(shards, q8, "Q8_0")
    q4 = tmp_path / "q4.gguf"
    summary = convert(q8, q4, "Q4_0")
    sd = lib_gguf.load_state_dict(q4)
    w = "single_blocks.0.linear1.weight"
    assert sd[w].gguf_cls.name == "Q4_0"
    assert _rel_err(sd[w].dequantize(torch.float32), flux_sd[w]) < 0.15
    assert summary.formats["Q4_0"] > 0


def test_diffusers_flux_is_refused_clearly(tmp_path):
    src = tmp_path / "diffusers.safetensors"
    save_file({"transformer_blocks.0.attn.to_q.weight": torch.zeros(64, 64),
               "single_transformer_blocks.0.attn.to_q.weight": torch.zeros(64, 64)}, str(src))
    with pytest.raises(GGUFFormatError, match="diffusers"):
        convert(src, tmp_path / "o.gguf", "Q8_0")
    assert not (tmp_path / "o.gguf").exists()


def test_failed_conversion_leaves_nothing_and_keeps_existing_output(tmp_path, flux_sd):
    src = tmp_path / "bad.safetensors"
    bad = dict(flux_sd)
    bad["single_blocks.0.linear2.weight"] = bad["single_blocks.0.linear2.weight"].clone()
    bad["single_blocks.0.linear2.weight"][0, 0] = float("nan")
    save_file(bad, str(src))
    dst = tmp_path / "out.gguf"
    dst.write_bytes(b"previous contents")
    with pytest.raises(GGUFFormatError, match="single_blocks.0.linear2.weight"):
        convert(src, dst, "Q8_0")
    assert dst.read_bytes() == b"previous contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors", "out.gguf"]


def test_bad_sources_are_clear_errors(tmp_path):
    with pytest.raises(GGUFFormatError, match="not found"):
        convert(tmp_path / "nope.safetensors", tmp_path / "o.gguf")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(GGUFFormatError, match="junk.safetensors"):
        convert(junk, tmp_path / "o.gguf")
    txt = tmp_path / "model.txt"
    txt.write_text("x")
    with pytest.raises(GGUFFormatError, match="expected a .safetensors file"):
        convert(txt, tmp_path / "o.gguf")


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_streams_tensor_by_tensor(tmp_path):
    """Peak memory is a small multiple of the largest tensor, not of the model."""
    cfg = FluxConfig(hidden_size=512, depth=3, depth_single_blocks=3, context_in_dim=512)
    sd = tiny_flux_state_dict(cfg)
    src = tmp_path / "big.safetensors"
    save_file(sd, str(src))
    model_bytes = sum(t.numel() * 4 for t in sd.values())
    largest = max(t.numel() * 4 for t in sd.values())
    del sd
    import gc
    gc.collect()
    base = _rss_anon()
    peak = [base]
    convert(src, tmp_path / "big.gguf", "Q8_0", progress=lambda d, t, n: peak.append(_rss_anon()))
    growth = max(peak) - base
    # holding the model would cost its float32 size plus the output; streaming, a few tensors
    # (allocator caches included)
    assert growth < max(6 * largest, model_bytes // 2), (growth, largest, model_bytes)


def test_cli_convert_inspect_presets(tmp_path, flux_file):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    dst = tmp_path / "cli.gguf"
    r = subprocess.run([sys.executable, "-m", "lib_gguf", "convert", str(flux_file), str(dst), "--type", "Q5_K_S"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "bits per weight" in r.stdout and "Q5_K" in r.stdout
    r = subprocess.run([sys.executable, "-m", "lib_gguf", "inspect", str(dst)], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "double_blocks.0.img_attn.qkv.weight" in r.stdout and "Q5_K" in r.stdout and "histogram" in r.stdout
    r = subprocess.run([sys.executable, "-m", "lib_gguf", "convert", str(tmp_path / "missing.safetensors"),
                        str(tmp_path / "x.gguf")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "missing.safetensors" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("preset,max_err", [("IQ3_S", 0.25), ("IQ1_M", 0.7), ("TQ2_0", 0.9), ("MXFP4", 0.2)])
def test_low_bit_presets_convert_and_read_back(tmp_path, flux_file, flux_sd, preset, max_err):
    """The lattice, ternary and FP4 formats as whole-model presets: the blocks' weights
    in that format (sensitive layers, norms and biases kept high), readable by gguf's
    own reader, and as close to the source as the format allows."""
    dst = tmp_path / f"flux-{preset}.gguf"
    summary = convert(flux_file, dst, preset)
    assert summary.formats.get(preset, 0) > 0 and set(summary.formats) <= {preset, "BF16", "F32"}
    name = "double_blocks.0.img_attn.qkv.weight"
    if preset in gguf.GGMLQuantizationType.__members__:  # gguf 0.10 (Forge's era) predates TQ2_0 and MXFP4
        types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(dst)).tensors}
        assert types[name] == preset and types["img_in.weight"] == "BF16"
    w = lib_gguf.load_state_dict(dst)[name]
    assert w.gguf_cls.name == preset
    assert _rel_err(w.dequantize(torch.float32), flux_sd[name].to(torch.bfloat16)) < max_err


@pytest.mark.parametrize("dtype,value", [(torch.bfloat16, float("nan")), (torch.float16, float("inf")),
                                         (torch.float32, float("-inf")), (torch.float8_e4m3fn, float("nan"))])
def test_non_finite_values_are_found_in_every_source_dtype(tmp_path, flux_sd, dtype, value):
    """The one-pass finite check (extremes) and the float8 path both catch a single bad value."""
    src = tmp_path / "bad.safetensors"
    bad = dict(flux_sd)
    w = bad["double_blocks.0.img_mlp.0.weight"].to(dtype).clone()
    w.view(-1)[w.numel() // 2 + 7] = value
    bad["double_blocks.0.img_mlp.0.weight"] = w
    save_file(bad, str(src))
    with pytest.raises(GGUFFormatError, match=r"double_blocks.0.img_mlp.0.weight.*1 inf or NaN|1 inf or NaN"):
        convert(src, tmp_path / "out.gguf", "Q8_0")
    assert not (tmp_path / "out.gguf").exists()
