"""lib_gguf: GGUF formats, dequantization and quantization in torch (with optional
compiled kernels), ``GGUFParameter``, GGUF layers, file reading and writing, and
quantization rules.

Imports neither Forge nor gradio, nor numba or triton (those load when a compiled
kernel may run): it runs wherever torch runs. Importing the package registers every
format family (:mod:`lib_gguf.families`), so :mod:`lib_gguf.formats` always knows
what each format has.
"""
from __future__ import annotations

from .families import FAMILIES  # noqa: F401  (first: every format's kernels, in the registry)
from .converter import convert
from .dequant import dequantize
from .errors import GGUFFormatError, UnsupportedFormatError
from .formats import FORMATS, GGMLFormat, GGMLType, get_format
from .layers import GGUFLinear, load_into
from .parameter import GGUFParameter, dequantize_tensor, is_gguf
from .quant import quantize
from .reader import GGUFFile, load_state_dict, read_metadata
from .recipes import Recipe, get_recipe
from .sample import tiny_flux_state_dict
from .writer import save

__all__ = ["FORMATS", "GGMLFormat", "GGMLType", "GGUFFile", "GGUFFormatError", "GGUFLinear", "GGUFParameter",
           "Recipe", "UnsupportedFormatError", "convert", "dequantize", "dequantize_tensor", "get_format",
           "get_recipe", "is_gguf", "load_into", "load_state_dict", "quantize", "read_metadata", "save",
           "tiny_flux_state_dict"]
