"""Local check (never in CI): GGUF files made by the other tools themselves, read by lib_gguf; and
our converter's files read by ComfyUI-GGUF's loader and by stable-diffusion.cpp.

Tiny random models with the real tensor names (and the shapes that matter: SD1.5 / SDXL channels
256 does not divide, Wan 2.1 1.3B's 5-D patch embedding and modulations, AuraFlow's leading-1
parameters) are written as safetensors, then:

* ComfyUI-GGUF's ``tools/convert.py`` makes the F16/BF16 GGUF (and, for Wan, its
  ``fix_5d_tensors.py`` adds the 5-D weight back after quantization);
* ``llama-quantize`` built from llama.cpp b3962 with ComfyUI-GGUF's ``tools/lcpp.patch`` quantizes it
  (Q8_0, Q4_0, Q4_K_S, Q5_K_M, Q3_K_S), when ``--quantize`` names the binary;
* ``sd-cli -M convert --diffusion-model ... --type q8_0`` (stable-diffusion.cpp) makes its own file,
  when ``--sd`` names the binary.

Each file is checked: it loads; every logical shape equals the source model's; every value equals
``gguf.quants.dequantize`` of the file's bytes reshaped to the source shape; it loads (strict) into a
module with the source's names and shapes (Linear / Conv2d / Conv3d / parameters). Then our
converter's output (Q8_0 and Q4_K_M) is read by ComfyUI-GGUF's own ``loader.py`` / ``dequant.py``
(``gguf_sd_loader``, with a stand-in for its ComfyUI-only ``ops.GGMLTensor``), whose shapes and values
must equal ours, and by ``sd-cli -M convert`` (which must accept it; sd.cpp refuses 5-D tensors, so
not for Wan).

    python tests/compat/run_tools_check.py --comfy ~/src/ComfyUI-GGUF \\
        [--quantize llama.cpp/build/bin/llama-quantize] [--sd sd.cpp/build/bin/sd-cli] [--work /tmp/x]

Prints one table row per file; exit code 1 when any check fails.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

QUANTS = ["Q8_0", "Q4_0", "Q4_K_S", "Q5_K_M", "Q3_K_S"]


# -- tiny models with the real names ------------------------------------------------------

def _models():
    """name -> {tensor name: shape}."""
    sd15 = {
        "input_blocks.0.0.weight": (320, 4, 3, 3), "input_blocks.0.0.bias": (320,),
        "input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3), "input_blocks.1.0.in_layers.2.bias": (320,),
        "input_blocks.1.1.norm.weight": (320,), "input_blocks.1.1.norm.bias": (320,),
        "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1), "input_blocks.1.1.proj_in.bias": (320,),
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
        "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.bias": (2560,),
        "input_blocks.1.1.transformer_blocks.0.ff.net.2.weight": (320, 1280),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3), "input_blocks.6.0.op.weight": (320, 320, 3, 3),
        "input_blocks.9.0.op.weight": (320, 320, 3, 3), "output_blocks.2.1.conv.weight": (320, 320, 3, 3),
        "output_blocks.5.2.conv.weight": (320, 320, 3, 3), "output_blocks.8.2.conv.weight": (320, 320, 3, 3),
        "time_embed.0.weight": (1280, 320), "time_embed.0.bias": (1280,),
        "out.2.weight": (4, 320, 3, 3), "out.2.bias": (4,),
    }
    sdxl = {
        "label_emb.0.0.weight": (1280, 2816), "label_emb.0.0.bias": (1280,),
        "input_blocks.0.0.weight": (320, 4, 3, 3), "input_blocks.0.0.bias": (320,),
        "input_blocks.4.1.norm.weight": (640,), "input_blocks.4.1.norm.bias": (640,),
        "input_blocks.4.1.proj_in.weight": (640, 640), "input_blocks.4.1.proj_in.bias": (640,),
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight": (640, 640),
        "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048),
        "input_blocks.4.1.transformer_blocks.0.ff.net.2.weight": (640, 2560),
        "input_blocks.4.1.proj_out.weight": (640, 640), "input_blocks.4.1.proj_out.bias": (640,),
        "time_embed.0.weight": (1280, 320), "time_embed.0.bias": (1280,),
        "out.2.weight": (4, 320, 3, 3), "out.2.bias": (4,),
    }
    wan = {  # Wan 2.1 1.3B's shapes, one block
        "patch_embedding.weight": (1536, 16, 1, 2, 2), "patch_embedding.bias": (1536,),
        "text_embedding.0.weight": (1536, 4096), "text_embedding.0.bias": (1536,),
        "text_embedding.2.weight": (1536, 1536), "text_embedding.2.bias": (1536,),
        "time_embedding.0.weight": (1536, 256), "time_embedding.0.bias": (1536,),
        "time_projection.1.weight": (9216, 1536), "time_projection.1.bias": (9216,),
        "blocks.0.modulation": (1, 6, 1536),
        "blocks.0.self_attn.q.weight": (1536, 1536), "blocks.0.self_attn.q.bias": (1536,),
        "blocks.0.self_attn.norm_q.weight": (1536,),
        "blocks.0.cross_attn.v.weight": (1536, 1536), "blocks.0.cross_attn.v.bias": (1536,),
        "blocks.0.ffn.0.weight": (8960, 1536), "blocks.0.ffn.0.bias": (8960,),
        "blocks.0.ffn.2.weight": (1536, 8960), "blocks.0.ffn.2.bias": (1536,),
        "head.modulation": (1, 2, 1536), "head.head.weight": (64, 1536), "head.head.bias": (64,),
    }
    h = 512  # Flux / Chroma / AuraFlow: real names, narrower (every row a multiple of 256, as in the real ones)
    flux = {
        "img_in.weight": (h, 64), "img_in.bias": (h,), "txt_in.weight": (h, 4096), "txt_in.bias": (h,),
        "time_in.in_layer.weight": (h, 256), "time_in.in_layer.bias": (h,),
        "double_blocks.0.img_attn.qkv.weight": (3 * h, h), "double_blocks.0.img_attn.qkv.bias": (3 * h,),
        "double_blocks.0.img_attn.proj.weight": (h, h), "double_blocks.0.img_attn.proj.bias": (h,),
        "double_blocks.0.img_attn.norm.query_norm.scale": (128,),
        "double_blocks.0.img_mlp.0.weight": (4 * h, h), "double_blocks.0.img_mlp.2.weight": (h, 4 * h),
        "single_blocks.0.linear1.weight": (7 * h, h), "single_blocks.0.linear2.weight": (h, 5 * h),
        "final_layer.linear.weight": (64, h), "final_layer.linear.bias": (64,),
    }
    chroma = {k: v for k, v in flux.items() if not k.startswith("time_in.")}
    chroma.update({"distilled_guidance_layer.in_proj.weight": (h, 64), "distilled_guidance_layer.in_proj.bias": (h,),
                   "distilled_guidance_layer.layers.0.in_layer.weight": (h, h)})
    aura = {
        "init_x_linear.weight": (h, 16), "init_x_linear.bias": (h,), "cond_seq_linear.weight": (h, 2048),
        "positional_encoding": (1, 256, h), "register_tokens": (1, 8, h),
        "double_layers.0.attn.w1q.weight": (h, h), "double_layers.0.attn.w2q.weight": (h, h),
        "double_layers.3.modX.1.weight": (6 * h, h), "single_layers.0.mlp.c_fc1.weight": (2 * h, h),
        "final_linear.weight": (64, h), "modF.1.weight": (2 * h, h),
    }
    return {"sd15": sd15, "sdxl": sdxl, "wan": wan, "flux": flux, "chroma": chroma, "aura": aura}


def _write_source(path: Path, shapes, seed: int, dtype=torch.bfloat16):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = {k: (torch.randn(s, generator=g) * 0.05).to(dtype) for k, s in shapes.items()}
    save_file(sd, str(path))
    return sd


# -- checks --------------------------------------------------------------------------------

class _Module(torch.nn.Module):
    pass


def build_module(shapes) -> torch.nn.Module:
    """A module with these parameter names and shapes: ``X.weight`` 2-D -> Linear, 4-D -> Conv2d,
    5-D -> Conv3d (with ``X.bias`` when there is one), anything else a plain parameter."""
    root = _Module()
    done = set()

    def parent_of(path):
        m = root
        for part in path:
            if not hasattr(m, part):
                m.add_module(part, _Module())
            m = getattr(m, part)
        return m

    for name, shape in shapes.items():
        if name in done:
            continue
        *path, leaf = name.split(".")
        bias = ".".join(path + ["bias"])
        if leaf == "weight" and len(shape) in (2, 4, 5) and path:
            has_bias = bias in shapes
            if len(shape) == 2:
                layer = torch.nn.Linear(shape[1], shape[0], bias=has_bias)
            elif len(shape) == 4:
                layer = torch.nn.Conv2d(shape[1], shape[0], tuple(shape[2:]), bias=has_bias)
            else:
                layer = torch.nn.Conv3d(shape[1], shape[0], tuple(shape[2:]), bias=has_bias)
            parent_of(path[:-1]).add_module(path[-1], layer)
            done.update({name, bias})
            continue
        parent_of(path).register_parameter(leaf, torch.nn.Parameter(torch.zeros(shape), requires_grad=False))
        done.add(name)
    return root


def check_file(path: Path, source) -> dict:
    """load / shapes / values / load_into of one GGUF file against its source state dict."""
    import gguf

    import lib_gguf
    from lib_gguf.compat import DIFFUSION_PREFIX

    row = {"load": "FAIL", "shapes": "-", "values": "-", "load_into": "-", "note": ""}
    try:
        f = lib_gguf.GGUFFile(path)
        sd = f.state_dict()
    except Exception as e:
        row["note"] = f"{type(e).__name__}: {e}"[:120]
        return row
    row["load"] = "ok"
    row["note"] = f"arch {f.architecture}" + (f"; {'; '.join(f.notes)}" if f.notes else "")
    bad = [k for k, v in source.items() if k not in sd or tuple(sd[k].shape) != tuple(v.shape)]
    extra = [k for k in sd if k not in source]
    row["shapes"] = "ok" if not bad and not extra else f"FAIL {len(bad)}+{len(extra)} (e.g. {(bad + extra)[0]})"
    reader = gguf.GGUFReader(str(path))
    wrong, checked = [], 0
    for t in reader.tensors:
        name = t.name[len(DIFFUSION_PREFIX):] if t.name.startswith(DIFFUSION_PREFIX) else t.name
        if name not in source or name not in sd:
            continue
        try:
            ref = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        except NotImplementedError:
            continue
        ref = torch.from_numpy(np.array(ref, dtype=np.float32)).reshape(source[name].shape)
        v = sd[name]
        ours = v.dequantize(torch.float32) if getattr(v, "gguf_cls", None) is not None else v.float()
        checked += 1
        if not torch.equal(ours, ref):
            wrong.append(name)
    row["values"] = (f"ok ({checked})" if not wrong else f"FAIL {len(wrong)}/{checked} (e.g. {wrong[0]})")
    try:
        model = build_module({k: tuple(v.shape) for k, v in source.items()})
        lib_gguf.load_into(model, sd)
        row["load_into"] = "ok"
    except Exception as e:
        row["load_into"] = "FAIL"
        row["note"] += f"; load_into: {str(e)[:150]}"
    return row


def comfy_loader(comfy_dir: Path, work: Path):
    """ComfyUI-GGUF's own gguf_sd_loader and dequantize_tensor, from its loader.py and dequant.py
    (copied into a scratch package beside a stand-in for ops.py, which needs ComfyUI itself)."""
    pkg = work / "_comfy_gguf"
    (pkg / "tools").mkdir(parents=True, exist_ok=True)
    for rel in ("loader.py", "dequant.py", "tools/convert.py"):
        shutil.copy(comfy_dir / rel, pkg / rel)
    (pkg / "__init__.py").write_text("")
    (pkg / "tools" / "__init__.py").write_text("")
    (pkg / "ops.py").write_text(
        "import torch\n"
        "class GGMLTensor(torch.Tensor):\n"
        "    # stand-in for ComfyUI-GGUF's ops.GGMLTensor: the bytes plus tensor_type and tensor_shape\n"
        "    def __new__(cls, data, tensor_type=None, tensor_shape=None):\n"
        "        t = torch.Tensor._make_subclass(cls, data, False)\n"
        "        t.tensor_type, t.tensor_shape = tensor_type, tensor_shape\n"
        "        return t\n"
        "    @classmethod\n"
        "    def __torch_function__(cls, func, types, args=(), kwargs=None):\n"
        "        with torch._C.DisableTorchFunctionSubclass():\n"
        "            return func(*args, **(kwargs or {}))\n")
    sys.path.insert(0, str(work))
    loader = importlib.import_module("_comfy_gguf.loader")
    dequant = importlib.import_module("_comfy_gguf.dequant")
    return loader.gguf_sd_loader, dequant.dequantize_tensor


def check_in_comfy(path: Path, source, load, dequantize) -> str:
    import lib_gguf

    try:
        sd = load(str(path))
    except Exception as e:
        return f"FAIL {type(e).__name__}: {e}"[:100]
    ours = lib_gguf.load_state_dict(path)
    worst = 0.0
    for k, v in source.items():
        if k not in sd:
            return f"FAIL missing {k}"
        shape = tuple(getattr(sd[k], "tensor_shape", sd[k].shape))
        if shape != tuple(v.shape):
            return f"FAIL shape {k} {list(shape)}"
        theirs = dequantize(sd[k], dtype=torch.float32).float().reshape(v.shape)
        o = ours[k]
        o = o.dequantize(torch.float32) if getattr(o, "gguf_cls", None) is not None else o.float()
        # their kernels compute partly in float16 (not bit-equal to gguf-py): a wrong layout or shape
        # gives errors of the weights' own size, rounding a few 1e-4 of it
        rel = float((theirs - o).abs().max() / o.abs().max().clamp_min(1e-30))
        worst = max(worst, rel)
        if rel > 1e-2:
            return f"FAIL values {k} (max diff {rel:.2g} of the largest weight)"
    return f"ok ({len(source)}, max diff {worst:.1g})"


def fix_5d(src: Path, dst: Path, fix: Path) -> None:
    """What ComfyUI-GGUF's tools/fix_5d_tensors.py does (its own script stops on numpy 2, reading
    general.file_type): copy every tensor, adding each 5-D weight from the fix file whole (F32)
    after its layer's bias."""
    import gguf
    from safetensors.torch import load_file

    reader = gguf.GGUFReader(str(src))
    field = reader.get_field("general.architecture")
    arch = str(bytes(field.parts[field.data[-1]]), encoding="utf-8")
    ft = reader.get_field("general.file_type")
    extra = {k: v.float().numpy() for k, v in load_file(str(fix)).items()}
    w = gguf.GGUFWriter(str(dst), arch)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if ft is not None:
        w.add_file_type(int(np.asarray(ft.parts[ft.data[-1]]).reshape(-1)[0]))
    added = set()
    for t in reader.tensors:
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
        key = t.name.replace(".bias", ".weight")
        if key in extra and key not in added:
            w.add_tensor(key, gguf.quants.quantize(extra[key], gguf.GGMLQuantizationType.F32),
                         raw_dtype=gguf.GGMLQuantizationType.F32)
            added.add(key)
    for key, x in extra.items():
        if key not in added:
            w.add_tensor(key, x, raw_dtype=gguf.GGMLQuantizationType.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def run(cmd, cwd=None, timeout=600):
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if p.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd[:3]))} failed ({p.returncode}): {(p.stderr or p.stdout)[-400:]}")
    return p


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--comfy", type=Path, default=os.environ.get("COMFY_GGUF"), help="a ComfyUI-GGUF checkout")
    ap.add_argument("--quantize", type=Path, default=None, help="llama-quantize built with lcpp.patch")
    ap.add_argument("--sd", type=Path, default=None, help="stable-diffusion.cpp's sd-cli")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--models", default=",".join(_models()))
    args = ap.parse_args(argv)
    if not args.comfy or not (Path(args.comfy) / "tools" / "convert.py").exists():
        ap.error("--comfy must name a ComfyUI-GGUF checkout (tools/convert.py)")
    work = args.work or Path(tempfile.mkdtemp(prefix="gguf-tools-check-"))
    work.mkdir(parents=True, exist_ok=True)
    import lib_gguf

    load_c, deq_c = comfy_loader(Path(args.comfy), work)
    rows = []
    models = _models()
    for i, mname in enumerate(args.models.split(",")):
        shapes = models[mname]
        d = work / mname
        d.mkdir(exist_ok=True)
        src = d / f"{mname}.safetensors"
        source = _write_source(src, shapes, seed=i)
        for stale in d.glob("*.gguf"):
            stale.unlink()
        # ComfyUI-GGUF's convert.py (BF16 source -> BF16 GGUF); Wan's 5-D weight goes to a fix file
        base = d / f"{mname}-BF16.gguf"
        fix = d / f"fix_5d_tensors_{'wan' if mname == 'wan' else 'x'}.safetensors"
        if fix.exists():
            fix.unlink()
        files = []
        try:
            run([sys.executable, str(Path(args.comfy) / "tools" / "convert.py"), "--src", str(src), "--dst", str(base)],
                cwd=d)
            if fix.exists():
                fixed = d / f"{mname}-BF16-fixed.gguf"
                fix_5d(base, fixed, fix)
                files.append(("city96 convert.py + fix_5d", fixed))
            else:
                files.append(("city96 convert.py", base))
        except Exception as e:
            rows.append((mname, "city96 convert.py", {"load": "FAIL", "shapes": "-", "values": "-",
                                                       "load_into": "-", "note": str(e)[:150]}))
        if args.quantize and base.exists():
            for q in QUANTS:
                out = d / f"{mname}-{q}.gguf"
                try:
                    run([str(args.quantize), str(base), str(out), q], cwd=d)
                    tool = f"llama-quantize {q}"
                    if fix.exists():
                        fixed = d / f"{mname}-{q}-fixed.gguf"
                        fix_5d(out, fixed, fix)
                        out, tool = fixed, tool + " + fix_5d"
                    files.append((tool, out))
                except Exception as e:
                    rows.append((mname, f"llama-quantize {q}", {"load": "FAIL", "shapes": "-", "values": "-",
                                                                 "load_into": "-", "note": str(e)[-150:]}))
        if args.sd:
            out = d / f"{mname}-sdcpp-q8_0.gguf"
            try:
                run([str(args.sd), "-M", "convert", "--diffusion-model", str(src), "-o", str(out), "--type", "q8_0"],
                    cwd=d)
                files.append(("sd -M convert q8_0", out))
            except Exception as e:
                rows.append((mname, "sd -M convert q8_0", {"load": "FAIL", "shapes": "-", "values": "-",
                                                            "load_into": "-", "note": str(e)[-150:]}))
        for tool, path in files:
            rows.append((mname, tool, check_file(path, source)))
        # ours, in theirs
        for recipe in ("Q8_0", "Q4_K_M"):
            out = d / f"{mname}-ours-{recipe}.gguf"
            lib_gguf.convert(src, out, recipe)
            row = check_file(out, source)
            row["comfy"] = check_in_comfy(out, source, load_c, deq_c)
            if args.sd:
                if any(len(s) > 4 for s in shapes.values()):
                    row["sd"] = "n/a (5-D)"
                else:
                    try:
                        run([str(args.sd), "-M", "convert", "-m", str(out), "-o", str(d / "sd-readback.gguf"),
                             "--type", "f16"], cwd=d)
                        row["sd"] = "ok"
                    except Exception as e:
                        row["sd"] = f"FAIL {str(e)[-80:]}"
            rows.append((mname, f"ours {recipe}", row))
    head = ["model", "made by", "load", "shapes", "values", "load_into", "ComfyUI-GGUF", "sd", "notes"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    failed = False
    for mname, tool, r in rows:
        cells = [mname, tool, r["load"], r["shapes"], r["values"], r["load_into"], r.get("comfy", ""),
                 r.get("sd", ""), r["note"].replace("|", "/")]
        failed |= any(str(c).startswith("FAIL") for c in cells[2:8])
        print("| " + " | ".join(str(c) for c in cells) + " |")
    print(f"\nfiles under {work}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
