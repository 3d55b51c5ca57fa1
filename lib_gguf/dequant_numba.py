"""Optional compiled dequantizers (numba) for CPU tensors, for the formats whose torch
kernels are slowest on a CPU (table lookups, many small passes): the lattice IQ
formats, the ternary formats and the FP4 formats.

Same values as the torch kernels in :mod:`lib_gguf.dequant_iq`, bit for bit: each
output is one float32 product of the block or sub-block scale and an exact table
value, stored as float32, or rounded once to float16 (the CPU's own conversion
instruction, round to nearest even, as torch rounds).

One parallel driver (:func:`_drive`) walks the blocks in chunks; a per-format block
function writes a block's float32 values into a scratch row, and :func:`_emit`
stores that row in one contiguous pass, which LLVM turns into vector conversions
(measured in this repository's development: TQ2_0 3x faster than storing element by
element, the lattice formats about 10%). Other output dtypes, other devices
and machines without numba take the torch kernels; the choice is
:func:`lib_gguf.backend.set_backend`'s, as for quantizing.
"""
from __future__ import annotations

import numpy as np

from .quant_numba import _LOCK, _OPTS, _f, _jit, _pjit, _set_threads, numba

if numba is not None:  # pragma: no branch
    from llvmlite import ir
    from numba import prange, types
    from numba.extending import intrinsic, overload
else:  # pragma: no cover
    prange = range

_CHUNK = 128  # 256-weight blocks a parallel work item


def available() -> bool:
    return numba is not None


if numba is not None:
    @intrinsic
    def _f16_bits(typingctx, v):
        """float32 -> IEEE half bits: one ``fptrunc`` (vcvtps2ph with F16C)."""
        if v != types.float32:
            return None

        def codegen(context, builder, signature, args):
            return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

        return types.uint16(types.float32), codegen

    def _emit(out, i, tmp):  # pragma: no cover - replaced by the overload below
        raise NotImplementedError

    @overload(_emit, jit_options=dict(_OPTS))
    def _emit_impl(out, i, tmp):
        """Row ``i`` of ``out`` from the float32 scratch ``tmp``: one contiguous pass
        that LLVM vectorizes (eight float16 conversions an instruction)."""
        if out.dtype == types.uint16:
            def impl(out, i, tmp):
                o = out[i]
                for j in range(tmp.shape[0]):
                    o[j] = _f16_bits(tmp[j])
        else:
            def impl(out, i, tmp):
                o = out[i]
                for j in range(tmp.shape[0]):
                    o[j] = tmp[j]
        return impl


