"""GGUF layers: a ``Linear`` that keeps its weight quantized, and ``load_into``.

:class:`GGUFLinear` holds a :class:`GGUFParameter` (or a plain float weight) and
dequantizes it in ``forward`` to the input's dtype and device. Run-time LoRA
deltas attach with ordinary forward hooks (``register_forward_hook``), which may
return a new output or add into a slice of it: ``lib_lora`` does exactly that, so
the GGUF bytes are never touched.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .backend import get_backend
from .dequant import dequantize
from .errors import GGUFFormatError
from .parameter import GGUFParameter, dequantize_tensor, is_gguf, raw_bytes
from .reader import load_state_dict

log = logging.getLogger(__name__)


class GGUFLinear(torch.nn.Module):
    """``torch.nn.Linear`` with a GGUF weight; ``bias`` may be ``None`` (AuraFlow)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype),
                                         requires_grad=False)
        if bias:
            self.bias = torch.nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype),
                                           requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> "GGUFLinear":
        """A GGUFLinear in place of ``linear`` holding ``weight`` (GGUF or float)."""
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        new.in_features = linear.in_features
        new.out_features = linear.out_features
        new.weight = weight if isinstance(weight, torch.nn.Parameter) else torch.nn.Parameter(weight, requires_grad=False)
        if bias is None:
            new.register_parameter("bias", None)
        else:
            new.bias = bias if isinstance(bias, torch.nn.Parameter) else torch.nn.Parameter(bias, requires_grad=False)
        return new

    def dequantized_weight(self, dtype: torch.dtype, device) -> torch.Tensor:
        w = self.weight
        if is_gguf(w):
            return w.dequantize(dtype, device=device)
        return w.to(device=device, dtype=dtype)

    # -- torch.compile: the graph sees the weight's bytes as a plain uint8 tensor and
    # dequantizes them with one opaque operator (``lib_gguf::dequantize``), never the
    # GGUFParameter, whose logical ``.shape`` differs from its storage's (dynamo cannot
    # guard it). The bytes, format and shape are kept beside the weight, in the module's
    # ``__dict__`` (not a buffer: no second copy when the module moves), and follow every
    # assignment of ``weight`` and every move.
    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name == "weight":
            self._sync_compiled_view()

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._sync_compiled_view()
        return out

    def _sync_compiled_view(self) -> None:
        w = self._parameters.get("weight")
        d = self.__dict__
        if is_gguf(w):
            d["_gguf_bytes"] = raw_bytes(w)
            d["_gguf_type"] = int(w.gguf_cls.type_id)
            d["_gguf_shape"] = [int(s) for s in w.gguf_shape]
        else:
            for k in ("_gguf_bytes", "_gguf_type", "_gguf_shape"):
                d.pop(k, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _compiling() and "_gguf_bytes" in self.__dict__ and _DEQUANTIZE_OP is not None:
            w = _DEQUANTIZE_OP(self._gguf_bytes.to(x.device), self._gguf_type, self._gguf_shape, x.dtype)
            b = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype)
            return F.linear(x, w, b)
        if _fused_candidate(self.weight, x):
            from .linear_triton import layer_forward

            y = layer_forward(self, x)  # one Triton kernel, the run-time LoRAs folded in; None: not here
            if y is not None:
                return y
        w = self.dequantized_weight(x.dtype, x.device)
        b = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype)
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        fmt = getattr(self.weight, "gguf_cls", None)
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={fmt.name if fmt is not None else str(self.weight.dtype)}")


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def _make_dequantize_op():
    """``lib_gguf::dequantize(bytes, type_id, shape, dtype)`` as a custom operator with
    a fake (shape-only) kernel, for torch.compile; None on a torch without
    ``torch.library.custom_op`` (before 2.4): there, a compiled module breaks its graph
    at each GGUF layer and runs it eagerly."""
    custom_op = getattr(torch.library, "custom_op", None)
    if custom_op is None:
        return None
    @custom_op("lib_gguf::dequantize", mutates_args=())
    def dequantize_op(data: torch.Tensor, type_id: int, shape: List[int], dtype: torch.dtype) -> torch.Tensor:
        return dequantize(data, type_id, shape, dtype)

    @dequantize_op.register_fake
    def _(data, type_id, shape, dtype):
        return data.new_empty(shape, dtype=dtype)

    return dequantize_op


