"""The "Bake LoRA" tab: LoRAs merged into a new GGUF file, each tensor requantized to
its own format (:func:`lib_lora.bake.bake_loras`)."""
from __future__ import annotations

from typing import List, Tuple

from . import common
from .common import UIError


def parse_lora_lines(text: str) -> List[Tuple[str, float]]:
    """One ``path`` or ``path:strength`` a line (``#`` comments) -> ``[(path, strength)]``."""
    out = []
    for line in (text or "").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path, strength = line, 1.0
        head, sep, tail = line.rpartition(":")
        if sep and head and tail:
            try:
                path, strength = head, float(tail)
            except ValueError:  # a ':' of the path (C:\...), no strength
                pass
        out.append((path.strip(), strength))
    return out


def bake_file(model: str, loras: str, dst: str, progress=None) -> str:
    """The LoRA baker, for the page: returns markdown (a summary or an error)."""
    try:
        m = common.existing_file(model, "model", (".gguf",))
        items = parse_lora_lines(loras)
        if not items:
            raise UIError("no LoRA given (one 'path' or 'path:strength' a line)")
        for path, _ in items:
            common.existing_file(path, "LoRA file")
        d = common.output_path(dst, m, "lora")
        if d.resolve() == m.resolve():
            raise UIError("the output would overwrite the model")
        from lib_lora.bake import bake_loras

        return common.done_text(bake_loras(str(m), items, str(d), progress=common.progress_adapter(progress, "baking")))
    except Exception as e:
        return common.error_text(e)


def build(gr) -> None:
    """The "Bake LoRA" tab, inside the ``gr.Blocks`` being built."""
    with gr.Tab("Bake LoRA", elem_id="gguf_tab_bake"):
        gr.Markdown("Merge LoRAs into a GGUF model, each tensor requantized to its own format.")
        with gr.Row():
            model = gr.Textbox(value=common.loaded_model() or "", label="GGUF model", scale=4, elem_id="gguf_bake_model")
            dst = gr.Textbox(label="Output .gguf (empty: beside the model)", scale=4, elem_id="gguf_bake_dst")
        loras = gr.Textbox(label="LoRAs: one 'path' or 'path:strength' a line", lines=3, elem_id="gguf_bake_loras")
        btn = gr.Button("Bake", variant="primary", elem_id="gguf_bake_btn")
        out = gr.Markdown("", elem_id="gguf_bake_out")

        def _on_bake(m, lo, d, progress=gr.Progress()):
            return bake_file(m, lo, d, progress=progress)

        btn.click(_on_bake, inputs=[model, loras, dst], outputs=[out])
