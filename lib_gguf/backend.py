"""Which kernels run: the torch ones (every device; the reference) or the compiled
ones, which give the same bytes and values faster: numba for CPU tensors
(:mod:`lib_gguf.numba_kernels`), Triton for CUDA tensors' dequantization
(:mod:`lib_gguf.dequant_triton`).

``"auto"`` (the default): the compiled kernels where their package (numba, triton)
imports and the kernel compiles, else torch. ``"torch"``: never the compiled kernels.
``"numba"``: always the numba ones for CPU tensors, an error where they cannot run
(for tests and benchmarks). ``"triton"``: the same for the Triton ones on CUDA tensors
(and on CPU tensors under Triton's interpreter, ``TRITON_INTERPRET=1``: for tests);
CPU tensors otherwise as under ``"auto"``. The environment variable ``LIB_GGUF_BACKEND``
sets the starting choice.
"""
from __future__ import annotations

import logging
import os

from .errors import GGUFFormatError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "numba", "triton")


def _from_env() -> str:
    raw = os.environ.get("LIB_GGUF_BACKEND") or "auto"
    name = raw.strip().lower()
    if name not in BACKENDS:
        log.warning("LIB_GGUF_BACKEND=%r is not one of %s; using auto", raw, ", ".join(BACKENDS))
        return "auto"
    return name


_backend = _from_env()


def set_backend(name: str) -> str:
    """Choose the kernels (see the module docstring); returns the previous choice."""
    global _backend
    name = str(name).strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}")
    old, _backend = _backend, name
    return old


def get_backend() -> str:
    return _backend


_announced: set = set()  # (kind, what, type id) whose first use was logged
_failed: set = set()  # (kind, what, type id) of compiled kernels that did not compile: torch from then on


def has_failed(key) -> bool:
    """Whether the compiled kernel ``key`` failed to compile in this process."""
    return key in _failed


def mark_failed(key) -> None:
    _failed.add(key)


def try_compiled(what: str, fmt, kind: str, find, call, *, required: bool = False):
    """The result of ``call(kernel)``, a compiled kernel for ``fmt`` (``what``:
    "quantizer" or "dequantizer"; ``kind``: "numba" or "triton"), or None when the
    torch kernel should run instead.

    ``find()`` imports the kernels' module and returns ``(kernel or None, available,
    compile_errors)``. None comes back when the choice is "torch" (then nothing is
    imported), when there is no kernel for ``fmt``, or when the kernel failed to
    compile before (one of ``compile_errors``: logged once, and not tried again under
    "auto"). Any other error (a data error, a device fault) is raised, and the kernel
    stays in use. When the choice is ``kind`` itself a compile failure is raised, and
    so is a missing kernel when ``required``; under another compiled choice this kind
    runs as under "auto". The caller has checked the device and dtypes."""
    choice = _backend
    if choice == "torch":
        return None
    strict = choice == kind
    kernel, available, compile_errors = find()
    if kernel is None:
        if required and strict:
            raise GGUFFormatError(f"no compiled ({kind}) {what} for {fmt.name}"
                                  + ("" if available else f": {kind} is not installed"))
        return None
    key = (kind, what, fmt.type_id)
    if key in _failed and not strict:
        return None
    if key not in _announced:
        _announced.add(key)
        log.info("preparing the compiled (%s) %s %s (first use in this process: a few seconds to compile, "
                 "or to load from the disk cache)", kind, fmt.name, what)
    try:
        return call(kernel)
    except compile_errors as e:  # a kernel that does not compile here: fall back, once
        if strict:
            raise
        _failed.add(key)
        log.warning("compiled (%s) %s %s unavailable (%s: %s); using the torch one", kind, fmt.name, what,
                    type(e).__name__, e)
        return None
