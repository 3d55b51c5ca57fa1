"""The "Convert" tab: safetensors (a file or a folder of shards) or GGUF -> GGUF with a
quantization preset and optional per-tensor rules (:func:`lib_gguf.converter.convert`)."""
from __future__ import annotations

import json

from . import common
from .common import UIError


def parse_rules_text(rules: str):
    """The rules box: JSON, or one ``PATTERN = FORMAT`` a line (``#`` comments); None when empty."""
    text = (rules or "").strip()
    if not text:
        return None
    if text.startswith("{"):
        try:
            return json.loads(text)
        except ValueError as e:
            raise UIError(f"rules: not valid JSON ({e})") from None
    pairs = []
    for i, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        pat, sep, fmt = line.rpartition("=")
        if not sep or not pat.strip() or not fmt.strip():
            raise UIError(f"rules line {i}: expected 'PATTERN = FORMAT', got {line!r}")
        pairs.append((pat.strip(), fmt.strip()))
    return pairs


def convert_file(src: str, dst: str, preset: str, rules: str = "", progress=None) -> str:
    """The converter, for the page: returns markdown (a summary or an error)."""
    try:
        s = common.existing_file(src, "source model", (".safetensors", ".gguf"))
        if not preset:
            raise UIError("no preset chosen")
        d = common.output_path(dst, s, preset.upper())
        if not d.parent.exists():
            raise UIError(f"output folder not found: {d.parent}")
        from lib_gguf.converter import convert

        summary = convert(s, d, preset, rules=parse_rules_text(rules),
                          progress=common.progress_adapter(progress, "quantizing"))
        return common.done_text(summary)
    except Exception as e:
        return common.error_text(e)


def build(gr) -> None:
    """The "Convert" tab, inside the ``gr.Blocks`` being built."""
    from lib_gguf.recipes import PRESETS

    with gr.Tab("Convert", elem_id="gguf_tab_convert"):
        gr.Markdown("safetensors (a file or a folder of shards) or GGUF → GGUF with a quantization preset.")
        with gr.Row():
            src = gr.Textbox(label="Source (.safetensors, folder, or .gguf)", scale=4, elem_id="gguf_convert_src")
            dst = gr.Textbox(label="Output .gguf (empty: beside the source)", scale=4, elem_id="gguf_convert_dst")
            preset = gr.Dropdown(list(PRESETS), value="Q4_K_S" if "Q4_K_S" in PRESETS else None,
                                 label="Preset", scale=1, elem_id="gguf_convert_preset")
        rules = gr.Textbox(label="Rules (optional): one 'PATTERN = FORMAT' a line, or JSON", lines=3,
                           placeholder="*_mlp.* = Q8_0\nre:^single_blocks\\.0\\. = keep", elem_id="gguf_convert_rules")
        btn = gr.Button("Convert", variant="primary", elem_id="gguf_convert_btn")
        out = gr.Markdown("", elem_id="gguf_convert_out")

        def _on_convert(s, d, p, r, progress=gr.Progress()):
            return convert_file(s, d, p, r, progress=progress)

        btn.click(_on_convert, inputs=[src, dst, preset, rules], outputs=[out])
