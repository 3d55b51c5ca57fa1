"""The format table: every GGML tensor type, keyed by its integer type id.

This is the one home of what we know about each type: its name, block size,
bytes per block, bits per weight, the torch dtype of a plain element type, and
(from the family modules in :mod:`lib_gguf.families`, which :func:`register`
here) its block layout and which kernels it has. This module imports no kernel
module: the families import it.

The table is keyed by integer id, never by ``gguf.GGMLQuantizationType``, so it
works the same whether ``import gguf`` is Forge's bundled old copy or the newest
PyPI release, and so that a file newer than both still gives a clear error.

Each :class:`GGMLFormat` is also the ``gguf_cls`` object a :class:`GGUFParameter`
carries, and offers what Forge calls on its own format classes (``bake``,
``dequantize_pytorch``, ``quantize_pytorch``), so Forge's code paths can use it
unchanged.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Union

import torch

from .errors import GGUFFormatError, UnsupportedFormatError

QK_K = 256


class GGMLType(enum.IntEnum):
    """GGML tensor type ids, as they are stored in GGUF files."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    Q4_0_4_4 = 31
    Q4_0_4_8 = 32
    Q4_0_8_8 = 33
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41


# (type, block size in weights, bytes per block, family)
# family: "float" (plain element types), "int", "legacy" (32-weight blocks),
# "k" (256-weight super-blocks), "iq" (lattice / non-linear codebooks),
# "ternary", "fp4" (micro-scaled 4-bit floats), "repacked" (CPU-only layouts
# that ggml has since removed).
_TABLE = [
    (GGMLType.F32, 1, 4, "float"),
    (GGMLType.F16, 1, 2, "float"),
    (GGMLType.BF16, 1, 2, "float"),
    (GGMLType.F64, 1, 8, "float"),
    (GGMLType.I8, 1, 1, "int"),
    (GGMLType.I16, 1, 2, "int"),
    (GGMLType.I32, 1, 4, "int"),
    (GGMLType.I64, 1, 8, "int"),
    (GGMLType.Q4_0, 32, 2 + 16, "legacy"),
    (GGMLType.Q4_1, 32, 2 + 2 + 16, "legacy"),
    (GGMLType.Q5_0, 32, 2 + 4 + 16, "legacy"),
    (GGMLType.Q5_1, 32, 2 + 2 + 4 + 16, "legacy"),
    (GGMLType.Q8_0, 32, 2 + 32, "legacy"),
    (GGMLType.Q8_1, 32, 4 + 32, "legacy"),
    (GGMLType.Q2_K, QK_K, 2 + 2 + QK_K // 16 + QK_K // 4, "k"),
    (GGMLType.Q3_K, QK_K, 2 + QK_K // 4 + QK_K // 8 + 12, "k"),
    (GGMLType.Q4_K, QK_K, 2 + 2 + QK_K // 2 + 12, "k"),
    (GGMLType.Q5_K, QK_K, 2 + 2 + QK_K // 2 + QK_K // 8 + 12, "k"),
    (GGMLType.Q6_K, QK_K, 2 + QK_K // 16 + 3 * QK_K // 4, "k"),
    (GGMLType.Q8_K, QK_K, 4 + QK_K + QK_K // 8, "k"),
    (GGMLType.IQ2_XXS, QK_K, 2 + QK_K // 4, "iq"),
    (GGMLType.IQ2_XS, QK_K, 2 + QK_K // 4 + QK_K // 32, "iq"),
    (GGMLType.IQ2_S, QK_K, 2 + QK_K // 4 + QK_K // 16, "iq"),
    (GGMLType.IQ3_XXS, QK_K, 2 + QK_K // 4 + QK_K // 8, "iq"),
    (GGMLType.IQ3_S, QK_K, 2 + QK_K // 4 + QK_K // 8 + QK_K // 32 + 4, "iq"),
    (GGMLType.IQ1_S, QK_K, 2 + QK_K // 8 + QK_K // 16, "iq"),
    (GGMLType.IQ1_M, QK_K, QK_K // 8 + QK_K // 16 + QK_K // 32, "iq"),
    (GGMLType.IQ4_NL, 32, 2 + 16, "iq"),
    (GGMLType.IQ4_XS, QK_K, 2 + 2 + QK_K // 2 + QK_K // 64, "iq"),
    (GGMLType.TQ1_0, QK_K, 2 + 4 * 13, "ternary"),
    (GGMLType.TQ2_0, QK_K, 2 + 64, "ternary"),
    (GGMLType.MXFP4, 32, 1 + 16, "fp4"),
    (GGMLType.NVFP4, 64, 4 + 32, "fp4"),
    (GGMLType.Q1_0, 128, 2 + 16, "legacy"),
    (GGMLType.Q4_0_4_4, 32, 18, "repacked"),
    (GGMLType.Q4_0_4_8, 32, 18, "repacked"),
    (GGMLType.Q4_0_8_8, 32, 18, "repacked"),
]

# The plain element types: the torch dtype each one stores as it is.
_TORCH_DTYPES: Dict[int, torch.dtype] = {
    int(GGMLType.F32): torch.float32,
    int(GGMLType.F16): torch.float16,
    int(GGMLType.BF16): torch.bfloat16,
    int(GGMLType.F64): torch.float64,
    int(GGMLType.I8): torch.int8,
    int(GGMLType.I16): torch.int16,
    int(GGMLType.I32): torch.int32,
    int(GGMLType.I64): torch.int64,
}

# The byte layout of one block: its named fields, in order.

@dataclass(frozen=True)
class Field:
    """One field of a block: ``size`` bytes at byte ``offset``; ``kind`` is "f16" or
    "f32" for a little-endian float scale, "bytes" for anything else."""

    name: str
    offset: int
    size: int
    kind: str = "bytes"

    @property
    def end(self) -> int:
        return self.offset + self.size

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.end)


class Layout:
    """A block's fields in storage order, each named once: ``Layout(d="f16", qs=16)``
    (a float16 ``d`` at byte 0, 16 bytes ``qs`` at byte 2). Fields are attributes
    (``layout.qs.offset``); :meth:`float_fields` lists the float scales."""

    _SIZES = {"f16": 2, "f32": 4}

    def __init__(self, **fields: Union[int, str]):
        self.fields: Dict[str, Field] = {}
        off = 0
        for name, spec in fields.items():
            kind = spec if isinstance(spec, str) else "bytes"
            size = self._SIZES[spec] if isinstance(spec, str) else int(spec)
            self.fields[name] = Field(name, off, size, kind)
            off += size
        self.size = off

    def __getattr__(self, name: str) -> Field:
        try:
            return self.__dict__["fields"][name]
        except KeyError:
            raise AttributeError(f"the block has no field {name!r}") from None

    def split(self, blocks: torch.Tensor, *names: str) -> tuple:
        """The fields ``names`` of uint8 blocks (n, size), as views (n, field size)."""
        return tuple(blocks[:, self.fields[name].slice] for name in names)

    def pack(self, **parts: torch.Tensor) -> torch.Tensor:
        """Blocks from their fields: every field by name, each (n, field size) uint8,
        laid out in storage order as (n, size) uint8."""
        missing = set(self.fields) ^ set(parts)
        if missing:
            raise ValueError(f"pack: fields {sorted(missing)} missing or unknown in {self}")
        for f in self.fields.values():
            if parts[f.name].shape[-1] != f.size or parts[f.name].dtype != torch.uint8:
                raise ValueError(f"pack: field {f.name} is {f.size} uint8 bytes, got {parts[f.name].dtype} "
                                 f"{tuple(parts[f.name].shape)}")
        return torch.cat([parts[name] for name in self.fields], dim=-1)

    def float_fields(self) -> tuple:
        """The float16 / float32 scale fields."""
        return tuple(f for f in self.fields.values() if f.kind in self._SIZES)

    def __repr__(self) -> str:
        return "Layout(" + ", ".join(f"{f.name}@{f.offset}:{f.size}" for f in self.fields.values()) + ")"


# -- the registry: what each family module says it has -------------------------------
#
# A dequantizer takes a uint8 tensor of blocks, shape (n_blocks, type_size), and a
# torch dtype, and returns (n_blocks, block_size) values of that dtype on the same
# device. A quantizer takes float32 values, shape (n_blocks, block_size), and
# returns uint8 blocks, shape (n_blocks, type_size). These torch kernels are the
# reference; the compiled kernels (numba for CPU tensors, Triton for CUDA tensors)
# give the same bytes and values, and a family says here which ones it has.
Dequantizer = Callable[[torch.Tensor, torch.dtype], torch.Tensor]
Quantizer = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Kernels:
    layout: Optional[Layout] = None
    dequantize: Optional[Dequantizer] = None
    quantize: Optional[Quantizer] = None
    numba_dequantize: bool = False
    numba_quantize: bool = False
    triton: bool = False
    fallback: tuple = ()  # formats to write instead when a row is not a whole number of blocks, in order


_NONE = Kernels()
_KERNELS: Dict[int, Kernels] = {}


def register(type_id: int, *, layout: Optional[Layout] = None, dequantize: Optional[Dequantizer] = None,
             quantize: Optional[Quantizer] = None, numba: Sequence[str] = (), triton: bool = False,
             fallback: Sequence[str] = ()) -> None:
    """Record what a family module has for ``type_id``: the block ``layout``, the torch
    kernels, its compiled kernels (``numba``: "dequantize" and/or "quantize";
    ``triton``: a Triton dequantizer), and the formats the quantization rules write
    instead where a row is not a whole number of its blocks (``fallback``, by name,
    in order of preference)."""
    fmt = get_format(type_id)
    if layout is not None and layout.size != fmt.type_size:
        raise GGUFFormatError(f"{fmt.name}: the layout's fields add up to {layout.size} bytes, "
                              f"a block is {fmt.type_size}")
    unknown = set(numba) - {"dequantize", "quantize"}
    if unknown:
        raise ValueError(f"{fmt.name}: numba kernels are 'dequantize' or 'quantize', not {sorted(unknown)}")
    _KERNELS[fmt.type_id] = Kernels(layout, dequantize, quantize, "dequantize" in numba, "quantize" in numba,
                                    triton, tuple(fallback))


# Formats whose ggml quantizer needs an importance matrix: we say so instead of
# producing something ggml would not.
NEEDS_IMATRIX = frozenset({GGMLType.IQ2_XXS, GGMLType.IQ2_XS, GGMLType.IQ1_S})

# Callables told the format name after each ``quantize_pytorch`` write-back (the
# host's LoRA merge): progress for whoever drives a whole model's merge.
_REQUANTIZE_OBSERVERS: list = []


def add_requantize_observer(fn: Callable[[str], None]) -> None:
    _REQUANTIZE_OBSERVERS.append(fn)


def remove_requantize_observer(fn: Callable[[str], None]) -> None:
    if fn in _REQUANTIZE_OBSERVERS:
        _REQUANTIZE_OBSERVERS.remove(fn)


# The public entry points, lib_gguf.dequant.dequantize and lib_gguf.quant.quantize
# (the torch kernels or a compiled one), behind a format's own ``dequantize`` /
# ``quantize`` and the methods Forge calls. Those modules import this one and hand
# them over as they load; ``lib_gguf/__init__`` imports both.
_ENTRY: Dict[str, Callable] = {}


def set_entry_point(name: str, fn: Callable) -> None:
    _ENTRY[name] = fn


@dataclass(frozen=True, eq=False)
class GGMLFormat:
    """One GGML tensor type: what it is, and how to turn its bytes into weights.

    Instances are singletons (one per type id, in :data:`FORMATS`) and are what a
    :class:`~lib_gguf.parameter.GGUFParameter` carries as ``gguf_cls``.
    """

    type_id: int
    name: str
    block_size: int
    type_size: int
    family: str

    # -- description -----------------------------------------------------
    @property
    def torch_dtype(self) -> Optional[torch.dtype]:
        """The torch element type of a plain (float or int) type; None for block formats."""
        return _TORCH_DTYPES.get(self.type_id)

    @property
    def __name__(self) -> str:  # Forge's loader prints ``gguf_cls.__name__`` (its formats are classes)
        return self.name

    @property
    def bits_per_weight(self) -> float:
        return self.type_size * 8.0 / self.block_size

    @property
    def is_float(self) -> bool:
        """Plain element types (F32, F16, BF16, F64): no blocks, no scales."""
        return self.family == "float"

    @property
    def is_quantized(self) -> bool:
        return self.family not in ("float", "int")

    @property
    def kernels(self) -> Kernels:
        """What the family modules registered for this type (nothing, for a type we only know by name)."""
        return _KERNELS.get(self.type_id, _NONE)

    @property
    def layout(self) -> Optional[Layout]:
        """The block's named fields (None for plain element types and unsupported types)."""
        return self.kernels.layout

    @property
    def can_dequantize(self) -> bool:
        return self.kernels.dequantize is not None

    @property
    def can_quantize(self) -> bool:
        return self.kernels.quantize is not None

    @property
    def needs_imatrix(self) -> bool:
        return self.type_id in NEEDS_IMATRIX

    def fits(self, n_per_row: int) -> bool:
        """Whether a row of ``n_per_row`` weights is a whole number of blocks."""
        return n_per_row % self.block_size == 0

    def row_bytes(self, n_per_row: int) -> int:
        if n_per_row % self.block_size:
            raise GGUFFormatError(
                f"{self.name} needs rows that are a multiple of {self.block_size} weights, got {n_per_row}"
            )
        return n_per_row // self.block_size * self.type_size

    def byte_shape(self, shape: Sequence[int]) -> tuple:
        """Shape of the uint8 tensor holding a tensor of logical ``shape``."""
        shape = tuple(int(s) for s in shape)
        if not shape:
            shape = (1,)
        return (*shape[:-1], self.row_bytes(shape[-1]))

    def logical_shape(self, byte_shape: Sequence[int]) -> tuple:
        byte_shape = tuple(int(s) for s in byte_shape)
        if byte_shape[-1] % self.type_size:
            raise GGUFFormatError(
                f"{self.name} rows are a multiple of {self.type_size} bytes, got {byte_shape[-1]}"
            )
        return (*byte_shape[:-1], byte_shape[-1] // self.type_size * self.block_size)

    def __repr__(self) -> str:
        return f"<GGML {self.name} (id {self.type_id}): {self.block_size} weights in {self.type_size} bytes>"

    def __reduce__(self):  # pickles (torch.save) as a reference to the table entry
        return (get_format, (self.type_id,))

    def __deepcopy__(self, memo):
        return self

    def __copy__(self):
        return self

    # -- kernels -----------------------------------------------------------
    def dequantize(self, data: torch.Tensor, shape: Sequence[int], dtype: torch.dtype = torch.float16) -> torch.Tensor:
        return _ENTRY["dequantize"](data, self.type_id, shape, dtype)

    def quantize(self, tensor: torch.Tensor) -> torch.Tensor:
        return _ENTRY["quantize"](tensor, self.type_id)

    # -- what Forge calls on its own format classes --------------------------
    # Forge's ``bake_gguf_model`` calls ``gguf_cls.bake(p)``; its Linear calls
    # ``gguf_cls.dequantize_pytorch(p)``; its LoRA loader calls
    # ``gguf_cls.quantize_pytorch(weight, p)`` to write a merged weight back.
    # We keep the GGUF bytes as they are (no private repacking), so a baked
    # parameter still holds exactly the file's bytes.
    def bake(self, parameter) -> None:
        if getattr(parameter, "baked", False):
            return
        try:
            parameter.baked = True
        except AttributeError:
            pass

    def dequantize_pytorch(self, parameter) -> torch.Tensor:
        dtype = getattr(parameter, "computation_dtype", None) or torch.float16
        shape = getattr(parameter, "gguf_shape", None) or getattr(parameter, "real_shape", None)
        data = parameter.data if isinstance(parameter, torch.nn.Parameter) else parameter
        if shape is None:
            shape = self.logical_shape(data.shape)
        return self.dequantize(data, shape, dtype)

    def quantize_pytorch(self, data: torch.Tensor, parent):
        """Quantize ``data`` (the merged float weight) into ``parent``'s format and
        store the bytes in ``parent.data``; returns ``parent``.

        For a format we cannot quantize, ``parent.requantize_to`` (a format name, set
        by whoever chose to merge) names the format to write instead; ``parent``
        then carries that format."""
        target = self
        if not self.can_quantize or not self.fits(int(data.shape[-1])):
            want = getattr(parent, "requantize_to", None)
            if want is None:
                why = (f"no quantizer for {self.name}" if not self.can_quantize else
                       f"rows of {int(data.shape[-1])} weights are not whole {self.name} blocks")
                raise UnsupportedFormatError(
                    f"{why}: merge into a format we can quantize, or apply the LoRA at run time"
                )
            target = get_format(want)
            if not target.can_quantize or not target.fits(int(data.shape[-1])):
                raise UnsupportedFormatError(
                    f"cannot requantize {self.name} into {target.name} (rows of {int(data.shape[-1])} weights)")
        q = target.quantize(data.to(torch.float32))
        parent.data = q.to(parent.data.device)
        if target is not self:
            parent.gguf_cls = target
        for fn in list(_REQUANTIZE_OBSERVERS):
            fn(target.name)
        return parent


FORMATS: Dict[int, GGMLFormat] = {
    int(t): GGMLFormat(int(t), t.name, bs, ts, fam) for t, bs, ts, fam in _TABLE
}
_BY_NAME: Dict[str, GGMLFormat] = {f.name: f for f in FORMATS.values()}
_BY_DTYPE: Dict[torch.dtype, GGMLFormat] = {d: FORMATS[t] for t, d in _TORCH_DTYPES.items()}


def format_for_dtype(dtype: torch.dtype, tensor: Optional[str] = None) -> GGMLFormat:
    """The plain GGUF type that stores torch ``dtype`` as it is (F32 for float32, I8 for int8, ...).

    A dtype without a GGUF element type (bool, uint8, complex, float8) raises :class:`GGUFFormatError`."""
    f = _BY_DTYPE.get(dtype)
    if f is None:
        raise GGUFFormatError(
            f"no GGUF element type for {dtype}; known: {', '.join(str(d) for d in _BY_DTYPE)}", tensor=tensor)
    return f


def get_format(qtype: Union[int, str, "enum.Enum", GGMLFormat], tensor: Optional[str] = None, path=None) -> GGMLFormat:
    """The table entry for ``qtype``: an int id, a name (``"Q4_K"``, any case), a
    ``gguf.GGMLQuantizationType`` (from either gguf package) or a format.

    Unknown ids raise :class:`GGUFFormatError` naming the tensor and the id.
    """
    if isinstance(qtype, GGMLFormat):
        return qtype
    if isinstance(qtype, str):
        f = _BY_NAME.get(qtype.upper())
        if f is None:
            raise GGUFFormatError(
                f"unknown GGML type name {qtype!r}; known: {', '.join(sorted(_BY_NAME))}", tensor=tensor, path=path
            )
        return f
    try:
        tid = int(qtype.value) if isinstance(qtype, enum.Enum) else int(qtype)
    except (TypeError, ValueError):
        raise GGUFFormatError(f"not a GGML type: {qtype!r}", tensor=tensor, path=path) from None
    f = FORMATS.get(tid)
    if f is None:
        raise GGUFFormatError(
            f"unknown GGML type id {tid} (newer than this extension's format table; "
            f"known ids: {', '.join(str(i) for i in sorted(FORMATS))})",
            tensor=tensor,
            path=path,
        )
    return f


def dequantizer_for(qtype, tensor: Optional[str] = None) -> Dequantizer:
    """The torch dequantizer of ``qtype``."""
    fmt = get_format(qtype, tensor)
    fn = fmt.kernels.dequantize
    if fn is None:
        raise UnsupportedFormatError(f"no dequantizer for {fmt.name} (type id {fmt.type_id})", tensor=tensor)
    return fn


def quantizer_for(qtype, tensor: Optional[str] = None) -> Quantizer:
    """The torch quantizer of ``qtype``."""
    fmt = get_format(qtype, tensor)
    fn = fmt.kernels.quantize
    if fn is None:
        if fmt.needs_imatrix:
            raise UnsupportedFormatError(
                f"{fmt.name} needs an importance matrix to quantize (as in ggml); "
                "pick another format such as IQ2_S, IQ3_XXS or Q2_K",
                tensor=tensor,
            )
        raise UnsupportedFormatError(f"no quantizer for {fmt.name} (type id {fmt.type_id})", tensor=tensor)
    return fn
