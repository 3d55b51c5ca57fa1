"""Writing GGUF files (version 3): atomic and streaming.

``save(path, tensors, metadata)`` writes to a temporary file beside ``path`` and
renames it into place only when everything is written and synced: an error at any
point leaves an existing file at ``path`` untouched and no temporary file behind.

Tensor values may be :class:`GGUFParameter`\\ s (written with their format and
logical shape), plain float or integer tensors (F32, F16, BF16, F64, I8-I64), or
*lazy* tensors: objects with ``gguf_cls``, ``gguf_shape`` and ``materialize()``
(returning the bytes or a float tensor), computed one at a time while writing so
that a converter holds one tensor in memory, not the model.
"""
from __future__ import annotations

import logging
import os
import struct
import tempfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import torch

from .errors import GGUFFormatError
from .formats import GGMLFormat, get_format

log = logging.getLogger(__name__)

LLAMA_CPP_NAME_LIMIT = 63  # GGML_MAX_NAME - 1: llama.cpp's tools cut longer names

_DTYPE_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 30, torch.float64: 28, torch.int8: 24,
                torch.int16: 25, torch.int32: 26, torch.int64: 27}


def _pack_string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _pack_value(v: Any, key: str) -> bytes:
    """Type id + value bytes of one metadata value."""
    if isinstance(v, bool):
        return struct.pack("<I?", 7, v)
    if isinstance(v, int):
        if -2**31 <= v < 2**31:
            return struct.pack("<Ii", 5, v)
        if 0 <= v < 2**64:
            return struct.pack("<IQ", 10, v)
        if -2**63 <= v < 2**63:
            return struct.pack("<Iq", 11, v)
        raise GGUFFormatError(f"metadata {key!r}: integer {v} does not fit 64 bits")
    if isinstance(v, float):
        return struct.pack("<If", 6, v)
    if isinstance(v, str):
        return struct.pack("<I", 8) + _pack_string(v)
    if isinstance(v, (list, tuple)):
        items = [_pack_value(x, key) for x in v]
        itype = struct.unpack("<I", items[0][:4])[0] if items else 8
        if any(struct.unpack("<I", it[:4])[0] != itype for it in items):
            # mixed ints widen, otherwise it is an error
            raise GGUFFormatError(f"metadata {key!r}: array items must all have one type")
        return struct.pack("<IIQ", 9, itype, len(items)) + b"".join(it[4:] for it in items)
    raise GGUFFormatError(f"metadata {key!r}: cannot store a {type(v).__name__} in GGUF")


def _describe(name: str, t) -> tuple:
    """(format, logical shape) of a tensor value."""
    fmt = getattr(t, "gguf_cls", None)
    if fmt is not None:
        shape = getattr(t, "gguf_shape", None) or getattr(t, "real_shape", None) or t.shape
        return get_format(fmt, tensor=name), tuple(int(s) for s in shape)
    if not isinstance(t, torch.Tensor):
        raise GGUFFormatError(f"expected a tensor, got {type(t).__name__}", tensor=name)
    tid = _DTYPE_TYPES.get(t.dtype)
    if tid is None:
        raise GGUFFormatError(f"cannot store dtype {t.dtype} in GGUF", tensor=name)
    return get_format(tid), tuple(int(s) for s in t.shape) or (1,)


def _bytes_of(name: str, t, fmt: GGMLFormat, shape: tuple, nbytes: int) -> torch.Tensor:
    if hasattr(t, "materialize"):
        t = t.materialize()
    if getattr(t, "gguf_cls", None) is not None or t.dtype == torch.uint8:
        data = t.data if isinstance(t, torch.nn.Parameter) else t
    else:
        want = _DTYPE_TYPES.get(t.dtype)
        if want != fmt.type_id:
            from .quant import quantize

            data = quantize(t, fmt, name=name)
        else:
            data = t.detach()
    data = data.detach().to("cpu").contiguous().reshape(-1)
    if data.dtype != torch.uint8:
        data = data.view(torch.uint8)
    if data.numel() != nbytes:
        raise GGUFFormatError(f"{fmt.name} {list(shape)} needs {nbytes} bytes, got {data.numel()}", tensor=name)
    return data


def save(path: Union[str, os.PathLike], tensors: Mapping[str, Any], metadata: Optional[Mapping[str, Any]] = None,
         alignment: int = 32) -> Path:
    """Write ``tensors`` and ``metadata`` to a GGUF file at ``path``, atomically."""
    path = Path(path)
    if alignment <= 0 or alignment & (alignment - 1):
        raise GGUFFormatError(f"alignment must be a power of two, got {alignment}", path=path)
    meta = dict(metadata or {})
    if alignment != 32:
        meta["general.alignment"] = alignment
    # header: every tensor's format, shape and size is known before any data is made
    entries = []
    offset = 0
    long_names = []
    for name, t in tensors.items():
        fmt, shape = _describe(name, t)
        if not fmt.fits(shape[-1]):
            raise GGUFFormatError(f"rows of {shape[-1]} are not a whole number of {fmt.name} blocks", tensor=name)
        n = 1
        for s in shape:
            n *= s
        nbytes = n // fmt.block_size * fmt.type_size
        entries.append((name, t, fmt, shape, offset, nbytes))
        offset += (nbytes + alignment - 1) // alignment * alignment
        if len(name.encode("utf-8")) > LLAMA_CPP_NAME_LIMIT:
            long_names.append(name)
    if long_names:
        log.warning("%d tensor names are longer than %d bytes (kept whole; llama.cpp's tools would cut them), "
                    "e.g. %r", len(long_names), LLAMA_CPP_NAME_LIMIT, long_names[0])
    head = [b"GGUF", struct.pack("<IQQ", 3, len(entries), len(meta))]
    for k, v in meta.items():
        if k == "general.alignment":  # readers expect a uint32 here
            packed = struct.pack("<II", 4, int(v))
        else:
            packed = _pack_value(v, k)
        head.append(_pack_string(str(k)) + packed)
    for name, _t, fmt, shape, off, _n in entries:
        dims = list(reversed(shape))
        head.append(_pack_string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
                    + struct.pack("<IQ", fmt.type_id, off))
    header = b"".join(head)
    header += b"\0" * ((-len(header)) % alignment)

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            for name, t, fmt, shape, off, nbytes in entries:
                data = _bytes_of(name, t, fmt, shape, nbytes)
                f.write(memoryview(data.numpy()))
                f.write(b"\0" * ((-nbytes) % alignment))
                del data
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path
