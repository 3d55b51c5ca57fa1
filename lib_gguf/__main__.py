"""Command line: ``python -m lib_gguf {convert,inspect,presets} ...``

    python -m lib_gguf convert model.safetensors model-Q4_K_S.gguf --type Q4_K_S [--rules rules.txt]
    python -m lib_gguf inspect model.gguf

(Baking LoRAs into a GGUF file is lib_lora's: ``python -m lib_lora bake ...``.)
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import List, Optional


def tqdm_progress(desc: str):
    """``(update(done, total, name), close())`` drawing a tqdm bar, or no-ops without tqdm."""
    try:
        from tqdm import tqdm
    except ImportError:  # progress is a nicety
        return None, lambda: None
    bar = {"b": None}

    def update(done: int, total: int, name: str = "") -> None:
        if bar["b"] is None:
            bar["b"] = tqdm(total=total, desc=desc, unit="tensor", dynamic_ncols=True)
        b = bar["b"]
        b.update(done - b.n)
        if name:
            b.set_postfix_str(name[-40:], refresh=False)

    def close() -> None:
        if bar["b"] is not None:
            bar["b"].close()

    return update, close


def _cmd_convert(args) -> int:
    from .converter import convert

    update, close = tqdm_progress("quantizing")
    try:
        summary = convert(args.src, args.dst, args.type, rules=args.rules, progress=update)
    finally:
        close()
    print(summary.text())
    return 0


def inspect_text(path) -> str:
    """A listing of a GGUF file: tensors, formats, shapes, and a per-format histogram."""
    from .reader import GGUFFile

    f = GGUFFile(path)
    rows = []
    hist = {}
    total_bytes = 0
    total_weights = 0
    for info in f.tensors:
        n = 1
        for s in info.shape:
            n *= s
        rows.append(f"{info.format.name:>8}  {str(list(info.shape)):>18}  {info.nbytes / 2**20:9.3f} MiB  {info.name}")
        h = hist.setdefault(info.format.name, [0, 0, 0])
        h[0] += 1
        h[1] += n
        h[2] += info.nbytes
        total_bytes += info.nbytes
        total_weights += n
    out = [f"{path}: GGUF v{f.version}, {len(rows)} tensors, {total_weights / 1e6:.2f} M weights, "
           f"{total_bytes / 2**20:.2f} MiB of tensor data, "
           f"{total_bytes * 8 / max(total_weights, 1):.3f} bits per weight"]
    arch = f.metadata.get("general.architecture")
    if arch or f.architecture:
        out.append(f"architecture: {f.architecture or arch}")
    out += [f"read as the model's: {note}" for note in f.notes]  # other tools' conventions (lib_gguf.compat)
    out.append("")
    out += rows
    out.append("")
    out.append(f"{'format':>8}  {'tensors':>7}  {'weights':>12}  {'MiB':>9}  {'share':>6}  histogram")
    for name, (count, n, nb) in sorted(hist.items(), key=lambda kv: -kv[1][1]):
        share = n / max(total_weights, 1)
        out.append(f"{name:>8}  {count:>7}  {n:>12}  {nb / 2**20:9.3f}  {share:6.1%}  {'#' * max(1, round(share * 40))}")
    return "\n".join(out)


def _cmd_inspect(args) -> int:
    print(inspect_text(args.file))
    return 0


def _cmd_presets(args) -> int:
    from .recipes import PRESETS

    for name, (base, mix) in PRESETS.items():
        print(f"{name:8} base {base}{'  mix ' + mix if mix else ''}")
    return 0


def command_parser(prog: str, description: str):
    """``(parser, subparsers)`` of a CLI with ``-v`` and one required command (this one, lib_lora's)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("-v", "--verbose", action="store_true", help="log each decision")
    return parser, parser.add_subparsers(dest="cmd", required=True)


def parse_and_run(parser, argv: Optional[List[str]]) -> int:
    """Parse ``argv``, set up logging (``-v``: each decision) and run the command (:func:`run_command`)."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    return run_command(args)


def main(argv: Optional[List[str]] = None) -> int:
    parser, sub = command_parser("python -m lib_gguf", "GGUF tools in Python and torch")

    p = sub.add_parser("convert", help="safetensors (file or folder of shards) or GGUF -> GGUF")
    p.add_argument("src")
    p.add_argument("dst")
    from .recipes import PRESETS

    p.add_argument("--type", default="Q8_0", help=f"preset: {', '.join(PRESETS)} (default Q8_0). IQ2_XXS, IQ2_XS "
                   "and IQ1_S need an importance matrix and are not offered")
    p.add_argument("--rules", help="rule file: one 'PATTERN = FORMAT' a line (glob, or re:REGEX; FORMAT a GGML "
                   "type we can quantize, or keep), or JSON")
    p.set_defaults(fn=_cmd_convert)

    p = sub.add_parser("inspect", help="list a GGUF file's tensors, formats and shapes")
    p.add_argument("file")
    p.set_defaults(fn=_cmd_inspect)

    p = sub.add_parser("presets", help="list the quantization presets")
    p.set_defaults(fn=_cmd_presets)

    return parse_and_run(parser, argv)


_SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


def run_command(args) -> int:
    """Run the command in a worker thread, so that Ctrl-C and SIGTERM (a plain
    ``kill``, a container stop) are handled at once, even in the middle of a long
    torch or numba call: the partial output is removed and the process exits with
    one line, no traceback. Errors in the input give one line and exit 2."""
    from .errors import GGUFFormatError

    outcome = {}

    def work():
        try:
            outcome["rc"] = args.fn(args)
        except BaseException as e:  # handed to the main thread
            outcome["error"] = e

    if threading.current_thread() is not threading.main_thread():  # called from a thread: no signals here
        work()
    else:
        previous = {}

        def on_signal(signum, frame):
            from .writer import remove_active_temps

            remove_active_temps()
            name = "interrupted" if signum == signal.SIGINT else "terminated"
            sys.stdout.flush()
            sys.stderr.write(f"\n{name}: stopped, the partial output was removed\n")
            sys.stderr.flush()
            os._exit(_SIGNAL_EXIT.get(signum, 1))

        for sig in _SIGNAL_EXIT:
            try:
                previous[sig] = signal.signal(sig, on_signal)
            except (ValueError, OSError):
                pass
        try:
            t = threading.Thread(target=work, name="gguf-cli", daemon=True)
            t.start()
            while t.is_alive():
                t.join(0.2)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    e = outcome.get("error")
    if e is None:
        return outcome.get("rc", 0)
    if isinstance(e, (GGUFFormatError, FileNotFoundError, ValueError, OSError)):
        print(f"error: {e}", file=sys.stderr)
        return 2
    if isinstance(e, KeyboardInterrupt):
        print("interrupted: stopped, the partial output was removed", file=sys.stderr)
        return 130
    raise e


if __name__ == "__main__":
    sys.exit(main())
