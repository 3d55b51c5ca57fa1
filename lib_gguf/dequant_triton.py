"""Triton dequantizers for CUDA tensors: the 32-weight "legacy" formats and the K-quants
(the IQ, ternary and FP4 ones are in :mod:`lib_gguf.dequant_iq_triton`).

Each format is one ``@triton.jit`` function ``value(src, off, j, mask, tab)``: the
float32 value of weight ``j`` (0 <= j < block size) of the block whose first byte is
at byte offset ``off`` of ``src`` (uint8). :func:`run` (the whole tensor) and the fused
dequantize-matmul of :mod:`lib_gguf.linear_triton` (one weight tile at a time, in
registers) both call them.

Exactness: every value is computed in float32 with the same operations, in the same
order, as the torch kernels of :mod:`lib_gguf.dequant` / :mod:`lib_gguf.dequant_iq`
(the float16 scales widened exactly, integer codes converted exactly, then the same
float32 multiplications and additions), and kernels are compiled without
multiply-add contraction (``enable_fp_fusion=False``): float32 output equals the torch
kernels bit for bit. Float16 output is the float32 value rounded once to nearest
even; bfloat16 output is rounded to nearest even with integer operations here (the
same bits on a GPU and under Triton's CPU interpreter, whose own bfloat16 cast
truncates): both equal the torch kernels' float32 result cast to that dtype. NaN
payloads are not guaranteed (a NaN stays a NaN).

Under ``TRITON_INTERPRET=1`` these kernels run on CPU tensors too (slowly): that is
how the tests check them without a GPU.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Tuple

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


def usable_on(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of ``device``."""
    if triton is None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreting()


# type id -> (value function, table factory or None, block size, type size)
_SPECS: Dict[int, tuple] = {}


def register(type_id: int, fn, block_size: int, type_size: int,
             table: Optional[Callable[[torch.device], torch.Tensor]] = None) -> None:
    _SPECS[int(type_id)] = (fn, table, block_size, type_size)


def spec(type_id: int):
    _load_families()
    return _SPECS.get(int(type_id))


def has_kernel(type_id: int) -> bool:
    return triton is not None and spec(type_id) is not None


_families_loaded = [False]


def _load_families() -> None:
    if not _families_loaded[0] and triton is not None:
        _families_loaded[0] = True
        from . import dequant_iq_triton  # noqa: F401  (registers its formats)


_DUMMY: dict = {}
_TABLES: dict = {}


def table_for(type_id: int, device) -> torch.Tensor:
    """The format's lookup table on ``device`` (a one-element dummy when it has none)."""
    fn, table, _bs, _ts = spec(type_id)
    key = (int(type_id), str(device))
    t = _TABLES.get(key)
    if t is None:
        t = table(device) if table is not None else _DUMMY.get(str(device))
        if t is None:
            t = _DUMMY[str(device)] = torch.zeros(1, dtype=torch.float32, device=device)
        _TABLES[key] = t
    return t


_OUT_KIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

