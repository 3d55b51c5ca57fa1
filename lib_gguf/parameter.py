"""``GGUFParameter``: a ``torch.nn.Parameter`` holding a tensor's GGUF bytes.

The bytes stay as the file has them (uint8, shape ``(*logical[:-1], row_bytes)``);
the parameter carries ``gguf_cls`` (its :class:`~lib_gguf.formats.GGMLFormat`),
reports its logical ``.shape`` and ``.size()`` (``gguf_shape``; ``real_shape`` for
Forge), and dequantizes on demand.

Every torch operation on it either works on the weight's values or keeps its bytes:

* **the host's memory management keeps the bytes** (the result is again a
  ``GGUFParameter``, same format and logical shape): device moves (``.to(device)``,
  ``.cpu()``, ``.cuda()``, ``model.to(device)``), ``.pin_memory()``, ``.detach()``,
  ``.clone()``, ``.contiguous()``, ``copy.deepcopy``, pickling, ``state_dict``
  round trips, ``torch.nn.Parameter(w)`` rewrapping, ``torch.empty_like(w)`` followed by
  ``.copy_(w)``. A dtype given *beside a device* (``w.to(device, torch.float16)``,
  ``w.to(device=d, dtype=t)``, ``w.to(other_tensor)``) is the host's generic cast of
  every weight: the bytes move, the dtype does not apply to them (Forge then
  dequantizes through ``gguf_cls.dequantize_pytorch``);
* **queries and storage access answer for the bytes**: ``.data`` (the plain uint8
  tensor), ``.dtype`` (``torch.uint8``), ``.numel()`` / ``.nelement()`` /
  ``.element_size()`` / ``.nbytes`` (bytes, for memory accounting), ``.data_ptr()``,
  ``.untyped_storage()``, ``.stride()``, ``.device``, ``.is_floating_point()`` (False:
  ``Module.half()`` / ``Module.to(dtype)`` leave GGUF weights alone);
* **everything else computes on the dequantized values**: ``w.float()``, ``w.half()``,
  ``w.to(torch.float16)`` (a dtype alone), ``w * 2``, ``w.sum()``, ``w[0]``, ``w.T``,
  ``F.linear(x, w)``, ``torch.equal(w, v)``; the weight is dequantized to the dtype of the
  first floating-point tensor beside it (``x`` in ``F.linear(x, w)``), else float32;
* **what would corrupt the bytes raises** :class:`~lib_gguf.errors.GGUFOperationError`
  saying what to call instead: in-place changes (``w.mul_(2)``, ``w[0] = 1``,
  ``nn.init.*``), float values copied or assigned into it, integer views of it.
  ``requires_grad_(True)`` leaves a GGUF weight frozen (quantized bytes have no
  gradient) and logs a warning once, so ``module.requires_grad_(True)`` still makes
  the module's float parameters trainable.

:func:`is_gguf` and :func:`dequantize_tensor` accept any tensor: plain tensors and
plain ``Parameter``s (a LoRA's, a bias) pass straight through.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch

from .dequant import dequantize as _dequantize
from .errors import GGUFOperationError
from .formats import GGMLFormat, get_format

log = logging.getLogger(__name__)

# Tensor methods whose result is the same bytes elsewhere (or a copy of them):
# the result stays a GGUFParameter with the same format and logical shape.
_KEEP = {
    torch.Tensor.to,
    torch.empty_like,  # a host's copy to another device: empty_like, then copy_ into it
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
# by name, so that ``torch.clone(w)`` and ``w.clone()`` are one case
_KEEP_NAMES = {f.__name__ for f in _KEEP}

# Queries and storage access: run on the bytes, result returned as torch gives it.
_RAW_NAMES = {
    "data_ptr", "untyped_storage", "storage", "_typed_storage", "element_size", "nelement", "numel", "dim",
    "size", "ndimension", "is_contiguous", "is_pinned", "is_shared", "is_floating_point", "is_complex", "is_signed",
    "is_inference", "get_device", "storage_offset", "stride", "__len__", "__setstate__", "__getstate__",
    "_fix_weakref", "__dir__", "__sizeof__", "record_stream", "set_", "resize_", "detach_", "share_memory_",
    "new_empty", "new_zeros", "new_ones", "new_full", "new_empty_strided", "new_tensor", "register_hook",
    "retain_grad", "register_post_accumulate_grad_hook", "_is_view", "is_set_to", "__dlpack__",
    "__dlpack_device__", "is_same_size", "_update_names", "refine_names", "__reduce_ex__", "__reduce__",
}
# Property getters that are math on the values (the rest, ``.device``, ``.dtype``,
# ``.data``, ``.grad``, ``.requires_grad``, ``.nbytes``, ..., answer for the bytes).
_VALUE_PROPERTIES = {"T", "mT", "H", "mH", "real", "imag"}
_FLOAT_CASTS = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64}
_warned_grad = [False]


def _strip_dtype(args, kwargs):
    """``.to(dtype)`` must not convert the bytes: drop dtype arguments."""
    args = tuple(a for a in args if not isinstance(a, torch.dtype))
    kwargs = {k: v for k, v in kwargs.items() if k != "dtype"}
    return args, kwargs


def _func_name(func) -> tuple:
    """``(kind, name)``: ``("get"|"set", property)`` for property access, else ``("call", name)``."""
    name = getattr(func, "__name__", "")
    if name in ("__get__", "__set__", "__delete__"):
        owner = getattr(getattr(func, "__self__", None), "__name__", "")
        return ("get" if name == "__get__" else "set"), owner
    return "call", name


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """The plain uint8 tensor behind a GGUFParameter (no torch-function dispatch)."""
    with torch._C.DisableTorchFunctionSubclass():
        return t.data


def _walk(x, fn):
    if isinstance(x, GGUFParameter):
        return fn(x)
    if isinstance(x, (list, tuple)):
        out = [_walk(v, fn) for v in x]
        return type(x)(*out) if hasattr(x, "_fields") else type(x)(out)
    if isinstance(x, dict):
        return {k: _walk(v, fn) for k, v in x.items()}
    return x


def _first_float_dtype(x) -> Optional[torch.dtype]:
    if isinstance(x, GGUFParameter):
        return None
    if isinstance(x, torch.Tensor):
        return x.dtype if x.is_floating_point() else None
    if isinstance(x, (list, tuple)):
        for v in x:
            d = _first_float_dtype(v)
            if d is not None:
                return d
    if isinstance(x, dict):
        return _first_float_dtype(list(x.values()))
    return None


def _describe(w) -> str:
    return f"GGUF {w.gguf_cls.name} weight {list(w.gguf_shape)}"


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
        return raw_bytes(self).shape

    def __repr__(self) -> str:
        return (f"GGUFParameter({self.gguf_cls.name}, shape={list(self.gguf_shape)}, "
                f"bytes={raw_bytes(self).numel()}, device={raw_bytes(self).device})")

    # -- values -------------------------------------------------------------------
    def dequantize(self, dtype: Optional[torch.dtype] = None, device=None) -> torch.Tensor:
        data = raw_bytes(self)
        if device is not None:
            data = data.to(device, non_blocking=True)
        return _dequantize(data, self.gguf_cls, self.gguf_shape, dtype or self.computation_dtype)

    def dequantize_as_pytorch_parameter(self) -> torch.nn.Parameter:  # Forge calls this
        return torch.nn.Parameter(self.dequantize(), requires_grad=False)

    def copy_with_data(self, data: torch.Tensor) -> "GGUFParameter":  # Forge's name for it
        new = GGUFParameter(data, self.gguf_cls, self.gguf_shape, computation_dtype=self.computation_dtype)
        new.baked = self.baked
        return new

    def size(self, dim: Optional[int] = None):
        """The logical size, as ``.shape`` (``byte_shape`` is the bytes' shape)."""
        return self.gguf_shape if dim is None else self.gguf_shape[dim]

    # -- torch operations ----------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind, name = _func_name(func)
        src = args[0] if args and isinstance(args[0], GGUFParameter) else None
        if src is None and not args:  # torch.nn.init and other overridable functions pass keywords
            src = next((kwargs[k] for k in ("self", "input", "tensor") if isinstance(kwargs.get(k), GGUFParameter)),
                       None)
        if kind == "get":
            if name in _VALUE_PROPERTIES and src is not None:
                return getattr(src.dequantize(torch.float32), name)
            return _plain(func, args, kwargs)
        if kind == "set":
            if src is not None:
                return _set_attribute(src, name, args[1], func, args, kwargs)
            return _plain(func, args, kwargs)
        if src is not None:
            if name == "to":
                return _to(src, args[1:], kwargs)
            if name in _FLOAT_CASTS:
                return src.dequantize(_FLOAT_CASTS[name])
            if name == "type" and len(args) == 1 and not kwargs:
                return _plain(func, args, kwargs)  # the type's name, a query
            if name == "requires_grad_":
                want = args[1] if len(args) > 1 else kwargs.get("requires_grad", True)
                if want:
                    _warn_frozen(src)
                    return src
                return _plain(func, args, kwargs)
        if name == "copy_" and len(args) >= 2:
            return _copy(args[0], args[1], func, args, kwargs)
        if name in _RAW_NAMES:
            return _plain(func, args, kwargs)
        if src is not None and name in _KEEP_NAMES:
            if name == "empty_like":
                rest, kwargs = _strip_dtype(args[1:], kwargs)
                args = (args[0],) + rest
            out = _plain(func, args, kwargs)
            if out is src and name == "share_memory_":
                return out
            if isinstance(out, torch.Tensor) and out.dtype == torch.uint8:
                # a new parameter object even when torch returns the same tensor (a
                # move to the device it is on): callers keep it as a backup while the
                # original's data is replaced (Forge's LoRA loader does exactly that)
                return src.copy_with_data(out)
            return out
        if src is not None and _in_place(name):
            raise GGUFOperationError(
                f"{name}() would change the bytes of a {_describe(src)} in place; dequantize it "
                f"(w.dequantize(torch.float32)), change that copy, and quantize it back "
                f"(w.gguf_cls.quantize_pytorch(values, w), or lib_gguf.quantize(values, {src.gguf_cls.name!r}))")
        hit = []
        _walk(kwargs.get("out"), hit.append)
        if hit:
            raise GGUFOperationError(f"{name}(out=...) cannot write values into the bytes of a {_describe(hit[0])}; "
                                     f"write into a float tensor, then quantize it (lib_gguf.quantize)")
        # everything else is math on the values: dequantize first
        dtype = _first_float_dtype(args) or _first_float_dtype(kwargs) or torch.float32
        args = _walk(args, lambda w: w.dequantize(dtype))
        kwargs = _walk(kwargs, lambda w: w.dequantize(dtype))
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    def __deepcopy__(self, memo):
        if id(self) in memo:
            return memo[id(self)]
        new = self.copy_with_data(raw_bytes(self).clone())
        memo[id(self)] = new
        return new

    def __reduce_ex__(self, proto):
        return (_rebuild, (raw_bytes(self), self.gguf_cls.type_id, tuple(int(s) for s in self.gguf_shape),
                           self.computation_dtype, self.baked))


def _plain(func, args, kwargs):
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)


