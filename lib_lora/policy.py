"""The LoRA policy: for each weight, merge its LoRA patches into it or add them at run time.

:func:`decide` is its one home, used by :func:`lib_lora.apply.apply_loras`, by the Forge
glue (``extension.py``) and by the GGUF tab's inspector:

- **the choice** for a weight is its format's own entry in ``mode_by_format``, else
  ``default_gguf_mode`` for a quantized format and ``default_mode`` for a float one
  (F16, BF16, F32): ``"runtime"``, ``"merge"`` or ``"auto"``;
- **auto**: the caller's hint decides (Forge's "(fp16 LoRA)" switch: on, run time;
  off, merge; no hint, merge), and a merge into a quantized weight that would keep
  less than ``keep_threshold`` of the delta (estimated by requantizing sample rows,
  :func:`lib_lora.merge.merge_keep`) runs at run time instead;
- **the merge target**: the weight's own format; for a format we cannot quantize
  (IQ2_XXS, IQ2_XS, IQ1_S) its ``requantize_target`` entry, else ``fallback_format``;
  F16 where that format cannot be written (rows that are not whole blocks). A format
  we cannot quantize is merged only when its choice is ``"merge"``;
- **run time** is for Linear weights only (the rest is merged) and for the patches
  the caller can run as deltas; the others (the host's LoHa, LoKr, DoRA, ... patches
  that the glue does not read, passed as ``others``) are merged, which every host applies.

An explicit mode (``apply_loras(mode="merge")``, a pasted infotext's modes) is the
choice for every format: :meth:`LoraOptions.forcing`. Nothing here imports torch at
module level (the tab imports this module at Forge's start).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

log = logging.getLogger(__name__)

MODES = ("merge", "runtime", "auto")  # the order the tab and Forge's settings show them in
COMPUTE_DTYPES = ("auto", "float16", "bfloat16", "float32")


def _mode(value, what: str) -> str:
    if value not in MODES:
        raise ValueError(f"option {what}: expected one of {', '.join(MODES)}, got {value!r}")
    return value


def _no_entry(value) -> bool:
    return value in (None, "", "default")


@dataclass
class LoraOptions:
    """What the user chose; the GGUF tab and Forge's settings are built from these fields.

    - ``mode_by_format``: GGML format name (``"Q4_K"``, ``"F16"``) -> ``"merge"``, ``"runtime"`` or ``"auto"``.
    - ``default_mode``: the mode of a float format (F16, BF16, F32) without an entry.
    - ``default_gguf_mode``: the mode of a quantized format without an entry.
    - ``requantize_target``: format we cannot quantize -> format a merged weight of it is written in.
    - ``fallback_format``: that format for the ones without a ``requantize_target`` entry.
    - ``compute_dtype``: ``"auto"`` (the input's), ``"float16"``, ``"bfloat16"`` or ``"float32"``, for run-time deltas.
    - ``keep_threshold``: in ``auto``, a merge that would keep less of the delta than this runs at run time instead.
    """

    mode_by_format: Dict[str, str] = field(default_factory=dict)
    default_mode: str = "auto"
    default_gguf_mode: str = "runtime"
    requantize_target: Dict[str, str] = field(default_factory=dict)
    fallback_format: str = "Q8_0"
    compute_dtype: str = "auto"
    keep_threshold: float = 0.90

    def __post_init__(self):
        for fmt, mode in self.mode_by_format.items():
            _mode(mode, f"mode_by_format[{fmt}]")
        _mode(self.default_mode, "default_mode")
        _mode(self.default_gguf_mode, "default_gguf_mode")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"option compute_dtype: expected one of {', '.join(COMPUTE_DTYPES)}, "
                             f"got {self.compute_dtype!r}")
        try:
            self.keep_threshold = float(self.keep_threshold)
        except (TypeError, ValueError):
            raise ValueError(f"option keep_threshold: expected a number, got {self.keep_threshold!r}") from None
        if not 0.0 <= self.keep_threshold <= 1.0:
            raise ValueError(f"option keep_threshold: expected a number from 0 to 1, got {self.keep_threshold}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Optional[Mapping[str, Any]]) -> "LoraOptions":
        """Options from a saved or submitted dict: unknown keys are ignored, format names
        upper-cased, per-format ``"default"`` (or empty) values mean no entry; a bad
        value raises ``ValueError`` naming the option."""
        d = dict(d or {})
        kw: Dict[str, Any] = {k: d[k] for k in ("default_mode", "default_gguf_mode", "compute_dtype",
                                                "keep_threshold") if k in d}
        kw["mode_by_format"] = {str(f).upper(): m for f, m in dict(d.get("mode_by_format") or {}).items()
                                if not _no_entry(m)}
        kw["requantize_target"] = {str(f).upper(): str(t).upper()
                                   for f, t in dict(d.get("requantize_target") or {}).items() if not _no_entry(t)}
        if d.get("fallback_format"):
            kw["fallback_format"] = str(d["fallback_format"]).upper()
        return cls(**kw)

    def forcing(self, mode: str) -> "LoraOptions":
        """These options with ``mode`` the choice of every format (an explicit mode)."""
        _mode(mode, "mode")
        return LoraOptions.from_dict(dict(self.to_dict(), mode_by_format={}, default_mode=mode,
                                          default_gguf_mode=mode))

    def choice_for(self, format_name: str, quantized: bool) -> str:
        """The configured mode of a format: its own entry, else the default for quantized or float formats."""
        own = self.mode_by_format.get(format_name.upper())
        if own is not None:
            return own
        return self.default_gguf_mode if quantized else self.default_mode

    def torch_compute_dtype(self):
        """The run-time deltas' dtype as a ``torch.dtype`` (None: the input's)."""
        import torch

        return None if self.compute_dtype == "auto" else getattr(torch, self.compute_dtype)


def merge_target(fmt, options: "LoraOptions", n_per_row: Optional[int] = None):
    """The format a merged weight of ``fmt`` is written in (a format object): its own,
    or for a format we cannot quantize the requantize target; F16 where that one cannot
    be written at this row width or is no format we can quantize."""
    from lib_gguf.errors import GGUFFormatError
    from lib_gguf.formats import get_format

    if fmt.is_float or fmt.can_quantize:
        want = fmt.name
    else:
        want = options.requantize_target.get(fmt.name, options.fallback_format)
    try:
        target = get_format(want)
    except GGUFFormatError as e:
        log.warning("requantize target for %s: %s; F16 instead", fmt.name, e)
        return get_format("F16")
    if not target.can_quantize or target.needs_imatrix or (n_per_row is not None and not target.fits(n_per_row)):
        return get_format("F16")
    return target


@dataclass(frozen=True)
class Decision:
    """Where one weight's patches go.

    ``mode``: ``"merge"`` (every patch merged into the weight, written as ``target``) or
    ``"runtime"`` (the patches the caller can run as deltas at run time; the ``others``
    merged into ``target``). ``choice``: the configured mode it came from; ``kept``:
    the share of the delta a merge would keep, when it was estimated."""

    format: str
    choice: str
    mode: str
    target: str
    why: str
    kept: Optional[float] = None
    others: Tuple[str, ...] = ()

    @property
    def modes(self) -> Tuple[str, ...]:
        """The modes this weight uses (what the infotext records)."""
        if self.mode == "runtime" and self.others:
            return ("merge", "runtime")
        return (self.mode,)


def is_linear_weight(module, attr: str, param) -> bool:
    """Whether ``module.attr`` can take a run-time delta: the 2-D weight of a layer whose
    forward is ``x @ W.T (+ b)`` (a Linear; not a conv kernel, a bias or an embedding)."""
    import torch

    return (attr == "weight" and len(param.shape) == 2 and module is not None
            and callable(getattr(module, "forward", None)) and not isinstance(module, torch.nn.Embedding))


def decide(weight, patches: Sequence[Tuple[Any, float]] = (), options: Optional[LoraOptions] = None, *,
           shape: Optional[Sequence[int]] = None, hint: Optional[str] = None, linear: bool = True,
           others: Sequence[str] = ()) -> Decision:
    """Where the LoRA patches of one weight go (see the module docstring).

    ``weight``: the weight (a ``GGUFParameter`` or a float tensor), or its format (a
    format object or name) with ``shape``. ``patches``: ``[(lib_lora Patch, strength)]``,
    the patches the caller can run at run time (the keep estimate uses them); ``others``:
    the kinds of the patches only the host can apply (merged). ``hint``: what the
    caller asks where the choice is ``auto`` (``"merge"``, ``"runtime"`` or None).
    ``linear``: whether the weight can take a run-time delta (:func:`is_linear_weight`)."""
    from lib_gguf.formats import format_for_dtype, get_format

    options = options or LoraOptions()
    data = None
    if hasattr(weight, "dtype") and hasattr(weight, "shape"):  # a tensor
        data = weight
        fmt = getattr(weight, "gguf_cls", None) or format_for_dtype(weight.dtype)
        shape = tuple(weight.shape)
    else:
        fmt = get_format(weight)
    if hint not in (None, "merge", "runtime"):
        raise ValueError(f"hint must be merge, runtime or None, got {hint!r}")
    quantized = fmt.is_quantized
    choice = options.choice_for(fmt.name, quantized)
    target = merge_target(fmt, options, int(shape[-1]) if shape else None).name
    if choice == "auto":
        mode = hint or "merge"
        why = f"{fmt.name}: auto, {mode}" + (" (the host's switch)" if hint else "")
    else:
        mode, why = choice, f"{fmt.name}: option {choice}"
    if mode == "merge" and quantized and not fmt.can_quantize and choice != "merge":
        mode, why = "runtime", f"{fmt.name}: no quantizer: merged (into {target}) only when its option is merge"
    if mode == "runtime" and not linear:
        mode, why = "merge", f"{fmt.name}: not a Linear weight: merged"
    kept = None
    if mode == "merge" and choice == "auto" and quantized and linear and patches and not others \
            and data is not None:
        from .errors import LoraError
        from .merge import merge_keep

        try:
            kept = merge_keep(data, patches, get_format(target))
        except LoraError as e:  # the merge itself reports it
            log.debug("no keep estimate: %s", e)
        if kept is not None and kept < options.keep_threshold:
            mode = "runtime"
            why = f"{fmt.name}: a merge would keep {kept:.0%} of the delta (< {options.keep_threshold:.0%})"
    return Decision(fmt.name, choice, mode, target, why, kept, tuple(others) if mode == "runtime" else ())
