"""safetensors / GGUF -> GGUF, tensor by tensor, with per-layer rules.

``convert(src, dst, recipe)`` reads a single ``.safetensors`` file, a folder of
safetensors shards, or a ``.gguf`` file (requantize), plans each tensor's format
with :mod:`lib_gguf.recipes`, and writes ``dst`` atomically, streaming: only one
source tensor (and its quantized bytes) is in memory at a time.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from .errors import GGUFFormatError
from .formats import GGMLFormat, get_format
from .quant import quantize
from .reader import load_state_dict
from .recipes import Recipe, TensorPlan, count_layers, detect_architecture, is_diffusers_flux
from .writer import check_output, save

log = logging.getLogger(__name__)

# Prefixes that single-file checkpoints put before the diffusion model's own names.
_MODEL_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")
# Other components of full checkpoints (VAE, text encoders): left out, and reported.
_OTHER_COMPONENTS = ("first_stage_model.", "cond_stage_model.", "conditioner.", "text_encoders.", "vae.",
                     "text_encoder.", "text_encoder_2.", "model_ema.")

ProgressFn = Callable[[int, int, str], None]


# -- sources -----------------------------------------------------------------------

class _Source:
    """Tensor names, shapes and dtypes up front; one tensor at a time on demand."""

    path: Path

    def infos(self) -> Dict[str, Tuple[Tuple[int, ...], Optional[torch.dtype]]]:
        raise NotImplementedError

    def load(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _SafetensorsSource(_Source):
    _DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
               "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
               "BOOL": torch.bool, "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
               "F8_E5M2": getattr(torch, "float8_e5m2", None)}

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        if not files:
            raise GGUFFormatError("no .safetensors files in this folder", path=path)
        self._handles = []
        self._where: Dict[str, object] = {}
        self._infos: Dict[str, Tuple[Tuple[int, ...], Optional[torch.dtype]]] = {}
        for f in files:
            try:
                h = safe_open(str(f), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise GGUFFormatError(f"not a readable safetensors file: {e}", path=f) from None
            self._handles.append(h)
            for k in h.keys():
                if k in self._where:
                    raise GGUFFormatError(f"tensor {k!r} appears in two shards", path=f)
                sl = h.get_slice(k)
                self._where[k] = h
                self._infos[k] = (tuple(sl.get_shape()), self._DTYPES.get(sl.get_dtype()))

    def infos(self):
        return dict(self._infos)

    def load(self, name):
        return self._where[name].get_tensor(name)


class _GGUFSource(_Source):
    def __init__(self, path: Path):
        self.path = path
        self._sd = load_state_dict(path)
        self._infos = {}
        for k, t in self._sd.items():
            fmt = getattr(t, "gguf_cls", None)
            dtype = None if fmt is not None else t.dtype
            self._infos[k] = (tuple(t.shape), dtype)

    def infos(self):
        return dict(self._infos)

    def load(self, name):
        t = self._sd[name]
        if getattr(t, "gguf_cls", None) is not None:
            return t.dequantize(torch.float32)
        return t


def open_source(src: Union[str, Path]) -> _Source:
    path = Path(src)
    if not path.exists():
        raise GGUFFormatError("source not found", path=path)
    if path.is_dir() or path.suffix.lower() == ".safetensors":
        return _SafetensorsSource(path)
    if path.suffix.lower() == ".gguf":
        return _GGUFSource(path)
    raise GGUFFormatError("expected a .safetensors file, a folder of .safetensors shards or a .gguf file", path=path)


def _model_names(names: Sequence[str], path: Path) -> Tuple[Dict[str, str], List[str]]:
    """Map output names to source names: strip a checkpoint's model prefix, leave
    out other components (reported)."""
    dropped = [n for n in names if n.startswith(_OTHER_COMPONENTS)]
    rest = [n for n in names if not n.startswith(_OTHER_COMPONENTS)]
    for prefix in _MODEL_PREFIXES:
        if rest and all(n.startswith(prefix) for n in rest):
            return {n[len(prefix):]: n for n in rest}, dropped
    if any(n.startswith("model.diffusion_model.") for n in rest):
        keep = [n for n in rest if n.startswith("model.diffusion_model.")]
        dropped += [n for n in rest if not n.startswith("model.diffusion_model.")]
        return {n[len("model.diffusion_model."):]: n for n in keep}, dropped
    return {n: n for n in rest}, dropped


# -- conversion --------------------------------------------------------------------

@dataclass
class ConvertSummary:
    src: str
    dst: str
    recipe: str
    architecture: str
    n_tensors: int
    n_weights: int
    out_bytes: int
    seconds: float
    formats: Dict[str, int] = field(default_factory=dict)  # format name -> tensor count
    fallbacks: List[Tuple[str, str, str, str]] = field(default_factory=list)  # name, wanted, got, why
    dropped: List[str] = field(default_factory=list)

    @property
    def bits_per_weight(self) -> float:
        return self.out_bytes * 8.0 / max(self.n_weights, 1)

    def text(self) -> str:
        lines = [
            f"{self.dst}: {self.n_tensors} tensors, {self.n_weights / 1e6:.2f} M weights, "
            f"{self.out_bytes / 2**20:.2f} MiB, {self.bits_per_weight:.3f} bits per weight "
            f"({self.architecture}, recipe {self.recipe}, {self.seconds:.1f} s)",
            "formats: " + ", ".join(f"{k} x{v}" for k, v in sorted(self.formats.items())),
        ]
        if self.fallbacks:
            lines.append(f"fallbacks ({len(self.fallbacks)}):")
            lines += [f"  {n}: {w} -> {g} ({why})" for n, w, g, why in self.fallbacks]
        if self.dropped:
            lines.append(f"left out {len(self.dropped)} tensors of other components (VAE, text encoders)")
        return "\n".join(lines)


_AMINMAX_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _all_finite(x: torch.Tensor) -> bool:
    """No NaN or inf in ``x``: one pass over the values, with no float copy, for the
    dtypes ``aminmax`` reads (a NaN or inf shows in the extremes); float8 and others
    through a float32 copy."""
    if not x.numel() or not x.is_floating_point():
        return True
    if x.dtype in _AMINMAX_DTYPES:
        lo, hi = torch.aminmax(x)
        return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))
    return bool(torch.isfinite(x.float()).all())


class _PlannedTensor:
    """A tensor the writer asks for when it reaches it (streaming)."""

    def __init__(self, plan: TensorPlan, load: Callable[[], torch.Tensor], path=None):
        self.plan = plan
        self._load = load
        self.path = path
        self.gguf_cls = plan.format
        self.gguf_shape = torch.Size(plan.shape)

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.plan.shape[:-1]:
            n *= s
        return n * self.plan.format.row_bytes(self.plan.shape[-1] if self.plan.shape else 1)

    def materialize(self) -> torch.Tensor:
        """The tensor's GGUF bytes (uint8), computed now."""
        x = self._load()
        if tuple(x.shape) != self.plan.shape:
            raise GGUFFormatError(f"shape changed while reading: {tuple(x.shape)} != {self.plan.shape}",
                                  path=self.path, tensor=self.plan.name)
        if not _all_finite(x):
            bad = int((~torch.isfinite(x.float())).sum())
            raise GGUFFormatError(f"contains {bad} inf or NaN values (of {x.numel()}); nothing was written",
                                  path=self.path, tensor=self.plan.name)
        return quantize(x, self.plan.format, name=self.plan.name)


