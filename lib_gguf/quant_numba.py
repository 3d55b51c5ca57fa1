"""Optional compiled quantizers (numba), for CPU tensors: the same bytes as the
torch kernels and as ggml, at C speed.

The torch kernels must reproduce ggml's element-order float32 sums, so on a CPU
they run as many small vector steps and stay below ggml's scalar C. Here each
block is a plain loop, compiled by numba (a PyPI wheel: no toolchain for the user
to build) and spread over threads; nothing else changes. numba is optional:
``lib_gguf.quantize`` uses these kernels for CPU tensors when it imports and
compiles, and falls back to the torch kernels (with one logged warning) when it
does not. ``set_backend("torch")`` or ``LIB_GGUF_QUANT_BACKEND=torch`` turns them
off.

Float care, since numba types follow numpy's rules: every constant is a float32
global, ints are cast with ``_f`` before they meet a float, and division by zero
follows IEEE (``error_model="numpy"``), as in C. No fused multiply-add is formed
(numba leaves LLVM's fp-contract off without fastmath).
"""
from __future__ import annotations

import logging
import math
import threading

import numpy as np

log = logging.getLogger(__name__)

try:  # pragma: no cover - depends on the environment
    import numba
    from numba import njit, prange
except Exception:  # ImportError, or an llvmlite that does not load
    numba = None

_f = np.float32
F0 = _f(0.0)
F1 = _f(1.0)
F_HALF = _f(0.5)
F_TENTH = _f(0.1)
F_EPS = _f(1e-15)          # ggml's GROUP_MAX_EPS
F_MAGIC_LIMIT = _f(4194303.0)
F_MAGIC = _f(12582912.0)   # 1.5 * 2**23: ggml's nearest_int adds it
F32_ = _f(32.0)
F63 = _f(63.0)
F15 = _f(15.0)
F127 = _f(127.0)
F128 = _f(128.0)
IQ4NL = np.array((-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113), dtype=np.int8)
E2M1 = np.array((0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12), dtype=np.int8)

_OPTS = dict(cache=True, error_model="numpy", nogil=True)
_KERNELS: dict = {}


def available() -> bool:
    return numba is not None


if numba is not None:
    def _jit(fn):
        return njit(**_OPTS)(fn)

    def _pjit(fn):
        return njit(parallel=True, **_OPTS)(fn)
else:  # pragma: no cover
    def _jit(fn):
        return fn

    _pjit = _jit


# -- scalar helpers ----------------------------------------------------------------------

@_jit
def nearest_int(v):
    """ggml's nearest_int: add 1.5 * 2**23 in float32 and read the low mantissa bits.
    Below 2**22 in magnitude that is round-half-to-even; beyond it (never in
    practice) the same bits are reproduced arithmetically."""
    if abs(v) < F_MAGIC_LIMIT:
        return int(np.rint(v))
    val = _f(v + F_MAGIC)
    a = abs(float(val))
    if val != val:
        return 0                      # a NaN's mantissa field is 0x400000
    if a == math.inf or a == 0.0:
        return -0x400000
    m, e = math.frexp(a)              # a = m * 2**e; field = m * 2**24 - 2**23 for normals
    return int(m * 16777216.0) - 0x800000 - 0x400000


@_jit
def roundf(v):
    """C's roundf: half away from zero."""
    t = np.trunc(v)
    if abs(v - t) == F_HALF:
        return t + (F1 if v > 0 else -F1)
    return np.rint(v)


@_jit
def f16_bits(v):
    """float32 -> IEEE half bits, round to nearest even (as F16C does)."""
    a = abs(float(v))
    s = 0x8000 if (v < 0 or (v == 0 and math.copysign(1.0, v) < 0)) else 0
    if a != a:
        return s | 0x7E00
    if a >= 65520.0:
        return s | 0x7C00
    if a < 6.103515625e-05:           # 2**-14: a subnormal half (or 2**-14 itself)
        return s | int(np.rint(a * 16777216.0))
    m, e = math.frexp(a)
    q = int(np.rint(m * 2048.0))       # 11 significant bits
    if q == 2048:
        q = 1024
        e += 1
    return s | ((e + 14) << 10) | (q - 1024)


@_jit
def f16_value(h):
    """IEEE half bits -> float32."""
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:
        v = math.ldexp(float(m), -24)
    elif e == 31:
        v = math.inf if m == 0 else math.nan
    else:
        v = math.ldexp(float(m + 1024), e - 25)
    return _f(-v if h & 0x8000 else v)


@_jit
def put_f16(out, i, o, v):
    """Store ``v`` as half at ``out[i, o:o+2]``; returns the stored value as float32."""
    h = f16_bits(v)
    out[i, o] = h & 0xFF
    out[i, o + 1] = h >> 8
    return f16_value(h)


def _chunks(n: int) -> int:
    return max(1, min(n, 64))


# -- legacy formats ----------------------------------------------------------------------

@_pjit
def _q8_0(x, out):
    nb = x.shape[0]
    for i in prange(nb):
        amax = F0
        for j in range(32):
            v = abs(x[i, j])
            if v > amax:
                amax = v
        d = _f(amax / F127)
        idv = _f(F1 / d) if d != F0 else F0
        put_f16(out, i, 0, d)
        for j in range(32):
            q = int(roundf(_f(x[i, j] * idv)))
            out[i, 2 + j] = q & 0xFF


@_pjit
def _q_sym(x, out, bits):
    """Q4_0 (bits 4) and Q5_0 (bits 5)."""
    nb = x.shape[0]
    half = 1 << (bits - 1)
    fhalf = _f(half)
    off = _f(_f(half) + F_HALF)
    top = 2 * half - 1
    for i in prange(nb):
        amax = F0
        mx = F0
        for j in range(32):
            v = x[i, j]
            if amax < abs(v):
                amax = abs(v)
                mx = v
        d = _f(mx / -fhalf)
        idv = _f(F1 / d) if d != F0 else F0
        put_f16(out, i, 0, d)
        qh = 0
        o = 2 if bits == 4 else 6
        for j in range(16):
            a = min(top, int(_f(_f(x[i, j] * idv) + off)))
            b = min(top, int(_f(_f(x[i, 16 + j] * idv) + off)))
            out[i, o + j] = (a & 0xF) | ((b & 0xF) << 4)
            qh |= ((a >> 4) & 1) << j
            qh |= ((b >> 4) & 1) << (j + 16)
        if bits == 5:
            for k in range(4):
                out[i, 2 + k] = (qh >> (8 * k)) & 0xFF


