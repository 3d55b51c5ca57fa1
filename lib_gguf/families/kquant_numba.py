"""Compiled (numba) quantizers of the K-quants Q2_K, Q3_K, Q4_K, Q5_K and Q6_K, on the
layouts of :mod:`lib_gguf.families.kquant`: the same bytes as its torch quantizers
(the reference) and as ggml, each block a plain loop spread over threads."""
from __future__ import annotations

import numpy as np

from ..formats import GGMLType
from ..numba_support import (F0, F1, F_EPS, F_TENTH, f32, jit, nearest_int, pjit, prange, put_f16, quantizer, scratch,
                             signed_absmax)
from .kquant import Q2_K, Q3_K, Q4_K, Q5_K, Q6_K

F15 = f32(15.0)
F32 = f32(32.0)
F63 = f32(63.0)
F128 = f32(128.0)
_CHUNK = 16  # blocks a parallel work item

# the byte offsets of the fields the kernels write (numba takes module ints as constants)
K_D, K_DMIN, K_SCALES = Q4_K.d.offset, Q4_K.dmin.offset, Q4_K.scales.offset  # Q5_K's are the same
Q4_QS = Q4_K.qs.offset
Q5_QH, Q5_QS = Q5_K.qh.offset, Q5_K.qs.offset
Q6_QL, Q6_QH, Q6_SCALES, Q6_D, Q6_SIZE = Q6_K.ql.offset, Q6_K.qh.offset, Q6_K.scales.offset, Q6_K.d.offset, Q6_K.size
Q2_SCALES, Q2_QS, Q2_D, Q2_DMIN = Q2_K.scales.offset, Q2_K.qs.offset, Q2_K.d.offset, Q2_K.dmin.offset
Q3_HMASK, Q3_QS, Q3_SCALES, Q3_D = Q3_K.hmask.offset, Q3_K.qs.offset, Q3_K.scales.offset, Q3_K.d.offset
assert (Q5_K.d.offset, Q5_K.dmin.offset, Q5_K.scales.offset) == (K_D, K_DMIN, K_SCALES)


@jit
def make_qkx2(x, w, nmax, rmin, rdelta, nstep, use_mad, L, Laux):
    """ggml's make_qkx2_quants over the sub-block ``x`` with weights ``w``: fills ``L``,
    returns (scale, -min)."""
    n = x.shape[0]
    fn = f32(nmax)
    mn = x[0]
    mx = x[0]
    sum_w = w[0]
    sum_x = f32(sum_w * x[0])
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        sum_w = f32(sum_w + w[i])
        sum_x = f32(sum_x + f32(w[i] * x[i]))
    if mn > F0:
        mn = F0
    if mx == mn:
        for i in range(n):
            L[i] = 0
        return F0, f32(-mn)
    iscale = f32(fn / f32(mx - mn))
    scale = f32(F1 / iscale)
    best_mad = F0
    for i in range(n):
        l = max(0, min(nmax, nearest_int(f32(iscale * f32(x[i] - mn)))))
        L[i] = l
        diff = f32(f32(f32(scale * f32(l)) + mn) - x[i])
        diff = abs(diff) if use_mad else f32(diff * diff)
        best_mad = f32(best_mad + f32(w[i] * diff))
    for step in range(nstep + 1):
        iscale = f32(f32(f32(rmin + f32(rdelta * f32(step))) + fn) / f32(mx - mn))
        sum_l = F0
        sum_l2 = F0
        sum_xl = F0
        for i in range(n):
            l = max(0, min(nmax, nearest_int(f32(iscale * f32(x[i] - mn)))))
            Laux[i] = l
            wl = f32(w[i] * f32(l))
            sum_l = f32(sum_l + wl)
            sum_l2 = f32(sum_l2 + f32(wl * f32(l)))
            sum_xl = f32(sum_xl + f32(wl * x[i]))
        D = f32(f32(sum_w * sum_l2) - f32(sum_l * sum_l))
        if D > F0:
            this_scale = f32(f32(f32(sum_w * sum_xl) - f32(sum_x * sum_l)) / D)
            this_min = f32(f32(f32(sum_l2 * sum_x) - f32(sum_l * sum_xl)) / D)
            if this_min > F0:
                this_min = F0
                this_scale = f32(sum_xl / sum_l2)
            mad = F0
            for i in range(n):
                diff = f32(f32(f32(this_scale * f32(Laux[i])) + this_min) - x[i])
                diff = abs(diff) if use_mad else f32(diff * diff)
                mad = f32(mad + f32(w[i] * diff))
            if mad < best_mad:
                for i in range(n):
                    L[i] = Laux[i]
                best_mad = mad
                scale = this_scale
                mn = this_min
    return scale, f32(-mn)


