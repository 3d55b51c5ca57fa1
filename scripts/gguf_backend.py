"""Forge script: registers our GGUF backend when Forge loads its scripts, hands it
the tab's options, and records the LoRA mode used in each image's infotext.

Forge executes every file in ``scripts/`` at startup with the extension's folder on
``sys.path`` (so ``extension``, ``gguf_tab``, ``lib_gguf`` and ``lib_lora`` import). Outside Forge
importing this file does nothing: ``modules.scripts`` is not importable.
"""
from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("forge_gguf_lora")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def infotext_params(sd_model=None) -> dict:
    """``{"GGUF LoRA": "Q4_K:runtime"}`` for the modes in use in ``sd_model``'s parts
    (each part's last LoRA refresh; all parts refreshed so far when None), or {}."""
    import extension

    modes = extension.last_modes(sd_model)
    if not modes:
        return {}
    from gguf_tab.options import lora_infotext

    return lora_infotext(modes=modes)


def apply_pasted_modes(text: str) -> dict:
    """``"Q4_K:runtime,Q8_0:merge"`` (from a pasted infotext) -> the modes that win
    over the options for this generation; empty text clears them. Returns them."""
    import extension
    from gguf_tab.options import parse_lora_infotext

    modes = parse_lora_infotext(text or "")
    extension.set_mode_override(modes)
    return extension._state.get("override", {})


def setup() -> bool:
    """Register the backend with the tab's options as the policy's input. False outside Forge."""
    import extension
    from gguf_tab.options import current_options

    if not extension.register():
        return False
    extension.set_options_provider(current_options)
    return True


try:  # inside Forge
    from modules import scripts as _forge_scripts  # type: ignore
except Exception:  # pragma: no cover - outside Forge
    _forge_scripts = None

if _forge_scripts is not None and hasattr(_forge_scripts, "Script"):
    try:
        setup()
    except Exception as e:  # never stop Forge from starting
        log.error("forge-gguf-lora: could not register the GGUF backend: %s", e)

    class GGUFLoraScript(_forge_scripts.Script):
        """Always on, no UI of its own: writes the infotext after each batch."""

        def title(self):
            return "GGUF LoRA"

        def show(self, is_img2img):
            return _forge_scripts.AlwaysVisible

        def ui(self, is_img2img):
            """One small field, filled when an infotext with ``GGUF LoRA`` is pasted:
            those modes then win over the tab's options, so the image is reproduced."""
            import gradio as gr

            from gguf_tab.options import INFOTEXT_KEY

            with gr.Accordion("GGUF LoRA", open=False):
                modes = gr.Textbox(label="LoRA modes from a pasted infotext (empty: the GGUF tab's options)",
                                   value="", lines=1)
            self.infotext_fields = [(modes, INFOTEXT_KEY)]
            return [modes]

        def process(self, p, modes="", *args, **kwargs):
            apply_pasted_modes(modes)

        def process_batch(self, p, *args, **kwargs):
            """After Forge activated this batch's LoRAs, before it samples: options
            changed since the loaded parts' last refresh apply now (Forge itself
            refreshes only the parts it loads, and an unchanged LoRA set loads none)."""
            import extension

            try:
                extension.apply_options_now(getattr(p, "sd_model", None))
            except Exception as e:  # the LoRAs stay as they were; say so
                log.error("GGUF LoRA: could not re-apply the LoRAs with the new options: %s", e)

        def postprocess_batch(self, p, *args, **kwargs):
            try:
                p.extra_generation_params.update(infotext_params(getattr(p, "sd_model", None)))
            except Exception as e:  # infotext is a record, never a failure
                log.debug("GGUF LoRA infotext: %s", e)
