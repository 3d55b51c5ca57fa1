"""The K-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and Q8_K (256-weight super-blocks):
block layouts, torch dequantizers and quantizers.

Layouts as ``ggml-common.h`` defines them. Dequantized float32 values equal
``gguf.quants.dequantize`` bit for bit; quantized bytes equal ggml's
``quantize_row_q*_K_ref`` (Q8_K is only read: ggml makes it for its own dot
products). ggml sums in element order in float32; so do the quantizers here: their
loops run over the (16 or 32) elements of a sub-block, each step vectorized over
every sub-block at once, which reproduces C's rounding exactly.
"""
from __future__ import annotations

import torch

from ..formats import GGMLType, Layout, register
from .legacy import int8_times
from .torch_ops import (dequant_chunks, f16_at, f16_bytes, f16_round, f32_buffer, lo_hi, max_magnitude, nearest_int,
                        pack_crumbs, rdiv, seq_sum, sqrtf, unpack)

QK_K = 256
Q2_K = Layout(scales=QK_K // 16, qs=QK_K // 4, d="f16", dmin="f16")
Q3_K = Layout(hmask=QK_K // 8, qs=QK_K // 4, scales=12, d="f16")
Q4_K = Layout(d="f16", dmin="f16", scales=12, qs=QK_K // 2)
Q5_K = Layout(d="f16", dmin="f16", scales=12, qh=QK_K // 8, qs=QK_K // 2)
Q6_K = Layout(ql=QK_K // 2, qh=QK_K // 4, scales=QK_K // 16, d="f16")
Q8_K = Layout(d="f32", qs=QK_K, bsums=QK_K // 8)  # bsums: 16 int16 block sums, unused when dequantizing


# -- dequantizing ----------------------------------------------------------------------------

@dequant_chunks(256)
def _dq_q2_k(b, out):
    n = b.shape[0]
    sc = b[:, Q2_K.scales.slice]
    d, dmin = f16_at(b, Q2_K.d.offset), f16_at(b, Q2_K.dmin.offset)
    dl = d * (sc & 0x0F).to(torch.float32)  # (n, 16)
    ml = dmin * (sc >> 4).to(torch.float32)
    q = unpack(b[:, Q2_K.qs.slice].reshape(n, 2, 32), (0, 2, 4, 6), 0x03)  # (n, 2, 4, 32)
    f = f32_buffer(out, (n, 16, 16), b.device)
    f.copy_(q.view(n, 16, 16))
    return f.mul_(dl.unsqueeze(-1)).sub_(ml.unsqueeze(-1)).view(n, 256)  # dl * q - ml


@dequant_chunks(256)
def _dq_q3_k(b, out):
    n = b.shape[0]
    d = f16_at(b, Q3_K.d.offset)
    s = b[:, Q3_K.scales.slice]
    lo = unpack(s[:, :8], (0, 4), 0x0F)  # (n, 2, 8)
    hi = s[:, 8:12].contiguous().view(torch.int32).view(n, 1)
    hi = torch.stack([hi, hi >> 2, hi >> 4, hi >> 6], 1).bitwise_and_(0x03030303).view(torch.uint8)  # (n, 4, 4)
    scales = lo.view(n, 16) | (hi.view(n, 16) << 4)
    dl = d * (scales.view(torch.int8) - 32).to(torch.float32)  # (n, 16)
    q = unpack(b[:, Q3_K.qs.slice].reshape(n, 2, 32), (0, 2, 4, 6), 0x03).view(n, 256)
    h = unpack(b[:, Q3_K.hmask.slice], range(8), 0x01).view(n, 256)
    # q - 4 where the hmask bit is clear: (q | h << 2) - 4, bytewise
    qv = q.view(torch.int64)
    qv.bitwise_or_(h.view(torch.int64).bitwise_left_shift_(2))
    q.add_(252)  # uint8 wrap-around: q - 4 as int8
    f = f32_buffer(out, (n, 16, 16), b.device)
    f.copy_(q.view(torch.int8).view(n, 16, 16))
    return f.mul_(dl.unsqueeze(-1)).view(n, 256)  # dl * q


def _k_scale_min(s: torch.Tensor):
    """Q4_K / Q5_K: the 12 scale bytes -> (sc, m), each (n, 8) uint8 of 6 bits."""
    n = s.shape[0]
    s = s.reshape(n, 3, 4)
    a, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([a & 0x3F, (md & 0x0F) | ((a >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _k_scales(b, layout):
    d, dmin = f16_at(b, layout.d.offset), f16_at(b, layout.dmin.offset)
    sc, mn = _k_scale_min(b[:, layout.scales.slice])
    return d * sc.to(torch.float32), dmin * mn.to(torch.float32)  # (n, 8) each


@dequant_chunks(256)
def _dq_q4_k(b, out):
    n = b.shape[0]
    dl, ml = _k_scales(b, Q4_K)
    lo, hi = lo_hi(b)
    qs = Q4_K.qs.slice
    f = f32_buffer(out, (n, 4, 2, 32), b.device)
    f[:, :, 0].copy_(lo[:, qs].view(n, 4, 32))
    f[:, :, 1].copy_(hi[:, qs].view(n, 4, 32))
    f = f.view(n, 8, 32)
    return f.mul_(dl.unsqueeze(-1)).sub_(ml.unsqueeze(-1)).view(n, 256)  # d * q - dm


@dequant_chunks(256)
def _dq_q5_k(b, out):
    n = b.shape[0]
    dl, ml = _k_scales(b, Q5_K)
    q = unpack(b[:, Q5_K.qs.slice].reshape(n, 4, 32), (0, 4), 0x0F)  # (n, 4, 2, 32)
    h = unpack(b[:, Q5_K.qh.slice], range(8), 0x01)  # (n, 8, 32)
    q.view(n, 256).view(torch.int64).bitwise_or_(h.view(n, 256).view(torch.int64).bitwise_left_shift_(4))
    f = f32_buffer(out, (n, 8, 32), b.device)
    f.copy_(q.view(n, 8, 32))
    return f.mul_(dl.unsqueeze(-1)).sub_(ml.unsqueeze(-1)).view(n, 256)


@dequant_chunks(256)
def _dq_q6_k(b, out):
    n = b.shape[0]
    d = f16_at(b, Q6_K.d.offset)
    dl = d * b[:, Q6_K.scales.slice].view(torch.int8).to(torch.float32)  # (n, 16)
    ql = unpack(b[:, Q6_K.ql.slice].reshape(n, 2, 64), (0, 4), 0x0F)  # (n, 2, 2, 64)
    qh = unpack(b[:, Q6_K.qh.slice].reshape(n, 2, 32), (0, 2, 4, 6), 0x03)  # (n, 2, 4, 32)
    ql.view(n, 256).view(torch.int64).bitwise_or_(qh.view(n, 256).view(torch.int64).bitwise_left_shift_(4))
    ql.add_(224)  # uint8 wrap-around: q - 32 as int8
    f = f32_buffer(out, (n, 16, 16), b.device)
    f.copy_(ql.view(torch.int8).view(n, 16, 16))
    return f.mul_(dl.unsqueeze(-1)).view(n, 256)  # d * q


@dequant_chunks(256)
def _dq_q8_k(b, out):
    d = b[:, Q8_K.d.slice].contiguous().view(torch.float32)
    return int8_times(b, out, d, Q8_K.qs.offset, 256)


# -- quantizing (ggml's quantize_row_q*_K_ref) -----------------------------------------------

def _make_qx_quants(x: torch.Tensor, nmax: int):
    """ggml's make_qx_quants with rmse_type 1 (weights x*x): per row of ``x`` (n, k),
    returns (scale (n,), L (n, k) in 0..2*nmax-1 as float).

    The 19 tries are independent until the choice, so they run as one batch: every
    element-order sum is k steps over a (2 * tries, n) slab instead of 2 * tries * k
    small steps."""
    n, k = x.shape
    mx, amax = max_magnitude(x, 1)
    zero = amax < 1e-15
    safe_max = torch.where(zero, torch.ones_like(mx), mx)
    xt = x.t().contiguous()                                   # (k, n)
    w = xt * xt
    wx = w * xt
    steps = [0] + [s for s in range(-9, 10) if s != 0]
    tenth = torch.tensor(0.1, dtype=torch.float32)
    nums = [-float(nmax)] + [float(-(float(nmax) + tenth * torch.tensor(float(s), dtype=torch.float32)))
                             for s in steps[1:]]
    iscale = torch.stack([rdiv(v, safe_max) for v in nums])   # (T, n)
    l = nearest_int(iscale[:, None, :] * xt[None]).clamp_(-nmax, nmax - 1)   # (T, k, n)
    prod = torch.empty((l.shape[0], 2, k, n), device=x.device)
    torch.mul(wx, l, out=prod[:, 0])
    torch.mul(w, l, out=prod[:, 1])
    prod[:, 1] *= l
    acc = prod[:, :, 0].clone()
    for i in range(1, k):
        acc += prod[:, :, i]
    sumlx, suml2 = acc[:, 0], acc[:, 1]
    scale = torch.where(suml2[0] != 0, sumlx[0] / torch.where(suml2[0] != 0, suml2[0], torch.ones_like(suml2[0])),
                        torch.zeros_like(suml2[0]))
    best = scale * sumlx[0]
    pick = torch.zeros(n, dtype=torch.long, device=x.device)
    for t in range(1, len(steps)):
        better = (suml2[t] > 0) & (sumlx[t] * sumlx[t] > best * suml2[t])
        new_scale = sumlx[t] / torch.where(suml2[t] > 0, suml2[t], torch.ones_like(suml2[t]))
        scale = torch.where(better, new_scale, scale)
        best = torch.where(better, new_scale * sumlx[t], best)
        pick = torch.where(better, torch.full_like(pick, t), pick)
    L = l.gather(0, pick[None, None, :].expand(1, k, n)).squeeze(0).t()
    L = torch.where(zero[:, None], torch.full_like(L, -nmax), L) + nmax
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, L


def _make_qkx2_quants(x: torch.Tensor, weights: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                      use_mad: bool = False):
    """ggml's make_qkx2_quants: per row of ``x`` (n, k), (scale, the_min, L).

    Works on the transposed (k, n) layout so that each of the element-order steps
    is one contiguous vector operation over every sub-block."""
    xt = x.t().contiguous()
    wt = weights.t().contiguous()
    k = xt.shape[0]
    mn = xt.amin(dim=0)
    mx = xt.amax(dim=0)
    sum_w = seq_sum(wt[i] for i in range(k))
    sum_x = seq_sum(wt[i] * xt[i] for i in range(k))
    mn = torch.where(mn > 0, torch.zeros_like(mn), mn)
    flat = mx == mn
    one = torch.ones_like(mx)
    rng = torch.where(flat, one, mx - mn)
    iscale = rdiv(float(nmax), rng)
    scale = 1.0 / iscale
    L = nearest_int(iscale * (xt - mn)).clamp_(0, nmax)
    diff = scale * L + mn - xt
    diff = diff.abs() if use_mad else diff * diff
    best_mad = seq_sum(wt[i] * diff[i] for i in range(k))
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)
    prod = torch.empty((3,) + tuple(xt.shape), device=xt.device)
    for step in range(nstep + 1):
        num = f32(rmin) + f32(rdelta) * f32(float(step)) + f32(float(nmax))
        # ggml updates ``min`` in place when a step wins, and later steps use it
        rng = torch.where(flat, one, mx - mn)
        iscale = num / rng
        l = nearest_int(iscale * (xt - mn)).clamp_(0, nmax)
        # the three element-order sums side by side: k steps over a (3, n) slab
        prod[0] = wt * l
        torch.mul(prod[0], l, out=prod[1])
        torch.mul(prod[0], xt, out=prod[2])
        acc = prod[:, 0].clone()
        for i in range(1, k):
            acc += prod[:, i]
        sum_l, sum_l2, sum_xl = acc[0], acc[1], acc[2]
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = torch.where(ok, D, one)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = this_min > 0
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(pos, sum_xl / torch.where(sum_l2 != 0, sum_l2, one), this_scale)
        d2 = this_scale * l + this_min - xt
        d2 = d2.abs() if use_mad else d2 * d2
        wd = wt * d2
        mad = wd[0].clone()
        for i in range(1, k):
            mad += wd[i]
        better = ok & (mad < best_mad)
        L = torch.where(better, l, L)
        best_mad = torch.where(better, mad, best_mad)
        scale = torch.where(better, this_scale, scale)
        mn = torch.where(better, this_min, mn)
    L = torch.where(flat, torch.zeros_like(L), L)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return scale, -mn, L.t()


def _running_max_positive(v: torch.Tensor) -> torch.Tensor:
    """``m = 0; for s in v: if s > m: m = s`` along the last dim."""
    return v.clamp(min=0).amax(dim=-1) + 0.0  # + 0.0: a zero result is +0, as in C


def _pack_k_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """8 six-bit scales and mins -> ggml's 12-byte K-quant scale layout."""
    ls = ls.to(torch.uint8)
    lm = lm.to(torch.uint8)
    out = torch.zeros(ls.shape[0], 12, dtype=torch.uint8, device=ls.device)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def _q45_k(x: torch.Tensor, nmax: int, rmin: float, nstep: int):
    nb = x.shape[0]
    sub = x.reshape(nb * 8, 32)
    st = sub.t()
    sum_x2 = seq_sum(st[i] * st[i] for i in range(32))
    av_x = sqrtf(sum_x2 / 32)
    weights = av_x[:, None] + sub.abs()
    scales, mins, L = _make_qkx2_quants(sub, weights, nmax, rmin, 0.1, nstep)
    scales = scales.reshape(nb, 8)
    mins = mins.reshape(nb, 8)
    L = L.reshape(nb, 256)
    max_scale = _running_max_positive(scales)
    max_min = _running_max_positive(mins)
    inv_scale = torch.where(max_scale > 0, rdiv(63.0, torch.where(max_scale > 0, max_scale, torch.ones_like(max_scale))),
                            torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, rdiv(63.0, torch.where(max_min > 0, max_min, torch.ones_like(max_min))),
                          torch.zeros_like(max_min))
    # uint8_t ls = nearest_int(...): an int narrowed to 8 bits, then MIN(63, ...)
    ls = (nearest_int(inv_scale[:, None] * scales).to(torch.int32) & 0xFF).clamp(max=63)
    lm = (nearest_int(inv_min[:, None] * mins).to(torch.int32) & 0xFF).clamp(max=63)
    d = max_scale / 63.0
    dmin = max_min / 63.0
    dd = f16_round(d)[:, None] * ls.to(torch.float32)
    dm = f16_round(dmin)[:, None] * lm.to(torch.float32)
    xs = x.reshape(nb, 8, 32)
    safe = torch.where(dd != 0, dd, torch.ones_like(dd))
    Lnew = nearest_int((xs + dm[:, :, None]) / safe[:, :, None]).clamp(0, nmax)
    L = torch.where((dd != 0)[:, :, None], Lnew, L.reshape(nb, 8, 32)).reshape(nb, 256).to(torch.uint8)
    return f16_bytes(d), f16_bytes(dmin), _pack_k_scales(ls, lm), L


def _q4_k(x: torch.Tensor) -> torch.Tensor:
    d, dmin, scales, L = _q45_k(x, 15, -1.0, 20)
    L = L.reshape(-1, 4, 2, 32)
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)
    return Q4_K.pack(d=d, dmin=dmin, scales=scales, qs=qs)


def _q5_k(x: torch.Tensor) -> torch.Tensor:
    d, dmin, scales, L = _q45_k(x, 31, -0.5, 15)
    L = L.reshape(-1, 4, 2, 32)
    lo = L & 0xF
    hi = (L >> 4) & 1  # (nb, 4, 2, 32): bit 2*n (+1 for the second half) of qh[j]
    shifts = (torch.arange(4, device=x.device).reshape(1, 4, 1, 1) * 2
              + torch.arange(2, device=x.device).reshape(1, 1, 2, 1)).to(torch.uint8)
    qh = (hi << shifts).sum(dim=(1, 2)).to(torch.uint8)
    qs = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(-1, 128)
    return Q5_K.pack(d=d, dmin=dmin, scales=scales, qh=qh, qs=qs)


def _q6_k(x: torch.Tensor) -> torch.Tensor:
    nb = x.shape[0]
    sub = x.reshape(nb * 16, 16)
    scales, L = _make_qx_quants(sub, 32)
    scales = scales.reshape(nb, 16)
    L = L.reshape(nb, 16, 16)
    max_scale, max_abs = max_magnitude(scales, 1)
    zero = max_abs < 1e-15
    safe = torch.where(zero, torch.ones_like(max_scale), max_scale)
    iscale = rdiv(-128.0, safe)
    d = torch.where(zero, torch.zeros_like(iscale), 1.0 / iscale)
    sc = nearest_int(iscale[:, None] * scales).clamp(max=127)
    sc = torch.where(zero[:, None], torch.zeros_like(sc), sc)
    dd = f16_round(d)[:, None] * sc
    safe_dd = torch.where(dd != 0, dd, torch.ones_like(dd))
    Lnew = nearest_int(x.reshape(nb, 16, 16) / safe_dd[:, :, None]).clamp(-32, 31) + 32
    L = torch.where((dd != 0)[:, :, None], Lnew, L)
    L = torch.where(zero[:, None, None], torch.zeros_like(L), L).reshape(nb, 2, 4, 32).to(torch.uint8)
    ql = torch.cat([(L[:, :, 0] & 0xF) | ((L[:, :, 2] & 0xF) << 4), (L[:, :, 1] & 0xF) | ((L[:, :, 3] & 0xF) << 4)],
                   dim=2).reshape(nb, 128)
    qh = ((L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6))
    qh = qh.reshape(nb, 64)
    sc8 = sc.to(torch.int8).view(torch.uint8)
    return Q6_K.pack(ql=ql, qh=qh, scales=sc8, d=f16_bytes(d))


def _q2_k(x: torch.Tensor) -> torch.Tensor:
    nb = x.shape[0]
    sub = x.reshape(nb * 16, 16)
    scales, mins, L = _make_qkx2_quants(sub, sub.abs(), 3, -0.5, 0.1, 15, use_mad=True)
    scales, mins, L = scales.reshape(nb, 16), mins.reshape(nb, 16), L.reshape(nb, 16, 16)
    max_scale = _running_max_positive(scales)
    max_min = _running_max_positive(mins)
    pos_s, pos_m = max_scale > 0, max_min > 0
    ls = torch.where(pos_s[:, None], nearest_int(rdiv(15.0, torch.where(pos_s, max_scale, torch.ones_like(max_scale)))[:, None]
                                                 * scales), torch.zeros_like(scales))
    lm = torch.where(pos_m[:, None], nearest_int(rdiv(15.0, torch.where(pos_m, max_min, torch.ones_like(max_min)))[:, None]
                                                 * mins), torch.zeros_like(mins))
    sc = (ls.to(torch.int32) | (lm.to(torch.int32) << 4)) & 0xFF
    d = torch.where(pos_s, max_scale / 15.0, torch.zeros_like(max_scale))
    dmin = torch.where(pos_m, max_min / 15.0, torch.zeros_like(max_min))
    dd = f16_round(d)[:, None] * (sc & 0xF).to(torch.float32)
    dm = f16_round(dmin)[:, None] * (sc >> 4).to(torch.float32)
    safe = torch.where(dd != 0, dd, torch.ones_like(dd))
    Lnew = nearest_int((x.reshape(nb, 16, 16) + dm[:, :, None]) / safe[:, :, None]).clamp(0, 3)
    L = torch.where((dd != 0)[:, :, None], Lnew, L).reshape(nb, 2, 4, 32).to(torch.uint8)
    return Q2_K.pack(scales=sc.to(torch.uint8), qs=pack_crumbs(L.reshape(nb, 256)), d=f16_bytes(d),
                     dmin=f16_bytes(dmin))


def _make_q3_quants(x: torch.Tensor, nmax: int):
    """ggml's make_q3_quants with do_rmse: per row of ``x`` (m, k), (scale, L + nmax)."""
    xt = x.t().contiguous()
    k = xt.shape[0]
    mx, amax = max_magnitude(xt, 0)
    zero = amax < 1e-15
    iscale = rdiv(-float(nmax), torch.where(zero, torch.ones_like(mx), mx))
    L = nearest_int(iscale * xt).clamp(-nmax, nmax - 1)
    w = xt * xt
    wx = w * xt
    sumlx = seq_sum(wx[i] * L[i] for i in range(k))
    suml2 = seq_sum(w[i] * L[i] * L[i] for i in range(k))
    # ggml stops a row once a pass changes nothing in it (at most five passes): each
    # pass runs on the rows the previous pass changed, gathered into a smaller slab
    active = torch.arange(xt.shape[1], device=x.device)
    xa, wa, wxa, La, sx, s2 = xt, w, wx, L, sumlx, suml2
    for _ in range(5):
        moved = torch.zeros(active.shape[0], dtype=torch.bool, device=x.device)
        for i in range(k):
            slx = sx - wxa[i] * La[i]
            ok = slx > 0
            sl2 = s2 - wa[i] * La[i] * La[i]
            new_l = nearest_int(xa[i] * sl2 / torch.where(ok, slx, torch.ones_like(slx))).clamp(-nmax, nmax - 1)
            changed = ok & (new_l != La[i])
            slx2 = slx + wxa[i] * new_l
            sl22 = sl2 + wa[i] * new_l * new_l
            accept = changed & (sl22 > 0) & (slx2 * slx2 * s2 > sx * sx * sl22)
            La[i] = torch.where(accept, new_l, La[i])
            sx = torch.where(accept, slx2, sx)
            s2 = torch.where(accept, sl22, s2)
            moved |= accept
        if La is not L:  # the first pass works on L itself
            L[:, active] = La
        sumlx = sumlx.index_copy(0, active, sx)
        suml2 = suml2.index_copy(0, active, s2)
        keep = moved.nonzero().squeeze(1)
        if keep.numel() == 0:
            break
        active = active.index_select(0, keep)
        xa, wa, wxa = xt.index_select(1, active), w.index_select(1, active), wx.index_select(1, active)
        La, sx, s2 = L.index_select(1, active), sumlx.index_select(0, active), suml2.index_select(0, active)
    scale = sumlx / torch.where(zero, torch.ones_like(suml2), suml2)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    L = torch.where(zero, torch.zeros_like(L), L + nmax)
    return scale, L.t()


def _q3_k(x: torch.Tensor) -> torch.Tensor:
    nb = x.shape[0]
    scales, L = _make_q3_quants(x.reshape(nb * 16, 16), 4)
    scales, L = scales.reshape(nb, 16), L.reshape(nb, 16, 16)
    max_scale, max_abs = max_magnitude(scales, 1)
    max_scale = torch.where(max_abs > 0, max_scale, torch.zeros_like(max_scale))
    nz = max_scale != 0
    iscale = rdiv(-32.0, torch.where(nz, max_scale, torch.ones_like(max_scale)))
    l6 = torch.where(nz[:, None], nearest_int(iscale[:, None] * scales).clamp(-32, 31) + 32,
                     torch.zeros_like(scales)).to(torch.int32)  # 0..63
    d = torch.where(nz, 1.0 / iscale, torch.zeros_like(iscale))
    lo = l6 & 0xF
    packed = torch.zeros(nb, 12, dtype=torch.int32, device=x.device)
    packed[:, 0:8] = lo[:, 0:8] | (lo[:, 8:16] << 4)
    hi = (l6 >> 4) & 3  # byte 8 + j%4 gets bits 2*(j//4)
    for q in range(4):
        packed[:, 8:12] |= hi[:, 4 * q:4 * q + 4] << (2 * q)
    sc = (l6 - 32).to(torch.float32)
    dd = f16_round(d)[:, None] * sc
    safe = torch.where(dd != 0, dd, torch.ones_like(dd))
    Lnew = nearest_int(x.reshape(nb, 16, 16) / safe[:, :, None]).clamp(-4, 3) + 4
    L = torch.where((dd != 0)[:, :, None], Lnew, L).reshape(nb, 256).to(torch.int32)
    high = (L > 3).to(torch.int32).reshape(nb, 8, 32)  # value j: byte j % 32, bit j // 32
    hmask = (high << torch.arange(8, device=x.device, dtype=torch.int32)[None, :, None]).sum(dim=1)
    L = torch.where(L > 3, L - 4, L)
    return Q3_K.pack(hmask=hmask.to(torch.uint8), qs=pack_crumbs(L), scales=packed.to(torch.uint8), d=f16_bytes(d))


_COMPILED = ("quantize", "dequantize")  # kquant_numba.py, kquant_q3_numba.py, kquant_dequant_numba.py
register(GGMLType.Q2_K, layout=Q2_K, dequantize=_dq_q2_k, quantize=_q2_k, numba=_COMPILED, triton=True,
         fallback=("Q5_0",))
register(GGMLType.Q3_K, layout=Q3_K, dequantize=_dq_q3_k, quantize=_q3_k, numba=_COMPILED, triton=True,
         fallback=("Q5_0",))
register(GGMLType.Q4_K, layout=Q4_K, dequantize=_dq_q4_k, quantize=_q4_k, numba=_COMPILED, triton=True,
         fallback=("Q5_0",))
register(GGMLType.Q5_K, layout=Q5_K, dequantize=_dq_q5_k, quantize=_q5_k, numba=_COMPILED, triton=True,
         fallback=("Q5_1",))
register(GGMLType.Q6_K, layout=Q6_K, dequantize=_dq_q6_k, quantize=_q6_k, numba=_COMPILED, triton=True,
         fallback=("Q8_0",))
register(GGMLType.Q8_K, layout=Q8_K, dequantize=_dq_q8_k, triton=True)
