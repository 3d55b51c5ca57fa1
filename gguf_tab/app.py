"""The GGUF tab assembled (its four tabs), its registration with Forge, and standalone
serving on 127.0.0.1."""
from __future__ import annotations

import os

from . import bake, common, convert, inspector, options
from .common import log

TAB_TITLE = "GGUF"
TAB_ELEM_ID = "forge_gguf_lora"
_CALLBACK = "forge_gguf_lora_tab"


def build_tab():
    """The tab's contents as a ``gr.Blocks`` (Forge puts it in a tab; serve() shows it alone)."""
    gr = common.gradio()
    with gr.Blocks(analytics_enabled=False, title="GGUF") as demo:
        options.build(gr, demo)
        inspector.build(gr)
        convert.build(gr)
        bake.build(gr)
    return demo


def on_ui_tabs():
    return [(build_tab(), TAB_TITLE, TAB_ELEM_ID)]


def register_with_forge(shared, script_callbacks) -> bool:
    """Inside Forge (its ``modules.shared`` and ``modules.script_callbacks``, handed over
    by ``scripts/gguf_ui.py``): the tab and the "GGUF LoRA" settings, registered once
    however often the script runs. Returns whether it registered now."""
    common.set_host(shared)
    done = any(str(getattr(c, "name", "")).endswith("/" + _CALLBACK)
               for c in script_callbacks.callback_map.get("callbacks_ui_tabs", []))
    if done:
        return False
    script_callbacks.on_ui_tabs(on_ui_tabs, name=_CALLBACK)
    script_callbacks.on_ui_settings(lambda: options.add_settings(shared), name="forge_gguf_lora_settings")
    # the settings exist from the start, not only once the settings page is built: the
    # API's options model (GET /sdapi/v1/options) lists only keys known by then
    try:
        options.add_settings(shared)
    except Exception as e:  # the settings page will add them again
        log.warning("GGUF LoRA settings not registered early: %s", e)
    return True


def serve(port: int = 7861, model=None, block: bool = True, options_path=None):
    """Serve the tab alone on http://127.0.0.1:<port> (never on other interfaces, no
    share link, no analytics). ``model``: a GGUF to inspect, else the built-in sample
    (written to the cache folder on first use). Returns when the server is closed, or
    returns the running ``gr.Blocks`` when ``block`` is False (call ``.close()``)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    if options_path is not None:
        options.set_options_file(options_path)
    if model is None:
        model = common.sample_model()
    common.set_loaded_model(model)
    demo = build_tab()
    demo.queue()
    demo.launch(server_name="127.0.0.1", server_port=int(port), share=False, inbrowser=False,
                prevent_thread_lock=True, quiet=True, show_error=False)
    url = f"http://127.0.0.1:{int(port)}"
    log.info("GGUF tab at %s", url)
    print(f"GGUF tab: {url}  (model: {model})", flush=True)
    if not block:
        return demo
    try:
        demo.block_thread()
    finally:
        demo.close()
    return None
