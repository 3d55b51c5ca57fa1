"""Quantization rules: which GGML format each tensor of a model gets.

A *recipe* is a named preset (``Q4_K_S``, ``Q8_0``, ...) plus optional user rules
(tensor-name pattern -> format). For each tensor it picks a format from:

1. the user's rules (first matching pattern wins);
2. what must stay in high precision: 1-D tensors, norms, small tensors, and
   each architecture's sensitive layers (Flux's ``img_in``, ``txt_in``,
   ``time_in``, ``vector_in``, ``guidance_in``, ``final_layer``, ...);
3. the preset's base format, raised one step for value and FFN-down
   projections in the ``_M`` (some layers) and ``_L`` (all layers) mixes, as
   llama.cpp does for LLMs;
4. a fallback when the row length is not a whole number of the format's blocks
   (each family names its formats' fallbacks, llama.cpp's choices: Q2_K-Q4_K -> Q5_0,
   Q5_K -> Q5_1, Q6_K -> Q8_0, 256-weight IQ formats -> IQ4_NL, ternary -> Q4_0,
   then F16), or when we have no quantizer for it.

Every decision carries a reason, so the converter can report fallbacks.
"""
from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .families import FAMILIES  # noqa: F401  (the registry: which formats quantize, their fallbacks)
from .errors import GGUFFormatError, UnsupportedFormatError
from .formats import FORMATS, GGMLFormat, get_format


def cannot_quantize_reason(fmt: GGMLFormat) -> str:
    """Why we cannot write ``fmt``, and what to pick instead."""
    if fmt.needs_imatrix:
        return ("needs an importance matrix to quantize (as in ggml), which this converter does not compute; "
                "pick IQ2_S, IQ3_XXS or Q2_K instead")
    return f"no quantizer for {fmt.name} here; pick another format"

# -- architectures -----------------------------------------------------------------

# (architecture, a tensor-name regex that identifies it); first match wins, so the
# more specific layouts come first (Chroma before Flux).
_ARCH_SIGNATURES: List[Tuple[str, str]] = [
    ("chroma", r"^distilled_guidance_layer\."),
    ("flux", r"^double_blocks\.\d+\.img_attn\.qkv\.weight$"),
    ("sd3", r"^joint_blocks\.\d+\.x_block\.attn\.qkv\.weight$"),
    ("auraflow", r"^(double_layers|single_layers)\.\d+\.attn\.w1q\.weight$"),
    ("hidream", r"^double_stream_blocks\.\d+\.block\.attn1\.to_q\.weight$"),
    ("wan", r"^blocks\.\d+\.self_attn\.q\.weight$"),
    ("ltxv", r"^transformer_blocks\.\d+\.attn1\.to_q\.weight$"),
    ("lumina2", r"^layers\.\d+\.attention\.qkv\.weight$"),
    ("sdxl", r"^label_emb\.0\.0\.weight$"),
    ("sd1", r"^input_blocks\.\d+\.\d+\.(weight|proj_in\.weight)$"),
]

# Layers that break when quantized, per architecture (matched with re.search).
_KEEP_HIGH: Dict[str, List[str]] = {
    "flux": [r"^img_in\.", r"^txt_in\.", r"^time_in\.", r"^vector_in\.", r"^guidance_in\.", r"^final_layer\."],
    "chroma": [r"^img_in\.", r"^txt_in\.", r"^distilled_guidance_layer\.", r"^final_layer\."],
    "sd3": [r"^x_embedder\.", r"^t_embedder\.", r"^y_embedder\.", r"^context_embedder\.", r"^final_layer\.",
            r"^pos_embed"],
    "auraflow": [r"^init_x_linear\.", r"^cond_seq_linear\.", r"^t_embedder\.", r"^final_linear\.", r"^modF\.",
                 r"^positional_encoding", r"^register_tokens"],
    "hidream": [r"^x_embedder\.", r"^t_embedder\.", r"^p_embedder\.", r"^caption_projection\.", r"^final_layer\."],
    "wan": [r"^patch_embedding\.", r"^text_embedding\.", r"^time_embedding\.", r"^time_projection\.",
            r"^img_emb\.", r"^head\."],
    "ltxv": [r"^patchify_proj\.", r"^adaln_single\.", r"^caption_projection\.", r"^proj_out\.",
             r"^scale_shift_table"],
    "lumina2": [r"^x_embedder\.", r"^t_embedder\.", r"^cap_embedder\.", r"^final_layer\.", r"^norm_final"],
    "sdxl": [r"^input_blocks\.0\.", r"^out\.", r"^time_embed\.", r"^label_emb\."],
    "sd1": [r"^input_blocks\.0\.", r"^out\.", r"^time_embed\."],
    "generic": [],
}

