"""Reading GGUF files: our own parser, memory-mapped and zero-copy.

It needs no ``import gguf`` (so Forge's bundled old copy, PyPI's newest, or none
at all make no difference), accepts tensor names of any length, and checks every
count, length, offset and size against the bytes that are really there before it
allocates anything: bad files give a :class:`GGUFFormatError` naming the file and
the field or tensor, never a crash, a hang or a huge allocation.

Other tools' conventions (:mod:`lib_gguf.compat`) are honoured unless ``compat=False``:
tensor shapes come from ``comfy.gguf.orig_shape.*`` (ComfyUI-GGUF) or, where
stable-diffusion.cpp or llama.cpp stored a tensor in another shape, from what the
architecture says; a ``model.diffusion_model.`` prefix on every name is stripped; the
architecture is detected from the names when the file does not say it
(:attr:`GGUFFile.architecture`); NVFP4 weights' companion scales are applied in
:meth:`GGUFFile.state_dict`; BF16 1-D tensors come out as float32. Each such change
is listed in :attr:`GGUFFile.notes`. With ``compat=False`` the file is read as it is.
"""
from __future__ import annotations

import logging
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from .compat import ORIG_SHAPE_PREFIX, nvfp4_companions, orig_shape, restore_shape, strip_prefix
from .errors import GGUFFormatError
from .formats import GGMLFormat, get_format
from .parameter import GGUFParameter
from .recipes import model_architecture

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 8

# GGUF metadata value types: id -> (name, struct format or None)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
T_STRING, T_ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    format: GGMLFormat
    shape: Tuple[int, ...]  # logical, torch order (rows last-dim-fastest: shape[-1] is GGUF's ne[0])
    offset: int  # absolute offset in the file
    nbytes: int
    stored_shape: Optional[Tuple[int, ...]] = None  # the file's dims (torch order) when they differ from shape
    file_name: Optional[str] = None  # the name in the file when it differs from name (a stripped prefix)
    note: Optional[str] = None  # why shape is not the file's dims

    @property
    def storage_shape(self) -> Tuple[int, ...]:
        """The shape the file stores (torch order)."""
        return self.stored_shape if self.stored_shape is not None else self.shape

    @property
    def n_weights(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


class _Cursor:
    def __init__(self, buf, path):
        self.buf = buf
        self.pos = 0
        self.end = len(buf)
        self.path = path

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.end:
            raise GGUFFormatError(f"truncated: {what} needs {n} bytes at offset {self.pos}, "
                                  f"the file has {self.end - self.pos} left", path=self.path)

    def unpack(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        self.need(size, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return v

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what + " length")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFFormatError(f"{what} is not valid UTF-8", path=self.path) from None

    def value(self, vtype: int, what: str, depth: int = 0):
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype], what)
        if vtype == T_STRING:
            return self.string(what)
        if vtype == T_ARRAY:
            if depth > 4:
                raise GGUFFormatError(f"{what}: arrays nested too deeply", path=self.path)
            itype = self.unpack("<I", what + " item type")
            count = self.unpack("<Q", what + " count")
            if itype in _SCALARS:
                size = struct.calcsize(_SCALARS[itype])
                self.need(count * size, f"{what} ({count} items)")
                fmt = "<" + str(count) + _SCALARS[itype][1]
                out = list(struct.unpack_from(fmt, self.buf, self.pos)) if count else []
                self.pos += count * size
                return out
            if itype not in (T_STRING, T_ARRAY):
                raise GGUFFormatError(f"{what}: unknown array item type {itype}", path=self.path)
            # each item takes at least 8 bytes (a length or a type + count)
            self.need(count * 8, f"{what} ({count} items)")
            return [self.value(itype, what, depth + 1) for _ in range(count)]
        raise GGUFFormatError(f"{what}: unknown metadata value type {vtype}", path=self.path)


