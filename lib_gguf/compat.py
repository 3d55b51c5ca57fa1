"""Other tools' GGUF conventions, in one place.

The GGUF diffusion models people download were mostly made by ComfyUI-GGUF's
``tools/convert.py`` (then llama.cpp's ``llama-quantize`` with its patch), or by
stable-diffusion.cpp's ``sd -M convert``. Each stores some tensors in another shape
than the model's, or under other names, and records it its own way:

* **ComfyUI-GGUF** (SD1.x / SDXL UNets): a tensor whose last dimension 256 does not
  divide is stored reshaped to ``(n / 256, 256)``, its true shape (torch order, an
  INT32 array) in the metadata key ``comfy.gguf.orig_shape.<tensor name>``;
  ``llama-quantize`` copies the key. We honour the key on read, and write it for every
  tensor we store reshaped (:func:`storage_shape`).
* **stable-diffusion.cpp** writes no metadata (no ``general.architecture``), may put
  ``model.diffusion_model.`` before every name, folds a 5-D tensor into 4-D by
  multiplying its first two dimensions (Wan's ``patch_embedding.weight``
  ``[1536, 16, 1, 2, 2]`` is stored ``[24576, 1, 2, 2]``), and, as ggml does, drops a
  leading dimension of 1 (``blocks.N.modulation`` ``[1, 6, 1536]`` is stored
  ``[6, 1536]``; llama.cpp's quantizer without the patch does the same to SD3's
  ``pos_embed`` and AuraFlow's ``positional_encoding``). :func:`restore_shape` gives
  such tensors back the shape the architecture says they have; the bytes are in the
  same order either way.
* **Architecture names**: ComfyUI-GGUF accepts only its own list of
  ``general.architecture`` values (``aura`` for AuraFlow, ``flux`` for Chroma too);
  :func:`lib_gguf.recipes.file_architecture` gives the name to write,
  :func:`lib_gguf.recipes.model_architecture` reads either.
* **NVFP4** weights from llama.cpp's converters come with companion per-tensor scales:
  ``X.scale`` (or ``X.weight.scale``), a float the dequantized weight is multiplied
  by, and ``X.input_scale`` (or ``X.weight.input_scale``), the activations' scale for
  FP4 matrix units, which a float computation does not need (:func:`nvfp4_companions`).
* **BF16 1-D tensors** (norms and biases some tools store as BF16) are handed out as
  float32, as ComfyUI-GGUF's loader does.
"""
from __future__ import annotations

import re
from typing import Dict, Mapping, Optional, Sequence, Tuple

from .errors import GGUFFormatError

ORIG_SHAPE_PREFIX = "comfy.gguf.orig_shape."
# ComfyUI-GGUF's convert.py stores rows of this many weights when it reshapes
RESHAPE_ROW = 256
# The prefix stable-diffusion.cpp (and full checkpoints) put before the diffusion model's names
DIFFUSION_PREFIX = "model.diffusion_model."

Shape = Tuple[int, ...]


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# -- comfy.gguf.orig_shape ------------------------------------------------------------

def orig_shape_key(name: str) -> str:
    """The metadata key holding the true shape of tensor ``name`` (its name in the file)."""
    return ORIG_SHAPE_PREFIX + name


