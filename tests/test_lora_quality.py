"""Merge quality: requantizing after a merge, measured against the float reference."""
import pytest
import torch

import lib_gguf
from lib_gguf import GGUFParameter
from lib_lora import LoraOptions, apply_loras
from lib_lora.merge import merge_keep
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
    kept_pred = merge_keep(lin.weight, [(lf.patches["weight"][0], 1.0)], max_rows=768)  # every row
    h = apply_loras(lin, [(lf, 1.0)], mode="merge")
    merged = lin.weight.dequantize(torch.float32)
    before = lib_gguf.dequantize(h._originals["weight"].data, "Q4_K", w.shape, torch.float32)
    kept = float(((merged - before) * delta).sum() / (delta * delta).sum())
    h.remove()
    assert abs(kept_pred - kept) < 1e-4 and kept < 0.5
    h = apply_loras(lin, [(lf, 1.0)], mode="auto", options=LoraOptions(mode_by_format={"Q4_K": "auto"}))
    assert h.report[0].mode == "runtime" and "would keep" in h.report[0].why
    h.remove()


@pytest.mark.parametrize("fmt,rel", [("Q4_K", 0.05), ("Q4_K", 0.1), ("Q5_0", 0.05), ("IQ4_XS", 0.1), ("Q8_0", 0.01)])
def test_the_64_row_estimate_is_close_to_the_whole_weights_value(fmt, rel, monkeypatch):
    """On a 2048-row weight the default estimate requantizes 64 rows (3%): it lands
    within 0.05 of the share the whole merged weight keeps (kept shares from 0.3 to
    0.98 here), and never dequantizes, merges or requantizes more than those rows."""
    w, delta, lin, lf = _setup(fmt, rel, seed=5, rows=2048, cols=1024)
    patches = [(lf.patches["weight"][0], 1.0)]
    whole = merge_keep(lin.weight, patches, max_rows=2048)
    seen = []
    real_quantize, real_dequantize = lib_gguf.quantize, type(lin.weight.gguf_cls).dequantize

    def quantize(x, *a, **k):
        seen.append(("quantize", x.shape[0]))
        return real_quantize(x, *a, **k)

    def dequantize(self, data, shape, *a, **k):
        seen.append(("dequantize", shape[0]))
        return real_dequantize(self, data, shape, *a, **k)

    monkeypatch.setattr(lib_gguf, "quantize", quantize)
    monkeypatch.setattr(type(lin.weight.gguf_cls), "dequantize", dequantize)
    sampled = merge_keep(lin.weight, patches)
    monkeypatch.undo()
    assert seen and all(rows <= 64 for _what, rows in seen), seen
    assert abs(sampled - whole) < 0.05, (sampled, whole)
    assert sampled == merge_keep(lin.weight, patches)  # the same rows every time


def test_sampled_rows_merge_as_the_whole_weight_does():
    """The rows the estimate merges are the whole merge's rows: plain, sliced (a fused
    qkv's q, k, v), LoHa and DoRA patches together, at two strengths."""
    from lib_lora.merge import merged_rows, merged_weight, sample_rows

    g = torch.Generator().manual_seed(9)
    rows, cols = 768, 256
    w = torch.randn(rows, cols, generator=g)
    param = GGUFParameter(lib_gguf.quantize(w, "Q4_K"), "Q4_K", w.shape)
    t = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    patches = [(Patch("w", "lora", {"up": t(rows, 4), "down": t(4, cols)}, 2.0), 0.7),
               (Patch("w", "lora", {"up": t(256, 4), "down": t(4, cols)}, None, None, (0, 256, 256)), 1.3),
               (Patch("w", "loha", {"hada_w1_a": t(256, 2), "hada_w1_b": t(2, cols), "hada_w2_a": t(256, 2),
                                    "hada_w2_b": t(2, cols)}, None, None, (0, 512, 256)), 1.0),
               (Patch("w", "lora", {"up": t(rows, 4), "down": t(4, cols)}, None, torch.rand(rows, 1, generator=g) + 0.5),
                0.5)]
    whole = merged_weight(param, patches)
    for n in (1, 7, 64, rows):
        idx = sample_rows(rows, n)
        assert len(idx) == n and bool((idx[1:] > idx[:-1]).all())
        assert torch.allclose(merged_rows(param, patches, idx), whole[idx], atol=1e-5), n
