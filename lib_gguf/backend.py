"""Which kernels run for CPU tensors: the torch ones (every device) or the compiled
numba ones (:mod:`lib_gguf.quant_numba`, :mod:`lib_gguf.dequant_numba`), which give
the same bytes and values several times faster where numba is installed.

``"auto"`` (the default): the compiled kernels when numba imports and compiles, else
torch. ``"torch"``: never the compiled kernels. ``"numba"``: always them, an error
where they cannot run (for tests and benchmarks). The environment variable
``LIB_GGUF_BACKEND`` sets the starting choice (``LIB_GGUF_QUANT_BACKEND`` is read
too, for older setups).
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "numba")


def _from_env() -> str:
    raw = os.environ.get("LIB_GGUF_BACKEND") or os.environ.get("LIB_GGUF_QUANT_BACKEND") or "auto"
    name = raw.strip().lower()
    if name not in BACKENDS:
        log.warning("LIB_GGUF_BACKEND=%r is not one of %s; using auto", raw, ", ".join(BACKENDS))
        return "auto"
    return name


_backend = _from_env()


def set_backend(name: str) -> str:
    """Choose the kernels for CPU tensors (see the module docstring); returns the
    previous choice. Tensors on other devices always take the torch kernels."""
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


def try_compiled(what: str, fmt, load, run, *, required: bool = False):
    """The result of ``run(module)``, a compiled kernel for ``fmt`` (``what``:
    "quantizer" or "dequantizer"; ``load()`` imports the module of compiled kernels,
    which has ``has_kernel`` and ``available``), or None when the torch kernel should
    run instead: the choice is "torch" (then nothing is imported), the module has no
    kernel for ``fmt``, or the kernel raised before (then it is logged once and not
    tried again under "auto"). Under "numba" a failure is raised, and so is a missing
    kernel when ``required``. The caller has checked the device and dtypes."""
    from .errors import GGUFFormatError

    choice = _backend
    if choice == "torch":
        return None
    mod = load()
    if not mod.has_kernel(fmt.type_id):
        if required and choice == "numba":
            raise GGUFFormatError(f"no compiled (numba) {what} for {fmt.name}"
                                  + ("" if mod.available() else ": numba is not installed"))
        return None
    key = (what, fmt.type_id)
    if key in _failed and choice == "auto":
        return None
    if key not in _announced:
        _announced.add(key)
        log.info("preparing the compiled %s %s (first use in this process: a few seconds to compile, "
                 "or to load from numba's disk cache)", fmt.name, what)
    try:
        return run(mod)
    except Exception as e:  # a numba/llvmlite that does not compile here: fall back, once
        if choice == "numba":
            raise
        _failed.add(key)
        log.warning("compiled %s %s unavailable (%s: %s); using the torch one", fmt.name, what,
                    type(e).__name__, e)
        return None
