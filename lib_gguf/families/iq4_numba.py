"""Compiled (numba) quantizers of IQ4_NL and IQ4_XS, on the layouts and levels of
:mod:`lib_gguf.families.iq4`: the same bytes as its torch quantizers (the
reference) and as ggml.

Speed: ggml finds each weight's nearest level by a binary search, whose branches a
CPU mispredicts about half the time. Here the nearest level is a count of
thresholds passed (:data:`THRESHOLDS`, found once, exactly, for ggml's float32
rule), which vectorizes; and the 16 candidate scales of a sub-block (the first
guess and 7 tries each side) are summed together, one lane each, so each lane's
sums are still added in element order, as in C.
"""
from __future__ import annotations

import numpy as np

from ..formats import GGMLType
from ..numba_support import F0, F1, F_EPS, f32, jit_inline, nearest_int, pjit, prange, put_f16, quantizer, signed_absmax
from .iq4 import IQ4_NL, IQ4_XS, LEVELS
from .legacy_numba import I32, first_abs_max

F32 = f32(32.0)
NTRY = 7                      # ggml's tries each side of the first scale
CHUNK = 16                    # blocks per work item (one scratch allocation each)
NL_D, NL_QS = IQ4_NL.d.offset, IQ4_NL.qs.offset
XS_D, XS_SCALES_H, XS_SCALES_L, XS_QS = IQ4_XS.d.offset, IQ4_XS.scales_h.offset, IQ4_XS.scales_l.offset, IQ4_XS.qs.offset


def level_thresholds(levels=LEVELS) -> np.ndarray:
    """T[k], k < 15: the least float32 ``v`` that ggml's best_index_int8 puts above level
    k, i.e. where ``f32(v - L[k]) < f32(L[k+1] - v)`` (keep the lower level) turns false.
    Both sides are monotonic in ``v``, so the rule is a threshold near the midpoint; the
    index of ``v`` is then the number of ``k`` with ``not v < T[k]`` (NaN: 15, as ggml)."""
    lv = np.asarray(levels, dtype=np.float32)
    out = np.empty(len(lv) - 1, dtype=np.float32)
    for k in range(len(lv) - 1):
        a, b = lv[k], lv[k + 1]

        def lower(v):
            return np.float32(v - a) < np.float32(b - v)

        v = np.float32((a + b) / np.float32(2))
        steps = 0
        while lower(v):                                   # up to the first "upper"
            v = np.nextafter(v, np.float32(np.inf))
            steps += 1
        while not lower(np.nextafter(v, np.float32(-np.inf))):
            v = np.nextafter(v, np.float32(-np.inf))      # down to the first "upper"
            steps += 1
        assert steps < 64 and a < v <= b
        out[k] = v
    return out


THRESHOLDS = level_thresholds()
LEVEL_0 = f32(LEVELS[0])
STEPS = np.diff(np.array(LEVELS, dtype=np.float32))        # level k+1 - level k, exact


@jit_inline
def level_index(v):
    """ggml's best_index_int8(LEVELS, v): the nearest level's index, the lower on a tie."""
    n = I32(0)
    for k in range(15):
        n = I32(n + I32(not v < THRESHOLDS[k]))
    return n


@jit_inline
def level_value(v):
    """LEVELS[level_index(v)] as float32 (sums of integers: exact in any order)."""
    q = LEVEL_0
    for k in range(15):
        q = f32(q + (F0 if v < THRESHOLDS[k] else STEPS[k]))
    return q


@jit_inline
def iq4_scale(x, fb, i, o, n, ntry, inv, sqx, sq2):
    """The scale ggml's quantize_row_iq4_nl_impl picks for ``x[i, o:o + n]`` (n = 32;
    weights x*x; ``ntry`` tries each side). ``inv``, ``sqx``, ``sq2``: scratch for the
    2*ntry + 2 candidates' inverse scales and sums (the first guess is candidate 0)."""
    mx, amax = first_abs_max(x, fb, i, o, n)
    if amax < F_EPS:
        return F0
    lanes = 2 * ntry + 2
    inv[0] = f32(F1 / f32(-mx / LEVEL_0))
    for t in range(1, lanes):
        inv[t] = f32(f32(t - 1 - ntry + LEVELS[0]) / mx)
    for t in range(lanes):
        sqx[t] = F0
        sq2[t] = F0
    for j in range(o, o + n):
        xj = x[i, j]
        w = f32(xj * xj)
        for t in range(lanes):
            q = level_value(f32(inv[t] * xj))
            wq = f32(w * q)
            sqx[t] = f32(sqx[t] + f32(wq * xj))
            sq2[t] = f32(sq2[t] + f32(wq * q))
    d = f32(sqx[0] / sq2[0])
    best = f32(d * sqx[0])
    for t in range(1, lanes):
        if sq2[t] > F0 and f32(sqx[t] * sqx[t]) > f32(best * sq2[t]):
            d = f32(sqx[t] / sq2[t])
            best = f32(d * sqx[t])
    return d


