"""Quantizer speed and error, CPU.

    python bench/quantize.py [--rows 3072] [--cols 3072] [--threads 2]

Per format: Mweights/s of lib_gguf's torch quantizer on a rows x cols weight,
beside gguf-py's numpy quantizer where it has the format (in the same run), and
the rmse on ggml's oracle inputs of ours beside ggml's own bytes (equal where the
bytes are equal). ggml's C quantizer is not timed here: ggml-python was not
installed in this environment.
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
from lib_gguf.formats import FORMATS  # noqa: E402

ORACLE = Path(os.environ.get("GGML_ORACLE", Path(__file__).resolve().parents[2] / "shared/oracle/ggml_quants.npz"))


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
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"command: python bench/quantize.py --rows {a.rows} --cols {a.cols} --threads {a.threads}")
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    import gguf

    x = torch.randn(a.rows, a.cols, generator=torch.Generator().manual_seed(0))
    xn = x.numpy()
    oracle = dict(np.load(ORACLE)) if ORACLE.exists() else {}
    kinds = sorted({k.split(".")[0] for k in oracle if k.endswith(".x")})
    print("\n| format | ours Mw/s | gguf-py numpy Mw/s | ours / numpy | rmse ours | rmse ggml | bytes = ggml |")
    print("|---|---|---|---|---|---|---|")
    for fmt in FORMATS.values():
        if not fmt.is_quantized or not fmt.can_quantize:
            continue
        t = timed(lambda: lib_gguf.quantize(x, fmt))
        ours = x.numel() / t / 1e6
        numpy_rate = "-"
        ratio = "-"
        qt = getattr(gguf.GGMLQuantizationType, fmt.name, None)
        if qt is not None:
            try:
                tn = timed(lambda: gguf.quants.quantize(xn, qt), 1)
                numpy_rate = f"{x.numel() / tn / 1e6:.1f}"
                ratio = f"{ours / (x.numel() / tn / 1e6):.2f}x"
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
        print(f"| {fmt.name} | {ours:.1f} | {numpy_rate} | {ratio} | {ro} | {rg} | {same}/{len(r_ours)} inputs |")


if __name__ == "__main__":
    main()
