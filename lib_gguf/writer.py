"""Writing GGUF files (version 3): atomic and streaming.

``save(path, tensors, metadata)`` writes to a temporary file beside ``path`` and
renames it into place only when everything is written and synced: an error at any
point (Ctrl-C included) leaves an existing file at ``path`` untouched and no temporary
file behind. The temporary file is named ``.NAME.<pid>-<random>.forge-gguf-lora-partial``
and locked while it is written, so that a later save to the same path finds and
removes the ones a killed process (SIGKILL, a container stop) left behind, and
nothing else. The finished file gets the mode a plain ``open()`` would give it (the
umask's, or the replaced file's). :func:`check_output` refuses, before any work, an
output that is one of the inputs, a folder, or in a folder we cannot write;
``save`` also refuses a disk without room for the whole file, and reports a full disk
or a failing rename as one :class:`~lib_gguf.errors.OutputPathError` naming the
user's path.

Tensor values may be :class:`GGUFParameter`\\ s (written with their format and
logical shape), plain float or integer tensors (F32, F16, BF16, F64, I8-I64), or
*lazy* tensors: objects with ``gguf_cls``, ``gguf_shape`` and ``materialize()``
(returning the bytes or a float tensor), computed one at a time while writing so
that a converter holds one tensor in memory, not the model.

Files load in the other tools too (:mod:`lib_gguf.compat`): ``general.architecture``
is written with the name ComfyUI-GGUF knows (``aura`` for AuraFlow, ``flux`` for
Chroma), and a quantized tensor whose rows are not whole blocks of its format (an
SDXL conv weight read from a ComfyUI-GGUF file) is stored reshaped to ``(n / 256,
256)`` with its shape in ``comfy.gguf.orig_shape.<name>``, as ComfyUI-GGUF's
convert.py does; ``comfy.gguf.orig_shape.*`` keys given in ``metadata`` are replaced by
the ones that describe the tensors written. Tensors of any number of dimensions (5-D
Conv3d weights) and leading dimensions of 1 are written as they are.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Set, Union

import torch

from .compat import ORIG_SHAPE_PREFIX, orig_shape_key, storage_shape
from .errors import GGUFFormatError, OutputPathError
from .formats import GGMLFormat, format_for_dtype, get_format
from .quant import quantize
from .recipes import file_architecture

try:
    import fcntl
except ImportError:  # Windows: stale temporary files are told by their process id
    fcntl = None

log = logging.getLogger(__name__)

LLAMA_CPP_NAME_LIMIT = 63  # GGML_MAX_NAME - 1: llama.cpp's tools cut longer names


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
        if v and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            return _pack_int_array(list(v), key)
        items = [_pack_value(x, key) for x in v]
        itype = struct.unpack("<I", items[0][:4])[0] if items else 8
        if any(struct.unpack("<I", it[:4])[0] != itype for it in items):
            raise GGUFFormatError(f"metadata {key!r}: array items must all have one type")
        return struct.pack("<IIQ", 9, itype, len(items)) + b"".join(it[4:] for it in items)
    raise GGUFFormatError(f"metadata {key!r}: cannot store a {type(v).__name__} in GGUF")


def _pack_int_array(v: list, key: str) -> bytes:
    """An array of ints in the narrowest of INT32, UINT64, INT64 that holds every item."""
    lo, hi = min(v), max(v)
    for tid, fmt, fits in ((5, "i", -2**31 <= lo and hi < 2**31), (10, "Q", 0 <= lo and hi < 2**64),
                           (11, "q", -2**63 <= lo and hi < 2**63)):
        if fits:
            return struct.pack("<IIQ", 9, tid, len(v)) + struct.pack(f"<{len(v)}{fmt}", *v)
    raise GGUFFormatError(f"metadata {key!r}: integers from {lo} to {hi} do not fit one 64-bit type")


def _describe(name: str, t) -> tuple:
    """(format, logical shape) of a tensor value."""
    fmt = getattr(t, "gguf_cls", None)
    if fmt is not None:
        shape = getattr(t, "gguf_shape", None) or getattr(t, "real_shape", None) or t.shape
        return get_format(fmt, tensor=name), tuple(int(s) for s in shape)
    if not isinstance(t, torch.Tensor):
        raise GGUFFormatError(f"expected a tensor, got {type(t).__name__}", tensor=name)
    return format_for_dtype(t.dtype, tensor=name), tuple(int(s) for s in t.shape) or (1,)


def _bytes_of(name: str, t, fmt: GGMLFormat, shape: tuple, nbytes: int, stored: Optional[tuple] = None) -> torch.Tensor:
    if hasattr(t, "materialize"):
        t = t.materialize()
    if getattr(t, "gguf_cls", None) is not None or t.dtype == torch.uint8:
        data = t.data if isinstance(t, torch.nn.Parameter) else t
    else:
        if fmt.torch_dtype != t.dtype:
            data = quantize(t.reshape(stored) if stored else t, fmt, name=name)
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
    meta = {k: v for k, v in (metadata or {}).items() if not str(k).startswith(ORIG_SHAPE_PREFIX)}
    arch = meta.get("general.architecture")
    if isinstance(arch, str):
        meta["general.architecture"] = file_architecture(arch)
    if alignment != 32:
        meta["general.alignment"] = alignment
    # header: every tensor's format, shape and size is known before any data is made
    entries = []
    offset = 0
    long_names = []
    for name, t in tensors.items():
        fmt, shape = _describe(name, t)
        stored = None
        if not fmt.fits(shape[-1]):
            stored = storage_shape(fmt, shape)
            if stored is None:
                raise GGUFFormatError(f"rows of {shape[-1]} are not a whole number of {fmt.name} blocks "
                                      f"(nor is the whole tensor, {list(shape)})", tensor=name)
            meta[orig_shape_key(name)] = [int(s) for s in shape]
        n = 1
        for s in shape:
            n *= s
        nbytes = n // fmt.block_size * fmt.type_size
        entries.append((name, t, fmt, shape, offset, nbytes, stored))
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
    for name, _t, fmt, shape, off, _n, stored in entries:
        dims = list(reversed(stored or shape))
        head.append(_pack_string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
                    + struct.pack("<IQ", fmt.type_id, off))
    header = b"".join(head)
    header += b"\0" * ((-len(header)) % alignment)

    total = len(header) + offset
    _prepare_folder(path)
    remove_stale_temps(path)
    _check_space(path, total)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            _lock(f)
            _set_mode(f, tmp, _open_mode(path))
            _write(f, header, path)
            for name, t, fmt, shape, off, nbytes, stored in entries:
                data = _bytes_of(name, t, fmt, shape, nbytes, stored)
                _write(f, memoryview(data.numpy()), path)
                _write(f, b"\0" * ((-nbytes) % alignment), path)
                del data
            try:
                f.flush()
                os.fsync(f.fileno())
            except OSError as e:
                raise _os_error(e, path, "writing") from None
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise _os_error(e, path, "renaming the finished file into place") from None
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    finally:
        _ACTIVE.discard(tmp)
    return path


# -- the output path: checks before any work, temporary files, modes --------------------

TEMP_SUFFIX = ".forge-gguf-lora-partial"
_ACTIVE: Set[str] = set()  # temporary files this process is writing now


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def check_output(path: Union[str, os.PathLike], inputs: Iterable[Union[str, os.PathLike, None]] = ()) -> Path:
    """Refuse ``path`` as an output before any work: when it is one of ``inputs``
    (after resolving links and ``..``; hard links too), an existing folder, or in a
    folder that cannot be written (read-only, no permission). Returns the path."""
    path = Path(path)
    for src in inputs:
        if src is None or isinstance(src, Mapping):
            continue
        if _same_file(path, Path(src)):
            raise OutputPathError(f"the output is one of the inputs ({src}); give another output file name",
                                  path=path)
    if path.is_dir():
        raise OutputPathError("the output is an existing folder; give a file name", path=path)
    folder = _existing_parent(path)
    if not folder.is_dir():
        raise OutputPathError(f"cannot create the output folder: {folder} is not a folder", path=path)
    try:  # the real test: create (and remove) a temporary file there
        fd, probe = tempfile.mkstemp(prefix=".forge-gguf-lora-probe.", suffix=TEMP_SUFFIX, dir=str(folder))
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputPathError(f"cannot write in the folder {folder} ({e.strerror or e})", path=path) from None
    return path


def _existing_parent(path: Path) -> Path:
    folder = path.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _prepare_folder(path: Path) -> None:
    if path.is_dir():
        raise OutputPathError("the output is an existing folder; give a file name", path=path)
    if not path.parent.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputPathError(f"cannot create the output folder {path.parent} ({e.strerror or e})",
                                  path=path) from None
        log.warning("created the output folder %s", path.parent)


def _check_space(path: Path, needed: int) -> None:
    try:
        free = shutil.disk_usage(str(path.parent)).free
    except OSError:
        return
    if free < needed:
        raise OutputPathError(f"not enough free disk space: the file needs {needed / 2**20:.1f} MiB, "
                              f"{path.parent} has {free / 2**20:.1f} MiB free", path=path)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def _create_temp(path: Path):
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{_temp_prefix(path)}{os.getpid()}-", suffix=TEMP_SUFFIX,
                                   dir=str(path.parent))
    except OSError as e:
        raise OutputPathError(f"cannot write in the folder {path.parent} ({e.strerror or e})", path=path) from None
    _ACTIVE.add(tmp)
    return fd, tmp


def _lock(f) -> None:
    if fcntl is not None:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a filesystem without locks: the process id tells
            pass


def _in_use(p: Path, pid: int) -> bool:
    """Whether a live writer still holds the temporary file ``p`` (written by ``pid``)."""
    if fcntl is not None:
        try:
            with open(p, "rb") as fh:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return True
                except OSError:
                    pass  # no locks on this filesystem: the process id tells
                else:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
                    return False
        except OSError:
            return True
    if pid == os.getpid():
        return str(p) in _ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _set_mode(f, tmp: str, mode: int) -> None:
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(f.fileno(), mode)
        else:
            os.chmod(tmp, mode)
    except OSError:  # a filesystem without modes
        pass


def remove_stale_temps(path: Union[str, os.PathLike]) -> List[Path]:
    """Remove the temporary files that earlier, killed saves to ``path`` left behind
    (only ours: ``.NAME.<pid>-<random>.forge-gguf-lora-partial``, not held by a
    running writer). Returns the removed paths."""
    path = Path(path)
    removed = []
    prefix = _temp_prefix(path)
    try:
        names = os.listdir(path.parent)
    except OSError:
        return removed
    for n in names:
        if not (n.startswith(prefix) and n.endswith(TEMP_SUFFIX)):
            continue
        pid = n[len(prefix):-len(TEMP_SUFFIX)].split("-", 1)[0]
        if not pid.isdigit():
            continue
        p = path.parent / n
        if str(p) in _ACTIVE or _in_use(p, int(pid)):
            continue
        try:
            size = p.stat().st_size
            p.unlink()
        except OSError:
            continue
        log.warning("removed %s (%.1f MiB), left by an interrupted earlier write of %s", p, size / 2**20, path)
        removed.append(p)
    return removed


def remove_active_temps() -> None:
    """Remove the temporary files this process is writing now (for a signal handler
    that exits at once)."""
    for tmp in list(_ACTIVE):
        try:
            os.unlink(tmp)
        except OSError:
            pass
        _ACTIVE.discard(tmp)


def _umask() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _open_mode(path: Path) -> int:
    """The mode ``open(path, "wb")`` would leave: the replaced file's, else 0666 less the umask."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def _write(f, data, path: Path) -> None:
    try:
        f.write(data)
    except OSError as e:
        raise _os_error(e, path, "writing") from None


def _os_error(e: OSError, path: Path, doing: str) -> OutputPathError:
    if e.errno == errno.ENOSPC:
        return OutputPathError(f"the disk is full ({doing}); nothing was written, free some space and run again",
                               path=path)
    return OutputPathError(f"{doing} failed: {e.strerror or e}; nothing was written", path=path)
