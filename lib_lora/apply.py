"""Applying LoRAs to a module: merge-and-requantize, or the run-time low-rank delta.

``apply_loras(module, [(lora, strength), ...], mode, options)`` returns a
:class:`LoraHandle`. Applying is all-or-nothing: every new weight is computed
before any is swapped in. ``handle.remove()`` puts back the very parameter
objects that were there, so every weight is bit-identical to before. In run-time
mode the GGUF bytes are untouched; a forward hook adds
``strength * scale * up(down(x))`` to the layer's output (or to its slice of a
fused output), and changing a strength costs no re-merge.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from .errors import LoraError
from .loader import LoraFile, Patch, check_finite, check_strength, load_lora
from .policy import LoraOptions

log = logging.getLogger(__name__)

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _fmt(p):
    return getattr(p, "gguf_cls", None) if isinstance(p, torch.Tensor) else None


def _dequant(p: torch.Tensor) -> torch.Tensor:
    fmt = _fmt(p)
    if fmt is not None:
        return fmt.dequantize(p.data, p.gguf_shape, torch.float32)
    return p.detach().to(torch.float32)


def _region(w: torch.Tensor, sl) -> torch.Tensor:
    return w if sl is None else w.narrow(sl[0], sl[1], sl[2])


def merged_weight(param: torch.Tensor, patches: Sequence[Tuple[Patch, float]], name: Optional[str] = None,
                  ) -> torch.Tensor:
    """The float32 weight with every (patch, strength) added (DoRA applied). A result
    holding inf or NaN (a strength too large for float32, a broken weight) raises
    :class:`LoraError` naming the parameter: it is never written."""
    w = _dequant(param).clone()
    for patch, strength in patches:
        region = _region(w, patch.slice)
        delta = patch.delta(tuple(region.shape), torch.float32, w.device)
        if patch.dora_scale is not None:
            new = region + delta
            norm = new.reshape(new.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (new.dim() - 1)))
            scaled = new * (patch.dora_scale.to(w).reshape(-1, *([1] * (new.dim() - 1))) / norm)
            region.add_((scaled - region) * strength)
        elif abs(strength) > torch.finfo(torch.float32).max:  # add_'s alpha must fit float32
            region.add_(delta.mul_(strength))
        else:
            region.add_(delta, alpha=strength)
    finite = torch.isfinite(w)
    if not bool(finite.all()):
        sources = sorted({p.source for p, _ in patches})
        raise LoraError(f"merging gives {int((~finite).sum())} inf or NaN values (of {w.numel()}) "
                        f"from {', '.join(sources)}: a strength too large, or a weight already broken",
                        key=name or (patches[0][0].key if patches else None))
    return w


F16_MAX = 65504.0


def check_range(w: torch.Tensor, fmt, name: str, path=None) -> None:
    """Refuse merged values that the output format cannot hold: float16 (and the
    float16 scales of the quantized formats) end at 65504, beyond which the file
    would hold inf."""
    if fmt is None or fmt.name in ("F32", "BF16", "F64"):
        return
    peak = float(w.abs().max()) if w.numel() else 0.0
    if peak > F16_MAX:
        raise LoraError(f"merged values reach {peak:.3g}, beyond what {fmt.name} holds (float16's range, "
                        f"{F16_MAX:g}): a LoRA strength far too large?", path=path, key=name)


def _requantize(w: torch.Tensor, param: torch.Tensor, options: LoraOptions, name: str):
    from lib_gguf import GGUFParameter, get_format, quantize

    fmt = _fmt(param)
    if fmt is None:
        return torch.nn.Parameter(w.to(param.dtype), requires_grad=False), str(param.dtype).replace("torch.", "")
    target = get_format(options.target_for(fmt))
    if not target.fits(w.shape[-1]) or not target.can_quantize:
        target = get_format("F16")
    check_range(w, target, name)
    q = quantize(w, target, name=name)
    new = GGUFParameter(q.to(param.data.device), target, tuple(param.gguf_shape),
                        computation_dtype=getattr(param, "computation_dtype", torch.float16))
    new.baked = getattr(param, "baked", False)
    return new, target.name


def merge_keep(param: torch.Tensor, patches: Sequence[Tuple[Patch, float]], options: LoraOptions,
               max_rows: int = 64) -> float:
    """The share of the delta a merge would keep: ``<merged - before, delta> / <delta, delta>``,
    measured by requantizing a sample of rows (1.0 for float parameters)."""
    from lib_gguf import get_format, quantize

    fmt = _fmt(param)
    if fmt is None:
        return 1.0
    before = _dequant(param)
    after = merged_weight(param, patches)
    rows = before.reshape(-1, before.shape[-1])
    n = rows.shape[0]
    idx = torch.linspace(0, n - 1, steps=min(n, max_rows)).long()
    b = rows[idx]
    a = after.reshape(-1, before.shape[-1])[idx]
    delta = a - b
    dd = float((delta * delta).sum())
    if dd == 0.0:
        return 1.0
    target = get_format(options.target_for(fmt))
    if not target.fits(b.shape[-1]) or not target.can_quantize:
        return 1.0
    requant = target.dequantize(quantize(a, target), a.shape, torch.float32)
    return float(((requant - b) * delta).sum()) / dd


@dataclass
class LayerReport:
    param: str
    mode: str  # "merge" or "runtime"
    why: str
    format: str = ""
    kept: Optional[float] = None


class _RuntimeHook:
    """Adds the low-rank deltas of one layer to its output."""

    def __init__(self, module: torch.nn.Module, param_name: str, entries: List[list], compute_dtype):
        self.module = module
        self.param_name = param_name
        self.entries = entries  # [patch, strength_index] pairs; strengths live in the handle
        self.compute_dtype = compute_dtype
        self.strengths: List[float] = []
        self._cache: Dict[tuple, list] = {}
        self.handle = module.register_forward_hook(self)

    def _factors(self, device, dtype):
        key = (device, dtype)
        if key not in self._cache:
            # one copy, for where the layer runs now: a layer that Forge moves back to
            # the CPU (or swaps out) must not keep its factors alive on the GPU
            self._cache.clear()
            facs = []
            for patch, si, dora_factor in self.entries:
                if patch.is_lowrank:
                    up = patch.tensors["up"].flatten(1).to(device=device, dtype=dtype)
                    down = (patch.tensors["down"].flatten(1) * patch.scale).to(device=device, dtype=dtype)
                    facs.append((patch, si, up, down, None, dora_factor))
                else:  # LoHa / LoKr / diff: materialised once here, not per step
                    w = self.module.weight
                    shape = patch.target_shape(tuple(w.shape))
                    full = patch.delta(shape, torch.float32).to(device=device, dtype=dtype)
                    facs.append((patch, si, None, None, full.reshape(full.shape[0], -1), dora_factor))
            self._cache[key] = facs
        return self._cache[key]

    # A weak reference to the output of a forward that already added this hook's deltas
    # (lib_gguf's fused GGUF Linear, through ``fused_lowrank``): for that output this
    # hook only clears it.
    fused_pending = None

    def fused_lowrank(self, device, dtype, n_out: int):
        """``(down [R, in], up [n_out, R])`` with ``up @ down`` the sum of this hook's
        deltas at their current strengths (strength and scale folded into ``down``, a
        sliced patch's ``up`` zero outside its rows), for a forward that adds
        ``(x @ down.T) @ up.T`` itself; None when a delta is not plain low-rank (DoRA,
        LoHa, LoKr, diff) or runs in another compute dtype: then this hook adds them."""
        if self.compute_dtype not in (None, dtype):
            return None
        facs = self._factors(device, dtype)
        if any(full is not None or dora is not None for _p, _si, _u, _d, full, dora in facs):
            return None
        key = ("fused", device, dtype, n_out, tuple(self.strengths[si] for _p, si, *_ in facs))
        hit = self._cache.get(key)
        if hit is None:
            downs, ups = [], []
            for patch, si, up, down, _full, _dora in facs:
                s = self.strengths[si]
                if s == 0.0:
                    continue
                sl = patch.slice
                if sl is not None:
                    full_up = torch.zeros((n_out, up.shape[1]), dtype=up.dtype, device=up.device)
                    full_up[sl[1]:sl[1] + sl[2]] = up
                    up = full_up
                downs.append(down * s)
                ups.append(up)
            k = facs[0][3].shape[1] if facs else 0
            hit = ((torch.cat(downs), torch.cat(ups, dim=1)) if downs else
                   (torch.zeros((0, k), dtype=dtype, device=device), torch.zeros((n_out, 0), dtype=dtype, device=device)))
            for old in [c for c in self._cache if isinstance(c, tuple) and c and c[0] == "fused"]:
                del self._cache[old]
            self._cache[key] = hit
        return hit

    def __call__(self, module, inputs, out):
        pending, self.fused_pending = self.fused_pending, None
        if pending is not None and pending() is out:  # the fused forward added the deltas already
            return out
        x = inputs[0]
        dtype = self.compute_dtype or x.dtype
        xin = x.to(dtype)
        bias = getattr(module, "bias", None)
        for patch, si, up, down, full, dora in self._factors(x.device, dtype):
            s = self.strengths[si]
            if s == 0.0:
                continue
            d = (xin @ down.T) @ up.T if full is None else xin @ full.T
            sl = patch.slice
            target = out if sl is None else out.narrow(-1, sl[1], sl[2])
            if dora is not None:  # out' = f * (W x + dW x): per-output factor, computed at apply
                f = dora.to(device=x.device, dtype=out.dtype)
                base = target if bias is None else target - _region(bias.to(out), sl)
                target.add_(((f - 1) * base + f * d.to(out.dtype)) * s)
            else:
                target.add_(d.to(out.dtype), alpha=s)
        return out

    def remove(self):
        self.handle.remove()


@dataclass
class LoraHandle:
    module: torch.nn.Module
    strengths: List[float]
    report: List[LayerReport] = field(default_factory=list)
    _originals: Dict[str, torch.Tensor] = field(default_factory=dict)
    _hooks: List[_RuntimeHook] = field(default_factory=list)
    removed: bool = False

    def set_strength(self, index: int, strength: float) -> None:
        """Change a LoRA's strength; only run-time layers follow (merged ones are baked)."""
        strength = check_strength(strength)
        self.strengths[index] = strength
        for h in self._hooks:
            h.strengths[index] = strength
        if any(r.mode == "merge" for r in self.report):
            log.info("strength changed: run-time layers follow now; merged layers keep the strength they were "
                     "merged with until the LoRAs are applied again")

    def remove(self) -> None:
        """Every weight back as it was (the same objects), every hook gone."""
        if self.removed:
            return
        for h in self._hooks:
            h.remove()
        for name, original in self._originals.items():
            mod, attr = _owner(self.module, name)
            setattr(mod, attr, original)
        self.removed = True

    def modes(self) -> Dict[str, str]:
        return {r.param: r.mode for r in self.report}

    def summary(self) -> str:
        merged = sum(r.mode == "merge" for r in self.report)
        runtime = len(self.report) - merged
        moved = [r.param for r in self.report if "would keep" in r.why]
        s = f"{merged} merged, {runtime} at run time"
        if moved:
            s += f"; moved to run time (a merge would lose the delta): {', '.join(moved)}"
        return s


def _owner(root: torch.nn.Module, name: str):
    path, _, attr = name.rpartition(".")
    return (root.get_submodule(path) if path else root), attr


def apply_loras(module: torch.nn.Module, loras: Sequence[Tuple[Union[LoraFile, str, dict], float]],
                mode: str = "auto", options: Optional[LoraOptions] = None) -> LoraHandle:
    """Apply LoRAs to ``module``; see the module docstring."""
    options = options or LoraOptions()
    if mode not in ("auto", "merge", "runtime"):
        raise LoraError(f"mode must be auto, merge or runtime, got {mode!r}")
    params = dict(module.named_parameters())
    files = []
    for l, s in loras:
        where = getattr(l, "path", None) if isinstance(l, LoraFile) else (None if isinstance(l, dict) else l)
        s = check_strength(s, where)
        if isinstance(l, LoraFile):  # built elsewhere: its tensors are checked here
            for plist in l.patches.values():
                for p in plist:
                    check_finite(l.path, {f"{p.source}.{k}": v for k, v in p.tensors.items()})
        files.append((l if isinstance(l, LoraFile) else load_lora(l, params), s))
    by_param: Dict[str, List[Tuple[Patch, int]]] = {}
    for i, (lf, _s) in enumerate(files):
        for name, patches in lf.patches.items():
            if name not in params:
                raise LoraError(f"the module has no parameter {name}", path=lf.path)
            for p in patches:
                by_param.setdefault(name, []).append((p, i))
    strengths = [s for _, s in files]
    handle = LoraHandle(module, strengths)
    compute_dtype = _DTYPES.get(options.compute_dtype)

    # 1. decide and compute everything; nothing in the module changes yet
    new_params: Dict[str, torch.Tensor] = {}
    runtime: Dict[str, List[list]] = {}
    for name, plist in by_param.items():
        param = params[name]
        fmt = _fmt(param)
        mod, attr = _owner(module, name)
        weighted = [(p, strengths[i]) for p, i in plist]
        is_linear_weight = attr == "weight" and param.dim() == 2 and hasattr(mod, "weight") and hasattr(mod, "forward")
        if fmt is None:
            want, why = "merge", "float parameter: merged exactly"
        else:
            want = options.mode_for(fmt.name, mode)
            why = f"{fmt.name}: {'asked' if mode != 'auto' else 'option'} {want}"
        if want == "runtime" and not is_linear_weight:
            want, why = "merge", "not a Linear weight: merged"
        kept = None
        if want == "merge" and fmt is not None and mode == "auto":
            kept = merge_keep(param, weighted, options)
            if kept < options.keep_threshold:
                if is_linear_weight:
                    want = "runtime"
                    why = f"{fmt.name}: a merge would keep {kept:.0%} of the delta (< {options.keep_threshold:.0%})"
        if want == "merge":
            try:
                w = merged_weight(param, weighted, name)
                new_params[name], target = _requantize(w, param, options, name)
            except LoraError:
                raise
            except Exception as e:
                raise LoraError(f"cannot merge into {name}: {e}") from e
            handle.report.append(LayerReport(name, "merge", why, target, kept))
        else:
            entries = []
            for p, i in plist:
                dora = None
                if p.dora_scale is not None:
                    w = _region(_dequant(param), p.slice)
                    new = w + p.delta(tuple(w.shape), torch.float32)
                    dora = (p.dora_scale.float().reshape(-1) / new.reshape(new.shape[0], -1).norm(dim=1))
                entries.append([p, i, dora])
            runtime[name] = entries
            handle.report.append(LayerReport(name, "runtime", why, fmt.name if fmt else "", kept))

    # 2. swap in (cannot fail part-way: attribute assignments and hook registration)
    try:
        for name, new in new_params.items():
            mod, attr = _owner(module, name)
            handle._originals[name] = getattr(mod, attr)
            setattr(mod, attr, new)
        for name, entries in runtime.items():
            mod, _ = _owner(module, name)
            hook = _RuntimeHook(mod, name, entries, compute_dtype)
            hook.strengths = handle.strengths
            handle._hooks.append(hook)
    except BaseException:
        handle.remove()
        raise
    log.info("LoRA applied: %s", handle.summary())
    return handle


def attach_runtime(module: torch.nn.Module, patches: Sequence[Tuple[Patch, float]], compute_dtype=None) -> _RuntimeHook:
    """Add low-rank deltas to one Linear-like layer's output at run time (its weight,
    GGUF or not, is untouched). Returns the hook; ``.remove()`` detaches it. Used by
    the Forge glue for Forge's own LoRA patches."""
    entries = [[p, i, None] for i, (p, _s) in enumerate(patches)]
    hook = _RuntimeHook(module, "weight", entries, compute_dtype)
    hook.strengths = [float(s) for _p, s in patches]
    return hook
