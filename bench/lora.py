"""LoRA cost on a Flux double block's linears, CPU.

    python bench/lora.py [--tokens 256,1024] [--dtype float16] [--hidden 3072] [--rank 16] [--repeat 5]

Times the image stream's linears of one Flux double block (attention qkv and proj,
MLP in and out) in Q4_K on each ``--tokens`` count, inputs in ``--dtype``: with no
LoRA, with a rank-16 LoRA at run time (lib_lora's low-rank delta), and with the full
delta re-merged into the dequantized weight on every forward (what Forge's "online"
LoRA does). Two blocks share the same weights, one with the LoRA attached; their
forwards alternate round by round and each figure is the median, so machine noise
hits them alike (the machine is shared and noisy): the ratios are what to read (goal,
issue 16: the run-time LoRA at most 5% over no LoRA). Also the merge-mode apply time
of one weight beside that format's quantize time.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lib_gguf  # noqa: E402
from lib_gguf import GGUFLinear, GGUFParameter, get_format  # noqa: E402
from lib_lora import apply_loras  # noqa: E402
from lib_lora.loader import LoraFile, Patch  # noqa: E402


def random_q4_k(out_f: int, in_f: int, g: torch.Generator) -> GGUFParameter:
    """Valid Q4_K bytes without paying for quantization: random codes, sane fp16 scales."""
    f = get_format("Q4_K")
    nb = out_f * in_f // 256
    raw = torch.randint(0, 256, (nb, f.type_size), dtype=torch.uint8, generator=g)
    scales = torch.full((nb, 2), 0.002, dtype=torch.float16)
    raw[:, :4] = scales.view(torch.uint8).reshape(nb, 4)
    return GGUFParameter(raw.reshape(out_f, -1), f, (out_f, in_f))


def best_time(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def interleaved(fns: dict, repeat: int) -> dict:
    """Median seconds of each function, their runs alternating round by round."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(repeat):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def build_block(shapes: dict, weights: dict) -> torch.nn.Module:
    block = torch.nn.Module()
    for name, (o, i) in shapes.items():
        lin = GGUFLinear.from_linear(torch.nn.Linear(1, 1, bias=False), weights[name])
        lin.in_features, lin.out_features = i, o
        parent = block
        for part in name.split(".")[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(name.split(".")[-1], lin)
    return block


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="256,1024", help="comma-separated token counts")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--hidden", type=int, default=3072)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    print(f"command: python bench/lora.py --tokens {a.tokens} --dtype {a.dtype} --hidden {a.hidden} "
          f"--rank {a.rank} --repeat {a.repeat} --threads {a.threads}")
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {a.threads} threads")
    h = a.hidden
    g = torch.Generator().manual_seed(0)
    shapes = {"img_attn.qkv": (3 * h, h), "img_attn.proj": (h, h), "img_mlp.0": (4 * h, h), "img_mlp.2": (h, 4 * h)}
    weights = {name: random_q4_k(o, i, g) for name, (o, i) in shapes.items()}
    plain, block = build_block(shapes, weights), build_block(shapes, weights)
    lora = LoraFile("bench")
    for name, (o, i) in shapes.items():
        up = torch.randn(o, a.rank, generator=g) * 0.01
        down = torch.randn(a.rank, i, generator=g) * 0.01
        lora.patches[f"{name}.weight"] = [Patch(f"{name}.weight", "lora", {"up": up, "down": down}, float(a.rank))]
    handle = apply_loras(block, [(lora, 1.0)], mode="runtime")
    n_w = sum(o * i for o, i in shapes.values())
    print(f"\nQ4_K, {n_w / 1e6:.1f} M weights, rank {a.rank}, {a.dtype} inputs; median of {a.repeat} alternating rounds\n")
    print("| tokens | no LoRA (s) | run-time LoRA (ours) | whole delta re-merged each forward (Forge online) | "
          "ours / re-merge overhead |")
    print("|---|---|---|---|---|")
    for tokens in [int(t) for t in a.tokens.split(",") if t.strip()]:
        xs = {name: torch.randn(tokens, i, generator=g).to(dtype) for name, (o, i) in shapes.items()}

        def forward(mod):
            for name in shapes:
                mod.get_submodule(name)(xs[name])

        def forward_remerge():  # Forge's online LoRA: whole delta merged into the weight, every call
            for name in shapes:
                p = lora.patches[f"{name}.weight"][0]
                w = weights[name].dequantize(torch.float32)
                w = w + (p.tensors["up"] @ p.tensors["down"]) * p.scale
                F.linear(xs[name], w.to(dtype))

        t = interleaved({"base": lambda: forward(plain), "runtime": lambda: forward(block),
                         "remerge": forward_remerge}, a.repeat)
        over_rt, over_rm = t["runtime"] - t["base"], t["remerge"] - t["base"]
        print(f"| {tokens} | {t['base']:.3f} | {t['runtime']:.3f} s, {t['runtime'] / t['base'] - 1:+.1%} | "
              f"{t['remerge']:.3f} s, {t['remerge'] / t['base'] - 1:+.1%} | "
              + (f"{over_rt / over_rm:.2f} |" if over_rm > 0 else "- |"), flush=True)
    handle.remove()
    layers = {name: block.get_submodule(name) for name in shapes}

    # merge-mode apply of one weight vs quantizing it
    name = "img_attn.proj"
    w = layers[name].weight
    wf = w.dequantize(torch.float32)
    q_time = best_time(lambda: lib_gguf.quantize(wf, "Q4_K"), 1)
    one = LoraFile("one")
    one.patches[f"{name}.weight"] = lora.patches[f"{name}.weight"]

    def merge_once():
        apply_loras(block, [(one, 1.0)], mode="merge").remove()

    m_time = best_time(merge_once, 1)
    print(f"\nmerge-mode apply of one {h}x{h} Q4_K weight: {m_time:.2f} s; quantize alone: {q_time:.2f} s; "
          f"ratio {m_time / q_time:.2f}")


if __name__ == "__main__":
    main()