_DEQUANTIZE_OP = _make_dequantize_op()


def _fused_candidate(w, x: torch.Tensor) -> bool:
    """Whether the fused dequantize-matmul (lib_gguf.linear_triton) may run: a GGUF
    weight and float16/bfloat16 activations on a CUDA device (or, for tests, the CPU
    under Triton's interpreter with the backend choice "triton"). Checked before
    anything is imported, so CPU runs never import triton. The rule per shape and the
    rest are :func:`lib_gguf.linear_triton.layer_forward`'s."""
    if x.dtype not in (torch.float16, torch.bfloat16) or not is_gguf(w):
        return False
    if x.device.type == "cuda":
        return True
    if x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return get_backend() == "triton"
    return False


def _module_and_attr(root: torch.nn.Module, name: str) -> Tuple[torch.nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (root.get_submodule(path) if path else root), attr


def load_into(module: torch.nn.Module, path_or_state_dict: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
              strict: bool = True) -> Dict[str, List[str]]:
    """Load a GGUF state dict into an existing float module.

    Every ``nn.Linear`` whose weight is GGUF becomes a :class:`GGUFLinear` (same
    attribute path); float weights are copied; other layers' weights stored
    quantized (conv, norm, embedding) are dequantized once, here. Returns
    ``{"missing": [...], "unexpected": [...], "mismatched": [...]}``; with
    ``strict`` any of them raises one :class:`GGUFFormatError` listing them all,
    before the module is changed.
    """
    source = None
    if isinstance(path_or_state_dict, Mapping):
        sd = dict(path_or_state_dict)
    else:
        source = path_or_state_dict
        sd = load_state_dict(path_or_state_dict)
    own = dict(module.named_parameters(remove_duplicate=False))
    own.update(dict(module.named_buffers(remove_duplicate=False)))
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [f"{k}: file {list(sd[k].shape)}, model {list(own[k].shape)}"
                  for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    problems = {"missing": missing, "unexpected": unexpected, "mismatched": mismatched}
    if strict and (missing or unexpected or mismatched):
        parts = [f"{what} ({len(v)}): {', '.join(v[:20])}{' ...' if len(v) > 20 else ''}"
                 for what, v in problems.items() if v]
        raise GGUFFormatError("state dict does not fit the model: " + "; ".join(parts), path=source)

    linears = {name: m for name, m in module.named_modules() if isinstance(m, (torch.nn.Linear, GGUFLinear))}
    for name, value in sd.items():
        if name not in own or tuple(value.shape) != tuple(own[name].shape):
            continue
        mod, attr = _module_and_attr(module, name)
        mod_name = name[: -len(attr) - 1] if "." in name else ""
        if is_gguf(value):
            if attr == "weight" and mod_name in linears:
                if isinstance(mod, torch.nn.Linear):
                    new = GGUFLinear.from_linear(mod, value, mod.bias)
                    parent, child = _module_and_attr(module, mod_name)
                    setattr(parent, child, new)
                    linears[mod_name] = new
                else:
                    mod.weight = value
                continue
            target = own[name]
            value = dequantize_tensor(value, target.dtype if target.is_floating_point() else torch.float32)
        target_mod = linears.get(mod_name, mod) if attr in ("weight", "bias") else mod
        current = getattr(target_mod, attr)
        with torch.no_grad():
            if current is None or is_gguf(current):
                setattr(target_mod, attr, torch.nn.Parameter(value.clone(), requires_grad=False))
            else:
                current.copy_(value)
    return problems
