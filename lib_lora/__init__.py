"""lib_lora: LoRA files and key maps (``loader``, ``keymaps``), merging (``merge``),
the policy that chooses between a merge and the run-time low-rank delta
(``policy.decide``), applying them to a module (``apply``) and baking them into a
GGUF file (``bake``).

Imports neither Forge nor gradio.
"""
from __future__ import annotations

from .errors import LoraError
from .loader import LoraFile, load_lora
from .policy import Decision, LoraOptions, decide
from .apply import LoraHandle, apply_loras  # noqa: E402  (after the policy it uses)

__all__ = ["Decision", "LoraError", "LoraFile", "LoraHandle", "LoraOptions", "apply_loras", "decide", "load_lora"]
