"""Command line: ``python -m lib_lora bake MODEL.gguf LORA[:STRENGTH] ... -o OUT.gguf``

    python -m lib_lora bake model-Q4_K_S.gguf style.safetensors:0.8 detail.safetensors -o baked.gguf

Merges the LoRAs into the model and writes a new GGUF file, each tensor requantized
to its own format (see :func:`lib_lora.bake.bake_loras`). Ctrl-C, SIGTERM and bad
input behave as in ``python -m lib_gguf``: one line, exit 2 for bad input, and no
partial file left behind.
"""
from __future__ import annotations

import sys
from typing import List, Optional

from lib_gguf.__main__ import command_parser, parse_and_run, tqdm_progress


def parse_lora_arg(text: str):
    """``path[:strength]`` -> (path, strength); a Windows drive letter is not a strength."""
    path, sep, tail = text.rpartition(":")
    if sep and path and tail:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return text, 1.0


def _cmd_bake(args) -> int:
    from .bake import bake_loras

    loras = [parse_lora_arg(a) for a in args.loras]
    update, close = tqdm_progress("baking")
    try:
        result = bake_loras(args.model, loras, args.output, progress=update)
    finally:
        close()
    if result is not None:
        print(result.text())
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser, sub = command_parser("python -m lib_lora", "LoRAs on GGUF models")
    p = sub.add_parser("bake", help="merge LoRAs into a GGUF model, requantizing each tensor to its format")
    p.add_argument("model")
    p.add_argument("loras", nargs="+", metavar="LORA[:STRENGTH]")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(fn=_cmd_bake)
    return parse_and_run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
