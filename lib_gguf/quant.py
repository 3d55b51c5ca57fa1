"""Quantization in torch, on any device: the public entry point and the kernels
for plain element types, the legacy formats and the K-quants.

Kernels take float32 ``(n_blocks, block_size)`` values and return
``(n_blocks, type_size)`` uint8 blocks, byte-identical to ggml's own quantizer
(the no-importance-matrix path of ``ggml_quantize_chunk``).
The IQ, ternary and MXFP4 quantizers live in :mod:`lib_gguf.quant_iq`.
"""
from __future__ import annotations

import logging

import torch

from .errors import GGUFFormatError
from . import backend as _bk
from .backend import get_backend, set_backend  # noqa: F401  (lib_gguf.quant.set_backend)
from .formats import GGMLType, get_format, quantizer_for, register_quantizer

log = logging.getLogger(__name__)

def _compiled(fmt, blocks: torch.Tensor):
    """The numba kernel's bytes, or None when the torch kernel should run."""
    if not fmt.is_quantized or blocks.device.type != "cpu" or blocks.dtype != torch.float32:
        return None
    return _bk.try_compiled("quantizer", fmt, _quant_numba,
                            lambda m: m.run(fmt.type_id, blocks, fmt.type_size), required=True)


def _quant_numba():
    from . import quant_numba

    return quant_numba


def quantize(tensor: torch.Tensor, qtype, name: str | None = None) -> torch.Tensor:
    """Quantize ``tensor`` to ``qtype``; returns uint8 of shape
    ``(*tensor.shape[:-1], bytes_per_row)`` on the tensor's device."""
    fmt = get_format(qtype, name)
    if tensor.dim() == 0:
        tensor = tensor.reshape(1)
    n_per_row = tensor.shape[-1]
    if n_per_row % fmt.block_size:
        raise GGUFFormatError(
            f"{fmt.name} needs rows that are a multiple of {fmt.block_size} weights, got {n_per_row} "
            f"(shape {list(tensor.shape)}); the quantization rules fall back to a format that fits",
            tensor=name,
        )
    fn = quantizer_for(fmt.type_id, name)
    x = tensor.detach()
    if x.dtype != torch.float32 and fmt.type_id not in _KEEP_DTYPE:
        x = x.to(torch.float32)
    lead = tuple(x.shape[:-1])
    blocks = x.reshape(-1, fmt.block_size)
    out = _compiled(fmt, blocks)
    if out is None:
        out = fn(blocks)
    return out.reshape(*lead, n_per_row // fmt.block_size * fmt.type_size)


_KEEP_DTYPE = {int(GGMLType.F64), int(GGMLType.I8), int(GGMLType.I16), int(GGMLType.I32), int(GGMLType.I64)}


def _caster(dst: torch.dtype):
    def fn(blocks: torch.Tensor) -> torch.Tensor:
        return blocks.to(dst).contiguous().view(torch.uint8).reshape(blocks.shape[0], -1)

    return fn


for _t, _dst in (
    (GGMLType.F32, torch.float32),
    (GGMLType.F16, torch.float16),
    (GGMLType.BF16, torch.bfloat16),
    (GGMLType.F64, torch.float64),
):
    register_quantizer(_t)(_caster(_dst))


# -- shared pieces -------------------------------------------------------------------

def chunked(blocks: int):
    """Run a per-block quantizer over at most ``blocks`` blocks at a time. Every block
    is independent, and slabs that stay in the CPU's cache make the many small
    element-order steps several times faster than one pass over a whole tensor."""
    def wrap(fn):
        def run(x: torch.Tensor, **kw) -> torch.Tensor:
            if x.shape[0] <= blocks:
                return fn(x, **kw)
            return torch.cat([fn(x[i:i + blocks], **kw) for i in range(0, x.shape[0], blocks)], dim=0)
        run.__name__, run.__doc__, run.__wrapped__ = fn.__name__, fn.__doc__, fn
        return run
    return wrap



def _f16_bytes(v: torch.Tensor) -> torch.Tensor:
    """float32 (n,) -> (n, 2) uint8, the fp16 bits (round to nearest even, as ggml)."""
    return v.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def _inv(d: torch.Tensor) -> torch.Tensor:
    """``d ? 1/d : 0`` in float32."""
    return torch.where(d != 0, 1.0 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))


def rdiv(c: float, t: torch.Tensor) -> torch.Tensor:
    """``c / t`` rounded as C rounds it. torch computes ``scalar / tensor`` as
    ``t.reciprocal() * scalar``, which differs in the last bit about a quarter of the
    time for constants that are not powers of two (63, 15, 31...)."""
    return torch.full_like(t, float(c)) / t