if triton is not None:
    # -- byte helpers ---------------------------------------------------------------

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

    # -- legacy formats (32 weights a block) ------------------------------------------

    @triton.jit
    def _nib32(src, off, j, mask, qs: tl.constexpr):
        """Legacy 4-bit code ``j``: low nibbles of the 16 bytes at ``qs``, then high."""
        return (u8(src, off + qs + (j % 16), mask) >> ((j // 16) * 4)) & 0x0F

    @triton.jit
    def _hbit32(src, off, j, mask, qh: tl.constexpr):
        """Bit ``j`` of the little-endian uint32 at ``qh``, as 0 or 16."""
        return ((u8(src, off + qh + j // 8, mask) >> (j % 8)) & 1) << 4

    @triton.jit
    def q4_0(src, off, j, mask, tab):
        d = f16f(src, off, mask)
        return (_nib32(src, off, j, mask, 2) - 8).to(tl.float32) * d

    @triton.jit
    def q4_1(src, off, j, mask, tab):
        d = f16f(src, off, mask)
        m = f16f(src, off + 2, mask)
        return _nib32(src, off, j, mask, 4).to(tl.float32) * d + m

    @triton.jit
    def q5_0(src, off, j, mask, tab):
        d = f16f(src, off, mask)
        q = _nib32(src, off, j, mask, 6) | _hbit32(src, off, j, mask, 2)
        return (q - 16).to(tl.float32) * d

    @triton.jit
    def q5_1(src, off, j, mask, tab):
        d = f16f(src, off, mask)
        m = f16f(src, off + 2, mask)
        q = _nib32(src, off, j, mask, 8) | _hbit32(src, off, j, mask, 4)
        return q.to(tl.float32) * d + m

    @triton.jit
    def q8_0(src, off, j, mask, tab):
        return i8f(src, off + 2 + j, mask) * f16f(src, off, mask)

    @triton.jit
    def q8_1(src, off, j, mask, tab):
        return i8f(src, off + 4 + j, mask) * f16f(src, off, mask)

    @triton.jit
    def q1_0(src, off, j, mask, tab):
        """Q1_0 (lib_gguf.dequant_q1): ``d`` where bit ``j`` of the 16 bytes at 2 is set, else ``-d``."""
        d = f16f(src, off, mask)
        return tl.where(((u8(src, off + 2 + j // 8, mask) >> (j % 8)) & 1) != 0, d, -d)

    # -- K-quants (256 weights a super-block) -------------------------------------------

    @triton.jit
    def _crumb(src, off, j, mask, qs: tl.constexpr):
        """2-bit code ``j`` of 64 bytes at ``qs``: 128 weights a 32-byte half, each byte
        holding weights l, l+32, l+64, l+96 of it in bits 0-1, 2-3, 4-5, 6-7."""
        return (u8(src, off + qs + (j // 128) * 32 + (j % 32), mask) >> (((j // 32) % 4) * 2)) & 0x03

    @triton.jit
    def q2_k(src, off, j, mask, tab):
        sc = u8(src, off + j // 16, mask)
        d = f16f(src, off + 80, mask)
        dmin = f16f(src, off + 82, mask)
        dl = d * (sc & 0x0F).to(tl.float32)
        ml = dmin * (sc >> 4).to(tl.float32)
        return _crumb(src, off, j, mask, 16).to(tl.float32) * dl - ml

    @triton.jit
    def q3_k(src, off, j, mask, tab):
        d = f16f(src, off + 108, mask)
        t = j // 16  # sub-block: 6-bit scale, low 4 bits in bytes 96..103, high 2 in 104..107
        lo = (u8(src, off + 96 + (t % 8), mask) >> ((t // 8) * 4)) & 0x0F
        hi = (u8(src, off + 104 + (t % 4), mask) >> ((t // 4) * 2)) & 0x03
        dl = d * ((lo | (hi << 4)) - 32).to(tl.float32)
        h = (u8(src, off + (j % 32), mask) >> (j // 32)) & 1
        q = (_crumb(src, off, j, mask, 32) | (h << 2)) - 4
        return q.to(tl.float32) * dl

    @triton.jit
    def _k_scale_min(src, off, sb, mask):
        """Q4_K / Q5_K: the 6-bit scale and min of sub-block ``sb`` (12 bytes at 4)."""
        i = sb % 4
        a = u8(src, off + 4 + i, mask)
        m = u8(src, off + 8 + i, mask)
        md = u8(src, off + 12 + i, mask)
        sc = tl.where(sb < 4, a & 0x3F, (md & 0x0F) | ((a >> 2) & 0x30))
        mn = tl.where(sb < 4, m & 0x3F, (md >> 4) | ((m >> 2) & 0x30))
        return sc, mn

    @triton.jit
    def _k_dl_ml(src, off, sb, mask):
        """Q4_K / Q5_K: sub-block ``sb``'s scale and offset, d * scale and dmin * min."""
        sc, mn = _k_scale_min(src, off, sb, mask)
        return f16f(src, off, mask) * sc.to(tl.float32), f16f(src, off + 2, mask) * mn.to(tl.float32)

    @triton.jit
    def q4_k(src, off, j, mask, tab):
        sb = j // 32
        dl, ml = _k_dl_ml(src, off, sb, mask)
        q = (u8(src, off + 16 + (j // 64) * 32 + (j % 32), mask) >> ((sb % 2) * 4)) & 0x0F
        return q.to(tl.float32) * dl - ml

    @triton.jit
    def q5_k(src, off, j, mask, tab):
        sb = j // 32
        dl, ml = _k_dl_ml(src, off, sb, mask)
        q = (u8(src, off + 48 + (j // 64) * 32 + (j % 32), mask) >> ((sb % 2) * 4)) & 0x0F
        q = q | (((u8(src, off + 16 + (j % 32), mask) >> sb) & 1) << 4)
        return q.to(tl.float32) * dl - ml

    @triton.jit
    def q6_k(src, off, j, mask, tab):
        d = f16f(src, off + 208, mask)
        dl = d * i8f(src, off + 192 + j // 16, mask)
        h = j // 128
        ql = (u8(src, off + h * 64 + (j % 64), mask) >> (((j // 64) % 2) * 4)) & 0x0F
        qh = (u8(src, off + 128 + h * 32 + (j % 32), mask) >> (((j // 32) % 4) * 2)) & 0x03
        return ((ql | (qh << 4)) - 32).to(tl.float32) * dl

    @triton.jit
    def q8_k(src, off, j, mask, tab):
        return i8f(src, off + 4 + j, mask) * f32f(src, off, mask)

    # -- the whole-tensor kernel ---------------------------------------------------------

    @triton.jit
    def _dequant_kernel(src, dst, n_blocks, tab, VALUE: tl.constexpr, BS: tl.constexpr, TS: tl.constexpr,
                        BP: tl.constexpr, OUT: tl.constexpr):
        """Blocks ``BP * pid .. BP * pid + BP - 1``: ``dst[b * BS + j] = value(b, j)``."""
        b = tl.program_id(0).to(tl.int64) * BP + tl.arange(0, BP)[:, None]
        j = tl.arange(0, BS)[None, :]
        mask = b < n_blocks
        v = VALUE(src, b * TS, j, mask, tab)
        o = dst + b * BS + j
        if OUT == 0:
            tl.store(o, v, mask=mask)
        elif OUT == 1:
            tl.store(o, v.to(tl.float16), mask=mask)
        else:
            tl.store(o, bf16_bits(v), mask=mask)

    from .formats import GGMLType as _T

    for _t, _fn in ((_T.Q4_0, q4_0), (_T.Q4_1, q4_1), (_T.Q5_0, q5_0), (_T.Q5_1, q5_1), (_T.Q8_0, q8_0),
                    (_T.Q8_1, q8_1), (_T.Q2_K, q2_k), (_T.Q3_K, q3_k), (_T.Q4_K, q4_k), (_T.Q5_K, q5_k),
                    (_T.Q6_K, q6_k), (_T.Q8_K, q8_k), (_T.Q1_0, q1_0)):
        from .formats import get_format as _gf

        register(_t, _fn, _gf(_t).block_size, _gf(_t).type_size)


# weights a program of the whole-tensor kernel writes
_WEIGHTS_PER_PROGRAM = 4096


def run(type_id: int, blocks: torch.Tensor, block_size: int, dtype: torch.dtype) -> torch.Tensor:
    """``(n_blocks, block_size)`` values of ``dtype`` (float32, float16 or bfloat16)
    from ``(n_blocks, type_size)`` uint8 blocks on a CUDA device (or the CPU, under
    the interpreter)."""
    fn, _table, bs, ts = spec(type_id)
    if bs != block_size or blocks.dim() != 2 or blocks.shape[1] != ts or blocks.dtype != torch.uint8:
        raise ValueError(f"expected uint8 blocks of shape (n, {ts}), got {blocks.dtype} {tuple(blocks.shape)}")
    kind = _OUT_KIND[dtype]
    nb = blocks.shape[0]
    out = torch.empty((nb, bs), dtype=dtype, device=blocks.device)
    if nb == 0:
        return out
    blocks = blocks.contiguous()
    bp = max(1, _WEIGHTS_PER_PROGRAM // bs)
    dst = out.view(torch.int16) if kind == 2 else out
    grid = (triton.cdiv(nb, bp),)
    with _device(blocks):
        _dequant_kernel[grid](blocks, dst, nb, table_for(type_id, blocks.device), VALUE=fn, BS=bs, TS=ts, BP=bp,
                              OUT=kind, enable_fp_fusion=False)
    return out


class _device:
    """``torch.cuda.device`` of a CUDA tensor (Triton launches on the current device)."""

    def __init__(self, t: torch.Tensor):
        self.ctx = torch.cuda.device(t.device) if t.device.type == "cuda" else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *a):
        if self.ctx is not None:
            self.ctx.__exit__(*a)