@_pjit
def _q_asym(x, out, bits):
    """Q4_1 (bits 4) and Q5_1 (bits 5)."""
    nb = x.shape[0]
    fl = _f((1 << bits) - 1)
    for i in prange(nb):
        lo = x[i, 0]
        hi = x[i, 0]
        for j in range(1, 32):
            v = x[i, j]
            if v < lo:
                lo = v
            if v > hi:
                hi = v
        d = _f(_f(hi - lo) / fl)
        idv = _f(F1 / d) if d != F0 else F0
        put_f16(out, i, 0, d)
        put_f16(out, i, 2, lo)
        qh = 0
        o = 4 if bits == 4 else 8
        for j in range(16):
            a = int(_f(_f(_f(x[i, j] - lo) * idv) + F_HALF))
            b = int(_f(_f(_f(x[i, 16 + j] - lo) * idv) + F_HALF))
            if bits == 4:
                a = min(15, a)
                b = min(15, b)
            out[i, o + j] = (a & 0xF) | ((b & 0xF) << 4)
            qh |= ((a >> 4) & 1) << j
            qh |= ((b >> 4) & 1) << (j + 16)
        if bits == 5:
            for k in range(4):
                out[i, 4 + k] = (qh >> (8 * k)) & 0xFF


# -- K-quants ----------------------------------------------------------------------------

@_jit
def make_qkx2(x, w, nmax, rmin, rdelta, nstep, use_mad, L, Laux):
    """ggml's make_qkx2_quants over the sub-block ``x`` with weights ``w``: fills ``L``,
    returns (scale, -min)."""
    n = x.shape[0]
    fn = _f(nmax)
    mn = x[0]
    mx = x[0]
    sum_w = w[0]
    sum_x = _f(sum_w * x[0])
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        sum_w = _f(sum_w + w[i])
        sum_x = _f(sum_x + _f(w[i] * x[i]))
    if mn > F0:
        mn = F0
    if mx == mn:
        for i in range(n):
            L[i] = 0
        return F0, _f(-mn)
    iscale = _f(fn / _f(mx - mn))
    scale = _f(F1 / iscale)
    best_mad = F0
    for i in range(n):
        l = max(0, min(nmax, nearest_int(_f(iscale * _f(x[i] - mn)))))
        L[i] = l
        diff = _f(_f(_f(scale * _f(l)) + mn) - x[i])
        diff = abs(diff) if use_mad else _f(diff * diff)
        best_mad = _f(best_mad + _f(w[i] * diff))
    for step in range(nstep + 1):
        iscale = _f(_f(_f(rmin + _f(rdelta * _f(step))) + fn) / _f(mx - mn))
        sum_l = F0
        sum_l2 = F0
        sum_xl = F0
        for i in range(n):
            l = max(0, min(nmax, nearest_int(_f(iscale * _f(x[i] - mn)))))
            Laux[i] = l
            wl = _f(w[i] * _f(l))
            sum_l = _f(sum_l + wl)
            sum_l2 = _f(sum_l2 + _f(wl * _f(l)))
            sum_xl = _f(sum_xl + _f(wl * x[i]))
        D = _f(_f(sum_w * sum_l2) - _f(sum_l * sum_l))
        if D > F0:
            this_scale = _f(_f(_f(sum_w * sum_xl) - _f(sum_x * sum_l)) / D)
            this_min = _f(_f(_f(sum_l2 * sum_x) - _f(sum_l * sum_xl)) / D)
            if this_min > F0:
                this_min = F0
                this_scale = _f(sum_xl / sum_l2)
            mad = F0
            for i in range(n):
                diff = _f(_f(_f(this_scale * _f(Laux[i])) + this_min) - x[i])
                diff = abs(diff) if use_mad else _f(diff * diff)
                mad = _f(mad + _f(w[i] * diff))
            if mad < best_mad:
                for i in range(n):
                    L[i] = Laux[i]
                best_mad = mad
                scale = this_scale
                mn = this_min
    return scale, _f(-mn)


@_jit
def _pack_k_scale(sc, j, ls, lm):
    if j < 4:
        sc[j] = ls
        sc[j + 4] = lm
    else:
        sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
        sc[j - 4] |= (ls >> 4) << 6
        sc[j] |= (lm >> 4) << 6


@_jit
def _k_scale_min(sc, j):
    if j < 4:
        return sc[j] & 63, sc[j + 4] & 63
    return (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)