@jit
def _levels_at(xb, L, o, n, dm, dd, lo, hi):
    """The final levels of a sub-block: ``L[o+k] = clamp(nearest_int((xb[o+k] + dm) / dd), lo, hi) - lo``."""
    for k in range(n):
        L[o + k] = max(lo, min(hi, nearest_int(f32(f32(xb[o + k] + dm) / dd)))) - lo


@jit
def _max_positive(v):
    """``m = 0; for s in v: if s > m: m = s``."""
    m = F0
    for s in v:
        if s > m:
            m = s
    return m


@jit
def _pack_k_scale(sc, j, ls, lm):
    if j < 4:
        sc[j] = ls
        sc[j + 4] = lm
    else:
        sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
        sc[j - 4] |= (ls >> 4) << 6
        sc[j] |= (lm >> 4) << 6


@jit
def _k_scale_min(sc, j):
    if j < 4:
        return sc[j] & 63, sc[j + 4] & 63
    return (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)


@jit
def _q45_k(xb, out, i, scratch, nmax, rmin, nstep):
    """Q4_K (nmax 15) and Q5_K (nmax 31): 8 sub-blocks of 32 with 6-bit scales and mins."""
    L, Laux, w, scales, mins, sc = scratch
    for j in range(8):
        sx2 = F0
        for k in range(32):
            v = xb[32 * j + k]
            sx2 = f32(sx2 + f32(v * v))
        av_x = np.sqrt(f32(sx2 / F32))
        for k in range(32):
            w[k] = f32(av_x + abs(xb[32 * j + k]))
        scales[j], mins[j] = make_qkx2(xb[32 * j:32 * j + 32], w, nmax, rmin, F_TENTH, nstep, False,
                                       L[32 * j:32 * j + 32], Laux)
    max_scale, max_min = _max_positive(scales[:8]), _max_positive(mins[:8])
    inv_scale = f32(F63 / max_scale) if max_scale > F0 else F0
    inv_min = f32(F63 / max_min) if max_min > F0 else F0
    for k in range(12):
        sc[k] = 0
    for j in range(8):
        ls = min(63, nearest_int(f32(inv_scale * scales[j])) & 0xFF)
        lm = min(63, nearest_int(f32(inv_min * mins[j])) & 0xFF)
        _pack_k_scale(sc, j, ls, lm)
    d = put_f16(out, i, K_D, f32(max_scale / F63))
    dmin = put_f16(out, i, K_DMIN, f32(max_min / F63))
    for k in range(12):
        out[i, K_SCALES + k] = sc[k]
    for j in range(8):
        si, mi = _k_scale_min(sc, j)
        dd = f32(d * f32(si))
        if dd == F0:
            continue
        dm = f32(dmin * f32(mi))
        _levels_at(xb, L, 32 * j, 32, dm, dd, 0, nmax)
    if nmax == 15:
        for g in range(4):
            for k in range(32):
                out[i, Q4_QS + 32 * g + k] = L[64 * g + k] | (L[64 * g + 32 + k] << 4)
    else:
        for k in range(32):
            out[i, Q5_QH + k] = 0
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
                out[i, Q5_QH + k] |= h
                out[i, Q5_QS + 32 * g + k] = l1 | (l2 << 4)


@jit
def _qx_pass(x, iscale, nmax, L, offset, store):
    """Levels ``clamp(nearest_int(iscale * x), -nmax, nmax - 1)`` (into ``L`` + ``offset``
    when ``store``) and their weighted sums (weights x*x): (sum w x l, sum w l l)."""
    sumlx = F0
    suml2 = F0
    for i in range(x.shape[0]):
        l = max(-nmax, min(nmax - 1, nearest_int(f32(iscale * x[i]))))
        if store:
            L[i] = l + offset
        w = f32(x[i] * x[i])
        sumlx = f32(sumlx + f32(f32(w * x[i]) * f32(l)))
        suml2 = f32(suml2 + f32(f32(w * f32(l)) * f32(l)))
    return sumlx, suml2


