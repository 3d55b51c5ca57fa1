"""One sampling step of a small Flux through Forge's real backend, Q4_K:
no LoRA, a LoRA at run time (this extension), and Forge's own online LoRA.

    FORGE_DIR=/path/to/forge python bench/forge_step.py [--hidden 1024] [--depth 2] [--single 2] [--tokens 1024]

Run it with an interpreter where Forge's backend imports (numpy < 2, einops,
psutil, pillow, pyyaml, safetensors, sentencepiece). Forge's own online LoRA is
measured with Forge's own loader and its bundled ``gguf`` (this extension
unregistered), the others with this extension registered; all in one run.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

FORGE = os.environ.get("FORGE_DIR")
if not FORGE:
    sys.exit("set FORGE_DIR to a Forge checkout")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ap = argparse.ArgumentParser()
for _flag, _default, _help in (("hidden", 1024, "model width"), ("depth", 2, "double blocks"),
                               ("single", 2, "single blocks"), ("tokens", 1024, "image tokens (latent pixels / 4)"),
                               ("rank", 16, "LoRA rank"), ("repeat", 3, "timed steps")):
    ap.add_argument(f"--{_flag}", type=int, default=_default, help=_help)
a = ap.parse_args()
sys.argv = [sys.argv[0], "--always-cpu"]
sys.path.insert(0, ROOT)
sys.path.insert(1, FORGE)
sys.path.insert(2, os.path.join(FORGE, "packages_3rdparty"))  # Forge's own gguf, for Forge's own loader

import torch  # noqa: E402

import extension  # noqa: E402
import lib_gguf  # noqa: E402
from lib_gguf.sample import FluxConfig, tiny_flux_state_dict  # noqa: E402
from backend import memory_management, utils  # noqa: E402
from backend.nn.flux import IntegratedFluxTransformer2DModel  # noqa: E402
from backend.operations import using_forge_operations  # noqa: E402
from backend.patcher.base import ModelPatcher  # noqa: E402
from backend.state_dict import load_state_dict  # noqa: E402

torch.set_num_threads(2)
cfg = FluxConfig(hidden_size=a.hidden, num_heads=a.hidden // 128, depth=a.depth, depth_single_blocks=a.single)
sd = tiny_flux_state_dict(cfg)
path = os.path.join("/tmp", f"forge-step-{a.hidden}.gguf")
q = {k: (lib_gguf.GGUFParameter(lib_gguf.quantize(v, "Q4_K"), "Q4_K", v.shape)
         if v.ndim == 2 and v.shape[1] % 256 == 0 and not k.startswith(("img_in", "final_layer")) else
         (v.half() if v.ndim == 2 else v)) for k, v in sd.items()}
lib_gguf.save(path, q)

side = int(a.tokens ** 0.5)
g = torch.Generator().manual_seed(0)
x = torch.randn(1, 16, 2 * side, 2 * side, generator=g)
ctx = torch.randn(1, 256, cfg.context_in_dim, generator=g)
y = torch.randn(1, cfg.vec_in_dim, generator=g)
patches = {}
for i in range(a.depth):
    for s in ("img", "txt"):
        for name, (o, n) in {f"{s}_attn.qkv": (3 * a.hidden, a.hidden), f"{s}_attn.proj": (a.hidden, a.hidden),
                             f"{s}_mlp.0": (4 * a.hidden, a.hidden), f"{s}_mlp.2": (a.hidden, 4 * a.hidden)}.items():
            patches[f"double_blocks.{i}.{name}.weight"] = ("lora", (torch.randn(o, a.rank, generator=g) * 0.01,
                                                                    torch.randn(a.rank, n, generator=g) * 0.01,
                                                                    None, None, None))


def build():
    state = utils.load_torch_file(path)
    with using_forge_operations(device=torch.device("cpu"), dtype=torch.float16, manual_cast_enabled=False,
                                bnb_dtype="gguf"):
        model = IntegratedFluxTransformer2DModel(**cfg.as_kwargs())
    load_state_dict(model, state)
    memory_management.bake_gguf_model(model)
    return model


def step(model):
    with torch.no_grad():
        model(x, torch.tensor([0.5]), ctx, y, guidance=torch.tensor([3.5]))


def timed(model):
    step(model)
    best = float("inf")
    for _ in range(a.repeat):
        t = time.perf_counter()
        step(model)
        best = min(best, time.perf_counter() - t)
    return best


def with_online_lora(model):
    p = ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    p.add_patches(filename="bench.safetensors", patches=patches, online_mode=True)
    p.refresh_loras()
    return model


extension.register()
ours = build()
t_none = timed(ours)
t_ours = timed(with_online_lora(ours))
extension.unregister()
forge_model = build()  # Forge's own loader and bundled gguf
t_forge_none = timed(forge_model)
t_forge = timed(with_online_lora(forge_model))

print(f"command: FORGE_DIR=... python bench/forge_step.py --hidden {a.hidden} --depth {a.depth} --single {a.single} "
      f"--tokens {a.tokens} --rank {a.rank} --repeat {a.repeat}")
print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, 2 threads; "
      f"Forge at {FORGE}")
print(f"\nFlux hidden {a.hidden}, {a.depth} double + {a.single} single blocks, Q4_K, {a.tokens} image + 256 text "
      f"tokens, rank-{a.rank} LoRA on every double-block linear\n")
print("| variant | seconds per step | vs no LoRA |")
print("|---|---|---|")
print(f"| no LoRA (this extension's loader) | {t_none:.3f} | - |")
print(f"| LoRA at run time (this extension) | {t_ours:.3f} | {t_ours / t_none - 1:+.1%} |")
print(f"| no LoRA (Forge's own loader) | {t_forge_none:.3f} | - |")
print(f"| Forge's online LoRA (re-merged each step) | {t_forge:.3f} | {t_forge / t_forge_none - 1:+.1%} |")
