"""The policy: per parameter, merge the LoRA into the weight or add it at run time.

Float parameters (F16/F32/BF16 weights, biases, norm scales) are always merged:
it is exact and costs nothing per step. For a GGUF parameter the user's choice for
its format decides (``mode_by_format``, else ``default_gguf_mode``); in ``auto``
a merge must also keep at least ``keep_threshold`` of the delta (measured on a
sample of rows by requantizing them), else the layer runs at run time instead.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict

MODES = ("auto", "merge", "runtime")


@dataclass
class LoraOptions:
    """What the user chose; the Gradio tab and Forge's settings are built from these fields.

    - ``mode_by_format``: GGML format name (``"Q4_K"``) -> ``"merge"``, ``"runtime"`` or ``"auto"``.
    - ``default_mode``: the mode when the caller asks for none.
    - ``default_gguf_mode``: what ``auto`` does for a GGUF format with no entry (``"runtime"``).
    - ``requantize_target``: format we cannot quantize -> format to requantize a merged weight into.
    - ``fallback_format``: the target for such formats when ``requantize_target`` has no entry.
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
        for fmt, mode in list(self.mode_by_format.items()) + [("default", self.default_mode),
                                                              ("default_gguf", self.default_gguf_mode)]:
            if mode not in MODES:
                raise ValueError(f"LoRA mode for {fmt} must be one of {MODES}, got {mode!r}")
        if self.compute_dtype not in ("auto", "float16", "bfloat16", "float32"):
            raise ValueError(f"compute_dtype must be auto, float16, bfloat16 or float32, got {self.compute_dtype!r}")
        if not 0.0 <= float(self.keep_threshold) <= 1.0:
            raise ValueError(f"keep_threshold must be between 0 and 1, got {self.keep_threshold!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LoraOptions":
        known = {k: v for k, v in (d or {}).items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def mode_for(self, format_name: str, requested: str) -> str:
        """The mode asked for a GGUF parameter of this format (before the keep check)."""
        if requested in ("merge", "runtime"):
            return requested
        choice = self.mode_by_format.get(format_name, "auto")
        if choice == "auto":
            return self.default_gguf_mode if self.default_gguf_mode != "auto" else "merge"
        return choice

    def target_for(self, fmt) -> str:
        """The format a merged weight of ``fmt`` is written back in."""
        if fmt.can_quantize:
            return self.requantize_target.get(fmt.name, fmt.name)
        return self.requantize_target.get(fmt.name, self.fallback_format)
