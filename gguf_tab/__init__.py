"""The "GGUF" tab, one module per tab, for Forge (``scripts/gguf_ui.py`` hands it
Forge's ``shared`` and ``script_callbacks``) and standalone (``python extension.py``):

- ``common``: what every tab shares: the host (Forge's ``shared`` module, or None),
  the loaded model, the page's error text, file checks, the sample model;
- ``options``: LoRA options per GGUF format (stored in Forge's settings, keys
  ``gguf_lora_*``, or a JSON file standalone), Forge's "GGUF LoRA" settings, infotext;
- ``inspector``: a GGUF file's tensors and formats, and what a LoRA would do to it;
- ``convert``: safetensors (or GGUF) to GGUF with a preset;
- ``bake``: LoRAs baked into a new GGUF file;
- ``app``: the tab assembled, its registration with Forge, standalone serving.

Importing any of them imports neither gradio, torch, ``lib_gguf`` nor ``lib_lora``
(the handlers and builders import them when called), and none imports Forge.
"""