@_pjit
def _q45_k(x, out, nmax, rmin, nstep):
    """Q4_K (nmax 15) and Q5_K (nmax 31): 8 sub-blocks of 32 with 6-bit scales and mins."""
    nb = x.shape[0]
    nchunk = (nb + 15) // 16
    for c in prange(nchunk):
        L = np.empty(256, dtype=np.int64)
        Laux = np.empty(32, dtype=np.int64)
        w = np.empty(32, dtype=np.float32)
        scales = np.empty(8, dtype=np.float32)
        mins = np.empty(8, dtype=np.float32)
        sc = np.zeros(12, dtype=np.int64)
        for i in range(c * 16, min(nb, c * 16 + 16)):
            xb = x[i]
            max_scale = F0
            max_min = F0
            for j in range(8):
                sx2 = F0
                for k in range(32):
                    v = xb[32 * j + k]
                    sx2 = _f(sx2 + _f(v * v))
                av_x = np.sqrt(_f(sx2 / F32_))
                for k in range(32):
                    w[k] = _f(av_x + abs(xb[32 * j + k]))
                s, m = make_qkx2(xb[32 * j:32 * j + 32], w, nmax, rmin, F_TENTH, nstep, False,
                                 L[32 * j:32 * j + 32], Laux)
                scales[j] = s
                mins[j] = m
                if s > max_scale:
                    max_scale = s
                if m > max_min:
                    max_min = m
            inv_scale = _f(F63 / max_scale) if max_scale > F0 else F0
            inv_min = _f(F63 / max_min) if max_min > F0 else F0
            for k in range(12):
                sc[k] = 0
            for j in range(8):
                ls = min(63, nearest_int(_f(inv_scale * scales[j])) & 0xFF)
                lm = min(63, nearest_int(_f(inv_min * mins[j])) & 0xFF)
                _pack_k_scale(sc, j, ls, lm)
            d = put_f16(out, i, 0, _f(max_scale / F63))
            dmin = put_f16(out, i, 2, _f(max_min / F63))
            for k in range(12):
                out[i, 4 + k] = sc[k]
            for j in range(8):
                si, mi = _k_scale_min(sc, j)
                dd = _f(d * _f(si))
                if dd == F0:
                    continue
                dm = _f(dmin * _f(mi))
                for k in range(32):
                    L[32 * j + k] = max(0, min(nmax, nearest_int(_f(_f(xb[32 * j + k] + dm) / dd))))
            if nmax == 15:
                for g in range(4):
                    for k in range(32):
                        out[i, 16 + 32 * g + k] = L[64 * g + k] | (L[64 * g + 32 + k] << 4)
            else:
                for k in range(32):
                    out[i, 16 + k] = 0
                for g in range(4):
                    for k in range(32):
                        l1 = L[64 * g + k]
                        l2 = L[64 * g + 32 + k]
                        h = 0
                        if l1 > 15:
                            l1 -= 16
                            h |= 1 << (2 * g)
                        if l2 > 15:
                            l2 -= 16
                            h |= 2 << (2 * g)
                        out[i, 16 + k] |= h
                        out[i, 48 + 32 * g + k] = l1 | (l2 << 4)


@_jit
def make_qx(x, nmax, L):
    """ggml's make_qx_quants with rmse_type 1 (weights x*x): fills ``L`` with
    0..2*nmax-1, returns the scale."""
    n = x.shape[0]
    fn = _f(nmax)
    mx = F0
    amax = F0
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < F_EPS:
        for i in range(n):
            L[i] = 0
        return F0
    iscale = _f(-fn / mx)
    sumlx = F0
    suml2 = F0
    for i in range(n):
        l = max(-nmax, min(nmax - 1, nearest_int(_f(iscale * x[i]))))
        L[i] = l + nmax
        w = _f(x[i] * x[i])
        sumlx = _f(sumlx + _f(_f(w * x[i]) * _f(l)))
        suml2 = _f(suml2 + _f(_f(w * _f(l)) * _f(l)))
    scale = _f(sumlx / suml2) if suml2 != F0 else F0
    best = _f(scale * sumlx)
    for s in range(-9, 10):
        if s == 0:
            continue
        iscale = _f(-_f(fn + _f(F_TENTH * _f(s))) / mx)
        sumlx = F0
        suml2 = F0
        for i in range(n):
            l = max(-nmax, min(nmax - 1, nearest_int(_f(iscale * x[i]))))
            w = _f(x[i] * x[i])
            sumlx = _f(sumlx + _f(_f(w * x[i]) * _f(l)))
            suml2 = _f(suml2 + _f(_f(w * _f(l)) * _f(l)))
        if suml2 > F0 and _f(sumlx * sumlx) > _f(best * suml2):
            for i in range(n):
                L[i] = nmax + max(-nmax, min(nmax - 1, nearest_int(_f(iscale * x[i]))))
            scale = _f(sumlx / suml2)
            best = _f(scale * sumlx)
    return scale


@_pjit
def _q6_k(x, out):
    nb = x.shape[0]
    nchunk = (nb + 15) // 16
    for c in prange(nchunk):
        L = np.empty(256, dtype=np.int64)
        scales = np.empty(16, dtype=np.float32)
        for i in range(c * 16, min(nb, c * 16 + 16)):
            xb = x[i]
            max_scale = F0
            max_abs = F0
            for j in range(16):
                s = make_qx(xb[16 * j:16 * j + 16], 32, L[16 * j:16 * j + 16])
                scales[j] = s
                if abs(s) > max_abs:
                    max_abs = abs(s)
                    max_scale = s
            if max_abs < F_EPS:
                for k in range(210):
                    out[i, k] = 0
                continue
            iscale = _f(-F128 / max_scale)
            d = put_f16(out, i, 208, _f(F1 / iscale))
            for j in range(16):
                q = min(127, nearest_int(_f(iscale * scales[j])))
                out[i, 192 + j] = q & 0xFF
                dd = _f(d * _f(q))
                if dd == F0:
                    continue
                for k in range(16):
                    L[16 * j + k] = 32 + max(-32, min(31, nearest_int(_f(xb[16 * j + k] / dd))))
            for h in range(2):
                for k in range(32):
                    a = L[128 * h + k]
                    b = L[128 * h + 32 + k]
                    c2 = L[128 * h + 64 + k]
                    e = L[128 * h + 96 + k]
                    out[i, 64 * h + k] = (a & 0xF) | ((c2 & 0xF) << 4)
                    out[i, 64 * h + 32 + k] = (b & 0xF) | ((e & 0xF) << 4)
                    out[i, 128 + 32 * h + k] = (a >> 4) | ((b >> 4) << 2) | ((c2 >> 4) << 4) | ((e >> 4) << 6)


