"""An SDXL-style UNet GGUF, written as ComfyUI-GGUF's tools write it, through Forge's loader.

    FORGE_DIR=/path/to/forge python tests/forge/run_forge_unet_check.py OUT_DIR FORMAT [FORMAT ...]

Runs in an interpreter that imports Forge's backend. For each format: Forge's own UNet
(``IntegratedUNet2DConditionModel``, SDXL's layout at a small width: linear projections
in the transformers, label embedding) is built once to get the real parameter names and
shapes; its weights go to a GGUF file in that format with the conv kernels quantized too
and every tensor whose size is not whole rows of blocks stored as (n/256, 256) rows with
``comfy.gguf.orig_shape`` (what ComfyUI-GGUF's converter and llama.cpp's quantizer
write); the file loads through our loader and Forge's ``load_huggingface_component``,
runs, takes a LoRA on a transformer projection merged and at run time, and comes back
to its exact bytes when the LoRA is removed. Prints one JSON line per format.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from forge_env import ARGS, cpu_patcher, failure, load_as_forge_does, removal_restores, snapshot  # noqa: E402  (sets up the paths)

out_dir, formats = ARGS[0], ARGS[1:]

import torch  # noqa: E402

import extension  # noqa: E402
import lib_gguf  # noqa: E402
from lib_lora.policy import LoraOptions  # noqa: E402

from backend import utils  # noqa: E402
from backend.nn.unet import IntegratedUNet2DConditionModel  # noqa: E402

assert extension.register()
CFG = dict(in_channels=4, model_channels=64, out_channels=4, num_res_blocks=[1, 1], channel_mult=[1, 2],
           num_head_channels=32, use_spatial_transformer=True, transformer_depth=[0, 1], transformer_depth_output=[0, 0, 1, 1],
           transformer_depth_middle=1, context_dim=96, use_linear_in_transformer=True, adm_in_channels=160,
           num_classes="sequential", use_scale_shift_norm=False, resblock_updown=False)
KEY = "input_blocks.3.1.proj_in.weight"  # a Linear of the second level's transformer (128 wide)


def reference_state_dict():
    torch.manual_seed(0)
    m = IntegratedUNet2DConditionModel(**CFG)
    sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
    for k, v in sd.items():  # weights of a trained size, not the init's zeros
        if v.is_floating_point():
            sd[k] = torch.randn(v.shape) * (0.05 if v.ndim > 1 else 0.01)
    return sd


def write(fmt, sd):
    f = lib_gguf.get_format(fmt)
    q = {}
    for k, v in sd.items():
        n = v.numel()
        if v.ndim >= 2 and n % f.block_size == 0 and not k.startswith(("input_blocks.0.", "out.")):
            rows = v.reshape(-1, v.shape[-1]) if f.fits(v.shape[-1]) else v.reshape(-1, 256)
            q[k] = lib_gguf.GGUFParameter(lib_gguf.quantize(rows, f), f, v.shape)
        else:
            q[k] = v.half() if v.ndim >= 2 else v
    p = os.path.join(out_dir, f"unet-{fmt}.gguf")
    lib_gguf.save(p, q, {"general.architecture": "sdxl"})
    return p, q


def build(path):
    return load_as_forge_does(path, CFG, "unet", "UNet2DConditionModel", [torch.float16, torch.float32])


def run(model):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 16, 16, generator=g)
    ctx = torch.randn(1, 8, CFG["context_dim"], generator=g)
    y = torch.randn(1, CFG["adm_in_channels"], generator=g)
    with torch.no_grad():
        return model(x, timesteps=torch.tensor([500.0]), context=ctx, y=y).float()



sd = reference_state_dict()
for fmt in formats:
    res = {"format": fmt}
    try:
        path, written = write(fmt, sd)
        res["reshaped_in_file"] = sum(1 for k, v in written.items() if getattr(v, "gguf_cls", None) is not None
                                      and not v.gguf_cls.fits(int(v.shape[-1])))
        model = build(path)
        conv = model.input_blocks[1][0].in_layers[2].weight
        res["conv_weight"] = [type(conv).__name__, str(conv.dtype), list(conv.shape)]
        w = utils.get_attr(model, KEY)
        res["proj_in"] = [getattr(getattr(w, "gguf_cls", None), "name", None), list(w.shape)]
        res["storage_dtype"] = str(model.storage_dtype)
        base = run(model)
        res["runs"] = bool(torch.isfinite(base).all())
        before = snapshot(model)
        patcher = cpu_patcher(model)
        g = torch.Generator().manual_seed(2)
        n_out, n_in = w.shape
        up, down = torch.randn(n_out, 4, generator=g), torch.randn(4, n_in, generator=g)
        outs = {}
        for mode in ("merge", "runtime"):
            extension.set_options_provider(lambda mode=mode: LoraOptions(mode_by_format={fmt: mode}))
            patcher.lora_patches = {}
            patcher.add_patches(filename="t.safetensors", patches={KEY: ("lora", (up, down, None, None, None))})
            patcher.refresh_loras()
            outs[mode] = run(model)
            res[f"{mode}_modes"] = extension.last_modes(model)
            res[f"{mode}_format"] = getattr(getattr(utils.get_attr(model, KEY), "gguf_cls", None), "name", None)
        effect = float((outs["runtime"] - base).abs().max())
        res["lora_changes_output"] = effect
        res["merge_vs_runtime"] = float((outs["merge"] - outs["runtime"]).abs().max()) / max(effect, 1e-12)
        res["merge_keeps"] = float((outs["merge"] - base).abs().max()) / max(effect, 1e-12)
        res.update(removal_restores(patcher, model, before, base, run))
        res["ok"] = True
    except Exception as e:
        res.update(failure(e))
    finally:
        extension.set_options_provider(None)
    print(json.dumps(res), flush=True)