@jit
def make_qx(x, nmax, L):
    """ggml's make_qx_quants with rmse_type 1 (weights x*x): fills ``L`` with
    0..2*nmax-1, returns the scale."""
    fn = f32(nmax)
    mx, amax = signed_absmax(x)
    if amax < F_EPS:
        L[:] = 0
        return F0
    sumlx, suml2 = _qx_pass(x, f32(-fn / mx), nmax, L, nmax, True)
    scale = f32(sumlx / suml2) if suml2 != F0 else F0
    best = f32(scale * sumlx)
    for s in range(-9, 10):
        if s == 0:
            continue
        iscale = f32(-f32(fn + f32(F_TENTH * f32(s))) / mx)
        sumlx, suml2 = _qx_pass(x, iscale, nmax, L, nmax, False)
        if suml2 > F0 and f32(sumlx * sumlx) > f32(best * suml2):
            _qx_pass(x, iscale, nmax, L, nmax, True)
            scale = f32(sumlx / suml2)
            best = f32(scale * sumlx)
    return scale


@jit
def _q6_k(xb, out, i, scratch, p0, p1, p2):
    L, scales = scratch[0], scratch[3]
    for j in range(16):
        scales[j] = make_qx(xb[16 * j:16 * j + 16], 32, L[16 * j:16 * j + 16])
    max_scale, max_abs = signed_absmax(scales)
    if max_abs < F_EPS:
        for k in range(Q6_SIZE):
            out[i, k] = 0
        return
    iscale = f32(-F128 / max_scale)
    d = put_f16(out, i, Q6_D, f32(F1 / iscale))
    for j in range(16):
        q = min(127, nearest_int(f32(iscale * scales[j])))
        out[i, Q6_SCALES + j] = q & 0xFF
        dd = f32(d * f32(q))
        if dd == F0:
            continue
        _levels_at(xb, L, 16 * j, 16, F0, dd, -32, 31)
    for h in range(2):
        for k in range(32):
            a = L[128 * h + k]
            b = L[128 * h + 32 + k]
            c2 = L[128 * h + 64 + k]
            e = L[128 * h + 96 + k]
            out[i, Q6_QL + 64 * h + k] = (a & 0xF) | ((c2 & 0xF) << 4)
            out[i, Q6_QL + 64 * h + 32 + k] = (b & 0xF) | ((e & 0xF) << 4)
            out[i, Q6_QH + 32 * h + k] = (a >> 4) | ((b >> 4) << 2) | ((c2 >> 4) << 4) | ((e >> 4) << 6)


@jit
def _q2_k(xb, out, i, scratch, p0, p1, p2):
    L, Laux, w, scales, mins, _ = scratch
    for j in range(16):
        for k in range(16):
            w[k] = abs(xb[16 * j + k])
        scales[j], mins[j] = make_qkx2(xb[16 * j:16 * j + 16], w, 3, f32(-0.5), F_TENTH, 15, True,
                                       L[16 * j:16 * j + 16], Laux)
    max_scale, max_min = _max_positive(scales), _max_positive(mins)
    if max_scale > F0:
        iscale = f32(F15 / max_scale)
        for j in range(16):
            out[i, Q2_SCALES + j] = nearest_int(f32(iscale * scales[j])) & 0xFF
        d = put_f16(out, i, Q2_D, f32(max_scale / F15))
    else:
        for j in range(16):
            out[i, Q2_SCALES + j] = 0
        d = put_f16(out, i, Q2_D, F0)
    if max_min > F0:
        iscale = f32(F15 / max_min)
        for j in range(16):
            out[i, Q2_SCALES + j] = (out[i, Q2_SCALES + j] | (nearest_int(f32(iscale * mins[j])) << 4)) & 0xFF
        dmin = put_f16(out, i, Q2_DMIN, f32(max_min / F15))
    else:
        dmin = put_f16(out, i, Q2_DMIN, F0)
    for j in range(16):
        dd = f32(d * f32(out[i, Q2_SCALES + j] & 0xF))
        if dd == F0:
            continue
        dm = f32(dmin * f32(out[i, Q2_SCALES + j] >> 4))
        _levels_at(xb, L, 16 * j, 16, dm, dd, 0, 3)
    for h in range(2):
        for k in range(32):
            out[i, Q2_QS + 32 * h + k] = (L[128 * h + k] | (L[128 * h + 32 + k] << 2)
                                          | (L[128 * h + 64 + k] << 4) | (L[128 * h + 96 + k] << 6))