@_pjit
def _drive(b, out, chunk, block, grid, ksign):
    """``block(b[i], tmp, grid, ksign)`` for every block, ``chunk`` blocks a work item,
    each block's values stored into ``out[i]`` (float32, or float16 bits as uint16)."""
    nb = b.shape[0]
    for c in prange((nb + chunk - 1) // chunk):
        tmp = np.empty(out.shape[1], np.float32)
        for i in range(c * chunk, min(nb, c * chunk + chunk)):
            block(b[i], tmp, grid, ksign)
            _emit(out, i, tmp)


@_jit
def _half(lo, hi):
    """fp16 bits (two bytes, little-endian) -> float32."""
    h = np.int64(lo) | (np.int64(hi) << 8)
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:
        v = np.float64(m) * 5.9604644775390625e-08           # 2**-24
    elif e == 31:
        v = np.inf if m == 0 else np.nan
    else:
        v = np.float64(m + 1024) * (2.0 ** (e - 25))
    return _f(-v if h & 0x8000 else v)


@_jit
def _u16(r, o):
    return np.int64(r[o]) | (np.int64(r[o + 1]) << 8)


@_jit
def _u32(r, o):
    return np.int64(r[o]) | (np.int64(r[o + 1]) << 8) | (np.int64(r[o + 2]) << 16) | (np.int64(r[o + 3]) << 24)


F_HALF = _f(0.5)
F_QUARTER = _f(0.25)
F_DELTA = _f(0.125)     # IQ1's grid shift


@_jit
def _put_signed(tmp, o, db, gr, s, n):
    """``tmp[o + j] = db * gr[j]``, negated where bit j of ``s`` is set, for j < n."""
    for j in range(n):
        v = _f(db * gr[j])
        tmp[o + j] = -v if (s >> j) & 1 else v


# Block functions: ``r`` is one block's bytes, ``tmp`` its float32 values; ``grid`` and
# ``ksign`` are the format's tables (a dummy where it has none). Row views (``r``,
# ``gr = grid[g]``) keep the indexing 1-D (measured: IQ1_M 2x faster than 2-D indexing).

@_jit
def _iq2_xxs(r, tmp, grid, ksign):
    d = _half(r[0], r[1])
    for ib in range(8):
        aux0 = _u32(r, 2 + 8 * ib)
        aux1 = _u32(r, 6 + 8 * ib)
        db = _f(_f(d * _f(F_HALF + _f(aux1 >> 28))) * F_QUARTER)
        for l in range(4):
            gr = grid[(aux0 >> (8 * l)) & 0xFF]
            s = ksign[(aux1 >> (7 * l)) & 0x7F]
            _put_signed(tmp, 32 * ib + 8 * l, db, gr, s, 8)


@_jit
def _iq2_scale(d, r, off, k2):
    """IQ2_XS / IQ2_S: the scale of 16-weight group ``k2``, from the 4-bit fields at ``off``."""
    sb = np.int64(r[off + k2 // 2])
    sc = (sb >> 4) if k2 % 2 else (sb & 0xF)
    return _f(_f(d * _f(F_HALF + _f(sc))) * F_QUARTER)


@_jit
def _iq2_xs(r, tmp, grid, ksign):
    d = _half(r[0], r[1])
    for k2 in range(16):
        db = _iq2_scale(d, r, 66, k2)
        for h in range(2):
            k = 2 * k2 + h
            q = _u16(r, 2 + 2 * k)
            gr = grid[q & 511]
            _put_signed(tmp, 8 * k, db, gr, ksign[q >> 9], 8)


@_jit
def _iq2_s(r, tmp, grid, ksign):
    d = _half(r[0], r[1])
    for k2 in range(16):
        db = _iq2_scale(d, r, 74, k2)
        qh = np.int64(r[66 + k2 // 2])
        for h in range(2):
            k = 2 * k2 + h
            gr = grid[np.int64(r[2 + k]) | (((qh >> (2 * (k % 4))) & 3) << 8)]
            _put_signed(tmp, 8 * k, db, gr, np.int64(r[34 + k]), 8)


@_jit
def _iq3_xxs(r, tmp, grid, ksign):
    d = _half(r[0], r[1])
    for ib in range(8):
        sc = _u32(r, 66 + 4 * ib)
        db = _f(_f(d * _f(F_HALF + _f(sc >> 28))) * F_HALF)
        for l in range(4):
            s = ksign[(sc >> (7 * l)) & 0x7F]
            for h in range(2):
                gr = grid[r[2 + 8 * ib + 2 * l + h]]
                _put_signed(tmp, 32 * ib + 8 * l + 4 * h, db, gr, s >> (4 * h), 4)


@_jit
def _iq3_s(r, tmp, grid, ksign):
    d = _half(r[0], r[1])
    for ib in range(8):
        sb = np.int64(r[106 + ib // 2])
        sc = (sb >> 4) if ib % 2 else (sb & 0xF)
        db = _f(d * _f(1 + 2 * sc))
        qh = np.int64(r[66 + ib])
        for t2 in range(4):
            sg = np.int64(r[74 + 4 * ib + t2])    # the sign nibbles of two grid points
            for h in range(2):
                t = 2 * t2 + h
                p = 8 * ib + t
                gr = grid[np.int64(r[2 + p]) | (((qh >> t) & 1) << 8)]
                _put_signed(tmp, 4 * p, db, gr, (sg >> (4 * h)) & 0xF, 4)


@_jit
def _iq1_s(r, tmp, grid, ksign):
    d = _half(r[0], r[1])
    for ib in range(8):
        qh = _u16(r, 34 + 2 * ib)
        dl = _f(d * _f(2 * ((qh >> 12) & 7) + 1))
        delta = F_DELTA if (qh & 0x8000) == 0 else -F_DELTA
        for l in range(4):
            gr = grid[np.int64(r[2 + 4 * ib + l]) | (((qh >> (3 * l)) & 7) << 8)]
            o = 32 * ib + 8 * l
            for j in range(8):
                tmp[o + j] = _f(dl * _f(gr[j] + delta))


@_jit
def _iq1_m(r, tmp, grid, ksign):
    # the block scale's 16 bits are the top nibbles of the four scale words
    dbits = (((_u16(r, 48) & 0xF000) >> 12) | ((_u16(r, 50) & 0xF000) >> 8)
             | ((_u16(r, 52) & 0xF000) >> 4) | (_u16(r, 54) & 0xF000))
    d = _half(dbits & 0xFF, dbits >> 8)
    for q4 in range(4):
        sw = _u16(r, 48 + 2 * q4)
        for g4 in range(4):
            g16 = 4 * q4 + g4
            dl = _f(d * _f(2 * ((sw >> (3 * g4)) & 7) + 1))
            qb = np.int64(r[32 + g16])
            for h in range(2):
                k = 2 * g16 + h
                nib = (qb >> (4 * h)) & 0xF
                gr = grid[np.int64(r[k]) | ((nib & 7) << 8)]
                delta = F_DELTA if (nib & 8) == 0 else -F_DELTA
                for j in range(8):
                    tmp[8 * k + j] = _f(dl * _f(gr[j] + delta))


@_jit
def _trit(q, p):
    """Base-3 digit of a TQ1_0 byte: multiplying by 3**k (mod 256) brings digit k to
    the top, and (x * 3) >> 8 reads it; minus one for the ternary value."""
    return _f((((q * p) & 0xFF) * 3 >> 8) - 1)


@_jit
def _trits_of(tmp, d, r, src, n, base, digits):
    """The first ``digits`` base-3 digits of bytes ``r[src:src + n]``: digit k of byte m
    to ``tmp[base + k * n + m]``, times ``d``."""
    for m in range(n):
        q = np.int64(r[src + m])
        p = 1
        for k in range(digits):
            tmp[base + k * n + m] = _f(d * _trit(q, p))
            p *= 3


@_jit
def _tq1_0(r, tmp, grid, ksign):
    d = _half(r[52], r[53])
    _trits_of(tmp, d, r, 0, 32, 0, 5)      # 32 bytes x 5 digits: weights 0-159
    _trits_of(tmp, d, r, 32, 16, 160, 5)   # 16 bytes x 5 digits: 160-239
    _trits_of(tmp, d, r, 48, 4, 240, 4)    # 4 bytes x 4 digits: 240-255


@_jit
def _tq2_0(r, tmp, grid, ksign):
    d = _half(r[64], r[65])
    for h in range(2):
        for m in range(32):
            q = np.int64(r[32 * h + m])
            tmp[128 * h + m] = _f(d * _f((q & 3) - 1))
            tmp[128 * h + 32 + m] = _f(d * _f(((q >> 2) & 3) - 1))
            tmp[128 * h + 64 + m] = _f(d * _f(((q >> 4) & 3) - 1))
            tmp[128 * h + 96 + m] = _f(d * _f((q >> 6) - 1))


E2M1 = np.array((0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12), dtype=np.float32)



def _e8m0_half_table():
    """UE8M0 scale byte -> 2**(e - 128), half its value (the E2M1 values are doubled), exact."""
    return np.array([np.ldexp(1.0, e - 128) for e in range(256)], dtype=np.float32)


def _ue4m3_half_table():
    """Unsigned E4M3 scale byte -> half its value (0 for 0x00 and the NaN code 0x7F), exact."""
    t = np.zeros(256, dtype=np.float32)
    for x in range(256):
        e, m = (x >> 3) & 0xF, x & 7
        if x in (0, 0x7F):
            continue
        t[x] = (m * 2.0 ** -9 if e == 0 else (1.0 + m / 8.0) * 2.0 ** (e - 7)) * 0.5
    return t


@_jit
def _mxfp4(r, tmp, scale, ksign):
    d = scale[r[0]]
    for j in range(16):
        q = np.int64(r[1 + j])
        tmp[j] = _f(d * E2M1[q & 0xF])
        tmp[16 + j] = _f(d * E2M1[q >> 4])


@_jit
def _nvfp4(r, tmp, scale, ksign):
    for s in range(4):
        d = scale[r[s]]
        for j in range(8):
            q = np.int64(r[4 + 8 * s + j])
            tmp[16 * s + j] = _f(d * E2M1[q & 0xF])
            tmp[16 * s + 8 + j] = _f(d * E2M1[q >> 4])


# -- dispatch ------------------------------------------------------------------------------

_TABLES: dict = {}


def _tables():
    """The lookup tables as numpy arrays (built once; called under ``_LOCK``)."""
    if not _TABLES:
        import torch

        from .grids import grid

        i = np.arange(128)
        par = np.zeros(128, dtype=np.int64)
        for k in range(7):
            par ^= (i >> k) & 1
        t = {"ksign": (i | (par << 7)).astype(np.int64)}
        for name in ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S"):
            t[name] = np.ascontiguousarray(grid(name, torch.device("cpu")).numpy())
        _TABLES.update(t)
    return _TABLES


_DUMMY = np.zeros((1, 1), dtype=np.float32)


def _kernels():
    """type id -> (block function, blocks a work item, grid or scale table, ksign)."""
    from .formats import GGMLType as T

    t = _tables()
    ks = t["ksign"]  # passed to every block function (those without sign tables ignore it)
    k = {int(tid): (fn, _CHUNK, t[g], ks) for tid, fn, g in (
        (T.IQ2_XXS, _iq2_xxs, "IQ2_XXS"), (T.IQ2_XS, _iq2_xs, "IQ2_XS"), (T.IQ2_S, _iq2_s, "IQ2_S"),
        (T.IQ3_XXS, _iq3_xxs, "IQ3_XXS"), (T.IQ3_S, _iq3_s, "IQ3_S"), (T.IQ1_S, _iq1_s, "IQ1_S"),
        (T.IQ1_M, _iq1_m, "IQ1_S"))}
    k[int(T.TQ1_0)] = (_tq1_0, _CHUNK, _DUMMY, ks)
    k[int(T.TQ2_0)] = (_tq2_0, _CHUNK, _DUMMY, ks)
    k[int(T.MXFP4)] = (_mxfp4, _CHUNK * 8, _e8m0_half_table(), ks)    # 32-weight blocks
    k[int(T.NVFP4)] = (_nvfp4, _CHUNK * 4, _ue4m3_half_table(), ks)   # 64-weight blocks
    return k


_KERNELS: dict = {}


def has_kernel(type_id: int) -> bool:
    if numba is None:
        return False
    if not _KERNELS:
        with _LOCK:  # two threads may ask first: the table is filled once, whole
            if not _KERNELS:
                _KERNELS.update(_kernels())
    return int(type_id) in _KERNELS


def run(type_id: int, blocks, block_size: int, dtype):
    """Dequantize ``blocks`` (a CPU uint8 torch tensor (n, type_size)) to ``dtype``
    (float16 or float32): a torch tensor (n, block_size)."""
    import torch

    b = blocks.contiguous().numpy()
    n = b.shape[0]
    out = np.empty((n, block_size), dtype=np.uint16 if dtype == torch.float16 else np.float32)
    if n:
        fn, chunk, grid, ksign = _KERNELS[int(type_id)]
        with _LOCK:  # the quantizers' lock: numba's workqueue layer takes one parallel launch at a time
            _set_threads()
            _drive(b, out, chunk, fn, grid, ksign)
    t = torch.from_numpy(out)
    return t.view(torch.float16) if dtype == torch.float16 else t