# Value and FFN-down projections: raised one step in the _M / _L mixes.
_RAISE = re.compile(
    r"(\.to_v\.|\.v_proj\.|\.attn\.v\.|self_attn\.v\.|cross_attn\.v\.|\.w1v\.|\.w2v\.|attn1\.to_v|attn2\.to_v"
    r"|_mlp\.2\.|\.linear2\.|mlp\.fc2\.|mlp\.c_proj\.|\.ffn\.2\.|ff\.net\.2\.|\.ff_i\.w2\.|\.ff_t\.w2\.|\.w2\."
    r"|feed_forward\.w2\.)"
)
_LAYER_INDEX = re.compile(
    r"((?:^|\.)(?:double_blocks|single_blocks|joint_blocks|double_layers|single_layers|double_stream_blocks"
    r"|single_stream_blocks|transformer_blocks|blocks|layers))\.(\d+)\."
)
_NORM = re.compile(r"(norm|\.scale$|ln_|layernorm|rms)", re.IGNORECASE)

# Below this many weights a tensor is kept in high precision: the bytes saved are
# negligible and small tensors (embeddings of a few rows, biases) are sensitive.
SMALL_TENSOR = 1 << 12

_LADDER = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0"]

# preset -> (base format, mix) where mix is "" / "S" (base only), "M" (raise some
# layers), "L" (raise all value/FFN-down layers).
PRESETS: Dict[str, Tuple[str, str]] = {
    "F16": ("F16", ""), "BF16": ("BF16", ""), "Q8_0": ("Q8_0", ""),
    "Q6_K": ("Q6_K", ""),
    "Q5_K_S": ("Q5_K", "S"), "Q5_K_M": ("Q5_K", "M"),
    "Q5_0": ("Q5_0", ""), "Q5_1": ("Q5_1", ""),
    "Q4_K_S": ("Q4_K", "S"), "Q4_K_M": ("Q4_K", "M"),
    "Q4_0": ("Q4_0", ""), "Q4_1": ("Q4_1", ""),
    "IQ4_NL": ("IQ4_NL", ""), "IQ4_XS": ("IQ4_XS", ""),
    "Q3_K_S": ("Q3_K", "S"), "Q3_K_M": ("Q3_K", "M"), "Q3_K_L": ("Q3_K", "L"),
    "Q2_K": ("Q2_K", "M"),
}
# every other format we quantize (without an importance matrix), whole, most bits first:
# for trying the low-bit formats on a model (they lose much more than the K-quants without one)
PRESETS.update((f.name, (f.name, "")) for f in sorted(FORMATS.values(), key=lambda f: -f.bits_per_weight)
               if f.is_quantized and f.can_quantize and f.name not in {base for base, _ in PRESETS.values()})


def detect_architecture(names: Iterable[str]) -> str:
    """The architecture a set of tensor names belongs to, or ``"generic"``."""
    names = list(names)
    for arch, pattern in _ARCH_SIGNATURES:
        rx = re.compile(pattern)
        if any(rx.search(n) for n in names):
            return arch
    return "generic"


# The ``general.architecture`` value other tools expect for our architecture names:
# ComfyUI-GGUF's loader refuses any value outside its own list ("Unexpected
# architecture type"), which says ``aura`` for AuraFlow and has no Chroma (it loads
# Chroma files written as ``flux``, and tells the two apart by their tensor names).
_FILE_NAMES: Dict[str, str] = {"auraflow": "aura", "chroma": "flux"}
# ``general.architecture`` values read back as our names (older files of ours wrote
# ``auraflow`` and ``chroma``, which stay readable).
_FROM_FILE: Dict[str, str] = {"aura": "auraflow"}
# Values that say nothing about the model: stable-diffusion.cpp writes no key at all,
# gguf-node writes these two.
_NO_ARCH = {None, "", "pig", "cow"}


def file_architecture(arch: str) -> str:
    """The ``general.architecture`` value to write for our architecture name ``arch``."""
    return _FILE_NAMES.get(arch, arch)


def model_architecture(value, names: Iterable[str]) -> str:
    """Our architecture name for a file whose ``general.architecture`` is ``value``
    (None when it has none, as stable-diffusion.cpp's files) and whose tensor names
    are ``names``: ``aura`` -> ``auraflow``, ``flux`` with Chroma's tensors ->
    ``chroma``; detected from the names when the value says nothing or is not one we
    know."""
    names = list(names)
    value = value if isinstance(value, str) else None
    if value in _NO_ARCH:
        return detect_architecture(names)
    arch = _FROM_FILE.get(value, value)
    if arch == "flux" and detect_architecture(names) == "chroma":
        return "chroma"
    if arch not in _KEEP_HIGH:
        detected = detect_architecture(names)
        return detected if detected != "generic" else arch
    return arch


