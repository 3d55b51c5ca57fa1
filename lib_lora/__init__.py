"""lib_lora: LoRA files and key maps, merge-and-requantize, the run-time
low-rank delta, and the policy that chooses between them.

Imports neither Forge nor gradio.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "load_lora": "loader",
    "LoraFile": "loader",
    "apply_loras": "apply",
    "LoraHandle": "apply",
    "LoraOptions": "policy",
    "LoraError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'lib_lora' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value
