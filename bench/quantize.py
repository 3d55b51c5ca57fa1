"""Quantizer speed and error, CPU.

    python bench/quantize.py [--rows 3072] [--cols 3072] [--threads 2] [--model-rows 64] [--backend auto]

Per format: Mweights/s of lib_gguf's quantizer on a rows x cols weight
(``--threads`` threads; ``--backend``: auto takes the compiled numba kernels when
numba is installed, torch the torch kernels), the torch kernels alone, and beside ggml's C quantizer (single thread, through
``ggml-python`` when installed) and gguf-py's numpy quantizer where it has the
format, all in the same run; ours and ggml's are timed in alternation and the
ratio is the median of the pairs (this machine is shared and noisy). Also the
rmse on ggml's oracle inputs of ours beside ggml's own bytes (equal where the
bytes are equal), and whether our bytes equal ggml's on the timed weight.

Then a whole-model figure: every tensor name and shape of Flux-dev (12B), planned
with the Q4_K_S recipe; ``--model-rows`` rows of each distinct (format, width) are
quantized for a rate, and the time for the whole model is extrapolated from it.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lib_gguf  # noqa: E402
from lib_gguf import ggml_ref  # noqa: E402
from lib_gguf.formats import FORMATS  # noqa: E402

ORACLE = Path(__file__).resolve().parents[1] / "tests" / "data" / "ggml_quants.npz"  # made by tests/data/make_oracle.py


def timed(fn, repeat=2):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=3072)
    ap.add_argument("--cols", type=int, default=3072)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=3, help="alternating ours/ggml timings per format")
    ap.add_argument("--model-rows", type=int, default=64, help="rows per (format, width) for the whole-model figure; 0 skips it")
    ap.add_argument("--formats", default="", help="comma-separated subset")
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "numba"])
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from lib_gguf import numba_kernels, quant

    quant.set_backend(a.backend)
    print(f"command: python bench/quantize.py --rows {a.rows} --cols {a.cols} --threads {a.threads} "
          f"--pairs {a.pairs} --model-rows {a.model_rows} --backend {a.backend}"
          + (f" --formats {a.formats}" if a.formats else ""))
    nb = "numba " + __import__("numba").__version__ if numba_kernels.available() else "no numba"
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {nb}, "
          f"{ggml_ref.version()}")
    import gguf

    wanted = {f.strip().upper() for f in a.formats.split(",") if f.strip()}

    x = torch.randn(a.rows, a.cols, generator=torch.Generator().manual_seed(0))
    xn = x.numpy()
    oracle = dict(np.load(ORACLE))
    kinds = sorted({k.split(".")[0] for k in oracle if k.endswith(".x")})
    print("\n| format | ours Mw/s (kernel) | torch kernel Mw/s | ggml C Mw/s | ours / ggml | = ggml bytes | "
          "gguf-py numpy Mw/s | rmse ours | rmse ggml (oracle) | = oracle |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for fmt in FORMATS.values():
        if not fmt.is_quantized or not fmt.can_quantize or (wanted and fmt.name not in wanted):
            continue
        lib_gguf.quantize(x[:2], fmt)  # tables built, kernels loaded
        ours_t, ggml_t, ratios = [], [], []
        for _ in range(a.pairs):
            ours_t.append(timed(lambda: lib_gguf.quantize(x, fmt), 1))
            if ggml_ref.available():
                ggml_ref.quantize(xn[:2], fmt.name)  # ggml's own one-time init outside the timing
                ggml_t.append(timed(lambda: ggml_ref.quantize(xn, fmt.name), 1))
                ratios.append(ggml_t[-1] / ours_t[-1])
        ours = x.numel() / min(ours_t) / 1e6
        kernel = "torch"
        if a.backend != "torch" and fmt.kernels.numba_quantize:
            kernel = "numba"
            old = quant.set_backend("torch")
            lib_gguf.quantize(x[:2], fmt)
            torch_rate = f"{x.numel() / timed(lambda: lib_gguf.quantize(x, fmt), 1) / 1e6:.1f}"
            quant.set_backend(old)
        else:
            torch_rate = f"{ours:.1f}"
        g_rate = f"{x.numel() / min(ggml_t) / 1e6:.1f}" if ggml_t else "-"
        g_ratio = f"{float(np.median(ratios)):.2f}x" if ratios else "-"
        g_same = "-"
        if ggml_ref.available():
            g_same = "yes" if np.array_equal(lib_gguf.quantize(x, fmt).numpy(), ggml_ref.quantize(xn, fmt.name)) else "NO"
        numpy_rate = "-"
        qt = getattr(gguf.GGMLQuantizationType, fmt.name, None)
        if qt is not None:
            try:
                tn = timed(lambda: gguf.quants.quantize(xn, qt), 1)
                numpy_rate = f"{x.numel() / tn / 1e6:.1f}"
            except Exception:  # gguf-py has no quantizer for most formats
                pass
        r_ours, r_ggml, same = [], [], 0
        for k in kinds:
            key = f"{k}.{fmt.name}"
            if key not in oracle:
                continue
            ref_x = torch.from_numpy(oracle[f"{k}.x"])
            q = lib_gguf.quantize(ref_x, fmt)
            back = lib_gguf.dequantize(q, fmt, ref_x.shape, torch.float32)
            gg = lib_gguf.dequantize(torch.from_numpy(oracle[key].copy()), fmt, ref_x.shape, torch.float32)
            scale = ref_x.pow(2).mean().sqrt().clamp(min=1e-30)
            r_ours.append(float((back - ref_x).pow(2).mean().sqrt() / scale))
            r_ggml.append(float((gg - ref_x).pow(2).mean().sqrt() / scale))
            same += int(np.array_equal(q.numpy().reshape(-1), oracle[key].reshape(-1)))
        ro = f"{np.mean(r_ours):.4f}" if r_ours else "-"
        rg = f"{np.mean(r_ggml):.4f}" if r_ggml else "-"
        print(f"| {fmt.name} | {ours:.1f} ({kernel}) | {torch_rate} | {g_rate} | {g_ratio} | {g_same} | {numpy_rate} | {ro} | {rg} | "
              f"{same}/{len(r_ours)} |")
    if a.model_rows > 0:  # --model-rows 0: no whole-model figure
        whole_model(a.model_rows)


def whole_model(rows: int, recipe: str = "Q4_K_S"):
    """Flux-dev's names and shapes, planned with ``recipe``; each distinct (format,
    width) timed on ``rows`` random rows, the whole model extrapolated."""
    from lib_gguf.recipes import plan_model
    from lib_gguf.sample import FluxConfig, flux_shapes

    cfg = FluxConfig(hidden_size=3072, num_heads=24, depth=19, depth_single_blocks=38)
    shapes = flux_shapes(cfg)
    plans = plan_model({k: (v, torch.bfloat16) for k, v in shapes.items()}, recipe)
    total_w = sum(int(np.prod(p.shape)) for p in plans)
    rates = {}
    g = torch.Generator().manual_seed(1)
    seconds = 0.0
    by_fmt = {}
    for p in plans:
        n = int(np.prod(p.shape))
        width = p.shape[-1]
        key = (p.format.name, width)
        if key not in rates:
            sample = torch.randn(rows, width, generator=g)
            lib_gguf.quantize(sample[:1], p.format)
            t = timed(lambda: lib_gguf.quantize(sample, p.format), 2)
            rates[key] = sample.numel() / t
        seconds += n / rates[key]
        by_fmt[p.format.name] = by_fmt.get(p.format.name, 0) + n
    mix = ", ".join(f"{k} {v / total_w:.1%}" for k, v in sorted(by_fmt.items(), key=lambda kv: -kv[1]))
    print(f"\nwhole model: Flux-dev names and shapes ({total_w / 1e9:.2f}B weights), recipe {recipe} ({mix}):")
    print(f"  {seconds / 60:.1f} min to quantize on this machine, extrapolated from {rows}-row samples of "
          f"{len(rates)} (format, width) pairs; {total_w / seconds / 1e6:.1f} Mweights/s overall")


if __name__ == "__main__":
    main()
