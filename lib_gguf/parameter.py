"""``GGUFParameter``: a ``torch.nn.Parameter`` holding a tensor's GGUF bytes.

The bytes stay as the file has them (uint8, shape ``(*logical[:-1], row_bytes)``);
the parameter carries ``gguf_cls`` (its :class:`~lib_gguf.formats.GGMLFormat`),
reports its logical ``.shape`` (``gguf_shape``; ``real_shape`` for Forge), and
dequantizes on demand. Moving it between devices, detaching, cloning, copying,
pickling and ``state_dict`` round trips keep it a ``GGUFParameter``; converting its
dtype never touches the bytes.

:func:`is_gguf` and :func:`dequantize_tensor` accept any tensor: plain tensors and
plain ``Parameter``s (a LoRA's, a bias) pass straight through.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .formats import GGMLFormat, get_format

# Tensor methods whose result is the same bytes elsewhere (or a copy of them):
# the result stays a GGUFParameter with the same format and logical shape.
_KEEP = {
    torch.Tensor.to,
    torch.Tensor.detach,
    torch.Tensor.clone,
    torch.Tensor.cpu,
    torch.Tensor.cuda,
    torch.Tensor.pin_memory,
    torch.Tensor.contiguous,
    torch.Tensor.requires_grad_,
    torch.Tensor.share_memory_,
}
for _name in ("xpu", "mps"):
    if hasattr(torch.Tensor, _name):
        _KEEP.add(getattr(torch.Tensor, _name))


def _strip_dtype(args, kwargs):
    """``.to(dtype)`` must not convert the bytes: drop dtype arguments."""
    args = tuple(a for a in args if not isinstance(a, torch.dtype))
    kwargs = {k: v for k, v in kwargs.items() if k != "dtype"}
    return args, kwargs


class GGUFParameter(torch.nn.Parameter):
    """GGUF bytes as a parameter. ``GGUFParameter(data_uint8, fmt, logical_shape)``."""

    gguf_cls: GGMLFormat
    gguf_shape: torch.Size

    def __new__(cls, data: torch.Tensor, gguf_cls=None, shape: Optional[Sequence[int]] = None,
                requires_grad: bool = False, computation_dtype: torch.dtype = torch.float16):
        if gguf_cls is None:
            raise TypeError("GGUFParameter needs its format (gguf_cls)")
        if isinstance(data, torch.nn.Parameter):
            data = data.data
        if data.dtype != torch.uint8:
            data = data.contiguous().view(torch.uint8)
        self = torch.Tensor._make_subclass(cls, data, False)
        fmt = get_format(gguf_cls)
        self.gguf_cls = fmt
        self.gguf_shape = torch.Size(shape if shape is not None else fmt.logical_shape(data.shape))
        self.computation_dtype = computation_dtype
        self.baked = False
        return self

    def __init__(self, *args, **kwargs):  # everything happens in __new__
        pass

    # -- what it says it is -------------------------------------------------------
    @property
    def shape(self) -> torch.Size:  # the logical shape, as Forge's ParameterGGUF does
        return self.gguf_shape

    @property
    def real_shape(self) -> torch.Size:
        return self.gguf_shape

    @property
    def byte_shape(self) -> torch.Size:
        return torch.Tensor.size(self)

    @property
    def qtype(self) -> int:
        return self.gguf_cls.type_id

    def __repr__(self) -> str:
        return (f"GGUFParameter({self.gguf_cls.name}, shape={list(self.gguf_shape)}, "
                f"bytes={self.data.numel()}, device={self.device})")

    # -- values -------------------------------------------------------------------
    def dequantize(self, dtype: Optional[torch.dtype] = None, device=None) -> torch.Tensor:
        data = self.data if device is None else self.data.to(device, non_blocking=True)
        return self.gguf_cls.dequantize(data, self.gguf_shape, dtype or self.computation_dtype)

    def dequantize_as_pytorch_parameter(self) -> torch.nn.Parameter:  # Forge calls this
        return torch.nn.Parameter(self.dequantize(), requires_grad=False)

    def copy_with_data(self, data: torch.Tensor) -> "GGUFParameter":  # Forge's name for it
        new = GGUFParameter(data, self.gguf_cls, self.gguf_shape, computation_dtype=self.computation_dtype)
        new.baked = self.baked
        return new

    # -- keeping the subclass through torch's machinery ------------------------
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to and args and isinstance(args[0], GGUFParameter):
            rest, kwargs = _strip_dtype(args[1:], kwargs)
            args = (args[0],) + rest
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if func in _KEEP and args and isinstance(args[0], GGUFParameter) and isinstance(out, torch.Tensor):
            src = args[0]
            if out is src and func in (torch.Tensor.requires_grad_, torch.Tensor.share_memory_):
                return out  # in place: the same parameter
            if out.dtype == torch.uint8:
                # a new parameter object even when torch returns the same tensor (a
                # move to the device it is on): callers keep it as a backup while the
                # original's data is replaced (Forge's LoRA loader does exactly that)
                return src.copy_with_data(out)
        return out

    def __deepcopy__(self, memo):
        if id(self) in memo:
            return memo[id(self)]
        new = self.copy_with_data(self.data.clone())
        memo[id(self)] = new
        return new

    def __reduce_ex__(self, proto):
        return (_rebuild, (self.data, self.gguf_cls.type_id, tuple(self.gguf_shape), self.computation_dtype,
                           self.baked))


def _rebuild(data, type_id, shape, computation_dtype=torch.float16, baked=False):
    p = GGUFParameter(data, type_id, shape, computation_dtype=computation_dtype)
    p.baked = baked
    return p


def is_gguf(t) -> bool:
    """Whether ``t`` holds quantized GGUF bytes (anything else is a plain tensor)."""
    return getattr(t, "gguf_cls", None) is not None and isinstance(t, torch.Tensor)


def dequantize_tensor(t, dtype: Optional[torch.dtype] = None):
    """Float values of ``t``: GGUF parameters are dequantized, anything else (a
    plain tensor, a LoRA's ``Parameter``, a bias, ``None``) passes through, cast
    to ``dtype`` when one is given."""
    if t is None:
        return None
    if is_gguf(t):
        fmt = t.gguf_cls
        shape = getattr(t, "gguf_shape", None) or getattr(t, "real_shape", None)
        data = t.data if isinstance(t, torch.Tensor) else t
        return fmt.dequantize(data, shape, dtype or getattr(t, "computation_dtype", None) or torch.float16)
    if dtype is not None and isinstance(t, torch.Tensor) and t.dtype != dtype:
        return t.to(dtype)
    return t
