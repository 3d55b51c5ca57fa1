"""GGUF on the GPU against BF16: Flux layer shapes, dequantize-only bandwidth, whole
blocks with a run-time LoRA, and the measured fused-or-not rule.

    python bench/gpu.py [--tokens 4096] [--formats Q8_0,Q4_K,...] [--repeat 20]
                        [--comfy /path/to/ComfyUI-GGUF/dequant.py] [--write-rule rule.json]
                        [--quick]

Per format and layer shape (3072->9216, 3072->3072, 3072->12288, 12288->3072,
3072->21504, 15360->3072; bfloat16 activations, ``--tokens`` rows), in ms (median of
``--repeat`` CUDA-event timings, after warm-up):

- ``bf16``: ``F.linear`` on a BF16 weight (the limit);
- ``comfy``: ComfyUI-GGUF's dequantize + ``F.linear`` (its ``dequant.py`` from a local
  copy: ``--comfy`` or ``$COMFYUI_GGUF_DEQUANT``; the column is left out without it);
- ``torch``: ours, torch kernels (backend "torch") + ``F.linear``;
- ``triton``: ours, Triton dequantize + ``F.linear``;
- ``fused``: ours, the fused dequantize-matmul.

Then dequantize-only GB/s (bytes read + written) beside a device-to-device copy of
the output's size in the same run, a Flux double block and single block at width 3072
(GGUF Linears, ``F.scaled_dot_product_attention``) with and without a rank-16 LoRA on
every Linear at run time, and the rule: for each format, shape and token count in
256, 1024, 4096, 8192, fused or dequantize-then-``F.linear``, whichever was faster
(``--write-rule FILE`` writes it for ``LIB_GGUF_FUSED_RULE``). Goals (issue 14, H100 /
H200): fused Q8_0 and Q4_K at most 1.10x bf16 at 4096 tokens; dequantize-only at
least 70% of copy bandwidth; the run-time LoRA at most +3% a block.

Weights are random bytes with realistic float16 scales (timing does not depend on the
values); nothing is downloaded.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lib_gguf  # noqa: E402
from lib_gguf import backend as bk  # noqa: E402
from lib_gguf.formats import get_format  # noqa: E402

SHAPES = [(9216, 3072), (3072, 3072), (12288, 3072), (3072, 12288), (21504, 3072), (3072, 15360)]  # (out, in)
FORMATS = ["Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "Q3_K", "Q2_K", "IQ4_XS"]
F16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q2_K": [80, 82],
              "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_NL": [0], "IQ4_XS": [0]}


def load_comfy(path):
    if not path:
        return None, "no path given (--comfy or $COMFYUI_GGUF_DEQUANT)"
    path = Path(path)
    if not path.exists():
        return None, f"not found: {path}"
    spec = importlib.util.spec_from_file_location("comfy_gguf_dequant_gpu", path)
    mod = importlib.util.module_from_spec(spec)
    try:
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    except Exception as e:
        return None, f"could not load {path}: {e!r}"
    return mod, None


DEVICE = "cuda"


def weight(fmt_name, n, k, device=None, seed=0):
    """A GGUFParameter of random bytes with float16 scales of realistic size."""
    fmt = get_format(fmt_name)
    device = device or DEVICE
    g = torch.Generator(device=device).manual_seed(seed)
    nb = n * k // fmt.block_size
    b = torch.randint(0, 256, (nb, fmt.type_size), dtype=torch.uint8, device=device, generator=g)
    for off in F16_FIELDS.get(fmt_name, []):
        d = (torch.rand(nb, device=device, generator=g) * 2e-3 + 1e-4).to(torch.float16)
        b[:, off:off + 2] = d.view(torch.uint8).view(nb, 2)
    return lib_gguf.GGUFParameter(b.reshape(n, -1), fmt_name, (n, k), computation_dtype=torch.bfloat16)


def timed(fn, repeat):
    """Median milliseconds of ``fn()`` over ``repeat`` runs (CUDA events), after warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def with_backend(name, fn):
    def run():
        old = bk.set_backend(name)
        try:
            return fn()
        finally:
            bk.set_backend(old)

    return run