def sqrtf(t: torch.Tensor) -> torch.Tensor:
    """C's sqrtf, correctly rounded. torch's float32 sqrt on the CPU is not always
    (46.369140625 gives one ulp below the nearest float), so take it in float64:
    a float64 square root of a float32 rounds back to the nearest float32. (Apple's
    MPS has no float64: there the float32 square root is used.)"""
    if t.device.type == "mps":
        return t.sqrt()
    return t.double().sqrt().to(t.dtype)


def roundf(v: torch.Tensor) -> torch.Tensor:
    """C's roundf (half away from zero), exactly, in float32."""
    r = torch.round(v)  # half to even
    t = torch.trunc(v)
    tie = (v - t).abs() == 0.5
    return torch.where(tie, t + torch.sign(v), r)


def _signed_absmax(x: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude in each block (the first one on ties; +0 when all are 0)."""
    idx = x.abs().argmax(dim=-1, keepdim=True)
    m = x.gather(-1, idx).squeeze(-1)
    return torch.where(m == 0, torch.zeros_like(m), m)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(n, 32) values 0..15 -> (n, 16) bytes: low nibble j, high nibble j + 16."""
    q = q.to(torch.uint8)
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


_BYTE_BITS = 0x0102040810204080  # sum of 2**(56 - 7i): byte i's low bit lands on bit 56 + i


def _pack_high_bits(q: torch.Tensor) -> torch.Tensor:
    """(n, 32) 5-bit values -> (n, 4) bytes: bit 4 of value j at bit j of a little-endian uint32.

    Eight 0/1 bytes read as one int64 and multiplied by ``_BYTE_BITS`` put byte i's
    bit at bit 56 + i, with no carries (every partial product has its own bit)."""
    bits = ((q.to(torch.uint8) >> 4) & 1).contiguous().view(torch.int64)   # (n, 4): 8 values each
    return ((bits * _BYTE_BITS) >> 56 & 0xFF).to(torch.uint8)


# -- legacy 32-weight formats (ggml's quantize_row_*_ref) -----------------------------

@register_quantizer(GGMLType.Q8_0)
@chunked(8192)
def _q8_0(x: torch.Tensor) -> torch.Tensor:
    amax = x.abs().amax(dim=-1)
    d = amax / 127
    q = roundf(x * _inv(d)[:, None]).to(torch.int8).view(torch.uint8)
    return torch.cat([_f16_bytes(d), q], dim=1)


def _symmetric(x: torch.Tensor, bits: int) -> torch.Tensor:
    half = 1 << (bits - 1)
    d = _signed_absmax(x) / -half
    # C's (int8_t) cast truncates toward zero; x * id + half + 0.5 lies in [0.5, 2 * half + 0.5]
    q = (x * _inv(d)[:, None] + (half + 0.5)).to(torch.int8).clamp_(max=2 * half - 1)
    parts = [_f16_bytes(d)]
    if bits == 5:
        parts.append(_pack_high_bits(q))
    parts.append(_pack_nibbles(q))
    return torch.cat(parts, dim=1)


def _asymmetric(x: torch.Tensor, bits: int) -> torch.Tensor:
    lo, hi = torch.aminmax(x, dim=-1)
    # A running min/max in C keeps the first zero it meets: a zero result takes that
    # zero's sign, so the stored fp16 matches ggml's bit for bit.
    zero = (lo == 0) | (hi == 0)
    if bool(zero.any()):
        first_zero = (x == 0).to(torch.int8).argmax(dim=-1, keepdim=True)
        z = x.gather(-1, first_zero).squeeze(-1)
        lo = torch.where(lo == 0, z, lo)
        hi = torch.where(hi == 0, z, hi)
    d = (hi - lo) / ((1 << bits) - 1)
    q = ((x - lo[:, None]) * _inv(d)[:, None] + 0.5).to(torch.int8)  # C's (int8_t): truncation
    if bits == 4:
        q = q.clamp_(max=15)
    parts = [_f16_bytes(d), _f16_bytes(lo)]
    if bits == 5:
        parts.append(_pack_high_bits(q))
    parts.append(_pack_nibbles(q))
    return torch.cat(parts, dim=1)


# 8192 blocks (262144 weights) a pass: the few full passes stay in the CPU's cache
register_quantizer(GGMLType.Q4_0)(chunked(8192)(lambda x: _symmetric(x, 4)))
register_quantizer(GGMLType.Q5_0)(chunked(8192)(lambda x: _symmetric(x, 5)))
register_quantizer(GGMLType.Q4_1)(chunked(8192)(lambda x: _asymmetric(x, 4)))
register_quantizer(GGMLType.Q5_1)(chunked(8192)(lambda x: _asymmetric(x, 5)))


# -- K-quants (ggml's quantize_row_q*_K_ref) -----------------------------------------
#
# ggml sums in element order in float32; so do we: the loops below run over the
# (16 or 32) elements of a sub-block, each step vectorized over every sub-block at
# once, which reproduces C's rounding exactly.

def nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int: round half to even (its magic-number trick), as float."""
    return torch.round(v)


def _seq_sum(terms) -> torch.Tensor:
    acc = None
    for t in terms:
        acc = t if acc is None else acc + t
    return acc


def _make_qx_quants(x: torch.Tensor, nmax: int):
    """ggml's make_qx_quants with rmse_type 1 (weights x*x): per row of ``x`` (n, k),
    returns (scale (n,), L (n, k) in 0..2*nmax-1 as float).

    The 19 tries are independent until the choice, so they run as one batch: every
    element-order sum is k steps over a (2 * tries, n) slab instead of 2 * tries * k
    small steps."""
    n, k = x.shape
    ax = x.abs()
    idx = ax.argmax(dim=1, keepdim=True)
    mx = x.gather(1, idx).squeeze(1)
    amax = ax.gather(1, idx).squeeze(1)
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
    sum_w = _seq_sum(wt[i] for i in range(k))
    sum_x = _seq_sum(wt[i] * xt[i] for i in range(k))
    mn = torch.where(mn > 0, torch.zeros_like(mn), mn)
    flat = mx == mn
    one = torch.ones_like(mx)
    rng = torch.where(flat, one, mx - mn)
    iscale = rdiv(float(nmax), rng)
    scale = 1.0 / iscale
    L = nearest_int(iscale * (xt - mn)).clamp_(0, nmax)
    diff = scale * L + mn - xt
    diff = diff.abs() if use_mad else diff * diff
    best_mad = _seq_sum(wt[i] * diff[i] for i in range(k))
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


def _f16_round(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.float16).to(torch.float32)


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
    sum_x2 = _seq_sum(st[i] * st[i] for i in range(32))
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
    dd = _f16_round(d)[:, None] * ls.to(torch.float32)
    dm = _f16_round(dmin)[:, None] * lm.to(torch.float32)
    xs = x.reshape(nb, 8, 32)
    safe = torch.where(dd != 0, dd, torch.ones_like(dd))
    Lnew = nearest_int((xs + dm[:, :, None]) / safe[:, :, None]).clamp(0, nmax)
    L = torch.where((dd != 0)[:, :, None], Lnew, L.reshape(nb, 8, 32)).reshape(nb, 256).to(torch.uint8)
    head = torch.cat([_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(ls, lm)], dim=1)
    return head, L


@register_quantizer(GGMLType.Q4_K)
def _q4_k(x: torch.Tensor) -> torch.Tensor:
    head, L = _q45_k(x, 15, -1.0, 20)
    L = L.reshape(-1, 4, 2, 32)
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)
    return torch.cat([head, qs], dim=1)


@register_quantizer(GGMLType.Q5_K)
def _q5_k(x: torch.Tensor) -> torch.Tensor:
    head, L = _q45_k(x, 31, -0.5, 15)
    L = L.reshape(-1, 4, 2, 32)
    lo = L & 0xF
    hi = (L >> 4) & 1  # (nb, 4, 2, 32): bit 2*n (+1 for the second half) of qh[j]
    shifts = (torch.arange(4, device=x.device).reshape(1, 4, 1, 1) * 2
              + torch.arange(2, device=x.device).reshape(1, 1, 2, 1)).to(torch.uint8)
    qh = (hi << shifts).sum(dim=(1, 2)).to(torch.uint8)
    qs = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(-1, 128)
    return torch.cat([head, qh, qs], dim=1)


@register_quantizer(GGMLType.Q6_K)
def _q6_k(x: torch.Tensor) -> torch.Tensor:
    nb = x.shape[0]
    sub = x.reshape(nb * 16, 16)
    scales, L = _make_qx_quants(sub, 32)
    scales = scales.reshape(nb, 16)
    L = L.reshape(nb, 16, 16)
    sa = scales.abs()
    idx = sa.argmax(dim=1, keepdim=True)
    max_abs = sa.gather(1, idx).squeeze(1)
    max_scale = scales.gather(1, idx).squeeze(1)
    zero = max_abs < 1e-15
    safe = torch.where(zero, torch.ones_like(max_scale), max_scale)
    iscale = rdiv(-128.0, safe)
    d = torch.where(zero, torch.zeros_like(iscale), 1.0 / iscale)
    sc = nearest_int(iscale[:, None] * scales).clamp(max=127)
    sc = torch.where(zero[:, None], torch.zeros_like(sc), sc)
    dd = _f16_round(d)[:, None] * sc
    safe_dd = torch.where(dd != 0, dd, torch.ones_like(dd))
    Lnew = nearest_int(x.reshape(nb, 16, 16) / safe_dd[:, :, None]).clamp(-32, 31) + 32
    L = torch.where((dd != 0)[:, :, None], Lnew, L)
    L = torch.where(zero[:, None, None], torch.zeros_like(L), L).reshape(nb, 2, 4, 32).to(torch.uint8)
    ql = torch.cat([(L[:, :, 0] & 0xF) | ((L[:, :, 2] & 0xF) << 4), (L[:, :, 1] & 0xF) | ((L[:, :, 3] & 0xF) << 4)],
                   dim=2).reshape(nb, 128)
    qh = ((L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6))
    qh = qh.reshape(nb, 64)
    sc8 = sc.to(torch.int8).view(torch.uint8)
    return torch.cat([ql, qh, sc8, _f16_bytes(d)], dim=1)


@register_quantizer(GGMLType.Q2_K)
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
    dd = _f16_round(d)[:, None] * (sc & 0xF).to(torch.float32)
    dm = _f16_round(dmin)[:, None] * (sc >> 4).to(torch.float32)
    safe = torch.where(dd != 0, dd, torch.ones_like(dd))
    Lnew = nearest_int((x.reshape(nb, 16, 16) + dm[:, :, None]) / safe[:, :, None]).clamp(0, 3)
    L = torch.where((dd != 0)[:, :, None], Lnew, L).reshape(nb, 2, 4, 32).to(torch.uint8)
    qs = (L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)).reshape(nb, 64)
    return torch.cat([sc.to(torch.uint8), qs, _f16_bytes(d), _f16_bytes(dmin)], dim=1)


def _make_q3_quants(x: torch.Tensor, nmax: int):
    """ggml's make_q3_quants with do_rmse: per row of ``x`` (m, k), (scale, L + nmax)."""
    xt = x.t().contiguous()
    k = xt.shape[0]
    ax = xt.abs()
    idx = ax.argmax(dim=0, keepdim=True)
    amax = ax.gather(0, idx).squeeze(0)
    mx = xt.gather(0, idx).squeeze(0)
    zero = amax < 1e-15
    iscale = rdiv(-float(nmax), torch.where(zero, torch.ones_like(mx), mx))
    L = nearest_int(iscale * xt).clamp(-nmax, nmax - 1)
    w = xt * xt
    wx = w * xt
    sumlx = _seq_sum(wx[i] * L[i] for i in range(k))
    suml2 = _seq_sum(w[i] * L[i] * L[i] for i in range(k))
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


@register_quantizer(GGMLType.Q3_K)
def _q3_k(x: torch.Tensor) -> torch.Tensor:
    nb = x.shape[0]
    scales, L = _make_q3_quants(x.reshape(nb * 16, 16), 4)
    scales, L = scales.reshape(nb, 16), L.reshape(nb, 16, 16)
    sa = scales.abs()
    idx = sa.argmax(dim=1, keepdim=True)
    max_scale = torch.where(sa.gather(1, idx).squeeze(1) > 0, scales.gather(1, idx).squeeze(1),
                            torch.zeros(nb, device=x.device))
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
    dd = _f16_round(d)[:, None] * sc
    safe = torch.where(dd != 0, dd, torch.ones_like(dd))
    Lnew = nearest_int(x.reshape(nb, 16, 16) / safe[:, :, None]).clamp(-4, 3) + 4
    L = torch.where((dd != 0)[:, :, None], Lnew, L).reshape(nb, 256).to(torch.int32)
    high = (L > 3).to(torch.int32).reshape(nb, 8, 32)  # value j: byte j % 32, bit j // 32
    hmask = (high << torch.arange(8, device=x.device, dtype=torch.int32)[None, :, None]).sum(dim=1)
    L = torch.where(L > 3, L - 4, L).reshape(nb, 2, 4, 32)
    qs = (L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)).reshape(nb, 64)
    return torch.cat([hmask.to(torch.uint8), qs.to(torch.uint8), packed.to(torch.uint8), _f16_bytes(d)], dim=1)
