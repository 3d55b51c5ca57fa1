"""The format table: every GGML tensor type, keyed by its integer type id.

This is the one home of what we know about each type: its name, block size,
bytes per block, bits per weight, and whether we can dequantize and quantize it.
The kernels live in ``dequant*.py`` and ``quant*.py`` and register themselves
here with :func:`register_dequantizer` / :func:`register_quantizer`.

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
import threading
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

# A dequantizer takes a uint8 tensor of blocks, shape (n_blocks, type_size), and a
# torch dtype, and returns (n_blocks, block_size) values of that dtype on the same
# device. A quantizer takes float32 values, shape (n_blocks, block_size), and
# returns uint8 blocks, shape (n_blocks, type_size).
Dequantizer = Callable[[torch.Tensor, torch.dtype], torch.Tensor]
Quantizer = Callable[[torch.Tensor], torch.Tensor]

_DEQUANTIZERS: Dict[int, Dequantizer] = {}
_QUANTIZERS: Dict[int, Quantizer] = {}
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


_kernels_loaded = False
_kernels_lock = threading.Lock()


def register_dequantizer(*types: int):
    """Decorator: register ``fn(blocks_uint8, dtype) -> values`` for these type ids."""

    def deco(fn: Dequantizer) -> Dequantizer:
        for t in types:
            _DEQUANTIZERS[int(t)] = fn
        return fn

    return deco


def register_quantizer(*types: int):
    """Decorator: register ``fn(values_f32) -> blocks_uint8`` for these type ids."""

    def deco(fn: Quantizer) -> Quantizer:
        for t in types:
            _QUANTIZERS[int(t)] = fn
        return fn

    return deco


def _load_kernels() -> None:
    global _kernels_loaded
    if _kernels_loaded:
        return
    with _kernels_lock:
        if _kernels_loaded:
            return
        import importlib

        for mod in ("dequant", "dequant_iq", "dequant_q1", "quant", "quant_iq", "quant_lattice"):
            try:
                importlib.import_module(f"{__package__}.{mod}")
            except ModuleNotFoundError as e:  # a kernel module not written yet
                if e.name != f"{__package__}.{mod}":
                    raise
        _kernels_loaded = True


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
    def __name__(self) -> str:  # Forge's loader prints ``gguf_cls.__name__`` (its formats are classes)
        return self.name

    @property
    def qtype(self) -> int:
        return self.type_id

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
    def can_dequantize(self) -> bool:
        _load_kernels()
        return self.type_id in _DEQUANTIZERS

    @property
    def can_quantize(self) -> bool:
        _load_kernels()
        return self.type_id in _QUANTIZERS

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
        from .dequant import dequantize

        return dequantize(data, self.type_id, shape, dtype)

    def quantize(self, tensor: torch.Tensor) -> torch.Tensor:
        from .quant import quantize

        return quantize(tensor, self.type_id)

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
    fmt = get_format(qtype, tensor)
    _load_kernels()
    fn = _DEQUANTIZERS.get(fmt.type_id)
    if fn is None:
        raise UnsupportedFormatError(f"no dequantizer for {fmt.name} (type id {fmt.type_id})", tensor=tensor)
    return fn


def quantizer_for(qtype, tensor: Optional[str] = None) -> Quantizer:
    fmt = get_format(qtype, tensor)
    _load_kernels()
    fn = _QUANTIZERS.get(fmt.type_id)
    if fn is None:
        if fmt.needs_imatrix:
            raise UnsupportedFormatError(
                f"{fmt.name} needs an importance matrix to quantize (as in ggml); "
                "pick another format such as IQ2_S, IQ3_XXS or Q2_K",
                tensor=tensor,
            )
        raise UnsupportedFormatError(f"no quantizer for {fmt.name} (type id {fmt.type_id})", tensor=tensor)
    return fn