@jit_inline
def put_codes(x, i, o, half, idv, out, qs_off):
    """Codes of ``x[i, o:o + 2 * half]`` at inverse scale ``idv``: weight j and j + half
    share byte j at ``qs_off``."""
    for j in range(half):
        a = level_index(f32(idv * x[i, o + j]))
        b = level_index(f32(idv * x[i, o + half + j]))
        out[i, qs_off + j] = a | I32(b << I32(4))


@pjit
def _iq4_nl(x, out, ntry):
    fb = x.view(np.int32)
    n = x.shape[1]   # 32, from the array: LLVM vectorizes loops of unknown count, unrolls others
    lanes = 2 * ntry + 2
    for c in prange((x.shape[0] + CHUNK - 1) // CHUNK):
        inv = np.empty(lanes, dtype=np.float32)
        sqx = np.empty(lanes, dtype=np.float32)
        sq2 = np.empty(lanes, dtype=np.float32)
        for i in range(c * CHUNK, min(x.shape[0], c * CHUNK + CHUNK)):
            s = iq4_scale(x, fb, i, 0, n, ntry, inv, sqx, sq2)
            put_f16(out, i, NL_D, s)
            put_codes(x, i, 0, n // 2, f32(F1 / s) if s != F0 else F0, out, NL_QS)


@jit_inline
def _iq4_xs_block(x, fb, i, out, ntry, scales, inv, sqx, sq2):
    sub = x.shape[1] // 8   # 32
    for j in range(8):
        scales[j] = iq4_scale(x, fb, i, sub * j, sub, ntry, inv, sqx, sq2)
    max_scale = signed_absmax(scales)[0]
    d = f32(-max_scale / F32)
    put_f16(out, i, XS_D, d)
    idv = f32(F1 / d) if d != F0 else F0
    sh = 0
    for j in range(8):
        l = max(-32, min(31, nearest_int(f32(idv * scales[j]))))
        dl = f32(d * f32(l))
        put_codes(x, i, sub * j, sub // 2, f32(F1 / dl) if dl != F0 else F0, out, XS_QS + 16 * j)
        l += 32
        if j % 2 == 0:
            out[i, XS_SCALES_L + j // 2] = l & 0xF
        else:
            out[i, XS_SCALES_L + j // 2] |= (l & 0xF) << 4
        sh |= (l >> 4) << (2 * j)
    out[i, XS_SCALES_H] = sh & 0xFF
    out[i, XS_SCALES_H + 1] = sh >> 8


@pjit
def _iq4_xs(x, out, ntry):
    fb = x.view(np.int32)
    lanes = 2 * ntry + 2
    for c in prange((x.shape[0] + CHUNK - 1) // CHUNK):
        scales = np.empty(8, dtype=np.float32)
        inv = np.empty(lanes, dtype=np.float32)
        sqx = np.empty(lanes, dtype=np.float32)
        sq2 = np.empty(lanes, dtype=np.float32)
        for i in range(c * CHUNK, min(x.shape[0], c * CHUNK + CHUNK)):
            _iq4_xs_block(x, fb, i, out, ntry, scales, inv, sqx, sq2)


QUANTIZERS = {
    GGMLType.IQ4_NL: quantizer(lambda x, o: _iq4_nl(x, o, NTRY), IQ4_NL.size),
    GGMLType.IQ4_XS: quantizer(lambda x, o: _iq4_xs(x, o, NTRY), IQ4_XS.size),
}
DEQUANTIZERS: dict = {}
