"""Applying LoRAs to a module: merge-and-requantize, or the run-time low-rank delta.

``apply_loras(module, [(lora, strength), ...], mode, options)`` returns a
:class:`LoraHandle`; :func:`lib_lora.policy.decide` says per weight where its patches
go (``mode`` other than ``"auto"``: that mode for every format). Applying is all-or-nothing: every new weight is computed
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
from .merge import _fmt, check_range, dequantized, merged_weight
from .policy import MODES, LoraOptions, decide, is_linear_weight

log = logging.getLogger(__name__)


def _region(w: torch.Tensor, sl) -> torch.Tensor:
    return w if sl is None else w.narrow(sl[0], sl[1], sl[2])


def _requantize(w: torch.Tensor, param: torch.Tensor, target: str, name: str):
    """The merged float32 ``w`` as the new parameter: a GGUF weight requantized into
    ``target`` (the policy's), a float one in its own dtype."""
    from lib_gguf import GGUFParameter, get_format, quantize

    if _fmt(param) is None:
        return torch.nn.Parameter(w.to(param.dtype), requires_grad=False)
    fmt = get_format(target)
    check_range(w, fmt, name)
    q = quantize(w, fmt, name=name)
    new = GGUFParameter(q.to(param.data.device), fmt, tuple(param.gguf_shape),
                        computation_dtype=getattr(param, "computation_dtype", torch.float16))
    new.baked = getattr(param, "baked", False)
    return new


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
        self.entries = entries  # [patch, strength index, DoRA factor or None]; strengths live in the handle
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
        if x.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            # a CPU's half-precision matrix products are several times slower than its
            # float32 ones: the small low-rank products run in float32 and are added
            # to the output in place, rounding once
            dtype = torch.float32
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
            elif target.dtype == d.dtype:
                target.add_(d, alpha=s)
            else:  # torch's mixed-dtype in-place add is a slow casting loop (1.5-1.8x measured): add in
                acc = target.to(d.dtype)  # float32, round once on the copy back (the same values)
                acc.add_(d, alpha=s)
                target.copy_(acc)
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
    if mode not in MODES:
        raise LoraError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode != "auto":  # an explicit mode is the choice for every format
        options = options.forcing(mode)
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

    # 1. decide and compute everything; nothing in the module changes yet
    new_params: Dict[str, torch.Tensor] = {}
    runtime: Dict[str, List[list]] = {}
    for name, plist in by_param.items():
        param = params[name]
        mod, attr = _owner(module, name)
        weighted = [(p, strengths[i]) for p, i in plist]
        # this runner adds every kind lib_lora reads at run time (LoHa, LoKr and full
        # diffs materialised once, DoRA as a per-row factor): no "others"
        d = decide(param, weighted, options, linear=is_linear_weight(mod, attr, param))
        if d.mode == "merge":
            try:
                w = merged_weight(param, weighted, name)
                new_params[name] = _requantize(w, param, d.target, name)
            except LoraError:
                raise
            except Exception as e:
                raise LoraError(f"cannot merge into {name}: {e}") from e
            handle.report.append(LayerReport(name, "merge", d.why, d.target, d.kept))
        else:
            entries = []
            for p, i in plist:
                dora = None
                if p.dora_scale is not None:
                    w = _region(dequantized(param), p.slice)
                    new = w + p.delta(tuple(w.shape), torch.float32)
                    dora = (p.dora_scale.float().reshape(-1) / new.reshape(new.shape[0], -1).norm(dim=1))
                entries.append([p, i, dora])
            runtime[name] = entries
            handle.report.append(LayerReport(name, "runtime", d.why, d.format, d.kept))

    # 2. swap in (cannot fail part-way: attribute assignments and hook registration)
    try:
        for name, new in new_params.items():
            mod, attr = _owner(module, name)
            handle._originals[name] = getattr(mod, attr)
            setattr(mod, attr, new)
        for name, entries in runtime.items():
            mod, _ = _owner(module, name)
            hook = _RuntimeHook(mod, name, entries, options.torch_compute_dtype())
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
