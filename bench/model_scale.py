"""Convert and bake at model scale: a full-width Flux-shaped checkpoint, end to end.

    python bench/model_scale.py [--double 3] [--single 4] [--recipe Q4_K_S] [--workdir DIR] [--keep]

Writes a Flux-dev-shaped safetensors (the real names and widths, hidden 3072, ``--double``
double and ``--single`` single blocks, bf16 random weights; 3 + 4 blocks are 1.58 B
weights, 3.2 GB), then, each in a fresh process so that its peak memory is its own:

* ``convert`` with ``--recipe``: wall time (the kernels compiled before), the split into
  reading (each tensor copied out of the mapped file, to time the reading itself),
  quantizing and writing, and the peak anonymous memory (sampled every 20 ms: file pages of the
  memory-mapped source are not counted, the goal is about memory beyond them);
* ggml's C quantizer (``ggml-python``, single thread) on the same tensors in the same
  formats, for the ratio (skipped with a note when ggml-python is not installed);
* a bake (``lib_lora.bake.bake_loras``, what ``python -m lib_lora bake`` runs) of a rank-16 kohya LoRA on
  every linear of every block into the converted file: its wall time, split (dequantize and merge,
  range check, quantize, write), beside the convert's whole time for the tensors it touches (each
  tensor's reading, finite check, quantizing and writing, timed tensor by tensor in the writer).

Goals (issue 12): a 12 B Flux to Q4_K_S in at most 5 minutes on two cores (the
whole-model figure scales this run's quantize rate to Flux-dev's 11.9 B weights);
baking at most 1.1x a convert of the tensors it touches; peak memory at most the
largest tensor's float size plus 1 GB beyond the mapped files.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLUX_DEV_WEIGHTS = 11.90e9

# run in a child process: the job, timed and split, with its peak anonymous memory
CHILD = r'''
import json, os, sys, threading, time
sys.path.insert(0, sys.argv[1])
job, args = sys.argv[2], json.loads(sys.argv[3])

peak = [0]
def anon_kb():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0
stop = threading.Event()
def sample():
    while not stop.is_set():
        peak[0] = max(peak[0], anon_kb())
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()

import torch
import lib_gguf
import lib_gguf.quant as quant
import lib_gguf.converter as converter
import lib_gguf.writer as writer
times = {"read": 0.0, "quantize": 0.0, "merge": 0.0, "check": 0.0, "write": 0.0}
per_tensor = {}  # name -> seconds reading and quantizing it (the convert's old measure)
whole_tensor = {}  # name -> seconds making its bytes and writing them (everything done for it)
current = [None]
def add(d, name, dt):
    if name:
        d[name] = d.get(name, 0.0) + dt
def timer(key, fn, named=None):
    def wrapped(*a, **k):
        t = time.perf_counter()
        out = fn(*a, **k)
        dt = time.perf_counter() - t
        times[key] += dt
        if named is not None:
            add(per_tensor, named(a, k), dt)
        return out
    return wrapped
orig_quantize = quant.quantize
timed_quantize = timer("quantize", orig_quantize, lambda a, k: k.get("name"))
quant.quantize = converter.quantize = lib_gguf.quantize = timed_quantize  # each caller's own reference
orig_bytes_of, orig_write = writer._bytes_of, writer._write
def bytes_of(name, *a, **k):
    current[0] = name
    t = time.perf_counter()
    out = orig_bytes_of(name, *a, **k)
    add(whole_tensor, name, time.perf_counter() - t)
    return out
def write(f, data, path):
    t = time.perf_counter()
    orig_write(f, data, path)
    dt = time.perf_counter() - t
    times["write"] += dt
    add(whole_tensor, current[0], dt)
writer._bytes_of, writer._write = bytes_of, write
orig_open = converter.open_source
def open_source(src):
    s = orig_open(src)
    load = s.load
    def timed_load(name):
        t = time.perf_counter()
        out = load(name)
        out = torch.empty_like(out).copy_(out)  # touch every page now: reading, not quantizing
        dt = time.perf_counter() - t
        times["read"] += dt
        add(per_tensor, name, dt)
        return out
    s.load = timed_load
    return s
converter.open_source = open_source
if job == "bake":
    import lib_lora.bake as bake
    bake.merged_weight = timer("merge", bake.merged_weight)  # dequantize, add the LoRA, finite check
    bake.check_range = timer("check", bake.check_range)

for fmt in args.get("warm", []):  # compile (or load from numba's cache) before timing
    orig_quantize(torch.randn(4, 256), fmt)
base = anon_kb()
t0 = time.perf_counter()
if job == "convert":
    summary = converter.convert(args["src"], args["dst"], args["recipe"])
    extra = {"n_weights": summary.n_weights, "formats": summary.formats}
elif job == "bake":
    from lib_lora.bake import bake_loras
    r = bake_loras(args["model"], [(args["lora"], 1.0)], args["dst"])
    extra = {"merged": len(r.merged)}
wall = time.perf_counter() - t0
stop.set()
peak[0] = max(peak[0], anon_kb())
print(json.dumps({"wall": wall, **times, "rest": wall - sum(times.values()), "per_tensor": per_tensor,
                  "whole_tensor": whole_tensor,
                  "peak_anon_mb": peak[0] / 1024, "start_anon_mb": base / 1024, **extra}))
'''


def flux_shapes(double: int, single: int):
    from lib_gguf.sample import FluxConfig, flux_shapes as shapes

    cfg = FluxConfig(hidden_size=3072, num_heads=24, depth=double, depth_single_blocks=single,
                     context_in_dim=4096, vec_in_dim=768)
    return shapes(cfg)


def write_model(path: str, double: int, single: int) -> int:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    sd = {}
    n = 0
    for name, shape in flux_shapes(double, single).items():
        t = torch.empty(shape, dtype=torch.bfloat16)
        t.normal_(0.0, 0.02, generator=g)
        sd[name] = t
        n += t.numel()
    save_file(sd, path)
    return n


def write_lora(path: str, double: int, single: int, rank: int = 16):
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    sd, names = {}, []
    for name, shape in flux_shapes(double, single).items():
        if len(shape) != 2 or not name.startswith(("double_blocks.", "single_blocks.")) or "norm" in name:
            continue
        stem = "lora_unet_" + name[:-len(".weight")].replace(".", "_")
        sd[f"{stem}.lora_down.weight"] = (torch.randn(rank, shape[1], generator=g) * 0.01).to(torch.bfloat16)
        sd[f"{stem}.lora_up.weight"] = (torch.randn(shape[0], rank, generator=g) * 0.01).to(torch.bfloat16)
        sd[f"{stem}.alpha"] = torch.tensor(float(rank))
        names.append(name)
    save_file(sd, path)
    return names


def child(job: str, **args) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, ROOT, job, json.dumps(args)], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{job} failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def ggml_pass(src: str, plans: dict):
    """Seconds ggml's quantizer (one thread) takes on the same tensors in the same formats."""
    import numpy as np
    import torch
    from safetensors import safe_open

    from lib_gguf import ggml_ref

    if not ggml_ref.available():
        return None
    total, n = 0.0, 0
    with safe_open(src, framework="pt") as f:
        for name, fmt in plans.items():
            if fmt in ("F16", "BF16", "F32"):
                continue
            x = f.get_tensor(name).float()
            x = x.reshape(-1, x.shape[-1]).numpy().astype(np.float32)
            t = time.perf_counter()
            ggml_ref.quantize(x, fmt)
            total += time.perf_counter() - t
            n += x.size
            del x
    torch.set_num_threads(torch.get_num_threads())
    return total, n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--double", type=int, default=3)
    ap.add_argument("--single", type=int, default=4)
    ap.add_argument("--recipe", default="Q4_K_S")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the model files")
    ap.add_argument("--no-ggml", action="store_true")
    ap.add_argument("--no-bake", action="store_true")
    a = ap.parse_args()
    sys.path.insert(0, ROOT)
    import torch

    work = a.workdir or tempfile.mkdtemp(prefix="model-scale-")
    os.makedirs(work, exist_ok=True)
    src, dst = os.path.join(work, "flux.safetensors"), os.path.join(work, f"flux-{a.recipe}.gguf")
    lora, baked = os.path.join(work, "lora.safetensors"), os.path.join(work, f"flux-{a.recipe}-baked.gguf")
    print(f"command: python bench/model_scale.py --double {a.double} --single {a.single} --recipe {a.recipe}")
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    try:
        t = time.perf_counter()
        n = write_model(src, a.double, a.single)
        shapes = flux_shapes(a.double, a.single)
        largest = max(shapes.values(), key=lambda s: s[0] * (s[1] if len(s) > 1 else 1))
        largest_mb = largest[0] * largest[1] * 4 / 2**20
        print(f"model: {n / 1e9:.2f} B weights, {os.path.getsize(src) / 2**30:.2f} GiB bf16 "
              f"({a.double} double + {a.single} single blocks at width 3072), written in {time.perf_counter() - t:.0f} s")

        warm = ["Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "Q5_0", "Q4_0", "IQ4_XS", "IQ4_NL"]
        c = child("convert", src=src, dst=dst, recipe=a.recipe, warm=warm)
        rate = c["n_weights"] / c["quantize"] / 1e6
        print(f"\nconvert {a.recipe}: {c['wall']:.1f} s wall = read {c['read']:.1f} + quantize {c['quantize']:.1f} + "
              f"write {c['write']:.1f} + the rest {c['rest']:.1f}; {c['n_weights'] / c['wall'] / 1e6:.1f} Mweights/s wall, "
              f"{rate:.1f} quantizing; formats {c['formats']}")
        whole = FLUX_DEV_WEIGHTS / (c["n_weights"] / c["wall"]) / 60
        print(f"  Flux-dev (11.9 B weights) at this wall rate: {whole:.1f} min (goal: at most 5)")
        over = c["peak_anon_mb"] - c["start_anon_mb"]
        print(f"  peak anonymous memory {c['peak_anon_mb']:.0f} MiB ({over:.0f} above the start); largest tensor "
              f"{list(largest)} is {largest_mb:.0f} MiB in float32: goal at most {largest_mb + 1024:.0f} MiB above")

        if not a.no_ggml:
            from lib_gguf.reader import GGUFFile

            plans = {i.name: i.format.name for i in GGUFFile(dst).tensors}
            g = ggml_pass(src, plans)
            if g is None:
                print("  ggml: not measured (pip install ggml-python==0.0.45 builds ggml's quantizer)")
            else:
                ours = sum(c["per_tensor"].get(k, 0.0) for k, f in plans.items() if f not in ("F16", "BF16", "F32"))
                print(f"  ggml's quantizer (1 thread) on the same tensors: {g[0]:.1f} s ({g[1] / g[0] / 1e6:.1f} "
                      f"Mweights/s); ours (read + quantize of those, {torch.get_num_threads()} threads) {ours:.1f} s: "
                      f"ours / ggml {g[0] / ours:.2f}x")

        if not a.no_bake:
            touched = write_lora(lora, a.double, a.single)
            b = child("bake", model=dst, lora=lora, dst=baked, warm=warm)
            conv_touched = sum(c["whole_tensor"].get(k, 0.0) for k in touched)
            conv_read_quant = sum(c["per_tensor"].get(k, 0.0) for k in touched)
            print(f"\nbake a rank-16 LoRA into {b['merged']} tensors: {b['wall']:.1f} s wall = dequantize and merge "
                  f"{b['merge']:.1f} + range check {b['check']:.1f} + quantize {b['quantize']:.1f} + write "
                  f"{b['write']:.1f} + the rest {b['rest']:.1f}; peak anonymous memory {b['peak_anon_mb']:.0f} MiB")
            print(f"  the convert spent {conv_touched:.1f} s on those tensors (read, check, quantize, write; "
                  f"{conv_read_quant:.1f} s of it reading and quantizing): bake / convert "
                  f"{b['wall'] / max(conv_touched, 1e-9):.2f}x (goal at most 1.1x)")
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