def _in_place(name: str) -> bool:
    if name.startswith("__"):
        return name in ("__setitem__", "__delitem__") or (name.startswith("__i") and name.endswith("__")
                                                           and name not in ("__index__", "__int__", "__invert__"))
    return name.endswith("_")


def _warn_frozen(w) -> None:
    if not _warned_grad[0]:
        _warned_grad[0] = True
        log.warning("requires_grad_(True): GGUF weights stay frozen (quantized bytes have no gradient); "
                    "the module's float parameters follow the call. Train a LoRA on top, or dequantize "
                    "(w.dequantize(torch.float32)) for a trainable float copy. First one: %s", _describe(w))


def _set_attribute(w, name, value, func, args, kwargs):
    if name == "data":
        if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8:
            what = getattr(value, "dtype", type(value).__name__)
            raise GGUFOperationError(
                f"assigning {what} data to a {_describe(w)} would leave values where its bytes belong; "
                f"assign quantized bytes (lib_gguf.quantize(values, {w.gguf_cls.name!r})), or call "
                f"w.gguf_cls.quantize_pytorch(values, w), or replace the parameter with a float one")
        if isinstance(value, GGUFParameter):
            args = (args[0], raw_bytes(value))
        return _plain(func, args, kwargs)
    if name == "requires_grad" and value:
        _warn_frozen(w)
        return None
    return _plain(func, args, kwargs)


