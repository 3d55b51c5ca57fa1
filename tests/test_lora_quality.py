"""Merge quality: requantizing after a merge, measured against the float reference."""
import pytest
import torch

import lib_gguf
from lib_gguf import GGUFParameter
from lib_lora import LoraOptions, apply_loras
from lib_lora.apply import merge_keep
from lib_lora.loader import LoraFile, Patch


def _setup(fmt, rel, seed=0, rows=768, cols=3072, rank=16):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) / cols ** 0.5
    up = torch.randn(rows, rank, generator=g)
    down = torch.randn(rank, cols, generator=g)
    delta = up @ down
    scale = rel * w.norm() / delta.norm()
    lin = torch.nn.Linear(cols, rows, bias=False)
    lin.weight = GGUFParameter(lib_gguf.quantize(w, fmt), fmt, w.shape)
    lf = LoraFile("t")
    lf.patches["weight"] = [Patch("weight", "lora", {"up": up * scale, "down": down}, None)]
    return w, delta * scale, lin, lf


@pytest.mark.parametrize("fmt", ["Q8_0", "Q5_K", "Q4_K"])
def test_merge_error_at_most_1_45x_a_single_quantization(fmt):
    w, delta, lin, lf = _setup(fmt, 0.10)
    target = w + delta
    single = lib_gguf.dequantize(lib_gguf.quantize(target, fmt), fmt, w.shape, torch.float32)
    h = apply_loras(lin, [(lf, 1.0)], mode="merge")
    merged = lin.weight.dequantize(torch.float32)
    err_merge = (merged - target).norm() / target.norm()
    err_single = (single - target).norm() / target.norm()
    assert err_merge <= 1.45 * err_single, (float(err_merge), float(err_single))
    before = lib_gguf.dequantize(h._originals["weight"].data, fmt, w.shape, torch.float32)
    kept = float(((merged - before) * delta).sum() / (delta * delta).sum())
    assert kept >= 0.90, kept
    h.remove()


def test_policy_predicts_what_a_merge_keeps_and_moves_lossy_layers():
    # 1% delta in Q4_K: ggml's requantization keeps little of it
    w, delta, lin, lf = _setup("Q4_K", 0.01)
    kept_pred = merge_keep(lin.weight, [(lf.patches["weight"][0], 1.0)], LoraOptions(), max_rows=768)
    h = apply_loras(lin, [(lf, 1.0)], mode="merge")
    merged = lin.weight.dequantize(torch.float32)
    before = lib_gguf.dequantize(h._originals["weight"].data, "Q4_K", w.shape, torch.float32)
    kept = float(((merged - before) * delta).sum() / (delta * delta).sum())
    h.remove()
    assert abs(kept_pred - kept) < 1e-4 and kept < 0.5
    h = apply_loras(lin, [(lf, 1.0)], mode="auto", options=LoraOptions(mode_by_format={"Q4_K": "merge"}))
    assert h.report[0].mode == "runtime" and "would keep" in h.report[0].why
    h.remove()