@jit
def make_q3(x, nmax, L):
    """ggml's make_q3_quants with do_rmse: fills ``L`` with 0..2*nmax-1, returns the scale."""
    n = x.shape[0]
    mx, amax = signed_absmax(x)
    if amax < F_EPS:
        L[:] = 0
        return F0
    sumlx, suml2 = _qx_pass(x, f32(-f32(nmax) / mx), nmax, L, 0, True)
    for _ in range(5):
        changed = 0
        for i in range(n):
            w = f32(x[i] * x[i])
            li = f32(L[i])
            slx = f32(sumlx - f32(f32(w * x[i]) * li))
            if slx > F0:
                sl2 = f32(suml2 - f32(f32(w * li) * li))
                new_l = max(-nmax, min(nmax - 1, nearest_int(f32(f32(x[i] * sl2) / slx))))
                if new_l != L[i]:
                    fl = f32(new_l)
                    slx = f32(slx + f32(f32(w * x[i]) * fl))
                    sl2 = f32(sl2 + f32(f32(w * fl) * fl))
                    if sl2 > F0 and f32(f32(slx * slx) * suml2) > f32(f32(sumlx * sumlx) * sl2):
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        changed += 1
        if changed == 0:
            break
    for i in range(n):
        L[i] += nmax
    return f32(sumlx / suml2)


@jit
def _q3_k(xb, out, i, scratch, p0, p1, p2):
    L, scales = scratch[0], scratch[3]
    for j in range(16):
        scales[j] = make_q3(xb[16 * j:16 * j + 16], 4, L[16 * j:16 * j + 16])
    max_scale = signed_absmax(scales)[0]
    for k in range(12):
        out[i, Q3_SCALES + k] = 0
    if max_scale != F0:
        iscale = f32(-F32 / max_scale)
        for j in range(16):
            l = max(-32, min(31, nearest_int(f32(iscale * scales[j])))) + 32
            if j < 8:
                out[i, Q3_SCALES + j] = l & 0xF
            else:
                out[i, Q3_SCALES + j - 8] |= (l & 0xF) << 4
            out[i, Q3_SCALES + 8 + j % 4] |= (l >> 4) << (2 * (j // 4))
        d = put_f16(out, i, Q3_D, f32(F1 / iscale))
    else:
        d = put_f16(out, i, Q3_D, F0)
    for j in range(16):
        lo4 = np.int64(out[i, Q3_SCALES + j]) & 0xF if j < 8 else np.int64(out[i, Q3_SCALES + j - 8]) >> 4
        sv = (lo4 | (((np.int64(out[i, Q3_SCALES + 8 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32
        dd = f32(d * f32(sv))
        if dd == F0:
            continue
        _levels_at(xb, L, 16 * j, 16, F0, dd, -4, 3)
    for k in range(32):
        out[i, Q3_HMASK + k] = 0
    for j in range(256):
        if L[j] > 3:
            out[i, Q3_HMASK + j % 32] |= 1 << (j // 32)
            L[j] -= 4
    for h in range(2):
        for k in range(32):
            out[i, Q3_QS + 32 * h + k] = (L[128 * h + k] | (L[128 * h + 32 + k] << 2)
                                       | (L[128 * h + 64 + k] << 4) | (L[128 * h + 96 + k] << 6))


@pjit
def _quantize(x, out, kind, nmax, rmin, nstep):
    """Every block of ``x`` with the block function ``kind`` (0: Q4_K / Q5_K, 1: Q6_K,
    2: Q2_K, 3: Q3_K), ``_CHUNK`` blocks a parallel work item."""
    for c in prange((x.shape[0] + _CHUNK - 1) // _CHUNK):
        s = scratch()
        for i in range(c * _CHUNK, min(x.shape[0], c * _CHUNK + _CHUNK)):
            if kind == 0:
                _q45_k(x[i], out, i, s, nmax, rmin, nstep)
            elif kind == 1:
                _q6_k(x[i], out, i, s, nmax, rmin, nstep)
            elif kind == 2:
                _q2_k(x[i], out, i, s, nmax, rmin, nstep)
            else:
                _q3_k(x[i], out, i, s, nmax, rmin, nstep)


def _kernel(kind, nmax=0, rmin=F0, nstep=0):
    return lambda x, out: _quantize(x, out, kind, nmax, f32(rmin), nstep)


QUANTIZERS = {
    GGMLType.Q2_K: quantizer(_kernel(2), Q2_K.size),
    GGMLType.Q3_K: quantizer(_kernel(3), Q3_K.size),
    GGMLType.Q4_K: quantizer(_kernel(0, 15, -1.0, 20), Q4_K.size),
    GGMLType.Q5_K: quantizer(_kernel(0, 31, -0.5, 15), Q5_K.size),
    GGMLType.Q6_K: quantizer(_kernel(1), Q6_K.size),
}
DEQUANTIZERS: dict = {}