def _to(w, args, kwargs):
    kw = dict(kwargs)
    copy = bool(kw.pop("copy", False))
    if args and isinstance(args[0], torch.Tensor):  # .to(other): other's device and dtype
        other = args[0]
        device, dtype = other.device, (torch.uint8 if isinstance(other, GGUFParameter) else other.dtype)
        non_blocking = bool(args[1]) if len(args) > 1 else bool(kw.get("non_blocking", False))
        memory_format = kw.get("memory_format")
    else:
        with torch._C.DisableTorchFunctionSubclass():
            device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kw)
    extra = {} if memory_format is None else {"memory_format": memory_format}
    raw = raw_bytes(w)
    if device is not None or dtype is None or dtype == torch.uint8:
        # a device move (a dtype beside a device is the host's cast of every weight:
        # the bytes move, unconverted) or a plain copy: the same GGUF weight
        out = raw.to(device=device, non_blocking=non_blocking, copy=copy, **extra) if device is not None \
            else raw.to(non_blocking=non_blocking, copy=copy, **extra)
        return w.copy_with_data(out)
    if dtype.is_floating_point:
        return w.dequantize(dtype)  # a dtype alone: the weight's values in that dtype
    raise GGUFOperationError(f".to({dtype}) of a {_describe(w)}: its bytes have no {dtype} view; "
                             f"w.dequantize(torch.float32) gives its values, w.data its uint8 bytes")


