"""The shared machinery of the compiled (numba) CPU kernels: the jit decorators,
float32 constants and ggml's scalar helpers (``nearest_int``, ``roundf``, fp16
bits), the dequantizers' parallel driver, and how a kernel is launched.

numba is optional: without it (or with an llvmlite that does not load) the
decorators leave the Python functions as they are, :func:`available` is False,
and lib_gguf runs the torch kernels. The family modules ``families/*_numba.py``
hold the kernels, on the same layouts as their torch kernels; each gives the same
bytes (quantizing) and values (dequantizing) as the torch kernel, which is the
reference.

Float care, since numba types follow numpy's rules: every constant is a float32
global, ints are cast with ``f32`` before they meet a float, and division by zero
follows IEEE (``error_model="numpy"``), as in C. No fused multiply-add is formed
(numba leaves LLVM's fp-contract off without fastmath).

Threads: a kernel runs on as many threads as torch uses (``torch.set_num_threads``;
numba's thread count is set per calling thread). numba's ``tbb`` and ``omp``
threading layers take parallel launches from several threads at once; its
``workqueue`` layer (the one every install has) aborts the process on a second
concurrent launch, so under that layer, and only there, launches take turns.
"""
from __future__ import annotations

import math
import os
import threading
from pathlib import Path

import numpy as np

try:  # pragma: no cover - depends on the environment
    import numba
    from numba import njit, prange
except Exception:  # ImportError, or an llvmlite that does not load
    numba = None
    prange = range

OPTS = dict(cache=True, error_model="numpy", nogil=True)

# Errors that mean "this kernel does not compile here": the only ones after which
# lib_gguf falls back to the torch kernel for the rest of the process. A data error
# raised by a kernel (IQ1_M's FloatingPointError on non-finite weights) is the
# caller's, as from the torch kernel.
COMPILE_ERRORS: tuple = ()
if numba is not None:
    from numba.core.errors import NumbaError

    COMPILE_ERRORS = (NumbaError,)


def available() -> bool:
    return numba is not None


# numba's disk cache checks only the file a kernel is defined in, but a family's kernels
# inline the helpers here and freeze their layout's offsets (from the family's torch
# module): a change to those files alone would leave stale compiled code. So lib_gguf's
# kernels are cached under a stamp of every file they depend on.
_STAMP_FILES = [Path(__file__), Path(__file__).with_name("formats.py"),
                *sorted((Path(__file__).parent / "families").glob("*.py"))]
_TREE_STAMP = tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in _STAMP_FILES)
_OURS = str(Path(__file__).parent) + os.sep


def _stamped(base):
    class Stamped(base):
        @classmethod
        def from_function(cls, py_func, py_file):
            if not str(py_file).startswith(_OURS):
                return None
            return super().from_function(py_func, py_file)

        def get_source_stamp(self):
            return (super().get_source_stamp(), _TREE_STAMP)

    Stamped.__name__ = f"LibGGUF{base.__name__}"
    return Stamped


if numba is not None:
    from numba.core import caching as _caching

    _impl = getattr(_caching, "CacheImpl", None) or getattr(_caching, "_CacheImpl", None)
    if _impl is not None and not any(k.__name__.startswith("LibGGUF") for k in _impl._locator_classes):
        _impl._locator_classes[:0] = [_stamped(b) for b in _impl._locator_classes]


if numba is not None:
    def jit(fn):
        return njit(**OPTS)(fn)

    def pjit(fn):
        return njit(parallel=True, **OPTS)(fn)

    def jit_inline(fn):
        """For a small helper on a hot path: numba inlines it into each caller."""
        return njit(inline="always", **OPTS)(fn)
else:  # pragma: no cover
    def jit(fn):
        return fn

    pjit = jit_inline = jit


# -- stack arrays ---------------------------------------------------------------------------
# A kernel's small scratch arrays made with np.empty live on the heap, and LLVM cannot tell
# that two of them (or one and an argument) never overlap: every store to one may change
# any other, so a loop over 16 independent sub-blocks keeps its sums in memory and runs
# one lane at a time. An array in the function's own stack frame is a distinct object to
# LLVM: the same loop becomes vector instructions (measured: the Q4_K fit's loops went
# from scalar ``vroundss`` to ``vroundps``). Such an array must not outlive the function
# that made it (never return it or store it in another array).

def _stack_py(dtype):
    def stack(rows, cols):
        return np.empty((rows, cols), dtype=dtype)

    return stack


