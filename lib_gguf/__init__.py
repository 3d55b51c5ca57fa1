"""lib_gguf: GGUF formats, dequantization and quantization in torch,
``GGUFParameter``, GGUF layers, file reading and writing, and quantization rules.

Imports neither Forge nor gradio: it runs wherever torch runs.
Names are imported lazily so that ``import lib_gguf`` stays cheap.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    # formats.py: the format table
    "GGMLType": "formats",
    "GGMLFormat": "formats",
    "FORMATS": "formats",
    "get_format": "formats",
    # errors.py
    "GGUFFormatError": "errors",
    "UnsupportedFormatError": "errors",
    # dequant.py / quantize.py
    "dequantize": "dequant",
    "quantize": "quant",
    # parameter.py
    "GGUFParameter": "parameter",
    "is_gguf": "parameter",
    "dequantize_tensor": "parameter",
    # reader.py / writer.py
    "load_state_dict": "reader",
    "read_metadata": "reader",
    "GGUFFile": "reader",
    "save": "writer",
    # layers.py
    "GGUFLinear": "layers",
    "load_into": "layers",
    # recipes.py / converter.py
    "Recipe": "recipes",
    "get_recipe": "recipes",
    "convert": "converter",
    # sample.py
    "tiny_flux_state_dict": "sample",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'lib_gguf' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
