"""Reading LoRA files into patches keyed by model parameter.

``load_lora(path_or_state_dict, model_keys)`` returns a :class:`LoraFile`: its
``patches`` (model parameter name -> list of :class:`Patch`) and ``unplaced``
(every LoRA key it could not place, with the reason: never silently dropped).
A shape that does not fit, or a LoRA for another architecture, raises
:class:`LoraError` naming the file and the key.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch

from .errors import LoraError
from .keymaps import KeyMap, split_key

Slice = Tuple[int, int, int]


@dataclass
class Patch:
    """One LoRA's change to one parameter (or a slice of it, for fused weights)."""

    key: str  # model parameter name
    kind: str  # "lora", "loha", "lokr", "diff"
    tensors: Dict[str, torch.Tensor]
    alpha: Optional[float] = None
    dora_scale: Optional[torch.Tensor] = None
    slice: Optional[Slice] = None  # (dim, start, length) of the parameter
    source: str = ""  # the LoRA stem it came from

    @property
    def rank(self) -> int:
        if self.kind == "lora":
            return int(self.tensors["down"].shape[0])
        if self.kind == "loha":
            return int(self.tensors["hada_w1_b"].shape[0])
        return 0

    @property
    def scale(self) -> float:
        """alpha / rank (1 when the file gives no alpha)."""
        r = self.rank
        return float(self.alpha) / r if (self.alpha is not None and r) else 1.0

    @property
    def is_lowrank(self) -> bool:
        return self.kind == "lora" and "mid" not in self.tensors

    def target_shape(self, param_shape: Tuple[int, ...]) -> Tuple[int, ...]:
        if self.slice is None:
            return tuple(param_shape)
        dim, _, length = self.slice
        s = list(param_shape)
        s[dim] = length
        return tuple(s)

    def delta(self, shape: Tuple[int, ...], dtype=torch.float32, device=None) -> torch.Tensor:
        """The full delta (without strength, without DoRA) of the patched region, reshaped to ``shape``."""
        t = {k: v.to(device=device, dtype=dtype) for k, v in self.tensors.items()}
        if self.kind == "lora":
            up, down = t["up"].flatten(1), t["down"].flatten(1)
            if "mid" in t:  # LoCon's mid (Tucker) factor
                down = t["mid"].flatten(1) @ down if t["mid"].dim() == 2 else down
            d = (up @ down) * self.scale
        elif self.kind == "loha":
            d = (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * self.scale
        elif self.kind == "lokr":
            w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
            w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
            scale = 1.0
            if self.alpha is not None and ("lokr_w1_b" in t or "lokr_w2_b" in t):
                r = (t["lokr_w1_b"] if "lokr_w1_b" in t else t["lokr_w2_b"]).shape[0]
                scale = float(self.alpha) / r
            d = torch.kron(w1, w2.reshape(w2.shape[0], -1) if w2.dim() > 2 else w2) * scale
        elif self.kind == "diff":
            d = t["diff"]
        else:  # pragma: no cover - kinds are fixed by the loader
            raise LoraError(f"unknown patch kind {self.kind}", key=self.source)
        n = 1
        for s in shape:
            n *= s
        if d.numel() != n:
            raise LoraError(f"delta has {tuple(d.shape)} ({d.numel()} values), the layer needs {tuple(shape)}",
                            key=self.source)
        return d.reshape(shape)


@dataclass
class LoraFile:
    path: Optional[str]
    patches: Dict[str, List[Patch]] = field(default_factory=dict)
    unplaced: Dict[str, str] = field(default_factory=dict)  # LoRA key -> why

    @property
    def n_patches(self) -> int:
        return sum(len(v) for v in self.patches.values())

    def report(self) -> str:
        lines = [f"{self.path or 'LoRA'}: {self.n_patches} patches on {len(self.patches)} parameters"]
        if self.unplaced:
            lines.append(f"{len(self.unplaced)} keys not placed:")
            lines += [f"  {k}: {why}" for k, why in sorted(self.unplaced.items())]
        return "\n".join(lines)


def _model_shapes(model_keys) -> Dict[str, Tuple[int, ...]]:
    if isinstance(model_keys, torch.nn.Module):
        return {k: tuple(v.shape) for k, v in model_keys.named_parameters()}
    if isinstance(model_keys, Mapping):
        out = {}
        for k, v in model_keys.items():
            out[k] = tuple(v.shape) if hasattr(v, "shape") else tuple(v)
        return out
    raise LoraError("model_keys must be a module or a mapping of parameter name -> shape (or tensor)")


def _read(path_or_sd) -> Tuple[Optional[str], Dict[str, torch.Tensor]]:
    if isinstance(path_or_sd, Mapping):
        return None, dict(path_or_sd)
    path = Path(path_or_sd)
    if not path.exists():
        raise LoraError("file not found", path=path)
    try:
        from safetensors.torch import load_file

        return str(path), load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for bad files
        raise LoraError(f"not a readable safetensors file ({e})", path=path) from None


# the partner each half of a low-rank pair needs, in the file's own naming
_PAIR_SUFFIX = {}
for _a, _b in (("lora_down.weight", "lora_up.weight"), ("lora_A.weight", "lora_B.weight"),
               ("lora_A.default.weight", "lora_B.default.weight"), ("lora.down.weight", "lora.up.weight"),
               ("down.weight", "up.weight")):
    _PAIR_SUFFIX[_a], _PAIR_SUFFIX[_b] = _b, _a
_LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def check_finite(path, sd: Mapping[str, torch.Tensor]) -> None:
    """Refuse a LoRA holding NaN or inf: merged, one NaN spreads over a whole row of
    the weight (and becomes zeros when requantized)."""
    for key, value in sd.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            finite = torch.isfinite(value)
            if not bool(finite.all()):
                bad = int((~finite).sum())
                raise LoraError(f"holds {bad} NaN or inf values (of {value.numel()}); a LoRA's tensors must be "
                                f"finite (a damaged or badly trained file?)", path=path, key=key)


def check_strength(strength, path=None) -> float:
    """A LoRA strength as a float; NaN and inf are refused."""
    try:
        s = float(strength)
    except (TypeError, ValueError):
        raise LoraError(f"strength must be a number, got {strength!r}", path=path) from None
    if s != s or s in (float("inf"), float("-inf")):
        raise LoraError(f"strength must be a finite number, got {s}", path=path)
    return s


def _incomplete(stem_keys: Dict[str, str], parts) -> str:
    """What a group of keys lacks, in the file's own key names."""
    for part, key in stem_keys.items():
        for suffix, partner in _PAIR_SUFFIX.items():
            if key.endswith("." + suffix):
                return f"incomplete: {key!r} has no {key[: -len(suffix)] + partner!r}"
    have = [k for k in _LOHA if k in parts]
    if have:
        one = next(iter(stem_keys.values()))
        stem = one[: one.rfind(".")]
        missing = [f"{stem}.{k}" for k in _LOHA if k not in parts]
        return f"incomplete LoHa: lacks {', '.join(repr(m) for m in missing)}"
    if any(k.startswith("lokr_w1") for k in parts) or any(k.startswith("lokr_w2") for k in parts):
        return "incomplete LoKr: needs both a lokr_w1* and a lokr_w2* factor"
    return f"incomplete: only {', '.join(sorted(stem_keys.values()))}, no weight to apply"


def load_lora(path_or_state_dict, model_keys) -> LoraFile:
    """Read a LoRA (``.safetensors`` path or state dict) against a model's parameters."""
    path, sd = _read(path_or_state_dict)
    if not sd:
        raise LoraError("the file holds no tensors (an empty LoRA)", path=path)
    check_finite(path, sd)
    shapes = _model_shapes(model_keys)
    km = KeyMap(shapes)
    lf = LoraFile(path)
    groups: Dict[str, Dict[str, torch.Tensor]] = {}
    names: Dict[str, Dict[str, str]] = {}  # stem -> part -> the file's own key
    for key, value in sd.items():
        sk = split_key(key)
        if sk is None:
            lf.unplaced[key] = "not a LoRA key this extension knows"
            continue
        stem, part = sk
        groups.setdefault(stem, {})[part] = value
        names.setdefault(stem, {})[part] = key
    _refuse_control_lora(path, groups, km)
    placed_any = False
    incomplete: List[str] = []
    for stem, parts in groups.items():
        keys = list(names[stem].values())
        pieces = km.resolve(stem)
        if pieces is None:
            why = _TEXT_ENCODER if stem.startswith(_TE_PREFIXES) else "no matching layer in this model"
            for k in keys:
                lf.unplaced[k] = why
            continue
        if "set" in parts:
            lf.unplaced[names[stem]["set"]] = (f"a replacement value for {pieces[0][0]}, not a change: lib_lora applies "
                                               f"changes only (the model's own value stays)")
            parts = {k: v for k, v in parts.items() if k != "set"}
            if not parts:
                continue
        pname = pieces[0][0]
        whole = _patches(stem, parts, names[stem], pname, km, lf)
        if whole is None:
            why = _incomplete(names[stem], parts)
            incomplete.append(why)
            for k in keys:
                lf.unplaced[k] = why
            continue
        for p in whole:
            _check_dora_axis(p, shapes[pname], path)
            for _name, sl, rows in pieces:
                q = _rows(p, rows, shapes[pname]) if rows else p
                q.slice = (0, sl[1], sl[2]) if (sl and q.key != pname) else sl
                shape = q.target_shape(shapes[q.key])
                _check_shape(q, shape, path)
                lf.patches.setdefault(q.key, []).append(q)
                placed_any = True
    if not placed_any:
        if incomplete:
            raise LoraError(f"an incomplete LoRA, nothing to apply: {'; '.join(incomplete[:5])}"
                            f"{' ...' if len(incomplete) > 5 else ''}", path=path)
        listed = sorted(lf.unplaced)
        raise LoraError(f"none of its {len(sd)} keys match this model (a LoRA for another architecture?); keys: "
                        f"{', '.join(repr(k) for k in listed[:8])}{' ...' if len(listed) > 8 else ''}", path=path)
    return lf


_TE_PREFIXES = ("lora_te", "text_encoder", "text_encoders", "te1.", "te2.")
_TEXT_ENCODER = "a text encoder's key: lib_lora patches the diffusion model only"


def _patches(stem, parts, file_keys, pname, km, lf) -> Optional[List[Patch]]:
    """The patches of one stem on the whole parameter (None when its parts make no patch)."""
    alpha = parts.get("alpha")
    alpha = float(alpha.float().reshape(-1)[0]) if isinstance(alpha, torch.Tensor) else alpha
    dora = parts.get("dora_scale")
    patches: List[Patch] = []
    if "diff_b" in parts:
        bname = km.bias_of(pname)
        if bname is None:
            lf.unplaced[file_keys["diff_b"]] = "the layer has no bias"
        else:
            patches.append(Patch(bname, "diff", {"diff": parts["diff_b"]}, source=stem))
    if "up" in parts and "down" in parts:
        t = {"up": parts["up"], "down": parts["down"]}
        if "mid" in parts:
            t["mid"] = parts["mid"]
        patches.append(Patch(pname, "lora", t, alpha, dora, None, stem))
    elif set(_LOHA) <= set(parts):
        patches.append(Patch(pname, "loha", {k: parts[k] for k in _LOHA}, alpha, dora, None, stem))
    elif any(k.startswith("lokr_w1") for k in parts) and any(k.startswith("lokr_w2") for k in parts):
        t = {k: v for k, v in parts.items() if k.startswith("lokr_")}
        patches.append(Patch(pname, "lokr", t, alpha, dora, None, stem))
    elif "diff" in parts:
        patches.append(Patch(pname, "diff", {"diff": parts["diff"]}, None, None, None, stem))
    elif "diff_b" not in parts:
        return None
    return patches


def _rows(p: Patch, rows: Tuple[int, int], param_shape) -> Patch:
    """The part of patch ``p`` that makes output rows ``rows`` = (start, length) of its delta."""
    a, n = rows
    t = dict(p.tensors)
    kind, alpha = p.kind, p.alpha
    if kind == "lora":
        t["up"] = t["up"][a:a + n]
    elif kind == "loha":
        t["hada_w1_a"], t["hada_w2_a"] = t["hada_w1_a"][a:a + n], t["hada_w2_a"][a:a + n]
    else:  # diff, or LoKr (its Kronecker factors do not split by rows): the delta's rows
        full = p.delta(tuple(param_shape) if p.kind != "diff" else tuple(t["diff"].shape))
        t, kind, alpha = {"diff": full[a:a + n].contiguous()}, "diff", None
    dora = p.dora_scale.reshape(-1)[a:a + n].reshape(-1, 1) if p.dora_scale is not None else None
    return Patch(p.key, kind, t, alpha, dora, None, p.source)


def _check_dora_axis(p: Patch, shape, path) -> None:
    """DoRA's magnitude must be per output row (shape (out,) or (out, 1)); LyCORIS's default
    (1, in) is a per-input-column magnitude, which lib_lora does not apply."""
    d = p.dora_scale
    if d is not None and d.dim() >= 2 and d.shape[0] == 1 and d.shape[1] > 1 and len(shape) > 1:
        raise LoraError(f"dora_scale of shape {tuple(d.shape)} is a per-input magnitude (LyCORIS's wd_on_out=False); "
                        f"only per-output DoRA (shape ({shape[0]}, 1)) is supported", path=path, key=p.source)


def _refuse_control_lora(path, groups, km) -> None:
    """BFL's FLUX.1 Canny/Depth LoRAs widen ``img_in`` for the control image's channels; on a
    model whose img_in is narrower they cannot work (and Forge gives the model no control input)."""
    for stem, parts in groups.items():
        pieces = km.resolve(stem) if "down" in parts else None
        if not pieces or pieces[0][0] != "img_in.weight":
            continue
        need, have = parts["down"].shape[-1], km.shapes["img_in.weight"][-1]
        if need > have:
            raise LoraError(f"a FLUX.1 Control LoRA (Canny/Depth): its img_in takes {need} input channels, this "
                            f"model's {have}; it needs the control image's channels, which this model has not",
                            path=path, key=stem)


def _check_shape(p: Patch, shape: Tuple[int, ...], path) -> None:
    t = p.tensors
    if p.kind == "lora":
        up, down = t["up"], t["down"]
        if up.dim() < 2 or down.dim() < 2 or up.shape[1] != down.shape[0]:
            raise LoraError(f"up {tuple(up.shape)} and down {tuple(down.shape)} do not multiply", path=path,
                            key=p.source)
        n_in = 1
        for s in down.shape[1:]:
            n_in *= s
        if up.shape[0] != shape[0] or (len(shape) > 1 and n_in != _prod(shape[1:])):
            raise LoraError(f"makes a {up.shape[0]}x{n_in} delta, the layer {p.key} is {list(shape)}",
                            path=path, key=p.source)
        if p.dora_scale is not None and p.dora_scale.numel() != shape[0]:
            raise LoraError(f"dora_scale has {p.dora_scale.numel()} values, the layer has {shape[0]} outputs",
                            path=path, key=p.source)
    elif p.kind == "diff":
        if t["diff"].numel() != _prod(shape):
            raise LoraError(f"diff of shape {tuple(t['diff'].shape)} does not fit {p.key} {list(shape)}", path=path,
                            key=p.source)
    else:
        try:
            p.delta(shape)
        except LoraError as e:
            raise LoraError(str(e), path=path, key=p.source) from None
        except RuntimeError as e:
            raise LoraError(f"factors do not combine: {e}", path=path, key=p.source) from None


def _prod(s) -> int:
    n = 1
    for v in s:
        n *= v
    return n