stack_f32 = _stack_py(np.float32)
stack_i64 = _stack_py(np.int64)
if numba is not None:
    from llvmlite import ir
    from numba import types as _types
    from numba.core import cgutils as _cgutils
    from numba.extending import intrinsic as _intrinsic
    from numba.extending import overload as _overload

    def _stack(item):
        """``stack(rows, cols)``: a (rows, cols) C array of ``item`` in the calling function's
        stack frame; rows and cols must be constants in the kernel's source."""
        @_intrinsic
        def stack(typingctx, rows, cols):
            if not (isinstance(rows, _types.IntegerLiteral) and isinstance(cols, _types.IntegerLiteral)):
                return None
            nr, nc = rows.literal_value, cols.literal_value
            arrty = _types.Array(item, 2, "C")

            def codegen(context, builder, sig, args):
                intp = context.get_value_type(_types.intp)
                size = context.get_abi_sizeof(context.get_value_type(item))
                data = _cgutils.alloca_once(builder, context.get_value_type(item), size=nr * nc)
                ary = context.make_array(arrty)(context, builder)
                context.populate_array(ary, data=data, shape=_cgutils.pack_array(builder, [intp(nr), intp(nc)]),
                                       strides=_cgutils.pack_array(builder, [intp(size * nc), intp(size)]),
                                       itemsize=intp(size), meminfo=None)
                return ary._getvalue()

            return arrty(rows, cols), codegen

        return stack

    stack_f32 = _stack(_types.float32)
    stack_i64 = _stack(_types.int64)


f32 = np.float32
F0 = f32(0.0)
F1 = f32(1.0)
F_HALF = f32(0.5)
F_QUARTER = f32(0.25)
F_TENTH = f32(0.1)
F_EPS = f32(1e-15)          # ggml's GROUP_MAX_EPS
F_FLT_MAX = f32(np.finfo(np.float32).max)
F_MAGIC_LIMIT = f32(4194303.0)
F_MAGIC = f32(12582912.0)   # 1.5 * 2**23: ggml's nearest_int adds it
F_2M24 = f32(2.0 ** -24)    # the smallest half subnormal


# -- scalar helpers ----------------------------------------------------------------------

@jit
def nearest_int(v):
    """ggml's nearest_int: add 1.5 * 2**23 in float32 and read the low mantissa bits.
    Below 2**22 in magnitude that is round-half-to-even; beyond it (never in
    practice) the same bits are reproduced arithmetically."""
    if abs(v) < F_MAGIC_LIMIT:
        return int(np.rint(v))
    val = f32(v + F_MAGIC)
    a = abs(float(val))
    if val != val:
        return 0                      # a NaN's mantissa field is 0x400000
    if a == math.inf or a == 0.0:
        return -0x400000
    m, e = math.frexp(a)              # a = m * 2**e; field = m * 2**24 - 2**23 for normals
    return int(m * 16777216.0) - 0x800000 - 0x400000


@jit
def roundf(v):
    """C's roundf: half away from zero."""
    t = np.trunc(v)
    if abs(v - t) == F_HALF:
        return t + (F1 if v > 0 else -F1)
    return np.rint(v)


@jit
def absmax(x):
    amax = F0
    for j in range(x.shape[0]):
        v = abs(x[j])
        if v > amax:
            amax = v
    return amax


@jit
def signed_absmax(x):
    """(the first value of largest magnitude, that magnitude); (0, 0) for all zeros."""
    mx = F0
    amax = F0
    for j in range(x.shape[0]):
        v = abs(x[j])
        if v > amax:
            amax = v
            mx = x[j]
    return mx, amax


@jit
def absmax_scale(x, out, i, d_off):
    """Ternary and similar: ``d`` = the block's absmax, stored as half at ``d_off``;
    returns ``1 / d`` (0 for an all-zero block)."""
    d = absmax(x)
    put_f16(out, i, d_off, d)
    return f32(F1 / d) if d != F0 else F0


@jit
def f16_bits(v):
    """float32 -> IEEE half bits, round to nearest even, as F16C and torch do (a NaN
    becomes the quiet NaN 0x7E00 with its sign). Integer work on the float's bits: the
    quantizers store a scale per block, and this is cheaper than frexp/ldexp there."""
    b = np.int64(f32(v).view(np.uint32))
    s = (b >> 16) & 0x8000
    a = b & 0x7FFFFFFF
    if a >= 0x38800000:                   # |v| >= 2**-14: a normal half, inf or NaN
        if a >= 0x477FF000:               # |v| >= 65520 (rounds past 65504), inf, NaN
            return s | (0x7E00 if a > 0x7F800000 else 0x7C00)
        r = a - 0x38000000                # exponent rebiased from 127 to 15
        return s | ((r + 0xFFF + ((r >> 13) & 1)) >> 13)   # drop 13 bits, ties to even
    if a < 0x33000000:                    # |v| <= 2**-25 (a tie at it, to even): zero
        return s
    shift = 126 - (a >> 23)               # 14..24: the half's unit 2**-24 in the mantissa
    m = (a & 0x7FFFFF) | 0x800000
    return s | ((m + ((1 << (shift - 1)) - 1) + ((m >> shift) & 1)) >> shift)