def plan_source(src: Union[str, Path], recipe: Union[str, Recipe] = "Q8_0", rules=None):
    """Open ``src`` and plan every tensor: ``(source, name_map, plans, arch, dropped)``."""
    source = open_source(src)
    infos = source.infos()
    names, dropped = _model_names(list(infos), source.path)
    if is_diffusers_flux(names):
        raise GGUFFormatError(
            "this is a diffusers-layout Flux (transformer_blocks.N.attn.to_q ...); convert it to the reference "
            "(BFL) layout first, e.g. save it from Forge or ComfyUI as a single-file checkpoint",
            path=source.path,
        )
    if isinstance(recipe, str):
        recipe = Recipe(recipe, rules)
    arch = detect_architecture(names)
    counts = count_layers(names)
    plans = []
    for out_name, src_name in names.items():
        shape, dtype = infos[src_name]
        if dtype is None and source.path.suffix.lower() != ".gguf":
            raise GGUFFormatError("unsupported element type", path=source.path, tensor=src_name)
        if dtype is not None and not (dtype.is_floating_point):
            raise GGUFFormatError(f"expected a floating-point tensor, got {dtype}", path=source.path,
                                  tensor=src_name)
        plans.append(recipe.plan(out_name, shape, dtype, arch, counts))
    return source, names, plans, arch, dropped


