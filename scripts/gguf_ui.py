"""Forge script: the "GGUF" tab and Forge's "GGUF LoRA" settings (the tab is
``gguf_tab/``; this file hands it Forge's ``shared`` and ``script_callbacks``).

Forge executes every file in ``scripts/`` at startup with the extension's folder on
``sys.path``. Outside Forge importing this file does nothing (``modules`` is not
Forge's); nothing heavy is imported either way (gradio only when the tab is built).
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

try:  # inside Forge
    from modules import script_callbacks, shared  # type: ignore
except ImportError:  # outside Forge
    script_callbacks = shared = None

if hasattr(script_callbacks, "on_ui_tabs") and hasattr(shared, "opts"):
    from gguf_tab.app import register_with_forge

    register_with_forge(shared, script_callbacks)