class GGUFFile:
    """A parsed GGUF file: ``version``, ``metadata``, ``tensors`` (list of
    :class:`TensorInfo`), and zero-copy tensor views with :meth:`tensor`."""

    def __init__(self, path: Union[str, os.PathLike], compat: bool = True):
        self.path = Path(path)
        self.compat = bool(compat)
        self.notes: List[str] = []  # what was read otherwise than the file says, and why
        self.architecture: Optional[str] = None  # our architecture name (compat), or the file's value
        self.companions: Dict[str, Dict[str, str]] = {}  # NVFP4 weight -> {"scale": name, "input_scale": name}
        try:
            fh = open(self.path, "rb")
        except FileNotFoundError:
            raise GGUFFormatError("file not found", path=self.path) from None
        except OSError as e:
            raise GGUFFormatError(f"cannot open: {e}", path=self.path) from None
        with fh:
            size = os.fstat(fh.fileno()).st_size
            if size < 24:
                raise GGUFFormatError(f"truncated: {size} bytes is too short for a GGUF header", path=self.path)
            # ACCESS_COPY: a private copy-on-write mapping, writable for torch.frombuffer,
            # never written back to the file, and copies nothing until written.
            self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        self._parse()

    def _parse(self) -> None:
        c = _Cursor(memoryview(self._mm), self.path)
        magic = bytes(c.buf[:4])
        if magic != GGUF_MAGIC:
            raise GGUFFormatError(f"not a GGUF file (magic {magic!r}, expected b'GGUF')", path=self.path)
        c.pos = 4
        self.version = c.unpack("<I", "version")
        if self.version not in (2, 3):
            raise GGUFFormatError(f"unsupported GGUF version {self.version} (expected 2 or 3)", path=self.path)
        n_tensors = c.unpack("<Q", "tensor count")
        n_kv = c.unpack("<Q", "metadata count")
        # every key-value takes at least 12 bytes, every tensor info at least 24
        need = 24 + n_kv * 12 + n_tensors * 24
        if need > c.end:
            if n_tensors > 1 << 24 or n_kv > 1 << 24:
                raise GGUFFormatError(f"corrupt header: it lists {n_tensors} tensors and {n_kv} metadata entries, "
                                      f"impossible in a {c.end}-byte file (not a GGUF file, or damaged)",
                                      path=self.path)
            raise GGUFFormatError(f"truncated: the header lists {n_tensors} tensors and {n_kv} metadata entries, "
                                  f"which need at least {need} bytes, the file has {c.end} (an incomplete "
                                  f"download or copy?)", path=self.path)
        meta: Dict[str, Any] = {}
        for i in range(n_kv):
            key = c.string(f"metadata key #{i}")
            vtype = c.unpack("<I", f"metadata {key!r} type")
            meta[key] = c.value(vtype, f"metadata {key!r}")
        self.metadata = meta
        align = meta.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align & (align - 1) or align > 1 << 20:
            raise GGUFFormatError(f"general.alignment must be a power of two, got {align!r}", path=self.path)
        self.alignment = align
        raw = []
        seen = set()
        for i in range(n_tensors):
            name = c.string(f"tensor #{i} name")
            if name in seen:
                raise GGUFFormatError("duplicate tensor name", path=self.path, tensor=name)
            seen.add(name)
            n_dims = c.unpack("<I", f"tensor {name!r} n_dims")
            if n_dims > MAX_DIMS:
                raise GGUFFormatError(f"{n_dims} dimensions (at most {MAX_DIMS})", path=self.path, tensor=name)
            dims = [c.unpack("<Q", f"tensor {name!r} dims") for _ in range(n_dims)]
            type_id = c.unpack("<I", f"tensor {name!r} type")
            offset = c.unpack("<Q", f"tensor {name!r} offset")
            raw.append((name, dims, type_id, offset))
        data_start = (c.pos + align - 1) // align * align
        self.data_offset = data_start
        infos: List[TensorInfo] = []
        for name, dims, type_id, offset in raw:
            fmt = get_format(type_id, tensor=name, path=self.path)
            n = 1
            for d in dims:
                if d == 0 or d > c.end * 8:
                    raise GGUFFormatError(f"bad dimension {d} in {dims}", path=self.path, tensor=name)
                n *= d
            if n > c.end * 8:
                raise GGUFFormatError(f"dimensions {dims} hold more weights than the file could", path=self.path,
                                      tensor=name)
            row = dims[0] if dims else 1
            if row % fmt.block_size:
                raise GGUFFormatError(f"rows of {row} are not a whole number of {fmt.name}'s "
                                      f"{fmt.block_size}-weight blocks", path=self.path, tensor=name)
            nbytes = n // fmt.block_size * fmt.type_size
            if offset % align:
                raise GGUFFormatError(f"data offset {offset} is not aligned to {align}", path=self.path, tensor=name)
            start = data_start + offset
            if start + nbytes > c.end:
                raise GGUFFormatError(f"truncated: its data runs past the end of the file ({start} + {nbytes} > "
                                      f"{c.end}; an incomplete download or copy?)", path=self.path, tensor=name)
            shape = tuple(reversed(dims)) if dims else (1,)
            infos.append(TensorInfo(name, fmt, shape, start, nbytes))
        arch = meta.get("general.architecture")
        self.architecture = arch if isinstance(arch, str) else None
        if self.compat:
            infos = self._apply_compat(infos)
        self.tensors = infos
        self._by_name = {t.name: t for t in infos}

    def _apply_compat(self, infos: List[TensorInfo]) -> List[TensorInfo]:
        """Other tools' conventions (see :mod:`lib_gguf.compat`): names, shapes, architecture."""
        prefix = strip_prefix([t.name for t in infos])
        if prefix:
            self.notes.append(f"stripped the prefix {prefix!r} from every tensor name")
        names = [t.name[len(prefix):] if prefix else t.name for t in infos]
        seen = set()
        for n in names:
            if n in seen:
                raise GGUFFormatError(f"two tensors are named {n!r} once the prefix {prefix!r} is stripped",
                                      path=self.path, tensor=n)
            seen.add(n)
        value = self.metadata.get("general.architecture")
        arch = model_architecture(value, names)
        if value is None or not isinstance(value, str):
            self.notes.append(f"no general.architecture in the file; detected {arch!r} from the tensor names")
        elif arch != value:
            self.notes.append(f"general.architecture {value!r} read as {arch!r}")
        self.architecture = arch
        stored = {n: t.shape for n, t in zip(names, infos)}
        out: List[TensorInfo] = []
        counts: Dict[str, int] = {}
        for n, t in zip(names, infos):
            shape, why = t.shape, None
            orig = orig_shape(self.metadata, t.name, t.shape, path=self.path)
            if orig is not None:
                shape, why = orig, f"{ORIG_SHAPE_PREFIX}* (ComfyUI-GGUF)"
            else:
                fixed = restore_shape(arch, n, t.shape, stored)
                if fixed is not None:
                    shape, why = fixed
            if shape != t.shape:
                counts[why] = counts.get(why, 0) + 1
            out.append(TensorInfo(n, t.format, shape, t.offset, t.nbytes,
                                  stored_shape=t.shape if shape != t.shape else None,
                                  file_name=t.name if prefix else None, note=why if shape != t.shape else None))
        for why, c in counts.items():
            self.notes.append(f"{c} tensor shape{'s' if c != 1 else ''} restored: {why}")
        self.companions = nvfp4_companions({t.name: t.format for t in out})
        if self.companions:
            self.notes.append(f"{len(self.companions)} NVFP4 weights with companion scale tensors")
        return out

    def info(self, name: str) -> TensorInfo:
        return self._by_name[name]

    def tensor(self, name: str) -> torch.Tensor:
        """A zero-copy view of one tensor: a :class:`GGUFParameter` for quantized
        types, a plain tensor of its dtype for F32/F16/BF16/F64 and integers."""
        info = self._by_name[name]
        if info.nbytes == 0:
            data = torch.empty(0, dtype=torch.uint8)
        else:
            data = torch.frombuffer(self._mm, dtype=torch.uint8, count=info.nbytes, offset=info.offset)
        fmt = info.format
        dtype = fmt.torch_dtype
        if dtype is not None:
            t = data.view(dtype).reshape(info.shape)
            if self.compat and dtype == torch.bfloat16 and len(info.shape) <= 1:
                t = t.to(torch.float32)  # as ComfyUI-GGUF: some tools store norms and biases as BF16
            return t
        # the bytes keep rows of the logical shape where its rows are whole blocks, and
        # the file's rows otherwise (a reshaped conv weight: blocks run across its rows)
        byte_shape = fmt.byte_shape(info.shape if fmt.fits(info.shape[-1]) else info.storage_shape)
        return GGUFParameter(data.reshape(byte_shape), fmt, info.shape)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """Every tensor by name. With ``compat``, NVFP4 weights' companions are folded in:
        a weight whose ``.scale`` is not 1 comes out dequantized (float32) and multiplied
        by it, and the ``.scale`` / ``.input_scale`` tensors themselves are left out
        (``input_scale`` scales activations for FP4 matrix units; a float computation has
        no use for it)."""
        if not self.compat or not self.companions:
            return {t.name: self.tensor(t.name) for t in self.tensors}
        skip = {c for comp in self.companions.values() for c in comp.values()}
        out: Dict[str, torch.Tensor] = {}
        expanded = []
        for t in self.tensors:
            if t.name in skip:
                continue
            value = self.tensor(t.name)
            scale_name = self.companions.get(t.name, {}).get("scale")
            if scale_name is not None:
                s = self._scalar(scale_name, t.name)
                if s != 1.0:
                    value = value.dequantize(torch.float32).mul_(s)
                    expanded.append(t.name)
            out[t.name] = value
        if expanded:
            log.warning("%s: %d NVFP4 weights have a per-tensor scale other than 1 and were dequantized to float32 "
                        "to apply it (e.g. %r)", self.path, len(expanded), expanded[0])
        return out

    def _scalar(self, name: str, weight: str) -> float:
        v = self.tensor(name)
        if getattr(v, "gguf_cls", None) is not None:
            v = v.dequantize(torch.float32)
        if v.numel() != 1 or not v.is_floating_point():
            raise GGUFFormatError(f"the scale of NVFP4 weight {weight!r} must be one float, got {v.dtype} "
                                  f"{list(v.shape)}", path=self.path, tensor=name)
        s = float(v.reshape(-1)[0])
        if not s == s or s in (float("inf"), float("-inf")):
            raise GGUFFormatError(f"the scale of NVFP4 weight {weight!r} is {s}", path=self.path, tensor=name)
        return s


def load_state_dict(path: Union[str, os.PathLike], compat: bool = True) -> Dict[str, torch.Tensor]:
    """All tensors of a GGUF file, memory-mapped (no copy of the tensor data), with the
    model's names and shapes (``compat=False``: the file's own; see :class:`GGUFFile`)."""
    return GGUFFile(path, compat=compat).state_dict()


def read_metadata(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The file's key-value metadata."""
    return dict(GGUFFile(path).metadata)
