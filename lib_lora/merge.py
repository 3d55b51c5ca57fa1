"""Merging LoRA patches into a weight in float32, and what a merge would keep.

:func:`merged_weight` is the whole weight with every (patch, strength) added (DoRA
applied); :func:`merge_keep` estimates, from a sample of rows, the share of the delta
that requantizing a merged weight keeps. Both add the patches the same way
(:func:`_add_patches`); every patch changes rows (slices are along the rows), and
DoRA normalises each row on its own, so a row's merge needs no other row.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from .errors import LoraError
from .loader import Patch

F16_MAX = 65504.0


def _fmt(p):
    return getattr(p, "gguf_cls", None) if isinstance(p, torch.Tensor) else None


def dequantized(p: torch.Tensor) -> torch.Tensor:
    """A weight's float32 values (a GGUF weight dequantized)."""
    fmt = _fmt(p)
    if fmt is not None:
        return fmt.dequantize(p.data, p.gguf_shape, torch.float32)
    return p.detach().to(torch.float32)


def _rows_of(p: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The float32 values of rows ``rows`` of a 2-D weight; a GGUF weight's other rows
    are never dequantized (each row is whole blocks)."""
    fmt = _fmt(p)
    if fmt is not None:
        data = p.data.index_select(0, rows.to(p.data.device))
        return fmt.dequantize(data, (len(rows), p.gguf_shape[-1]), torch.float32)
    return p.detach().index_select(0, rows.to(p.device)).to(torch.float32)


def _add_lowrank(region: torch.Tensor, patch: Patch, strength: float) -> bool:
    """``region += strength * scale * (up @ down)`` as one fused product, with no delta
    the size of the weight made; False (nothing done) where the patch or its shapes do
    not suit it (the general path then adds, or says what does not fit)."""
    if not patch.is_lowrank or patch.dora_scale is not None or not region.is_contiguous():
        return False
    alpha = float(strength) * patch.scale
    if not abs(alpha) <= torch.finfo(torch.float32).max:
        return False
    up = patch.tensors["up"].flatten(1)
    down = patch.tensors["down"].flatten(1)
    flat = region.view(region.shape[0], -1)
    if up.shape[0] != flat.shape[0] or down.shape[1] != flat.shape[1] or up.shape[1] != down.shape[0]:
        return False
    flat.addmm_(up.to(device=region.device, dtype=region.dtype), down.to(device=region.device, dtype=region.dtype),
                alpha=alpha)
    return True


def _add(region: torch.Tensor, delta: torch.Tensor, patch: Patch, strength: float) -> None:
    """``region += strength * delta`` in place (DoRA's normalised form when the patch has one)."""
    if patch.dora_scale is not None:
        new = region + delta
        norm = new.reshape(new.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (new.dim() - 1)))
        mag = patch.dora_scale.to(region).reshape(-1, *([1] * (new.dim() - 1)))
        region.add_((new * (mag / norm) - region) * strength)
    elif abs(strength) > torch.finfo(torch.float32).max:  # add_'s alpha must fit float32
        region.add_(delta.mul_(strength))
    else:
        region.add_(delta, alpha=strength)


def _add_patches(w: torch.Tensor, param_shape: Tuple[int, ...], patches: Sequence[Tuple[Patch, float]],
                 rows: Optional[torch.Tensor] = None) -> None:
    """Add every (patch, strength) to ``w`` in place: ``w`` holds every row of the
    parameter (``rows`` None) or the parameter's rows ``rows`` (a sample)."""
    n = int(param_shape[0])
    for patch, strength in patches:
        start, length = (0, n) if patch.slice is None else (patch.slice[1], patch.slice[2])
        region_shape = patch.target_shape(tuple(param_shape))
        if rows is None:
            region = w if patch.slice is None else w.narrow(0, start, length)
            if tuple(region.shape) == tuple(region_shape) and _add_lowrank(region, patch, strength):
                continue
            _add(region, patch.delta(region_shape, torch.float32, w.device), patch, strength)
            continue
        sel = ((rows >= start) & (rows < start + length)).nonzero().flatten()
        if not len(sel):
            continue
        local = rows.index_select(0, sel) - start
        if patch.is_lowrank:  # only the sampled rows of up @ down
            up = patch.tensors["up"].to(torch.float32).flatten(1).index_select(0, local)
            delta = (up @ patch.tensors["down"].to(torch.float32).flatten(1)) * patch.scale
        else:
            delta = patch.delta(region_shape, torch.float32, w.device).reshape(length, -1).index_select(0, local)
        region = w.index_select(0, sel)
        if patch.dora_scale is not None:
            sampled = Patch(patch.key, patch.kind, patch.tensors, patch.alpha,
                            patch.dora_scale.reshape(-1).index_select(0, local), patch.slice, patch.source)
            _add(region, delta.reshape(region.shape), sampled, strength)
        else:
            _add(region, delta.reshape(region.shape), patch, strength)
        w.index_copy_(0, sel, region)


def value_range(w: torch.Tensor) -> Tuple[float, float]:
    """(smallest, largest) value of ``w`` in one pass; NaN in either when ``w`` holds a NaN."""
    if not w.numel():
        return 0.0, 0.0
    lo, hi = torch.aminmax(w)
    return float(lo), float(hi)


def _check_finite(w: torch.Tensor, patches, name: Optional[str]) -> None:
    lo, hi = value_range(w)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        finite = torch.isfinite(w)
        sources = sorted({p.source for p, _ in patches})
        raise LoraError(f"merging gives {int((~finite).sum())} inf or NaN values (of {w.numel()}) "
                        f"from {', '.join(sources)}: a strength too large, or a weight already broken",
                        key=name or (patches[0][0].key if patches else None))


def _shares_memory(w: torch.Tensor, param: torch.Tensor) -> bool:
    """Whether ``w`` may be ``param``'s own memory (a float weight already float32):
    then the merge works on a copy, never on the model's weight."""
    src = param.data if isinstance(param, torch.nn.Parameter) else param
    try:
        return w.untyped_storage().data_ptr() == src.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return True


def merged_weight(param: torch.Tensor, patches: Sequence[Tuple[Patch, float]], name: Optional[str] = None,
                  ) -> torch.Tensor:
    """The float32 weight with every (patch, strength) added (DoRA applied). A result
    holding inf or NaN (a strength too large for float32, a broken weight) raises
    :class:`LoraError` naming the parameter: it is never written."""
    w = dequantized(param)
    if _shares_memory(w, param):
        w = w.clone()
    _add_patches(w, tuple(w.shape), patches)
    _check_finite(w, patches, name)
    return w


def check_range(w: torch.Tensor, fmt, name: str, path=None) -> None:
    """Refuse merged values that the output format cannot hold: float16 (and the
    float16 scales of the quantized formats) end at 65504, beyond which the file
    would hold inf."""
    if fmt is None or fmt.name in ("F32", "BF16", "F64"):
        return
    lo, hi = value_range(w)
    peak = max(-lo, hi) if lo == lo and hi == hi else float("nan")
    if peak > F16_MAX:
        raise LoraError(f"merged values reach {peak:.3g}, beyond what {fmt.name} holds (float16's range, "
                        f"{F16_MAX:g}): a LoRA strength far too large?", path=path, key=name)


def merged_rows(param: torch.Tensor, patches: Sequence[Tuple[Patch, float]], rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` of :func:`merged_weight` (a 2-D weight), computed from those rows alone."""
    w = _rows_of(param, rows)
    _add_patches(w, tuple(param.shape), patches, rows)
    _check_finite(w, patches, None)
    return w


def sample_rows(n: int, max_rows: int) -> torch.Tensor:
    """``min(n, max_rows)`` rows spread evenly over ``n`` (always the same ones)."""
    return torch.unique(torch.linspace(0, n - 1, steps=min(n, max_rows)).round().long())


def merge_keep(param: torch.Tensor, patches: Sequence[Tuple[Patch, float]], target=None,
               max_rows: int = 64) -> float:
    """The share of the delta a merge would keep, ``<merged - before, delta> / <delta, delta>``,
    with ``merged`` the merged weight requantized into ``target`` (default: the weight's
    own format). Only ``max_rows`` rows (spread evenly) are dequantized, merged and
    requantized; 1.0 for float weights."""
    from lib_gguf import get_format, quantize

    fmt = _fmt(param)
    if fmt is None:
        return 1.0
    target = fmt if target is None else get_format(target)
    shape = tuple(param.shape)
    if len(shape) != 2:
        raise LoraError(f"a keep estimate needs a 2-D weight, got shape {list(shape)}")
    if not target.can_quantize or not target.fits(shape[-1]):
        return 1.0
    rows = sample_rows(shape[0], max_rows)
    before = _rows_of(param, rows)
    delta = merged_rows(param, patches, rows) - before
    after = before + delta
    dd = float((delta * delta).sum())
    if dd == 0.0:
        return 1.0
    requant = target.dequantize(quantize(after, target), after.shape, torch.float32)
    return float(((requant - before) * delta).sum()) / dd