def orig_shape(metadata: Mapping, name: str, stored: Sequence[int], path=None) -> Optional[Shape]:
    """The true shape ``comfy.gguf.orig_shape.<name>`` gives tensor ``name`` (stored as
    ``stored``), or None when the file has no such key. A key that is not a list of
    positive integers, or whose shape holds another number of weights than the tensor,
    is a :class:`GGUFFormatError` naming the file, the tensor and the key."""
    key = orig_shape_key(name)
    value = metadata.get(key)
    if value is None:
        return None
    if (not isinstance(value, list) or not value
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise GGUFFormatError(f"metadata {key!r} must be a list of positive integers (the tensor's shape), "
                              f"got {value!r}", path=path, tensor=name)
    if _numel(value) != _numel(stored):
        raise GGUFFormatError(f"metadata {key!r} gives the shape {list(value)} ({_numel(value)} weights), but the "
                              f"tensor is stored as {list(stored)} ({_numel(stored)} weights)",
                              path=path, tensor=name)
    return tuple(int(v) for v in value)


def storage_shape(fmt, shape: Sequence[int]) -> Optional[Shape]:
    """The shape to store a tensor of logical ``shape`` in ``fmt`` when its rows are not
    whole blocks of ``fmt`` (a quantized SDXL conv weight read from a ComfyUI-GGUF
    file): ``(n / 256, 256)`` as ComfyUI-GGUF's convert.py stores it (rows of one block
    when 256 does not divide ``n``), or None when ``shape`` can be stored as it is, or
    cannot be stored at all (``n`` not a whole number of blocks)."""
    shape = tuple(int(s) for s in shape) or (1,)
    if fmt.fits(shape[-1]):
        return None
    n = _numel(shape)
    for row in (RESHAPE_ROW, fmt.block_size):
        if row % fmt.block_size == 0 and n % row == 0:
            return (n // row, row)
    return None


# -- names ---------------------------------------------------------------------------

def strip_prefix(names: Sequence[str]) -> Optional[str]:
    """The prefix to strip from every name (``model.diffusion_model.``, as
    stable-diffusion.cpp writes them) when every name has it; None otherwise (a full
    checkpoint with other components keeps its names)."""
    names = list(names)
    if names and all(n.startswith(DIFFUSION_PREFIX) and len(n) > len(DIFFUSION_PREFIX) for n in names):
        return DIFFUSION_PREFIX
    return None


# -- shapes other tools change ---------------------------------------------------------

# (architecture, tensor-name regex, the model's number of dimensions): tensors whose
# leading 1 ggml's writers drop (ggml_n_dims counts no trailing ne of 1).
_LEADING_ONE = [
    ("wan", r"^blocks\.\d+\.modulation$", 3),      # [1, 6, dim]
    ("wan", r"^head\.modulation$", 3),             # [1, 2, dim]
    ("wan", r"^img_emb\.emb_pos$", 3),             # [1, 514, 1280] (FLF2V)
    ("sd3", r"^pos_embed$", 3),                    # [1, n, dim]
    ("auraflow", r"^positional_encoding$", 3),     # [1, n, dim]
    ("auraflow", r"^register_tokens$", 3),         # [1, 8, dim]
    ("lumina2", r"^(x|cap)_pad_token$", 2),        # [1, dim]
]
# (architecture, regex): Conv3d weights [out, in, kt, kh, kw] that stable-diffusion.cpp
# stores 4-D as [out * in, kt, kh, kw]; ``out`` is the length of the layer's bias.
_FOLDED_5D = [
    ("wan", r"^(vace_)?patch_embedding\.weight$"),
]
# (architecture, regex): linear weights [out, in] older stable-diffusion.cpp files store
# as 1x1 convolutions [out, in, 1, 1] (ComfyUI-GGUF's loader squeezes them the same way).
_SQUEEZED_LINEAR = [
    ("sdxl", r"\.proj_(in|out)\.weight$"),
]


def restore_shape(arch: str, name: str, stored: Shape, shapes: Mapping[str, Shape]) -> Optional[Tuple[Shape, str]]:
    """``(model shape, why)`` for a tensor that another tool stored in a shape the
    architecture says is not the model's, or None when ``stored`` is the model's shape
    (or there is no telling). ``shapes`` are the file's other tensors' shapes (a
    folded Conv3d weight's ``out`` is its bias's length)."""
    stored = tuple(int(s) for s in stored)
    for a, pattern, ndim in _LEADING_ONE:
        if a == arch and len(stored) == ndim - 1 and re.search(pattern, name):
            return (1,) + stored, "leading 1 dropped (ggml's writers)"
    for a, pattern in _FOLDED_5D:
        if a == arch and len(stored) == 4 and re.search(pattern, name):
            bias = shapes.get(name[: -len("weight")] + "bias")
            if bias and len(bias) == 1 and bias[0] > 0 and stored[0] % bias[0] == 0:
                out = int(bias[0])
                return (out, stored[0] // out) + stored[1:], "5-D weight folded to 4-D (stable-diffusion.cpp)"
    for a, pattern in _SQUEEZED_LINEAR:
        if a == arch and len(stored) == 4 and stored[2:] == (1, 1) and re.search(pattern, name):
            return stored[:2], "linear weight stored as a 1x1 convolution (stable-diffusion.cpp)"
    return None


# -- NVFP4 companions ------------------------------------------------------------------

NVFP4_TYPE_ID = 40
_COMPANIONS = ("scale", "input_scale")


def nvfp4_companions(formats: Mapping[str, object]) -> Dict[str, Dict[str, str]]:
    """``{weight name: {"scale": name, "input_scale": name}}`` for the NVFP4 weights
    among ``formats`` (tensor name -> :class:`~lib_gguf.formats.GGMLFormat`) that have
    companion tensors, named ``X.scale`` / ``X.input_scale`` for a weight ``X.weight``
    (llama.cpp's converter) or ``X.weight.scale`` / ``X.weight.input_scale``."""
    out: Dict[str, Dict[str, str]] = {}
    for name, fmt in formats.items():
        if getattr(fmt, "type_id", None) != NVFP4_TYPE_ID:
            continue
        base = name[: -len(".weight")] if name.endswith(".weight") else None
        found = {}
        for kind in _COMPANIONS:
            for cand in ([f"{base}.{kind}"] if base else []) + [f"{name}.{kind}"]:
                if cand in formats and cand != name:
                    found[kind] = cand
                    break
        if found:
            out[name] = found
    return out