@_pjit
def _q2_k(x, out):
    nb = x.shape[0]
    nchunk = (nb + 15) // 16
    for c in prange(nchunk):
        L = np.empty(256, dtype=np.int64)
        Laux = np.empty(16, dtype=np.int64)
        w = np.empty(16, dtype=np.float32)
        scales = np.empty(16, dtype=np.float32)
        mins = np.empty(16, dtype=np.float32)
        for i in range(c * 16, min(nb, c * 16 + 16)):
            xb = x[i]
            max_scale = F0
            max_min = F0
            for j in range(16):
                for k in range(16):
                    w[k] = abs(xb[16 * j + k])
                s, m = make_qkx2(xb[16 * j:16 * j + 16], w, 3, _f(-0.5), F_TENTH, 15, True,
                                 L[16 * j:16 * j + 16], Laux)
                scales[j] = s
                mins[j] = m
                if s > max_scale:
                    max_scale = s
                if m > max_min:
                    max_min = m
            if max_scale > F0:
                iscale = _f(F15 / max_scale)
                for j in range(16):
                    out[i, j] = nearest_int(_f(iscale * scales[j])) & 0xFF
                d = put_f16(out, i, 80, _f(max_scale / F15))
            else:
                for j in range(16):
                    out[i, j] = 0
                d = put_f16(out, i, 80, F0)
            if max_min > F0:
                iscale = _f(F15 / max_min)
                for j in range(16):
                    out[i, j] = (out[i, j] | (nearest_int(_f(iscale * mins[j])) << 4)) & 0xFF
                dmin = put_f16(out, i, 82, _f(max_min / F15))
            else:
                dmin = put_f16(out, i, 82, F0)
            for j in range(16):
                dd = _f(d * _f(out[i, j] & 0xF))
                if dd == F0:
                    continue
                dm = _f(dmin * _f(out[i, j] >> 4))
                for k in range(16):
                    L[16 * j + k] = max(0, min(3, nearest_int(_f(_f(xb[16 * j + k] + dm) / dd))))
            for h in range(2):
                for k in range(32):
                    out[i, 16 + 32 * h + k] = (L[128 * h + k] | (L[128 * h + 32 + k] << 2)
                                               | (L[128 * h + 64 + k] << 4) | (L[128 * h + 96 + k] << 6))


@_jit
def make_q3(x, nmax, L):
    """ggml's make_q3_quants with do_rmse: fills ``L`` with 0..2*nmax-1, returns the scale."""
    n = x.shape[0]
    mx = F0
    amax = F0
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < F_EPS:
        for i in range(n):
            L[i] = 0
        return F0
    iscale = _f(-_f(nmax) / mx)
    sumlx = F0
    suml2 = F0
    for i in range(n):
        l = max(-nmax, min(nmax - 1, nearest_int(_f(iscale * x[i]))))
        L[i] = l
        w = _f(x[i] * x[i])
        sumlx = _f(sumlx + _f(_f(w * x[i]) * _f(l)))
        suml2 = _f(suml2 + _f(_f(w * _f(l)) * _f(l)))
    for _ in range(5):
        changed = 0
        for i in range(n):
            w = _f(x[i] * x[i])
            li = _f(L[i])
            slx = _f(sumlx - _f(_f(w * x[i]) * li))
            if slx > F0:
                sl2 = _f(suml2 - _f(_f(w * li) * li))
                new_l = max(-nmax, min(nmax - 1, nearest_int(_f(_f(x[i] * sl2) / slx))))
                if new_l != L[i]:
                    fl = _f(new_l)
                    slx = _f(slx + _f(_f(w * x[i]) * fl))
                    sl2 = _f(sl2 + _f(_f(w * fl) * fl))
                    if sl2 > F0 and _f(_f(slx * slx) * suml2) > _f(_f(sumlx * sumlx) * sl2):
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        changed += 1
        if changed == 0:
            break
    for i in range(n):
        L[i] += nmax
    return _f(sumlx / suml2)