def is_diffusers_flux(names: Iterable[str]) -> bool:
    """Whether the names are diffusers' Flux layout (separate q/k/v), not BFL's."""
    return any(n.startswith(("transformer_blocks.", "single_transformer_blocks.")) and ".attn.to_q." in n
               for n in names) and not any(n.startswith("double_blocks.") for n in names)


def _use_more_bits(i: int, n: int) -> bool:
    # llama.cpp's choice for the _M mixes: the first and last eighth of the
    # layers, and every third layer in between.
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass(frozen=True)
class TensorPlan:
    """The format chosen for one tensor, and why."""

    name: str
    shape: Tuple[int, ...]
    format: GGMLFormat
    reason: str
    wanted: Optional[GGMLFormat] = None  # set when a fallback replaced the wanted format

    @property
    def is_fallback(self) -> bool:
        return self.wanted is not None and self.wanted is not self.format


@dataclass
class Rule:
    pattern: str
    format: str

    def matches(self, name: str) -> bool:
        if self.pattern.startswith("re:"):
            return re.search(self.pattern[3:], name) is not None
        return fnmatch.fnmatchcase(name, self.pattern)


def parse_rules(source: Union[str, Path, Mapping[str, str], Sequence[Tuple[str, str]], None]) -> List[Rule]:
    """User rules from a file, a mapping or pairs.

    A rule file is JSON (``{"pattern": "FORMAT", ...}``) or text, one rule a line:
    ``PATTERN = FORMAT`` (or ``PATTERN FORMAT``), ``#`` comments. A pattern is a
    glob on the tensor name (``double_blocks.*.img_mlp.2.weight``) or, prefixed with
    ``re:``, a regular expression searched in it. ``FORMAT`` is a GGML type name,
    or ``keep`` for the high-precision type.
    """
    if source is None:
        return []
    if isinstance(source, Mapping):
        pairs = list(source.items())
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise GGUFFormatError("rule file not found", path=path)
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise GGUFFormatError(f"rule file is not valid JSON: {e}", path=path) from None
            if not isinstance(data, dict):
                raise GGUFFormatError("a JSON rule file must be an object of pattern -> format", path=path)
            pairs = list(data.items())
        else:
            pairs = []
            for lineno, line in enumerate(text.splitlines(), 1):
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                if "=" in line:
                    pat, _, fmt = line.rpartition("=")
                else:
                    parts = line.split()
                    if len(parts) != 2:
                        raise GGUFFormatError(f"line {lineno}: expected 'PATTERN = FORMAT', got {line!r}", path=path)
                    pat, fmt = parts
                pairs.append((pat.strip(), fmt.strip()))
    else:
        pairs = list(source)
    rules = []
    where = path if isinstance(source, (str, Path)) else None
    for pat, fmt in pairs:
        if str(fmt).lower() != "keep":
            f = get_format(fmt, path=where)  # validates the name with a clear error
            if not f.can_quantize:
                # never quietly another format (the fallback chain would end at BF16/F16)
                raise UnsupportedFormatError(f"rule {pat!r} = {f.name}: {cannot_quantize_reason(f)}", path=where)
        if pat.startswith("re:"):
            try:
                re.compile(pat[3:])
            except re.error as e:
                raise GGUFFormatError(f"bad regular expression in rule {pat!r}: {e}") from None
        rules.append(Rule(str(pat), str(fmt)))
    return rules


