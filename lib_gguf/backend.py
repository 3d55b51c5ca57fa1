"""Which kernels run: the torch ones (every device) or the compiled ones, which give
the same bytes and values faster: numba for CPU tensors (:mod:`lib_gguf.quant_numba`,
:mod:`lib_gguf.dequant_numba`), Triton for CUDA tensors' dequantization
(:mod:`lib_gguf.dequant_triton`).

``"auto"`` (the default): the compiled kernels where their package (numba, triton)
imports and the kernel compiles, else torch. ``"torch"``: never the compiled kernels.
``"numba"``: always the numba ones for CPU tensors, an error where they cannot run
(for tests and benchmarks). ``"triton"``: the same for the Triton ones on CUDA tensors
(and on CPU tensors under Triton's interpreter, ``TRITON_INTERPRET=1``: for tests);
CPU tensors otherwise as under ``"auto"``. The environment variable ``LIB_GGUF_BACKEND``
sets the starting choice (``LIB_GGUF_QUANT_BACKEND`` is read too, for older setups).
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "numba", "triton")


def _from_env() -> str:
    raw = os.environ.get("LIB_GGUF_BACKEND") or os.environ.get("LIB_GGUF_QUANT_BACKEND") or "auto"
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


_announced: set = set()  # (what, type id) whose first use was logged
_failed: set = set()  # (what, type id) of compiled kernels that raised once: torch from then on


def try_compiled(what: str, fmt, load, run, *, required: bool = False, kind: str = "numba",
                 fallback_on: tuple = (Exception,)):
    """The result of ``run(module)``, a compiled kernel for ``fmt`` (``what``:
    "quantizer" or "dequantizer"; ``kind``: "numba" or "triton"; ``load()`` imports the
    module of compiled kernels, which has ``has_kernel`` and ``available``), or None when
    the torch kernel should run instead: the choice is "torch" (then nothing is
    imported), the module has no kernel for ``fmt``, or the kernel raised one of
    ``fallback_on`` before (compile errors; then it is logged once and not tried again
    under "auto"). When the choice is ``kind`` itself a failure is raised, and so is a
    missing kernel when ``required``; under another compiled choice this kind runs as
    under "auto". The caller has checked the device and dtypes."""
    from .errors import GGUFFormatError

    choice = _backend
    if choice == "torch":
        return None
    strict = choice == kind
    mod = load()
    if not mod.has_kernel(fmt.type_id):
        if required and strict:
            raise GGUFFormatError(f"no compiled ({kind}) {what} for {fmt.name}"
                                  + ("" if mod.available() else f": {kind} is not installed"))
        return None
    key = (kind, what, fmt.type_id)
    if key in _failed and not strict:
        return None
    if key not in _announced:
        _announced.add(key)
        log.info("preparing the compiled (%s) %s %s (first use in this process: a few seconds to compile, "
                 "or to load from the disk cache)", kind, fmt.name, what)
    try:
        return run(mod)
    except fallback_on as e:  # a kernel that does not compile here: fall back, once
        if strict:
            raise
        _failed.add(key)
        log.warning("compiled (%s) %s %s unavailable (%s: %s); using the torch one", kind, fmt.name, what,
                    type(e).__name__, e)
        return None
