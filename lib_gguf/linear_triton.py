"""Fused dequantize-matmul for :class:`~lib_gguf.layers.GGUFLinear` on CUDA (Triton).

``y = x @ dequantize(W).T + bias (+ the run-time LoRA deltas)`` in one kernel: each
program dequantizes (BLOCK_N x BLOCK_K) weight tiles in registers with the format's
value function from :mod:`lib_gguf.dequant_triton` (the same code as the dequantizers,
so the same values), rounds them to the activations' dtype (float16 or bfloat16) and
feeds them to ``tl.dot`` (the tensor cores); the float weight is never written to
memory. Run-time LoRAs (low-rank, from :mod:`lib_lora`'s hooks) are folded into the
same kernel: ``t = x @ down.T`` (tokens x rank, one small matmul) goes in beside the
weight and the kernel adds ``t @ up.T`` to its accumulator before the single store of
the output, so there is no second pass over the output.

Which path runs per shape is :func:`choose`'s: a rule table measured by
``bench/gpu.py`` (``--write-rule FILE``; ``LIB_GGUF_FUSED_RULE=FILE`` makes it the rule)
or, until it is measured, :data:`DEFAULT_MAX_TOKENS`. ``LIB_GGUF_FUSED`` = ``auto``
(the rule, the default), ``always`` or ``never`` overrides it; the backend choice
``torch`` (:func:`lib_gguf.backend.set_backend`) turns it off too.
"""
from __future__ import annotations

import json
import logging
import os
import weakref
from typing import Dict, List, Optional, Tuple

import torch

from .backend import get_backend, has_failed, mark_failed
from .dequant_triton import spec, table_for
from .parameter import raw_bytes
from .triton_support import COMPILE_ERRORS, interpreting, on_device, tl, triton

log = logging.getLogger(__name__)

# The formats of Flux GGUF files (and IQ4_XS): the fused kernel is built for them.
FUSED_FORMATS = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K", "IQ4_XS")
_DTYPES = (torch.float16, torch.bfloat16)

# Until measured on a GPU (bench/gpu.py prints and writes the measured table): the fused
# kernel for up to this many tokens (rows of x), where reading the quantized weight once
# instead of writing and re-reading a float copy matters most; dequantize + F.linear
# (cuBLAS) above it. A guess, stated as one: no GPU has run this code yet.
DEFAULT_MAX_TOKENS = 256


def _load_rule() -> Dict[Tuple[str, str], List[Tuple[int, int, int, str]]]:
    """``{(format, dtype): [(tokens, n, k, "fused"|"dequant"), ...]}`` from the file
    ``LIB_GGUF_FUSED_RULE`` names (bench/gpu.py ``--write-rule``), else {}."""
    path = os.environ.get("LIB_GGUF_FUSED_RULE")
    if not path:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        rule = {}
        for key, rows in raw["rule"].items():
            fmt, dtype = key.split("/")
            rule[(fmt, dtype)] = [(int(m), int(n), int(k), str(c)) for m, n, k, c in rows]
        return rule
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("LIB_GGUF_FUSED_RULE=%s unreadable (%s); using the default rule", path, e)
        return {}


_RULE = _load_rule()


def set_rule(rule: Optional[dict]) -> dict:
    """Replace the measured rule (``{(format, dtype_name): [(tokens, n, k, choice), ...]}``);
    returns the previous one. ``None`` or ``{}``: the default."""
    global _RULE
    old, _RULE = _RULE, dict(rule or {})
    return old


def choose(fmt_name: str, m: int, n: int, k: int, dtype: torch.dtype) -> str:
    """``"fused"`` or ``"dequant"`` (dequantize, then ``F.linear``) for ``m`` tokens
    through an ``n x k`` weight. Measured rows of the same (format, dtype) decide by
    the nearest measured shape (same n and k first, then the nearest token count);
    without any, :data:`DEFAULT_MAX_TOKENS`."""
    force = os.environ.get("LIB_GGUF_FUSED", "auto").strip().lower()
    if force in ("always", "1", "on", "fused"):
        return "fused"
    if force in ("never", "0", "off", "dequant"):
        return "dequant"
    rows = _RULE.get((fmt_name, str(dtype).replace("torch.", "")))
    if rows:
        same = [r for r in rows if r[1] == n and r[2] == k] or rows
        best = min(same, key=lambda r: (abs(_log2(r[0]) - _log2(m)), abs(_log2(r[1] * r[2]) - _log2(n * k))))
        return best[3]
    return "fused" if m <= DEFAULT_MAX_TOKENS else "dequant"


