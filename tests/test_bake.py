"""Baking LoRAs into a new GGUF file, through the CLI and the function."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch
from safetensors.torch import save_file

import lib_gguf
from lib_gguf import GGUFParameter
from lib_gguf.sample import tiny_flux_state_dict
from lib_lora import LoraError
from lib_lora.bake import bake_loras

ROOT = Path(__file__).resolve().parents[1]
H, R = 256, 8


@pytest.fixture()
def model(tmp_path):
    sd = tiny_flux_state_dict()
    q = {k: (GGUFParameter(lib_gguf.quantize(v, "Q5_0"), "Q5_0", v.shape) if v.ndim == 2 else v) for k, v in sd.items()}
    p = tmp_path / "m.gguf"
    lib_gguf.save(p, q, {"general.architecture": "flux"})
    return p


@pytest.fixture()
def lora(tmp_path):
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(3 * H, R, generator=g) * 0.1, torch.randn(R, H, generator=g) * 0.1
    p = tmp_path / "style.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up,
               "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down}, str(p))
    return p, up @ down


def test_bake_cli(tmp_path, model, lora):
    path, delta = lora
    out = tmp_path / "baked.gguf"
    before = model.read_bytes()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "lib_lora", "bake", str(model), f"{path}:0.7", "-o", str(out)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert model.read_bytes() == before  # input untouched
    src = lib_gguf.load_state_dict(model)
    baked = lib_gguf.load_state_dict(out)
    name = "double_blocks.0.img_attn.qkv.weight"
    assert baked[name].gguf_cls.name == "Q5_0"
    want = lib_gguf.quantize(src[name].dequantize(torch.float32) + 0.7 * delta, "Q5_0")
    assert torch.equal(baked[name].data, want)
    for k in src:  # everything else copied byte for byte
        if k != name:
            a, b = src[k], baked[k]
            assert torch.equal(a.data if isinstance(a, GGUFParameter) else a, b.data if isinstance(b, GGUFParameter) else b)
    meta = lib_gguf.read_metadata(out)
    # the LoRA's file name and content hash, never a local path
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    assert json.loads(meta["forge_gguf_lora.loras"]) == [{"file": "style.safetensors", "sha256": sha, "strength": 0.7}]
    assert str(path.parent) not in json.dumps(meta, default=str)
    assert meta["general.architecture"] == "flux"
    assert [t.name for t in gguf.GGUFReader(str(out)).tensors] == list(src)


def test_bake_errors_leave_no_output(tmp_path, model):
    out = tmp_path / "o.gguf"
    foreign = tmp_path / "sdxl.safetensors"
    save_file({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(4, 2),
               "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 4)}, str(foreign))
    with pytest.raises(LoraError, match="sdxl.safetensors"):
        bake_loras(model, [(foreign, 1.0)], out)
    assert not out.exists()