def layer_table(args, comfy, dtype):
    from lib_gguf import linear_triton as lt

    print(f"\n## Layers: {args.tokens} tokens, {dtype}, ms (ratio to bf16)\n")
    cols = ["bf16"] + (["comfy"] if comfy else []) + ["torch", "triton", "fused"]
    print("| format | out x in | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for fmt in args.formats:
        for n, k in args.shapes:
            w = weight(fmt, n, k)
            wb = torch.randn(n, k, device="cuda", dtype=dtype) * 0.02
            x = torch.randn(args.tokens, k, device="cuda", dtype=dtype)
            raw = w.data
            fns = {"bf16": lambda: F.linear(x, wb)}
            if comfy is not None:
                import gguf

                qt = gguf.GGMLQuantizationType[fmt]
                if qt in comfy.dequantize_functions:
                    fns["comfy"] = lambda: F.linear(x, comfy.dequantize(raw, qt, (n, k), dtype=dtype).to(dtype))
            fns["torch"] = with_backend("torch", lambda: F.linear(x, w.dequantize(dtype)))
            fns["triton"] = with_backend("triton", lambda: F.linear(x, w.dequantize(dtype)))
            if lt.supported(fmt, dtype):
                fns["fused"] = lambda: lt.fused_linear(x, w)
            t = {c: timed(f, args.repeat) for c, f in fns.items()}
            cells = [f"{t[c]:.3f} ({t[c] / t['bf16']:.2f}x)" if c in t else "-" for c in cols]
            print(f"| {fmt} | {n}x{k} | " + " | ".join(cells) + " |", flush=True)
            del w, wb, x


def dequant_table(args):
    print("\n## Dequantize only: 3072x12288 weight, bfloat16 out, GB/s (bytes read + written)\n")
    n, k = 12288, 3072
    out_bytes = n * k * 2
    src = torch.empty(out_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t_copy = timed(lambda: dst.copy_(src), args.repeat)
    copy_gbs = 2 * out_bytes / t_copy / 1e6
    print(f"device-to-device copy of {out_bytes / 2**20:.0f} MiB: {copy_gbs:.0f} GB/s\n")
    print("| format | triton GB/s | share of copy | torch kernels GB/s |")
    print("|---|---|---|---|")
    for fmt in args.formats:
        w = weight(fmt, n, k)
        moved = w.data.numel() + out_bytes
        tt = timed(with_backend("triton", lambda: w.dequantize(torch.bfloat16)), args.repeat)
        to = timed(with_backend("torch", lambda: w.dequantize(torch.bfloat16)), args.repeat)
        g = moved / tt / 1e6
        print(f"| {fmt} | {g:.0f} | {g / copy_gbs:.0%} | {moved / to / 1e6:.0f} |", flush=True)


class Block(torch.nn.Module):
    """A Flux block's Linears at real width, GGUF weights, attention by SDPA (norms and
    modulation arithmetic left out: they are the same for every weight format)."""

    def __init__(self, fmt, kind, h=3072, heads=24, mlp=12288):
        super().__init__()
        from lib_gguf.layers import GGUFLinear

        def lin(n, k):
            base = torch.nn.Linear(k, n, device="meta")
            return GGUFLinear.from_linear(base, weight(fmt, n, k),
                                          torch.zeros(n, device=DEVICE, dtype=torch.bfloat16))

        self.kind, self.h, self.heads = kind, h, heads
        if kind == "double":
            for s in ("img", "txt"):
                setattr(self, f"{s}_qkv", lin(3 * h, h))
                setattr(self, f"{s}_proj", lin(h, h))
                setattr(self, f"{s}_mlp0", lin(mlp, h))
                setattr(self, f"{s}_mlp2", lin(h, mlp))
        else:
            self.linear1 = lin(3 * h + mlp, h)
            self.linear2 = lin(h, h + mlp)
        self.mlp = mlp

    def _attn(self, qkv):
        b, L, _ = qkv.shape
        q, k, v = qkv.view(b, L, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, L, self.h)

    def forward(self, img, txt):
        if self.kind == "double":
            qi, qt = self.img_qkv(img), self.txt_qkv(txt)
            a = self._attn(torch.cat([qt, qi], dim=1))
            at, ai = a[:, :txt.shape[1]], a[:, txt.shape[1]:]
            img = img + self.img_proj(ai)
            txt = txt + self.txt_proj(at)
            img = img + self.img_mlp2(F.gelu(self.img_mlp0(img), approximate="tanh"))
            txt = txt + self.txt_mlp2(F.gelu(self.txt_mlp0(txt), approximate="tanh"))
            return img, txt
        x = torch.cat([txt, img], dim=1)
        y = self.linear1(x)
        qkv, m = y[..., :3 * self.h], y[..., 3 * self.h:]
        x = x + self.linear2(torch.cat([self._attn(qkv), F.gelu(m, approximate="tanh")], dim=-1))
        return x[:, txt.shape[1]:], x[:, :txt.shape[1]]


def lora_for(block, rank=16):
    sd = {}
    g = torch.Generator().manual_seed(5)
    for name, mod in block.named_modules():
        if hasattr(mod, "in_features") and hasattr(mod, "weight"):
            sd[f"{name}.lora_up.weight"] = torch.randn(mod.out_features, rank, generator=g) * 0.01
            sd[f"{name}.lora_down.weight"] = torch.randn(rank, mod.in_features, generator=g) * 0.01
    return sd


def block_table(args):
    from lib_lora import apply_loras

    print(f"\n## Blocks: {args.tokens} image + 512 text tokens, bfloat16, ms\n")
    print("| format | block | plain | rank-16 LoRA at run time | LoRA cost |")
    print("|---|---|---|---|---|")
    img = torch.randn(1, args.tokens, 3072, device="cuda", dtype=torch.bfloat16)
    txt = torch.randn(1, 512, 3072, device="cuda", dtype=torch.bfloat16)
    for fmt in args.block_formats:
        for kind in ("double", "single"):
            blk = Block(fmt, kind)
            with torch.inference_mode():
                t0 = timed(lambda: blk(img, txt), args.repeat)
                h = apply_loras(blk, [(lora_for(blk), 1.0)], mode="runtime")
                t1 = timed(lambda: blk(img, txt), args.repeat)
                h.remove()
            print(f"| {fmt} | {kind} | {t0:.2f} | {t1:.2f} | {t1 / t0 - 1:+.1%} |", flush=True)
            del blk


def rule_table(args, dtype):
    from lib_gguf import linear_triton as lt

    print(f"\n## Rule: fused vs dequantize + F.linear, {dtype}, ms\n")
    print("| format | out x in | tokens | fused | dequant + F.linear | choice |")
    print("|---|---|---|---|---|---|")
    rule = {}
    for fmt in args.formats:
        if not lt.supported(fmt, dtype):
            continue
        rows = rule.setdefault(f"{fmt}/{str(dtype).replace('torch.', '')}", [])
        for n, k in args.shapes:
            w = weight(fmt, n, k)
            for m in args.rule_tokens:
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                tf = timed(lambda: lt.fused_linear(x, w), args.repeat)
                td = timed(with_backend("triton", lambda: F.linear(x, w.dequantize(dtype))), args.repeat)
                c = "fused" if tf < td else "dequant"
                rows.append([m, n, k, c])
                print(f"| {fmt} | {n}x{k} | {m} | {tf:.3f} | {td:.3f} | {c} |", flush=True)
    if args.write_rule:
        Path(args.write_rule).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rule": rule}, indent=1))
        print(f"\nrule written to {args.write_rule} (use: LIB_GGUF_FUSED_RULE={args.write_rule})")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--block-formats", default="Q8_0,Q4_K")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--comfy", default=os.environ.get("COMFYUI_GGUF_DEQUANT"))
    ap.add_argument("--write-rule", default=None)
    ap.add_argument("--rule-tokens", default="256,1024,4096,8192")
    ap.add_argument("--quick", action="store_true", help="Q8_0 and Q4_K, two shapes, fewer repeats (gpu_check.sh)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: layers,dequant,blocks,rule")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/gpu.py needs a CUDA device")
        return 2
    args.formats = [f for f in args.formats.split(",") if f]
    args.block_formats = [f for f in args.block_formats.split(",") if f]
    args.rule_tokens = [int(t) for t in args.rule_tokens.split(",") if t]
    args.shapes = SHAPES
    if args.quick:
        args.formats, args.block_formats = ["Q8_0", "Q4_K"], ["Q4_K"]
        args.shapes, args.repeat, args.rule_tokens = SHAPES[:2], min(args.repeat, 7), [256, 4096]
    skip = set(args.skip.split(","))
    print(f"command: python bench/gpu.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {getattr(__import__('triton'), '__version__', '?')}")
    comfy, err = load_comfy(args.comfy)
    if err:
        print(f"ComfyUI-GGUF column left out: {err}")
    dtype = torch.bfloat16
    if "layers" not in skip:
        layer_table(args, comfy, dtype)
    if "dequant" not in skip:
        dequant_table(args)
    if "blocks" not in skip:
        block_table(args)
    if "rule" not in skip:
        rule_table(args, dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
