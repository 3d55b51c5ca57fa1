"""Dequantization speed: ours (float16 out) beside gguf-py (numpy), ComfyUI-GGUF's
torch dequantizer and Forge's baked one, per format, on the CPU.

    python bench/dequant.py [--rows 3072 --cols 3072] [--threads 2] [--repeat 7]
                            [--shapes flux,sdxl]
                            [--comfy /work/ref/comfy-gguf/dequant.py]
                            [--forge /work/ref/forge/packages_3rdparty/gguf]
                            [--formats Q4_0,Q4_K,...] [--backend auto|torch|numba]

``ours`` is ``lib_gguf.dequantize`` as a user gets it (``--backend auto``: the
compiled numba kernels, every quantized format's but Q1_0's and Q8_K's, when numba
is installed); ``ours torch`` is the torch kernels alone, timed in the same rounds.

Competitors are loaded by path from local copies (never copied into this repo):
ComfyUI-GGUF's ``dequant.py`` as a standalone module, and Forge's modified gguf
package under the module name ``forge_gguf`` (it would clash with PyPI's ``gguf``),
importing only its ``quants`` module and what that needs.
Prints a markdown table of Mweights/s (median of the repeats; rounds of all
contenders interleaved so machine noise hits them alike). With ``--shapes`` it
prints instead, per format and weight shape (Flux's and SDXL's presets, or given),
the ratios ours / ComfyUI-GGUF and ours / Forge, each format's smallest, and which
fall short of issue 16's goals (1.5x ComfyUI-GGUF, 1.0x Forge, 1.2x Forge on Q4_K).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import gguf  # noqa: E402

from lib_gguf import formats as F  # noqa: E402
from lib_gguf.dequant import dequantize  # noqa: E402



def load_comfy(path):
    """ComfyUI-GGUF's dequant.py, by path (it imports only gguf, torch, tqdm)."""
    path = Path(path)
    if not path.exists():
        return None, f"not found: {path}"
    name = "comfy_gguf_dequant_bench"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    try:
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    except Exception as e:  # e.g. a newer copy with relative imports
        sys.modules.pop(name, None)
        return None, f"could not load {path}: {e!r}"
    return mod, None


def load_forge(path):
    """Forge's gguf package under the name ``forge_gguf``, without running its
    ``__init__`` (whose reader/vocab modules import ``gguf`` absolutely)."""
    path = Path(path)
    if not (path / "quants.py").exists():
        return None, f"not found: {path}/quants.py"
    pkg = types.ModuleType("forge_gguf")
    pkg.__path__ = [str(path)]
    sys.modules["forge_gguf"] = pkg
    try:
        return importlib.import_module("forge_gguf.quants"), None
    except Exception as e:
        return None, f"could not load {path}: {e!r}"


class _ForgeParam:
    """What Forge's bake / dequantize_pytorch read from a ParameterGGUF."""

    def __init__(self, data, shape, dtype):
        self.data = data
        self.shape = torch.Size(shape)
        self.computation_dtype = dtype
        self.baked = False


def make_bytes(name, rows, cols, seed=0):
    """ggml-compatible bytes for a rows x cols tensor: gguf-py's quantizer where it
    has one, else random bytes with realistic finite float16 scales."""
    fmt = F.get_format(name)
    rng = np.random.default_rng(seed)
    qt = gguf.GGMLQuantizationType[name] if name in gguf.GGMLQuantizationType.__members__ else None
    if qt is not None:
        try:
            x = rng.standard_normal((rows, cols), dtype=np.float32) * 0.02
            q = gguf.quants.quantize(x, qt)
            if q.dtype == np.uint8 and q.size == rows * cols // fmt.block_size * fmt.type_size:
                return q.reshape(rows, -1), "gguf.quantize"
        except Exception:
            pass
    nb = rows * cols // fmt.block_size
    raw = rng.integers(0, 256, (nb, fmt.type_size), dtype=np.uint8)
    # realistic, finite float16 scales (from the format's layout)
    for off in [f.offset for f in (fmt.layout.float_fields() if fmt.layout else ()) if f.kind == "f16"]:
        scale = rng.uniform(1e-4, 2e-3, nb).astype(np.float16).view(np.uint8).reshape(nb, 2)
        raw[:, off : off + 2] = scale
    return raw.reshape(rows, -1), "random bytes"