class Recipe:
    """A preset plus user rules; :meth:`plan` picks each tensor's format."""

    def __init__(self, name: str, rules=None):
        key = str(name).upper()
        if key not in PRESETS:
            fmt = next((f for f in FORMATS.values() if f.name == key), None)
            if fmt is not None and not fmt.can_quantize:
                raise UnsupportedFormatError(f"{fmt.name}: {cannot_quantize_reason(fmt)}; presets: {', '.join(PRESETS)}")
            if fmt is not None:
                raise GGUFFormatError(f"{fmt.name} is a GGML format but not a preset; a rule file can choose it "
                                      f"per tensor ('* = {fmt.name}'); presets: {', '.join(PRESETS)}")
            raise GGUFFormatError(f"unknown recipe {name!r}; presets: {', '.join(PRESETS)}")
        self.name = key
        self.base_name, self.mix = PRESETS[key]
        self.base = get_format(self.base_name)
        self.rules = parse_rules(rules)

    def __repr__(self) -> str:
        return f"Recipe({self.name!r}, rules={len(self.rules)})"

    @staticmethod
    def high_precision(shape: Sequence[int], source_dtype: Optional[torch.dtype]) -> GGMLFormat:
        """The format for a tensor kept in high precision: F32 for 1-D tensors,
        BF16 for bfloat16 sources (F16 could overflow), else F16."""
        if len(shape) <= 1:
            return get_format("F32")
        if source_dtype == torch.bfloat16:
            return get_format("BF16")
        return get_format("F16")

    def _raised(self, name: str, layer: Optional[int], n_layers: int) -> Optional[str]:
        if self.mix not in ("M", "L") or not _RAISE.search(name):
            return None
        if self.mix == "M" and layer is not None and n_layers and not _use_more_bits(layer, n_layers):
            return None
        if self.base_name in _LADDER and self.base_name != _LADDER[-1]:
            return _LADDER[_LADDER.index(self.base_name) + 1]
        return None

    def plan(self, name: str, shape: Sequence[int], source_dtype: Optional[torch.dtype] = None,
             arch: str = "generic", n_layers: Optional[Mapping[str, int]] = None) -> TensorPlan:
        shape = tuple(int(s) for s in shape)
        numel = 1
        for s in shape:
            numel *= s
        keep = self.high_precision(shape, source_dtype)
        for rule in self.rules:
            if rule.matches(name):
                want = keep if rule.format.lower() == "keep" else get_format(rule.format)
                return self._fit(name, shape, want, f"user rule {rule.pattern!r}", keep)
        if self.base.is_float:
            fmt = keep if len(shape) <= 1 else self.base
            return TensorPlan(name, shape, fmt, "preset")
        if len(shape) != 2:
            why = "1-D tensor" if len(shape) <= 1 else f"{len(shape)}-D tensor"
            return TensorPlan(name, shape, keep, why)
        if _NORM.search(name):
            return TensorPlan(name, shape, keep, "norm")
        if numel < SMALL_TENSOR:
            return TensorPlan(name, shape, keep, f"small tensor ({numel} weights)")
        for pattern in _KEEP_HIGH.get(arch, []):
            if re.search(pattern, name):
                return TensorPlan(name, shape, keep, f"sensitive layer of {arch}")
        m = _LAYER_INDEX.search(name)
        layer = int(m.group(2)) if m else None
        count = (n_layers or {}).get(m.group(1).lstrip("."), 0) if m else 0
        raised = self._raised(name, layer, count)
        if raised:
            return self._fit(name, shape, get_format(raised), f"{self.name} raises value/FFN-down", keep)
        return self._fit(name, shape, self.base, "preset", keep)

    def _fit(self, name: str, shape: Tuple[int, ...], want: GGMLFormat, reason: str, keep: GGMLFormat) -> TensorPlan:
        """``want`` if a row is a whole number of its blocks and we can quantize it,
        else the nearest format that fits."""
        row = shape[-1] if shape else 1
        chain = [want.name, *want.kernels.fallback, keep.name]
        for cand_name in chain:
            cand = get_format(cand_name)
            if cand.fits(row) and cand.can_quantize:
                if cand is want:
                    return TensorPlan(name, shape, cand, reason)
                why = (f"rows of {row} are not a multiple of {want.block_size}" if not want.fits(row)
                       else f"no quantizer for {want.name}")
                return TensorPlan(name, shape, cand, f"{reason}; fallback: {why}", wanted=want)
        return TensorPlan(name, shape, get_format("F32"), f"{reason}; fallback to F32", wanted=want)


def get_recipe(name: str, rules=None) -> Recipe:
    return Recipe(name, rules)


def count_layers(names: Iterable[str]) -> Dict[str, int]:
    """The number of repeated blocks in each block list (``double_blocks``: 19, ...)."""
    counts: Dict[str, int] = {}
    for n in names:
        m = _LAYER_INDEX.search(n)
        if m:
            key = m.group(1).lstrip(".")
            counts[key] = max(counts.get(key, 0), int(m.group(2)) + 1)
    return counts


def plan_model(shapes: Mapping[str, Tuple[Sequence[int], Optional[torch.dtype]]], recipe: Union[str, Recipe],
               rules=None) -> List[TensorPlan]:
    """A plan for every tensor: ``shapes`` maps names to ``(shape, source dtype)``."""
    if isinstance(recipe, str):
        recipe = Recipe(recipe, rules)
    arch = detect_architecture(shapes)
    n_layers = count_layers(shapes)
    return [recipe.plan(name, shape, dtype, arch, n_layers) for name, (shape, dtype) in shapes.items()]