def _log2(v: int) -> float:
    import math

    return math.log2(max(1, v))


def supported(fmt_name: str, dtype: torch.dtype) -> bool:
    return triton is not None and fmt_name in FUSED_FORMATS and dtype in _DTYPES


if triton is not None:
    @triton.jit
    def _fused_linear(x, w, tab, bias, t, u, y, M, N, K, row_bytes, R,
                      VALUE: tl.constexpr, BS: tl.constexpr, TS: tl.constexpr, HAS_BIAS: tl.constexpr,
                      HAS_LORA: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                      BK: tl.constexpr, GROUP_M: tl.constexpr, F32_DOT: tl.constexpr):
        """``y[M, N] = x[M, K] @ W[N, K].T (+ bias) (+ t[M, R] @ u[N, R].T)``; W as GGUF
        bytes, ``row_bytes`` a row; x, t, u, y contiguous; K a multiple of BK.
        ``F32_DOT`` (Triton's CPU interpreter only, whose ``tl.dot`` multiplies bfloat16
        bit patterns as integers): the same rounded operands, multiplied in float32."""
        pid = tl.program_id(0)
        n_m = tl.cdiv(M, BM)
        n_n = tl.cdiv(N, BN)
        group = GROUP_M * n_n  # programs in a group share weight tiles in L2
        first_m = (pid // group) * GROUP_M
        size_m = tl.minimum(n_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group) % size_m
        pid_n = (pid % group) // size_m
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        mask_m = rm < M
        mask_n = rn < N
        rm64 = rm.to(tl.int64)
        row = rn.to(tl.int64)[:, None] * row_bytes
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            xt = tl.load(x + rm64[:, None] * K + rk[None, :], mask=mask_m[:, None], other=0.0)
            off = row + ((rk // BS) * TS)[None, :]
            wt = VALUE(w, off, (rk % BS)[None, :], mask_n[:, None], tab)
            wt = wt.to(xt.dtype, fp_downcast_rounding="rtne")
            if F32_DOT:
                acc += tl.dot(xt.to(tl.float32), tl.trans(wt.to(tl.float32)))
            else:
                acc += tl.dot(xt, tl.trans(wt))
        if HAS_LORA:
            rr = tl.arange(0, BR)
            tt = tl.load(t + rm64[:, None] * BR + rr[None, :], mask=mask_m[:, None], other=0.0)
            uu = tl.load(u + rn.to(tl.int64)[:, None] * BR + rr[None, :], mask=mask_n[:, None], other=0.0)
            if F32_DOT:
                acc += tl.dot(tt.to(tl.float32), tl.trans(uu.to(tl.float32)))
            else:
                acc += tl.dot(tt, tl.trans(uu))
        if HAS_BIAS:
            acc += tl.load(bias + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(y + rm64[:, None] * N + rn[None, :], acc.to(y.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _block_k(k: int, bs: int, want: int) -> int:
    for bk in (want, 128, 64, 32, 16):
        if bk <= want and k % bk == 0 and (bk % bs == 0 or bs % bk == 0):
            return bk
    raise ValueError(f"no K tile fits K={k}")


def _config(m: int, n: int, k: int, bs: int) -> dict:
    """Tile sizes: small tiles under the interpreter (it runs them on the CPU); on a GPU
    128x128x64 tiles (8 warps, 3 stages) for many tokens, narrower in M for few."""
    if interpreting():
        return dict(BM=16 if m <= 16 else 32, BN=32, BK=_block_k(k, bs, 32), GROUP_M=4, num_warps=4, num_stages=1)
    if m <= 16:
        return dict(BM=16, BN=64, BK=_block_k(k, bs, 128), GROUP_M=8, num_warps=4, num_stages=4)
    if m <= 64:
        return dict(BM=64, BN=128, BK=_block_k(k, bs, 64), GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BM=128, BN=128, BK=_block_k(k, bs, 64), GROUP_M=8, num_warps=8, num_stages=3)


def fused_linear(x: torch.Tensor, weight, bias: Optional[torch.Tensor] = None,
                 lora: Optional[Tuple[torch.Tensor, torch.Tensor]] = None, config: Optional[dict] = None
                 ) -> torch.Tensor:
    """``F.linear(x, dequantize(weight), bias)`` plus ``(x @ down.T) @ up.T`` for
    ``lora = (down [R, K], up [N, R])`` (strengths folded into ``down``), in one fused
    kernel. ``weight``: a :class:`~lib_gguf.parameter.GGUFParameter` on x's device in
    one of :data:`FUSED_FORMATS`; x float16 or bfloat16."""
    fmt = weight.gguf_cls
    kernel = spec(fmt.type_id)
    if kernel is None or fmt.name not in FUSED_FORMATS:
        raise ValueError(f"no fused kernel for {fmt.name}")
    value, _tab, bs, ts = kernel
    n, k = (int(s) for s in weight.gguf_shape)
    if not fmt.fits(k):
        raise ValueError(f"{fmt.name} rows of {k} weights are not whole blocks: no fused kernel (dequantize it)")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    wb = raw_bytes(weight).reshape(n, -1)
    if not wb.is_contiguous():
        wb = wb.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*lead, n)
    cfg = dict(config or _config(m, n, k, bs))
    has_lora = lora is not None and lora[0].shape[0] > 0
    if has_lora:
        down, up = lora
        r = down.shape[0]
        br = max(16, triton.next_power_of_2(r))
        pad = torch.nn.functional.pad
        t = pad(x2 @ down.to(device=x.device, dtype=x.dtype).T, (0, br - r)).contiguous()
        u = pad(up.to(device=x.device, dtype=x.dtype), (0, br - r)).contiguous()
    else:
        br, t, u = 16, x2, x2  # unused
    b = bias if bias is not None else x2
    if bias is not None and (bias.device != x.device or not bias.is_contiguous()):
        b = bias.to(x.device).contiguous()
    grid = (triton.cdiv(m, cfg["BM"]) * triton.cdiv(n, cfg["BN"]),)
    with on_device(x2):
        _fused_linear[grid](x2, wb, table_for(fmt.type_id, x.device), b, t, u, y, m, n, k, wb.shape[1],
                            br, VALUE=value, BS=bs, TS=ts, HAS_BIAS=bias is not None, HAS_LORA=has_lora, BR=br,
                            F32_DOT=interpreting(), **cfg)
    return y.reshape(*lead, n)


def layer_forward(layer, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The fused forward of a GGUFLinear, or None when the caller should dequantize and
    call ``F.linear`` (format, dtype or device not covered, the rule says so, the backend
    choice is ``torch``, or the kernel does not compile here: logged once). Run-time LoRA
    hooks that can hand over their low-rank factors (``fused_lowrank``) are folded in,
    and told so (``fused_pending``, a weak reference to this output: their call on it
    adds nothing); the others add their delta after the forward, as forward hooks do."""
    w = layer.weight
    fmt = w.gguf_cls
    if not supported(fmt.name, x.dtype) or get_backend() == "torch":
        return None
    if w.device != x.device:
        return None
    n, k = (int(s) for s in w.gguf_shape)
    if not fmt.fits(k):
        return None  # rows stored across blocks (another tool's reshaped file): dequantize whole
    m = x.numel() // max(1, k)
    if choose(fmt.name, m, n, k, x.dtype) != "fused":
        return None
    key = ("fused", fmt.type_id)
    if has_failed(key) and get_backend() != "triton":
        return None
    hooks, downs, ups = [], [], []
    for h in list(layer._forward_hooks.values()):
        get = getattr(h, "fused_lowrank", None)
        if get is None:
            continue
        terms = get(x.device, x.dtype, n)
        if terms is None:
            continue
        hooks.append(h)
        if terms[0].shape[0]:
            downs.append(terms[0])
            ups.append(terms[1])
    lora = (torch.cat(downs), torch.cat(ups, dim=1)) if downs else None
    bias = None if layer.bias is None else layer.bias.to(device=x.device, dtype=x.dtype)
    try:
        y = fused_linear(x, w, bias, lora)
    except COMPILE_ERRORS as e:
        if get_backend() == "triton":
            raise
        mark_failed(key)
        log.warning("fused %s matmul unavailable (%s: %s); dequantizing and using F.linear", fmt.name,
                    type(e).__name__, e)
        return None
    if hooks:
        ref = weakref.ref(y)
        for h in hooks:
            h.fused_pending = ref
    return y
