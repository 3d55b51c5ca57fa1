"""Runs inside an interpreter that can import Forge's backend (numpy < 2, einops, ...).

    FORGE_DIR=/path/to/forge python tests/forge/run_forge_check.py OUT_DIR FORMAT [FORMAT ...]

For each format: a tiny Flux in that format loads through Forge's loader with our
backend registered, runs, takes a LoRA merged (Forge's LoraLoader) and at run time
(Forge's online mode, which our glue turns into a low-rank delta), compares with
the float reference, and checks the exact bytes come back when the LoRA is removed.
Prints one JSON line per format.
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
from lib_gguf.sample import FluxConfig, in_format, tiny_flux_state_dict  # noqa: E402

from backend import utils  # noqa: E402
from backend.memory_management import LoadedModel  # noqa: E402
from lib_lora.policy import LoraOptions  # noqa: E402

import gguf  # noqa: E402

originals = (utils.load_torch_file,)
assert extension.register() and extension.register()  # idempotent
cfg = FluxConfig()
sd = tiny_flux_state_dict(cfg, seed=1)
H = cfg.hidden_size


def write(fmt):
    p = os.path.join(out_dir, f"flux-{fmt}.gguf")
    lib_gguf.save(p, in_format(sd, fmt))
    return p


def build(path):
    return load_as_forge_does(path, cfg.as_kwargs(), "transformer", "FluxTransformer2DModel",
                              [torch.bfloat16, torch.float16, torch.float32])


def run(model):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 8, 8, generator=g)
    ctx = torch.randn(1, 4, cfg.context_in_dim, generator=g)
    y = torch.randn(1, cfg.vec_in_dim, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([0.5]), ctx, y, guidance=torch.tensor([3.5])).float()



R = 8
g = torch.Generator().manual_seed(7)
UP = torch.randn(3 * H, R, generator=g) * 0.05
DOWN = torch.randn(R, H, generator=g) * 0.05
KEY = "double_blocks.0.img_attn.qkv.weight"

def float_reference():
    """F16 weights, the LoRA merged by Forge in float: what every format should come close to."""
    model = build(write("F16"))
    base = run(model)
    patcher = cpu_patcher(model)
    patcher.add_patches(filename="t.safetensors", patches={KEY: ("lora", (UP, DOWN, None, None, None))})
    patcher.refresh_loras()
    return base, run(model)


REF_BASE, REF_LORA = float_reference()


def same_network_reference(fmt):
    """The model of ``fmt`` with every weight stored as its dequantized float values (the same
    network), the LoRA merged by Forge in float: what this format's run with the LoRA should give."""
    from lib_gguf.parameter import dequantize_tensor, is_gguf

    q = in_format(sd, fmt)
    p = os.path.join(out_dir, f"flux-{fmt}-dequantized.gguf")
    lib_gguf.save(p, {k: dequantize_tensor(v, torch.float32) if is_gguf(v) else v for k, v in q.items()})
    model = build(p)
    base = run(model)
    patcher = cpu_patcher(model)
    patcher.add_patches(filename="t.safetensors", patches={KEY: ("lora", (UP, DOWN, None, None, None))})
    patcher.refresh_loras()
    return base, run(model)

def use_options(**kw):
    extension.set_options_provider(lambda: LoraOptions(**kw))


def with_lora(patcher, online, strength=1.0):
    patcher.lora_patches = {}
    patcher.add_patches(filename="t.safetensors", patches={KEY: ("lora", (UP, DOWN, None, None, None))},
                        strength_patch=strength, online_mode=online)
    patcher.refresh_loras()


def hooks(model):
    return len(model.double_blocks[0].img_attn.qkv._forward_hooks)