def timeit(fns, repeat):
    """Median seconds per contender; rounds interleaved."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(repeat):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=3072)
    ap.add_argument("--cols", type=int, default=3072)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--numpy-repeat", type=int, default=2, help="repeats for the (slow) gguf-py numpy reference")
    ap.add_argument("--comfy", default="/work/ref/comfy-gguf/dequant.py")
    ap.add_argument("--forge", default="/work/ref/forge/packages_3rdparty/gguf")
    ap.add_argument("--formats", default="", help="comma-separated subset (default: every format we dequantize)")
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "numba"])
    ap.add_argument("--shapes", default="", help="per-shape ratios instead: 'flux', 'sdxl', and/or RxC,... "
                    "(weight shapes, rows = out features)")
    args = ap.parse_args(argv)
    from lib_gguf import backend as bk, numba_kernels

    bk.set_backend(args.backend)

    torch.set_num_threads(args.threads)
    comfy, comfy_err = load_comfy(args.comfy)
    forge, forge_err = load_forge(args.forge)

    print("command: python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:])))
    print(
        f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"numpy {np.__version__}, gguf {_gguf_version()}, "
        + (f"numba {__import__('numba').__version__}" if numba_kernels.available() else "no numba")
    )
    if comfy_err:
        print(f"ComfyUI-GGUF: {comfy_err}")
    if forge_err:
        print(f"Forge: {forge_err}")
    rows, cols = args.rows, args.cols
    n = rows * cols
    print(f"tensor: {rows}x{cols} = {n / 1e6:.2f}M weights, float16 output; Mweights/s, median of {args.repeat}")
    print()

    # the ceiling: one int8 -> float16 conversion pass over the same number of weights
    x8 = torch.randint(-128, 128, (n,), dtype=torch.int8)
    ceil_s = timeit({"c": lambda: x8.to(torch.float16)}, args.repeat)["c"]
    ceiling = n / ceil_s / 1e6
    print(f"ceiling (int8 -> float16 conversion, same weights): {ceiling:.0f} Mweights/s")
    print()

    wanted = [s.strip().upper() for s in args.formats.split(",") if s.strip()]
    names = [f.name for f in F.FORMATS.values() if f.is_quantized and f.can_dequantize]
    if wanted:
        names = [n_ for n_ in names if n_ in wanted]

    hdr = ("| format | source | ours | ours torch | % of ceiling | ComfyUI | Forge | gguf numpy | ours/Comfy | "
           "ours/Forge | ours/numpy |")
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    if args.shapes:
        return by_shape(names, parse_shapes(args.shapes), args, comfy, forge)
    for name in names:
        fmt = F.get_format(name)
        if cols % fmt.block_size:
            continue
        rate, source, compiled = measure(name, rows, cols, args, comfy, forge)
        np_rate = numpy_rate(name, rows, cols, args)

        def ratio(k_rate):
            return f"{rate['ours'] / k_rate:.2f}x" if k_rate else "-"

        print(
            f"| {name} | {source} | {rate['ours']:.0f}{' (numba)' if compiled else ''} | "
            f"{_cell(rate.get('torch', rate['ours']))} | {100 * rate['ours'] / ceiling:.0f}% | "
            f"{_cell(rate.get('comfy'))} | {_cell(rate.get('forge'))} | {_cell(np_rate)} | "
            f"{ratio(rate.get('comfy'))} | {ratio(rate.get('forge'))} | {ratio(np_rate)} |",
            flush=True,
        )


def _cell(r):
    return f"{r:.0f}" if r is not None else "-"


def measure(name, rows, cols, args, comfy, forge):
    """Mweights/s of every contender on one rows x cols tensor of ``name`` (rounds
    interleaved), the bytes' source, and whether ours ran a compiled kernel."""
    from lib_gguf import backend as bk

    fmt = F.get_format(name)
    raw, source = make_bytes(name, rows, cols)
    data = torch.from_numpy(np.ascontiguousarray(raw))
    shape = (rows, cols)
    fns = {"ours": lambda: dequantize(data, fmt.type_id, shape, torch.float16)}
    compiled = args.backend != "torch" and fmt.kernels.numba_dequantize
    if compiled and not args.shapes:
        def torch_only():
            old = bk.set_backend("torch")
            try:
                return dequantize(data, fmt.type_id, shape, torch.float16)
            finally:
                bk.set_backend(old)

        fns["torch"] = torch_only
    qt = gguf.GGMLQuantizationType[name] if name in gguf.GGMLQuantizationType.__members__ else None
    if comfy is not None and qt is not None and qt in comfy.dequantize_functions:
        fns["comfy"] = lambda: comfy.dequantize(data, qt, shape, dtype=torch.float16)
    fcls = getattr(forge, name, None) if forge is not None else None
    if fcls is not None and "dequantize_blocks_pytorch" in _own_attrs(fcls):
        p = _ForgeParam(data.clone(), shape, torch.float16)
        fcls.bake(p)
        fns["forge"] = lambda: fcls.dequantize_pytorch(p)
    t = timeit(fns, args.repeat)
    return {k: rows * cols / v / 1e6 for k, v in t.items()}, source, compiled