def _copy(dst, src, func, args, kwargs):
    non_blocking = bool(args[2]) if len(args) > 2 else bool(kwargs.get("non_blocking", False))
    if isinstance(dst, GGUFParameter):
        if isinstance(src, GGUFParameter):
            if src.gguf_cls is not dst.gguf_cls or tuple(src.gguf_shape) != tuple(dst.gguf_shape):
                raise GGUFOperationError(
                    f"copy_: cannot copy a {_describe(src)} into a {_describe(dst)}; formats and shapes must "
                    f"match (replace the parameter instead)")
            data = raw_bytes(src)
        elif isinstance(src, torch.Tensor) and src.dtype == torch.uint8 and tuple(src.shape) == tuple(dst.byte_shape):
            data = src  # raw bytes of the same layout
        else:
            what = getattr(src, "dtype", type(src).__name__)
            raise GGUFOperationError(
                f"copy_: cannot copy {what} values into a {_describe(dst)}; quantize them "
                f"(dst.gguf_cls.quantize_pytorch(values, dst), or lib_gguf.quantize(values, {dst.gguf_cls.name!r}))")
        with torch._C.DisableTorchFunctionSubclass():
            dst.copy_(data, non_blocking=non_blocking)
        return dst
    if isinstance(src, GGUFParameter):
        if isinstance(dst, torch.Tensor) and dst.dtype == torch.uint8 and tuple(dst.shape) == tuple(src.byte_shape):
            data = raw_bytes(src)  # a byte buffer of the same layout (a host's staging copy)
        else:
            data = src.dequantize(dst.dtype if dst.is_floating_point() else torch.float32)
        with torch._C.DisableTorchFunctionSubclass():
            return dst.copy_(data, non_blocking=non_blocking)
    return _plain(func, args, kwargs)


def _rebuild(data, type_id, shape, computation_dtype=torch.float16, baked=False):
    p = GGUFParameter(data, type_id, shape, computation_dtype=computation_dtype)
    p.baked = bool(baked)
    return p


# ``torch.load`` (whose default is ``weights_only=True`` since torch 2.6) may rebuild a
# saved GGUFParameter once this module is imported: ``_rebuild`` only takes a plain
# uint8 tensor, a type id, a shape, a dtype and a flag.
if hasattr(torch.serialization, "add_safe_globals"):
    torch.serialization.add_safe_globals([_rebuild])


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
        return _dequantize(data, fmt, shape, dtype or getattr(t, "computation_dtype", None) or torch.float16)
    if dtype is not None and isinstance(t, torch.Tensor) and t.dtype != dtype:
        return t.to(dtype)
    return t