@jit
def f16_value(h):
    """IEEE half bits -> float32 (exact: built from the bits; a NaN is 0x7FC00000 with
    the half's sign)."""
    s = (np.int64(h) & 0x8000) << 16
    e = (h >> 10) & 0x1F
    m = np.int64(h) & 0x3FF
    if e == 0:
        v = f32(f32(m) * F_2M24)
        return -v if s else v
    if e == 31:
        return np.uint32(s | 0x7F800000 | (0x400000 if m else 0)).view(np.float32)
    return np.uint32(s | ((np.int64(e) + 112) << 23) | (m << 13)).view(np.float32)


@jit
def put_f16(out, i, o, v):
    """Store ``v`` as half at ``out[i, o:o+2]``; returns the stored value as float32."""
    h = f16_bits(v)
    out[i, o] = h & 0xFF
    out[i, o + 1] = h >> 8
    return f16_value(h)


if numba is not None:
    @_intrinsic
    def _f16_ext(typingctx, h):
        """IEEE half bits (the low 16 bits of an integer) -> float32: one ``fpext``
        (vcvtph2ps with F16C), exact for every half, subnormals included."""
        if not isinstance(h, _types.Integer):
            return None

        def codegen(context, builder, signature, args):
            bits = builder.trunc(args[0], ir.IntType(16)) if args[0].type.width > 16 else args[0]
            return builder.fpext(builder.bitcast(bits, ir.HalfType()), ir.FloatType())

        return _types.float32(h), codegen

    @jit
    def half(lo, hi):
        """fp16 bits (two bytes, little-endian) -> float32 (the dequantizers' hot path:
        the same value as :func:`f16_value`; a NaN keeps its payload, quieted)."""
        return _f16_ext(np.int64(lo) | (np.int64(hi) << 8))
else:  # pragma: no cover - never called: without numba no compiled kernel runs
    def half(lo, hi):
        return f32(np.array([lo | (hi << 8)], np.uint16).view(np.float16)[0])


@jit
def u16(r, o):
    return np.int64(r[o]) | (np.int64(r[o + 1]) << 8)


@jit
def u32(r, o):
    return np.int64(r[o]) | (np.int64(r[o + 1]) << 8) | (np.int64(r[o + 2]) << 16) | (np.int64(r[o + 3]) << 24)


# -- the dequantizers' output --------------------------------------------------------------
#
# A block function writes one block's float32 values into the output row with :func:`put`
# (float32, or float16 bits), or into a scratch row that :func:`emit` stores in one
# contiguous pass. Either way LLVM turns a loop into vector instructions (eight or
# sixteen conversions an instruction) only when its trip count is not a constant: a loop
# of a constant 16 or 32 is fully unrolled into scalar code instead (measured on Q8_0:
# 32 scalar ``vcvtps2ph``, against two 16-wide ones with the count passed in). So block
# functions take their lane count as an argument. Each family's numba module has the
# parallel loop that calls its block functions (in the same file, so that numba's disk
# cache, which is checked per file, is renewed with them).

if numba is not None:
    @_intrinsic
    def _f16_trunc(typingctx, v):
        """float32 -> IEEE half bits: one ``fptrunc`` (vcvtps2ph with F16C)."""
        if v != _types.float32:
            return None

        def codegen(context, builder, signature, args):
            return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

        return _types.uint16(_types.float32), codegen

    def emit(out, i, tmp):  # pragma: no cover - replaced by the overload below
        raise NotImplementedError

    def put(o, j, v):  # pragma: no cover - replaced by the overload below
        raise NotImplementedError

    @_overload(emit, jit_options=dict(OPTS))
    def _emit_impl(out, i, tmp):
        """Row ``i`` of ``out`` (float32, or float16 bits as uint16) from the float32 scratch ``tmp``."""
        if out.dtype == _types.uint16:
            def impl(out, i, tmp):
                o = out[i]
                for j in range(tmp.shape[0]):
                    o[j] = _f16_trunc(tmp[j])
        else:
            def impl(out, i, tmp):
                o = out[i]
                for j in range(tmp.shape[0]):
                    o[j] = tmp[j]
        return impl

    @_overload(put, jit_options=dict(OPTS), inline="always")
    def _put_impl(o, j, v):
        """``o[j] = v`` for a float32 output row, or its float16 bits for a uint16 one."""
        if o.dtype == _types.uint16:
            def impl(o, j, v):
                o[j] = _f16_trunc(v)
        else:
            def impl(o, j, v):
                o[j] = v
        return impl