def numpy_rate(name, rows, cols, args):
    qt = gguf.GGMLQuantizationType[name] if name in gguf.GGMLQuantizationType.__members__ else None
    if qt is None or not args.numpy_repeat:
        return None
    raw, _ = make_bytes(name, rows, cols)
    try:
        s = timeit({"np": lambda: gguf.quants.dequantize(raw, qt)}, args.numpy_repeat)["np"]
    except NotImplementedError:
        return None
    return rows * cols / s / 1e6


# weight shapes (rows = out features, cols = in features) as the models hold them
SHAPES = {
    "flux": [(3072, 3072), (9216, 3072), (12288, 3072), (3072, 12288), (21504, 3072), (3072, 15360),
             (18432, 3072), (1024, 3072), (3072, 4096), (3072, 768), (3072, 256), (64, 3072)],
    "sdxl": [(320, 320), (640, 640), (1280, 1280), (5120, 640), (640, 2560), (640, 2048), (10240, 1280),
             (1280, 5120), (1280, 2048)],
}


def parse_shapes(text):
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if part in SHAPES:
            out += [s for s in SHAPES[part] if s not in out]
        elif part:
            r, c = part.split("x")
            out.append((int(r), int(c)))
    return out


def by_shape(names, shapes, args, comfy, forge, comfy_goal=1.5, forge_goal=1.0, q4k_forge_goal=1.2):
    """Per format and shape, ours / ComfyUI-GGUF and ours / Forge (same run, rounds
    interleaved), each format's smallest ratio, and whether it meets the goals."""
    print("shapes (rows x cols): " + ", ".join(f"{r}x{c}" for r, c in shapes))
    print("each cell: ours / ComfyUI-GGUF, ours / Forge ('-': the contender lacks the format; "
          "'n/a': the width is not whole blocks)")
    print()
    hdr = "| format | " + " | ".join(f"{r}x{c}" for r, c in shapes) + " | min / Comfy | min / Forge | goals |"
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    short = []
    for name in names:
        fmt = F.get_format(name)
        cells, vs_c, vs_f = [], [], []
        for rows, cols in shapes:
            if cols % fmt.block_size:
                cells.append("n/a")
                continue
            rate, _, _ = measure(name, rows, cols, args, comfy, forge)
            rc = rate["ours"] / rate["comfy"] if "comfy" in rate else None
            rf = rate["ours"] / rate["forge"] if "forge" in rate else None
            if rc is not None:
                vs_c.append((rc, f"{rows}x{cols}"))
            if rf is not None:
                vs_f.append((rf, f"{rows}x{cols}"))
            cells.append(f"{rc:.2f} / {rf:.2f}" if rc and rf else f"{rc:.2f} / -" if rc
                         else f"- / {rf:.2f}" if rf else f"{rate['ours']:.0f} Mw/s")
        fg = q4k_forge_goal if name == "Q4_K" else forge_goal
        misses = [f"Comfy {r:.2f}x at {s}" for r, s in vs_c if r < comfy_goal]
        misses += [f"Forge {r:.2f}x at {s}" for r, s in vs_f if r < fg]
        if misses:
            short.append(f"{name}: " + ", ".join(misses))
        mc = f"{min(vs_c)[0]:.2f}x" if vs_c else "-"
        mf = f"{min(vs_f)[0]:.2f}x" if vs_f else "-"
        goal = "-" if not (vs_c or vs_f) else ("met" if not misses else "short")
        print(f"| {name} | " + " | ".join(cells) + f" | {mc} | {mf} | {goal} |", flush=True)
    print()
    print(f"goals: at least {comfy_goal}x ComfyUI-GGUF and {forge_goal}x Forge ({q4k_forge_goal}x on Q4_K) "
          f"at every shape: " + ("met by every format" if not short else "short:\n  " + "\n  ".join(short)))


def _gguf_version():
    try:
        from importlib.metadata import version

        return version("gguf")
    except Exception:
        return "?"


def _own_attrs(cls):
    """Attributes a Forge format class defines itself or inherits from a real
    parent format (not the abstract base that raises NotImplementedError)."""
    out = set()
    for klass in cls.__mro__:
        if klass.__name__.endswith("__Quant") or klass.__name__ in ("ABC", "object"):
            continue
        out.update(vars(klass))
    return out


if __name__ == "__main__":
    main()