for fmt in formats:
    res = {"format": fmt, "gguf": getattr(gguf, "__file__", "?")}
    try:
        model = build(write(fmt))
        w = model.double_blocks[0].img_attn.qkv.weight
        res["param_type"] = type(w).__name__
        res["storage_dtype"] = str(model.storage_dtype)
        res["weight_dtype"] = str(w.dtype)
        base = run(model)
        res["runs"] = bool(torch.isfinite(base).all())
        before = snapshot(model)
        patcher = cpu_patcher(model)
        delta_out = {}
        # "auto" with no per-format choice: Forge's own switch decides (merge / run time)
        use_options(default_gguf_mode="auto")
        for online in (False, True):
            with_lora(patcher, online)
            out = run(model)
            delta_out[online] = out
            layer = model.double_blocks[0].img_attn.qkv
            res[f"{'online' if online else 'merged'}_hooks"] = hooks(model)
            res[f"{'online' if online else 'merged'}_still_forge_online"] = "weight" in getattr(layer, "forge_online_loras", {})
            res[f"{'online' if online else 'merged'}_modes"] = extension.last_modes(model)
        res["lora_changes_output"] = float((delta_out[True] - base).abs().max())
        # error against the float reference, relative to this format's own error without a LoRA
        scale = float((REF_LORA - REF_BASE).abs().max())
        res["runtime_err_vs_float"] = float((delta_out[True] - REF_LORA).abs().max()) / scale
        res["base_err_vs_float"] = float((base - REF_BASE).abs().max()) / scale
        res["merged_err_vs_float"] = float((delta_out[False] - REF_LORA).abs().max()) / scale
        # the LoRA's change of the output against the change Forge's float merge makes on the same
        # network (this format's weights, dequantized): "keep" is the share of that change a path
        # reproduces, "err" the rest (L2, relative); a dropped LoRA keeps 0 with err 1
        ref_base, ref_lora = same_network_reference(fmt)
        res["same_network_base_err"] = float((base - ref_base).norm() / (ref_lora - ref_base).norm())
        ref = (ref_lora - ref_base).double().flatten()
        for online in (False, True):
            got = (delta_out[online] - base).double().flatten()
            res[f"{'runtime' if online else 'merged'}_effect_keep"] = float(got @ ref / (ref @ ref))
            res[f"{'runtime' if online else 'merged'}_effect_err"] = float((got - ref).norm() / ref.norm())
        res["merged_vs_runtime"] = float((delta_out[True] - delta_out[False]).abs().max() /
                                         (delta_out[True] - base).abs().max())

        if fmt == "F16":
            # a GGUF file's float weights follow their own format's option too
            use_options(mode_by_format={"F16": "runtime"})
            with_lora(patcher, online=False)
            res["policy_runtime_hooks"] = hooks(model)
            res["policy_runtime_modes"] = extension.last_modes(model)
            use_options(mode_by_format={"F16": "merge"})
            patcher.refresh_loras()
            res["policy_merge_hooks"] = hooks(model)
            res["policy_merge_modes"] = extension.last_modes(model)
            res["policy_merge_changes_output"] = float((run(model) - base).abs().max())
        if fmt != "F16":
            # the per-format choice overrides Forge's switch, and applies at the next refresh
            use_options(mode_by_format={fmt: "runtime"})
            with_lora(patcher, online=False)
            res["policy_runtime_hooks"] = hooks(model)
            res["policy_runtime_equal"] = bool(torch.equal(run(model), delta_out[True]))
            use_options(mode_by_format={fmt: "merge"})
            patcher.refresh_loras()  # same patches, new options: re-routed without a patch change
            res["policy_merge_hooks"] = hooks(model)
            res["policy_merge_equal"] = bool(torch.equal(run(model), delta_out[False]))
            res["policy_merge_modes"] = extension.last_modes(model)
            res["policy_merge_format"] = model.double_blocks[0].img_attn.qkv.weight.gguf_cls.name
            res["policy_merge_changes_output"] = float((run(model) - base).abs().max())

            # memory management: Forge's real load/unload, with CPU swap, then a full load
            use_options()  # the defaults: GGUF LoRAs at run time
            with_lora(patcher, online=False)
            ref = run(model)
            lm = LoadedModel(patcher)
            lm.model_load(model_gpu_memory_when_using_cpu_swap=1)
            swapped = run(lm.real_model)
            lm.model_unload()
            lm = LoadedModel(patcher)
            lm.model_load()
            reloaded = run(lm.real_model)
            lm.model_unload(avoid_model_moving=True)
            patcher.refresh_loras()  # what a reload does: same patches, Forge returns early
            again = run(model)
            res["reload_hooks"] = hooks(model)
            res["reload_keeps_lora"] = all(torch.equal(ref, o) for o in (swapped, reloaded, again))
            # a strength change between generations, and back
            with_lora(patcher, online=False, strength=0.5)
            half = run(model)
            with_lora(patcher, online=False, strength=1.0)
            res["strength_change"] = bool(not torch.equal(half, ref) and not torch.equal(half, base)
                                          and torch.equal(run(model), ref))
        res.update(removal_restores(patcher, model, before, base, run))
        res["hooks_after_remove"] = hooks(model)
        res["ok"] = True
    except Exception as e:
        res.update(failure(e))
    print(json.dumps(res), flush=True)

extension.unregister()
assert utils.load_torch_file is originals[0]
print(json.dumps({"unregister_restores": True}))