else:  # pragma: no cover - never called: without numba no compiled kernel runs
    def emit(out, i, tmp):
        out[i] = tmp.astype(np.float16).view(np.uint16) if out.dtype == np.uint16 else tmp

    def put(o, j, v):
        o[j] = np.float16(v).view(np.uint16) if o.dtype == np.uint16 else v


@jit_inline
def put_nibble_levels(o, at, r, qs, n, d, levels):
    """The ``n`` bytes at ``r[qs:]`` as 4-bit codes into a lookup table (low nibbles
    first): ``o[at + j] = d * levels[lo_j]``, ``o[at + n + j] = d * levels[hi_j]`` (the
    IQ4 and FP4 dequantizers; ``n`` passed in, see above)."""
    for j in range(n):
        q = np.int32(r[qs + j])
        put(o, at + j, f32(d * levels[q & 0x0F]))
        put(o, at + n + j, f32(d * levels[q >> 4]))


# -- launching ----------------------------------------------------------------------------

_WORKQUEUE_LOCK = threading.Lock()
_layer: list = [None]  # the threading layer, known after the first parallel launch


def _set_threads() -> int:
    """As many numba threads as torch uses, for launches from this thread; returns
    torch's count, which :func:`launch` puts back after the kernel."""
    import torch

    torch_threads = torch.get_num_threads()
    threads = max(1, min(torch_threads, numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != threads:
        numba.set_num_threads(threads)
    return torch_threads


def _keep_torch_threads(torch_threads: int) -> None:
    """Starting numba's OpenMP pool (its first launch) resets the OpenMP thread count
    that torch reads: a user's ``torch.set_num_threads(1)`` would silently become every
    core, for torch and, from the next launch, for numba. Put torch's count back."""
    import torch

    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)


def launch(kernel, *args) -> None:
    """Run the parallel ``kernel(*args)``; launches take turns only under numba's
    workqueue layer (and for the first one, until the layer is known)."""
    torch_threads = _set_threads()
    if _layer[0] not in (None, "workqueue"):
        kernel(*args)
        _keep_torch_threads(torch_threads)
        return
    with _WORKQUEUE_LOCK:
        kernel(*args)
        if _layer[0] is None:
            try:
                _layer[0] = numba.threading_layer()
            except ValueError:  # no parallel region ran
                pass
    _keep_torch_threads(torch_threads)


def quantizer(kernel, type_size: int, leaves_to=None):
    """A quantizer ``fn(values) -> blocks`` (CPU float32 torch tensor (n, block_size) ->
    uint8 (n, type_size)) from the parallel ``kernel(x, out)`` on numpy arrays.

    With ``leaves_to`` (a type id) the kernel is ``kernel(x, out, redo)`` and may leave
    blocks to the torch quantizer of that format (the reference), marked in ``redo``:
    the rare blocks its fast path does not cover (non-finite weights)."""
    def quantize(blocks):
        import torch

        x = blocks.detach().contiguous().numpy()
        out = np.empty((x.shape[0], type_size), dtype=np.uint8)
        if x.shape[0] and leaves_to is None:
            launch(kernel, x, out)
        elif x.shape[0]:
            redo = np.zeros(x.shape[0], dtype=np.bool_)
            launch(kernel, x, out, redo)
            if redo.any():
                from .formats import get_format

                left = np.flatnonzero(redo)
                reference = get_format(leaves_to).kernels.quantize
                out[left] = reference(blocks.detach()[torch.from_numpy(left)].to(torch.float32)).numpy()
        return torch.from_numpy(out)

    return quantize


def dequantizer(drive, kind: int, chunk: int, table=None, ksign=None):
    """A dequantizer ``fn(blocks, block_size, dtype)`` (CPU uint8 torch tensor (n, type_size)
    -> (n, block_size) float32 or float16) from a family's parallel ``drive(b, out, chunk,
    kind, table, ksign)``; ``table()`` and ``ksign()`` give the lookup tables (a dummy
    is passed where there is none)."""
    def dequantize(blocks, block_size: int, dtype):
        import torch

        b = blocks.contiguous().numpy()
        out = np.empty((b.shape[0], block_size), dtype=np.uint16 if dtype == torch.float16 else np.float32)
        if b.shape[0]:
            launch(drive, b, out, chunk, kind, table() if table is not None else _DUMMY_TABLE,
                   ksign() if ksign is not None else _DUMMY_KSIGN)
        t = torch.from_numpy(out)
        return t.view(torch.float16) if dtype == torch.float16 else t

    return dequantize


_DUMMY_KSIGN = np.zeros(1, dtype=np.int64)
_DUMMY_TABLE = np.zeros(1, dtype=np.float32)