def _input_files(src, rules) -> List[Path]:
    """Every file a conversion reads: the source (each shard of a folder) and a rule file."""
    src = Path(src)
    files = [src]
    if src.is_dir():
        files += sorted(src.glob("*.safetensors"))
    if isinstance(rules, (str, Path)):
        files.append(Path(rules))
    return files


def convert(src: Union[str, Path], dst: Union[str, Path], recipe: Union[str, Recipe] = "Q8_0", rules=None,
            progress: Optional[ProgressFn] = None, metadata: Optional[dict] = None) -> ConvertSummary:
    """Convert ``src`` to a GGUF file at ``dst`` with a recipe (see :mod:`lib_gguf.recipes`).

    ``progress(done, total, tensor_name)`` is called after each tensor.
    Returns a :class:`ConvertSummary`; nothing is left at ``dst`` on error.
    """
    t0 = time.perf_counter()
    dst = Path(dst)
    check_output(dst, _input_files(src, rules))
    source, names, plans, arch, dropped = plan_source(src, recipe, rules)
    recipe_name = recipe.name if isinstance(recipe, Recipe) else str(recipe).upper()
    try:
        total = len(plans)
        done = [0]
        tensors = {}
        for plan in plans:
            src_name = names[plan.name]

            def load(src_name=src_name, name=plan.name):
                t = source.load(src_name)
                done[0] += 1
                if progress is not None:
                    progress(done[0], total, name)
                return t

            tensors[plan.name] = _PlannedTensor(plan, load, source.path)
        meta = {
            "general.architecture": arch,
            "general.quantization_version": 2,
            "general.name": Path(src).stem,
            "forge_gguf_lora.recipe": recipe_name,
            "forge_gguf_lora.source": Path(src).name,
            "forge_gguf_lora.tensor_types": json.dumps({p.name: p.format.name for p in plans}),
        }
        if isinstance(recipe, Recipe) and recipe.rules:
            meta["forge_gguf_lora.rules"] = json.dumps([[r.pattern, r.format] for r in recipe.rules])
        meta.update(metadata or {})
        save(dst, tensors, meta)
    finally:
        source.close()
    formats: Dict[str, int] = {}
    for p in plans:
        formats[p.format.name] = formats.get(p.format.name, 0) + 1
    n_weights = 0
    for p in plans:
        n = 1
        for s in p.shape:
            n *= s
        n_weights += n
    summary = ConvertSummary(
        src=str(src), dst=str(dst), recipe=recipe_name, architecture=arch, n_tensors=len(plans),
        n_weights=n_weights, out_bytes=dst.stat().st_size, seconds=time.perf_counter() - t0, formats=formats,
        fallbacks=[(p.name, p.wanted.name, p.format.name, p.reason) for p in plans if p.is_fallback],
        dropped=dropped,
    )
    for n, w, g, why in summary.fallbacks:
        log.info("fallback %s: %s -> %s (%s)", n, w, g, why)
    return summary