@_pjit
def _q3_k(x, out):
    nb = x.shape[0]
    nchunk = (nb + 15) // 16
    for c in prange(nchunk):
        L = np.empty(256, dtype=np.int64)
        scales = np.empty(16, dtype=np.float32)
        for i in range(c * 16, min(nb, c * 16 + 16)):
            xb = x[i]
            amax = F0
            max_scale = F0
            for j in range(16):
                s = make_q3(xb[16 * j:16 * j + 16], 4, L[16 * j:16 * j + 16])
                scales[j] = s
                if abs(s) > amax:
                    amax = abs(s)
                    max_scale = s
            for k in range(12):
                out[i, 96 + k] = 0
            if max_scale != F0:
                iscale = _f(-F32_ / max_scale)
                for j in range(16):
                    l = max(-32, min(31, nearest_int(_f(iscale * scales[j])))) + 32
                    if j < 8:
                        out[i, 96 + j] = l & 0xF
                    else:
                        out[i, 96 + j - 8] |= (l & 0xF) << 4
                    out[i, 104 + j % 4] |= (l >> 4) << (2 * (j // 4))
                d = put_f16(out, i, 108, _f(F1 / iscale))
            else:
                d = put_f16(out, i, 108, F0)
            for j in range(16):
                lo4 = np.int64(out[i, 96 + j]) & 0xF if j < 8 else np.int64(out[i, 96 + j - 8]) >> 4
                sv = (lo4 | (((np.int64(out[i, 104 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32
                dd = _f(d * _f(sv))
                if dd == F0:
                    continue
                for k in range(16):
                    L[16 * j + k] = 4 + max(-4, min(3, nearest_int(_f(xb[16 * j + k] / dd))))
            for k in range(32):
                out[i, k] = 0
            for j in range(256):
                if L[j] > 3:
                    out[i, j % 32] |= 1 << (j // 32)
                    L[j] -= 4
            for h in range(2):
                for k in range(32):
                    out[i, 32 + 32 * h + k] = (L[128 * h + k] | (L[128 * h + 32 + k] << 2)
                                               | (L[128 * h + 64 + k] << 4) | (L[128 * h + 96 + k] << 6))


# -- IQ4_NL / IQ4_XS, ternary, MXFP4 -----------------------------------------------------

@_jit
def best_index_int8(val, v):
    """ggml's best_index_int8: the nearest of the sorted levels ``val``, the lower on a tie."""
    n = val.shape[0]
    if v <= _f(val[0]):
        return 0
    if v >= _f(val[n - 1]):
        return n - 1
    ml = 0
    mu = n - 1
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if v < _f(val[mav]):
            mu = mav
        else:
            ml = mav
    return mu - 1 if _f(v - _f(val[mu - 1])) < _f(_f(val[mu]) - v) else mu


@_jit
def iq4_scale(x, ntry):
    """The scale ggml's quantize_row_iq4_nl_impl picks for one 32-weight sub-block
    (weights x*x, ``ntry`` tries each side)."""
    amax = F0
    mx = F0
    for j in range(32):
        ax = abs(x[j])
        if ax > amax:
            amax = ax
            mx = x[j]
    if amax < F_EPS:
        return F0
    v0 = _f(IQ4NL[0])
    d = _f(-mx / v0)
    idv = _f(F1 / d)
    sumqx = F0
    sumq2 = F0
    for j in range(32):
        q = _f(IQ4NL[best_index_int8(IQ4NL, _f(idv * x[j]))])
        w = _f(x[j] * x[j])
        wq = _f(w * q)
        sumqx = _f(sumqx + _f(wq * x[j]))
        sumq2 = _f(sumq2 + _f(wq * q))
    d = _f(sumqx / sumq2)
    best = _f(d * sumqx)
    for t in range(-ntry, ntry + 1):
        idv = _f(_f(t + np.int64(IQ4NL[0])) / mx)
        sumqx = F0
        sumq2 = F0
        for j in range(32):
            q = _f(IQ4NL[best_index_int8(IQ4NL, _f(idv * x[j]))])
            w = _f(x[j] * x[j])
            wq = _f(w * q)
            sumqx = _f(sumqx + _f(wq * x[j]))
            sumq2 = _f(sumq2 + _f(wq * q))
        if sumq2 > F0 and _f(sumqx * sumqx) > _f(best * sumq2):
            d = _f(sumqx / sumq2)
            best = _f(d * sumqx)
    return d


@_pjit
def _iq4_nl(x, out):
    nb = x.shape[0]
    for i in prange(nb):
        s = iq4_scale(x[i], 7)
        put_f16(out, i, 0, s)
        idv = _f(F1 / s) if s != F0 else F0
        for j in range(16):
            a = best_index_int8(IQ4NL, _f(idv * x[i, j]))
            b = best_index_int8(IQ4NL, _f(idv * x[i, 16 + j]))
            out[i, 2 + j] = a | (b << 4)


@_pjit
def _iq4_xs(x, out):
    nb = x.shape[0]
    nchunk = (nb + 15) // 16
    for c in prange(nchunk):
        scales = np.empty(8, dtype=np.float32)
        for i in range(c * 16, min(nb, c * 16 + 16)):
            xb = x[i]
            amax = F0
            max_scale = F0
            for j in range(8):
                s = iq4_scale(xb[32 * j:32 * j + 32], 7)
                scales[j] = s
                if abs(s) > amax:
                    amax = abs(s)
                    max_scale = s
            d = _f(-max_scale / F32_)
            put_f16(out, i, 0, d)
            idv = _f(F1 / d) if d != F0 else F0
            sh = 0
            for j in range(8):
                l = max(-32, min(31, nearest_int(_f(idv * scales[j]))))
                dl = _f(d * _f(l))
                idl = _f(F1 / dl) if dl != F0 else F0
                for k in range(16):
                    a = best_index_int8(IQ4NL, _f(idl * xb[32 * j + k]))
                    b = best_index_int8(IQ4NL, _f(idl * xb[32 * j + 16 + k]))
                    out[i, 8 + 16 * j + k] = a | (b << 4)
                l += 32
                if j % 2 == 0:
                    out[i, 4 + j // 2] = l & 0xF
                else:
                    out[i, 4 + j // 2] |= (l & 0xF) << 4
                sh |= (l >> 4) << (2 * j)
            out[i, 2] = sh & 0xFF
            out[i, 3] = sh >> 8


@_jit
def _absmax(x):
    amax = F0
    for j in range(x.shape[0]):
        v = abs(x[j])
        if v > amax:
            amax = v
    return amax


@_pjit
def _tq1_0(x, out):
    nb = x.shape[0]
    for i in prange(nb):
        xb = x[i]
        d = _absmax(xb)
        idv = _f(F1 / d) if d != F0 else F0
        put_f16(out, i, 52, d)
        for m in range(32):          # 5 trits a byte over the first 160 weights
            q = 0
            for n in range(5):
                q = q * 3 + int(roundf(_f(xb[m + 32 * n] * idv))) + 1
            out[i, m] = (q * 256 + 242) // 243
        for m in range(16):          # then 5 a byte over the next 80
            q = 0
            for n in range(5):
                q = q * 3 + int(roundf(_f(xb[160 + m + 16 * n] * idv))) + 1
            out[i, 32 + m] = (q * 256 + 242) // 243
        for j in range(4):           # and 4 a byte over the last 16, shifted to the top trit
            q = 0
            for m in range(4):
                q = q * 3 + int(roundf(_f(xb[240 + j + 4 * m] * idv))) + 1
            q *= 3
            out[i, 48 + j] = (q * 256 + 242) // 243


@_pjit
def _tq2_0(x, out):
    nb = x.shape[0]
    for i in prange(nb):
        xb = x[i]
        d = _absmax(xb)
        idv = _f(F1 / d) if d != F0 else F0
        put_f16(out, i, 64, d)
        for h in range(2):
            for m in range(32):
                q = 0
                for n in range(4):
                    t = int(roundf(_f(xb[128 * h + m + 32 * n] * idv))) + 1
                    q |= (t & 3) << (2 * n)
                out[i, 32 * h + m] = q


@_pjit
def _mxfp4(x, out):
    nb = x.shape[0]
    for i in prange(nb):
        xb = x[i]
        amax = _absmax(xb)
        e = 0
        if amax > F0:
            _, ex = math.frexp(float(amax))      # floor(log2(amax)) = ex - 1
            e = max(0, min(255, ex - 1 - 2 + 127))
        out[i, 0] = e
        d = _f(math.ldexp(1.0, e - 128))         # 2**(e-128): half the E8M0 value
        for j in range(16):
            a = 0
            b = 0
            ea = abs(_f(_f(E2M1[0]) * d) - xb[j])
            eb = abs(_f(_f(E2M1[0]) * d) - xb[16 + j])
            for k in range(1, 16):
                lv = _f(_f(E2M1[k]) * d)
                err = abs(_f(lv - xb[j]))
                if err < ea:
                    a = k
                    ea = err
                err = abs(_f(lv - xb[16 + j]))
                if err < eb:
                    b = k
                    eb = err
            out[i, 1 + j] = a | (b << 4)


# -- dispatch ------------------------------------------------------------------------------

def _table():
    from .formats import GGMLType as T

    return {
        int(T.Q8_0): _q8_0,
        int(T.Q4_0): lambda x, o: _q_sym(x, o, 4),
        int(T.Q5_0): lambda x, o: _q_sym(x, o, 5),
        int(T.Q4_1): lambda x, o: _q_asym(x, o, 4),
        int(T.Q5_1): lambda x, o: _q_asym(x, o, 5),
        int(T.Q2_K): _q2_k,
        int(T.Q3_K): _q3_k,
        int(T.Q4_K): lambda x, o: _q45_k(x, o, 15, _f(-1.0), 20),
        int(T.Q5_K): lambda x, o: _q45_k(x, o, 31, _f(-0.5), 15),
        int(T.Q6_K): _q6_k,
        int(T.IQ4_NL): _iq4_nl,
        int(T.IQ4_XS): _iq4_xs,
        int(T.TQ1_0): _tq1_0,
        int(T.TQ2_0): _tq2_0,
        int(T.MXFP4): _mxfp4,
    }


def _lattice_table():
    """Lattice formats: the compiled fit inside the torch quantizer (the packing after
    it is a few vector steps)."""
    from . import quant_lattice as ql
    from .formats import GGMLType as T

    return {
        int(T.IQ3_XXS): lambda b: ql._iq3_xxs(b, fit=lattice_fit),
        int(T.IQ3_S): lambda b: ql._iq3_s(b, fit=lattice_fit),
        int(T.IQ2_S): lambda b: ql._iq2_s(b, fit=lattice_fit),
        int(T.IQ1_M): lambda b: ql._iq1_m(b, fit=iq1m_fit),
    }


_TORCH_LEVEL: dict = {}


def has_kernel(type_id: int) -> bool:
    if numba is None:
        return False
    if not _KERNELS:
        with _LOCK:  # two threads may ask first: both tables are filled before either is read
            if not _KERNELS:
                _TORCH_LEVEL.update(_lattice_table())
                _KERNELS.update(_table())
    return int(type_id) in _KERNELS or int(type_id) in _TORCH_LEVEL


def run(type_id: int, blocks, type_size: int):
    """Quantize ``blocks`` (a CPU float32 torch tensor (n, block_size)) with the
    compiled kernel: a uint8 torch tensor (n, type_size).

    One call at a time: numba's default (workqueue) threading layer aborts the
    process when two threads launch parallel kernels at once, and a web UI may run
    two conversions side by side."""
    import torch

    type_id = int(type_id)
    with _LOCK:
        if type_id not in _seen:
            _seen.add(type_id)
            log.debug("compiled quantizer for GGML type %d: compiling on first use (cached afterwards)", type_id)
        if type_id in _TORCH_LEVEL:
            return _TORCH_LEVEL[type_id](blocks)
        fn = _KERNELS[type_id]
        x = blocks.detach().contiguous().numpy()
        out = np.empty((x.shape[0], type_size), dtype=np.uint8)
        if x.shape[0]:
            _set_threads()
            fn(x, out)
        return torch.from_numpy(out)


_LOCK = threading.RLock()
_seen: set = set()


def _set_threads():
    """As many numba threads as torch uses (``torch.set_num_threads``)."""
    import torch

    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if numba.get_num_threads() != threads:
        numba.set_num_threads(threads)


# -- lattice formats (IQ3_XXS, IQ3_S, IQ2_S): the per-sub-block fit ---------------------------

F_FLT_MAX = _f(np.finfo(np.float32).max)


@_jit
def _round_group(xval, waux, o, D, bits, kmaxq, idv, scale, kmap, nbr, lev, Lg, go):
    """Levels of the group at ``xval[o:o+D]`` for inverse scale ``idv`` into
    ``Lg[go:go+D]``; an off-grid group takes its best neighbour at ``scale``
    (ggml's find_best_neighbour). Returns whether it was on the grid."""
    u = 0
    for i in range(D):
        l = max(0, min(kmaxq - 1, nearest_int(_f(F_HALF * _f(_f(idv * xval[o + i]) - F1)))))
        Lg[go + i] = l
        u |= l << (bits * i)
    if kmap[u] >= 0:
        return True
    best = F_FLT_MAX
    pick = nbr[u, 0]
    for j in range(nbr.shape[1]):
        cand = nbr[u, j]
        if cand < 0:
            break
        d2 = F0
        for i in range(D):
            diff = _f(_f(scale * _f(2 * lev[cand, i] + 1)) - xval[o + i])
            d2 = _f(d2 + _f(_f(waux[o + i] * diff) * diff))
        if d2 < best:
            best = d2
            pick = cand
    for i in range(D):
        Lg[go + i] = lev[pick, i]
    return False


@_jit
def _fit_levels(weight, xval, L, S):
    sqx = F0
    sq2 = F0
    for i in range(S):
        q = _f(2 * L[i] + 1)
        sqx = _f(sqx + _f(_f(weight[i] * xval[i]) * q))
        sq2 = _f(sq2 + _f(_f(weight[i] * q) * q))
    return sqx, sq2


@_pjit
def _lattice(x, S, D, bits, kmaxq, lo, hi, step, eps, parity, refit_all, sigma_weight, kmap, nbr, lev,
             scale_o, L_o, signs_o, skipped_o):
    """The fit of quant_lattice._lattice, one sub-block at a time (same outputs)."""
    nb = x.shape[0]
    per = 256 // S
    ng = S // D
    base = _f(2 * kmaxq - 1)
    nchunk = (nb + 7) // 8
    for c in prange(nchunk):
        weight = np.empty(S, dtype=np.float32)
        waux = np.empty(S, dtype=np.float32)
        xval = np.empty(S, dtype=np.float32)
        neg = np.empty(S, dtype=np.bool_)
        L = np.empty(S, dtype=np.int64)
        La = np.empty(S, dtype=np.int64)
        on_grid = np.empty(ng, dtype=np.bool_)
        ong = np.empty(ng, dtype=np.bool_)
        for blk in range(c * 8, min(nb, c * 8 + 8)):
            quarter_sigma = F0
            if sigma_weight:
                sx2 = F0
                for i in range(256):
                    sx2 = _f(sx2 + _f(x[blk, i] * x[blk, i]))
                quarter_sigma = _f(_f(0.25) * _f(_f(_f(2.0) * sx2) / _f(256.0)))
            for sb in range(per):
                m = blk * per + sb
                o = sb * S
                for i in range(S):
                    xi = x[blk, o + i]
                    w = _f(xi * xi)
                    if sigma_weight:
                        w = _f(quarter_sigma + w)
                    weight[i] = w
                    waux[i] = np.sqrt(w)
                    neg[i] = xi < F0
                    xval[i] = -xi if neg[i] else xi
                if parity:
                    for k in range(S // 8):
                        cnt = 0
                        for i in range(8):
                            cnt += neg[8 * k + i]
                        if cnt % 2 == 1:
                            imin = 8 * k
                            kmin = _f(_f(weight[imin] * x[blk, o + imin]) * x[blk, o + imin])
                            for i in range(8 * k + 1, 8 * k + 8):
                                kv = _f(_f(weight[i] * x[blk, o + i]) * x[blk, o + i])
                                if kv < kmin:
                                    kmin = kv
                                    imin = i
                            xval[imin] = -xval[imin]
                            neg[imin] = not neg[imin]
                smask = 127 if parity else 255
                for k in range(S // 8):
                    s = 0
                    for i in range(8):
                        if neg[8 * k + i]:
                            s |= 1 << i
                    signs_o[m, k] = s & smask
                mx = xval[0]
                for i in range(1, S):
                    if xval[i] > mx:
                        mx = xval[i]
                skipped = (mx < eps) if eps > F0 else (mx == F0)
                skipped_o[m] = skipped
                if skipped:
                    scale_o[m] = F0
                    for i in range(S):
                        L_o[m, i] = 0
                    continue
                best = F0
                scale = _f(mx / base)
                for i in range(S):
                    L[i] = 0
                for g in range(ng):
                    on_grid[g] = not refit_all
                for i_s in range(lo, hi + 1):
                    cc = _f(base + _f(_f(i_s) * step))
                    idv = _f(cc / mx)
                    ths = _f(F1 / idv)
                    for g in range(ng):
                        ong[g] = _round_group(xval, waux, g * D, D, bits, kmaxq, idv, ths, kmap, nbr, lev, La, g * D)
                    sqx, sq2 = _fit_levels(weight, xval, La, S)
                    if sq2 > F0 and _f(sqx * sqx) > _f(best * sq2):
                        scale = _f(sqx / sq2)
                        best = _f(scale * sqx)
                        for i in range(S):
                            L[i] = La[i]
                        for g in range(ng):
                            on_grid[g] = ong[g]
                need = False
                for g in range(ng):
                    if not on_grid[g]:
                        need = True
                if need and scale > F0:
                    id2 = _f(F1 / scale)
                    for i in range(S):
                        La[i] = L[i]
                    for g in range(ng):
                        if refit_all or not on_grid[g]:
                            _round_group(xval, waux, g * D, D, bits, kmaxq, id2, scale, kmap, nbr, lev, La, g * D)
                    sqx, sq2 = _fit_levels(weight, xval, La, S)
                    if sq2 > F0:
                        scale = _f(sqx / sq2)
                    for i in range(S):
                        L[i] = La[i]
                if scale < F0:
                    scale = -scale
                    for k in range(S // 8):
                        signs_o[m, k] = (~signs_o[m, k]) & smask
                scale_o[m] = scale
                for i in range(S):
                    L_o[m, i] = L[i]


def lattice_fit(x, spec):
    """quant_lattice._lattice's outputs from the compiled fit: (scale, L, signs, skipped, kmap)
    as torch tensors, for a CPU float32 ``x`` (nblocks, 256)."""
    import torch

    from .quant_lattice import _tables, _tables_np

    kmap, nbr, lev = _tables_np(spec.grid, spec.kmaxq, spec.bits, spec.nwant)
    xn = x.detach().contiguous().numpy()
    m = xn.shape[0] * (256 // spec.sub)
    scale = np.empty(m, dtype=np.float32)
    L = np.empty((m, spec.sub), dtype=np.int64)
    signs = np.empty((m, spec.sub // 8), dtype=np.int64)
    skipped = np.empty(m, dtype=np.bool_)
    lo, hi, step = spec.steps
    if xn.shape[0]:
        _set_threads()
        _lattice(xn, spec.sub, spec.dim, spec.bits, spec.kmaxq, lo, hi, _f(step), _f(spec.eps), spec.parity,
                 spec.refit_all, spec.sigma_weight, kmap, nbr, lev, scale, L, signs, skipped)
    tk = _tables(spec.grid, spec.kmaxq, spec.bits, spec.nwant, x.device).kmap
    return (torch.from_numpy(scale), torch.from_numpy(L), torch.from_numpy(signs), torch.from_numpy(skipped), tk)


# -- IQ1_M: the per-sub-block fit ----------------------------------------------------------

_IQ1_XP = np.array((-1 + 0.125, 0.125, 1 + 0.125), dtype=np.float32)
_IQ1_XM = np.array((-1 - 0.125, -0.125, 1 - 0.125), dtype=np.float32)
F_IQ1_EPS = _f(1e-7)
F_NEG_TINY = _f(-np.finfo(np.float32).tiny)


@_jit
def _iq1_value(k, group, s):
    """Level ``s`` of group ``group`` under shift choice ``k`` (0: +,+  1: +,-  2: -,+  3: -,-)."""
    plus = (k < 2) if group == 0 else (k % 2 == 0)
    return _IQ1_XP[s] if plus else _IQ1_XM[s]


@_pjit
def _iq1m_fit(xs, kmap, nbr, lev, scale_o, bk_o, gi_o, skipped_o, failed_o):
    m = xs.shape[0]
    nchunk = (m + 63) // 64
    for c in prange(nchunk):
        w = np.empty(16, dtype=np.float32)
        order = np.empty(16, dtype=np.int64)
        tqx = np.empty((4, 3, 16), dtype=np.float32)
        tq2 = np.empty((4, 3, 16), dtype=np.float32)
        L = np.empty(16, dtype=np.int64)
        sqx = np.empty(4, dtype=np.float32)
        sq2 = np.empty(4, dtype=np.float32)
        for r in range(c * 64, min(m, c * 64 + 64)):
            x = xs[r]
            mx = F0
            for i in range(16):
                w[i] = _f(x[i] * x[i])
                if abs(x[i]) > mx:
                    mx = abs(x[i])
            if mx < F_IQ1_EPS:
                skipped_o[r] = True
                scale_o[r] = F0
                bk_o[r] = 0
                gi_o[r, 0] = 0
                gi_o[r, 1] = 0
                continue
            skipped_o[r] = False
            for i in range(16):          # stable insertion sort of the positions by value
                order[i] = i
                j = i
                while j > 0 and x[order[j - 1]] > x[i]:
                    order[j] = order[j - 1]
                    j -= 1
                order[j] = i
            for j in range(16):
                i = order[j]
                grp = 1 if i >= 8 else 0
                for k in range(4):
                    for s in range(3):
                        v = _iq1_value(k, grp, s)
                        wv = _f(w[i] * v)
                        tqx[k, s, j] = _f(wv * x[i])
                        tq2[k, s, j] = _f(wv * v)
            best = F_NEG_TINY
            scale = mx
            b1 = -1
            b2 = -1
            bk = -1
            for i1 in range(17):
                for i2 in range(i1, 17):
                    for k in range(4):
                        sqx[k] = F0
                        sq2[k] = F0
                    for j in range(16):
                        s = 0 if j < i1 else (1 if j < i2 else 2)
                        for k in range(4):
                            sqx[k] = _f(sqx[k] + tqx[k, s, j])
                            sq2[k] = _f(sq2[k] + tq2[k, s, j])
                    for k in range(4):
                        if sq2[k] > F0 and _f(sqx[k] * sqx[k]) > _f(best * sq2[k]):
                            scale = _f(sqx[k] / sq2[k])
                            best = _f(scale * sqx[k])
                            b1 = i1
                            b2 = i2
                            bk = k
            if b1 < 0:
                failed_o[r] = True
                bk = 0
                b1 = 0
                b2 = 0
            for j in range(16):
                L[order[j]] = 0 if j < b1 else (1 if j < b2 else 2)
            if scale < F0:
                for j in range(16):
                    L[j] = 2 - L[j]
                scale = -scale
                bk = 3 - bk
            any_off = False
            for g in range(2):
                u = 0
                for j in range(8):
                    u |= L[8 * g + j] << (2 * j)
                gi = kmap[u]
                if gi < 0:
                    any_off = True
                    bd = F_FLT_MAX
                    gi = nbr[u, 0]
                    for jn in range(nbr.shape[1]):
                        cand = nbr[u, jn]
                        if cand < 0:
                            break
                        d2 = F0
                        for j in range(8):
                            diff = _f(_f(scale * _iq1_value(bk, g, lev[cand, j])) - x[8 * g + j])
                            d2 = _f(d2 + _f(_f(w[8 * g + j] * diff) * diff))
                        if d2 < bd:
                            bd = d2
                            gi = cand
                gi_o[r, g] = gi
            if any_off:
                fx = F0
                f2 = F0
                for g in range(2):
                    for j in range(8):
                        q = _iq1_value(bk, g, lev[gi_o[r, g], j])
                        wq = _f(w[8 * g + j] * q)
                        fx = _f(fx + _f(wq * x[8 * g + j]))
                        f2 = _f(f2 + _f(wq * q))
                if fx > F0 and f2 > F0:
                    scale = _f(fx / f2)
            scale_o[r] = scale
            bk_o[r] = bk


def iq1m_fit(xs):
    """quant_lattice._iq1m_sub_blocks's outputs from the compiled fit:
    (scale, best_k, grid index (m, 2), skipped) for a CPU float32 ``xs`` (m, 16)."""
    import torch

    from .quant_lattice import _tables_np

    kmap, nbr, lev = _tables_np("IQ1_S", 3, 2, 3)
    xn = xs.detach().contiguous().numpy()
    m = xn.shape[0]
    scale = np.empty(m, dtype=np.float32)
    bk = np.empty(m, dtype=np.int64)
    gi = np.empty((m, 2), dtype=np.int64)
    skipped = np.empty(m, dtype=np.bool_)
    failed = np.zeros(m, dtype=np.bool_)
    if m:
        _set_threads()
        _iq1m_fit(xn, kmap, nbr, lev, scale, bk, gi, skipped, failed)
    if failed.any():
        raise FloatingPointError("IQ1_M: no fit for a sub-block (non-finite weights?)")
    return torch.from_numpy(scale), torch.from_numpy(bk), torch.from_numpy(gi), torch.from_numpy(skipped)
