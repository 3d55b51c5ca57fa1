"""The shared machinery of the Triton kernels (CUDA tensors): the guarded import,
which errors mean "does not compile here", byte readers and the bfloat16 rounding
every value function uses.

triton is optional: without it :func:`available` is False and CUDA tensors take the
torch kernels. Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors too
(slowly): that is how the tests check them without a GPU.
"""
from __future__ import annotations

import os
from typing import Tuple

import torch

try:  # optional: only CUDA tensors use these kernels
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None

# Errors that mean "this kernel does not compile here" (the only ones after which
# lib_gguf falls back to the torch kernels, with a warning): a runtime fault is raised.
COMPILE_ERRORS: Tuple[type, ...] = ()
if triton is not None:
    _errs = []
    for _mod, _name in (("triton.compiler.errors", "CompilationError"),
                        ("triton.runtime.errors", "OutOfResources"),
                        ("triton.runtime.autotuner", "OutOfResources"),
                        ("triton.runtime.errors", "PTXASError"),
                        ("triton.backends.nvidia.compiler", "PTXASError")):
        try:
            _errs.append(getattr(__import__(_mod, fromlist=[_name]), _name))
        except (ImportError, AttributeError):
            pass
    COMPILE_ERRORS = tuple(dict.fromkeys(_errs))


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def available() -> bool:
    return triton is not None


def const(v: int):
    """A layout offset as a Triton compile-time constant (value functions read module globals)."""
    return tl.constexpr(v) if tl is not None else v


class on_device:
    """``torch.cuda.device`` of a CUDA tensor (Triton launches on the current device)."""

    def __init__(self, t: torch.Tensor):
        self.ctx = torch.cuda.device(t.device) if t.device.type == "cuda" else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *a):
        if self.ctx is not None:
            self.ctx.__exit__(*a)


if triton is not None:
    @triton.jit
    def u8(src, off, mask):
        """The byte at ``off`` as int32."""
        return tl.load(src + off, mask=mask, other=0).to(tl.int32)

    @triton.jit
    def i8f(src, off, mask):
        """The byte at ``off`` as a signed integer, in float32 (exact)."""
        return tl.load(src + off, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.float32)

    @triton.jit
    def f16f(src, off, mask):
        """The little-endian float16 at ``off``, widened (exactly) to float32."""
        lo = tl.load(src + off, mask=mask, other=0).to(tl.uint16)
        hi = tl.load(src + off + 1, mask=mask, other=0).to(tl.uint16)
        return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def f32f(src, off, mask):
        """The little-endian float32 at ``off``."""
        b0 = tl.load(src + off, mask=mask, other=0).to(tl.uint32)
        b1 = tl.load(src + off + 1, mask=mask, other=0).to(tl.uint32)
        b2 = tl.load(src + off + 2, mask=mask, other=0).to(tl.uint32)
        b3 = tl.load(src + off + 3, mask=mask, other=0).to(tl.uint32)
        return (b0 | (b1 << 8) | (b2 << 16) | (b3 << 24)).to(tl.float32, bitcast=True)

    @triton.jit
    def bf16_bits(v):
        """float32 -> bfloat16 bits (int16), rounded to nearest even; NaN -> 0x7FC0."""
        bits = v.to(tl.uint32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        r = tl.where(v != v, 0x7FC0, r)
        return r.to(tl.uint16).to(tl.int16, bitcast=True)
