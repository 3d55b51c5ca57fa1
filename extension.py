"""Forge glue: the only code outside ``scripts/`` that imports Forge.

``register()`` puts our GGUF backend into Forge's (idempotent; ``unregister()``
restores Forge's own functions exactly):

* **load**: every module-level ``load_torch_file`` of Forge's ``backend`` that is
  Forge's own is wrapped so that ``.gguf`` files are read by ``lib_gguf``'s reader:
  quantized tensors become our ``GGUFParameter``\\ s (every format, IQ included, with
  whichever ``gguf`` package ``import gguf`` finds), float tensors plain
  ``Parameter``\\ s (so Forge's LoRA loader can merge into F16 weights).
* **bake / dequantize / merge**: Forge calls ``gguf_cls.bake``, ``dequantize_pytorch``
  and ``quantize_pytorch`` on our format objects, which keep the file's bytes and
  requantize a merged LoRA into the weight's own format (K-quants included).
* **online LoRA**: ``LoraLoader.refresh`` is wrapped: plain low-rank patches that
  Forge would re-merge into the whole weight on every step are attached instead as
  run-time deltas (``lib_lora``'s forward hooks) on the GGUF layers; Forge keeps
  the patches it alone understands.

``python extension.py [--port N] [--model FILE]`` serves the tab on localhost.
"""
from __future__ import annotations

import logging
import os
import sys
import weakref
from typing import Any, Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

log = logging.getLogger("forge_gguf_lora")

_state: Dict[str, Any] = {"registered": False, "patched": [], "loaders": weakref.WeakSet()}


_FLOAT_NAMES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64"}


def _load_gguf_for_forge(path: str, original, args, kwargs):
    """A ``.gguf`` file as Forge's loader wants it. Quantized tensors are our
    ``GGUFParameter``\\ s; float tensors stay plain ``Parameter``\\ s in the file's own
    dtype (Forge's LoRA merge writes back into them), each carrying ``gguf_cls = None``
    as Forge's own ones do, so that ``state_dict_dtype`` still calls the checkpoint
    GGUF (else Forge picks a storage dtype of its own: float32 on a CPU, bfloat16 on
    recent GPUs, and rounds or doubles the file's F16 weights) and ``gguf_float_format``
    (its file format, for the per-format LoRA option). A file our reader refuses goes
    to Forge's own loader, with a warning: a load never fails because of us."""
    import torch

    from lib_gguf import load_state_dict

    try:
        sd = load_state_dict(path)
    except Exception as e:
        log.warning("%s: not readable by forge-gguf-lora (%s); Forge's own GGUF loader takes it", path, e)
        return original(path, *args, **kwargs)
    out = {}
    for k, v in sd.items():
        fmt = getattr(v, "gguf_cls", None)
        if fmt is not None and len(v.shape) != 2:
            # the host's GGUF operations dequantize Linear weights only: a quantized conv
            # kernel (SDXL/SD1.5 UNets from ComfyUI-GGUF's tools) or 1-D tensor becomes
            # float once, here, as load_into does
            v = v.dequantize(torch.float16)
        if getattr(v, "gguf_cls", None) is None:
            if not isinstance(v, torch.nn.Parameter):
                v = torch.nn.Parameter(v, requires_grad=False)
            v.gguf_cls = None
            v.gguf_float_format = _FLOAT_NAMES.get(str(v.dtype).replace("torch.", ""), str(v.dtype))
        out[k] = v
    if kwargs.get("return_metadata"):  # Forge Neo asks; its own loader has none for GGUF files
        return out, None
    return out


def _make_loader(original):
    def load_torch_file(ckpt, *args, **kwargs):
        if isinstance(ckpt, (str, os.PathLike)) and os.fspath(ckpt).lower().endswith(".gguf"):
            return _load_gguf_for_forge(os.fspath(ckpt), original, args, kwargs)
        return original(ckpt, *args, **kwargs)

    load_torch_file.__wrapped__ = original
    load_torch_file._forge_gguf_lora = True
    return load_torch_file


def _patch_parts(p):
    """``(strength, v, strength_model, offset, function)`` of one host patch."""
    strength_patch, v, strength_model, offset, function = (list(p) + [None] * 5)[:5]
    return strength_patch, v, strength_model, offset, function


def _lowrank_factors(v):
    """``(up, down, alpha)`` when ``v`` (a host patch's payload) is a plain low-rank
    LoRA: Forge's ``("lora", (up, down, alpha, mid, dora_scale))`` tuple, or a
    ComfyUI-style weight adapter (Forge Neo's ``LoRAAdapter``, ``.weights`` =
    ``(up, down, alpha, mid, dora_scale, reshape)``). None for anything else (LoHa,
    LoKr, DoRA, a mid factor, a reshape, full diffs): those are left to the host."""
    import torch

    if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str):
        if v[0] != "lora":
            return None
        payload = list(v[1]) + [None] * 6
    elif hasattr(v, "weights") and type(v).__name__ == "LoRAAdapter":
        payload = list(v.weights) + [None] * 6
    else:
        return None
    up, down, alpha, mid, dora, reshape = payload[:6]
    if mid is not None or dora is not None or reshape is not None:
        return None
    if not (isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor)):
        return None
    return up, down, alpha


def patch_kind(p) -> str:
    """A host patch's kind, for messages: "lora", "loha", "lokr", "diff", ..."""
    v = _patch_parts(p)[1]
    if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str):
        return v[0]
    return str(getattr(v, "name", type(v).__name__))


def _read_host_patch(key: str, p):
    """``(lib_lora Patch, strength)`` for a host patch we run as a delta: a plain low-rank
    LoRA (no mid, no DoRA, strength_model 1, no function, an offset along the output
    dim), Forge's tuple or Forge Neo's weight adapter; None for any other."""
    from lib_lora.loader import Patch

    strength_patch, v, strength_model, offset, function = _patch_parts(p)
    factors = _lowrank_factors(v)
    if factors is None or function is not None or strength_model not in (None, 1.0) or \
            (offset is not None and offset[0] != 0):
        return None
    up, down, alpha = factors
    sl = None if offset is None else (0, int(offset[1]), int(offset[2]))
    return (Patch(key, "lora", {"up": up, "down": down}, None if alpha is None else float(alpha), None, sl, key),
            float(strength_patch))


def forge_patches_to_lib_lora(key: str, patches) -> Tuple[List[tuple], List]:
    """Split the host's patch list for one weight into (lib_lora patches with strengths,
    patches left to the host): see :func:`_read_host_patch`."""
    ours, theirs = [], []
    for p in patches:
        r = _read_host_patch(key, p)
        if r is None:
            theirs.append(p)
        else:
            ours.append(r)
    return ours, theirs


def set_options_provider(provider) -> None:
    """``provider()`` returns the ``lib_lora.policy.LoraOptions`` for the next
    generation (the tab and Forge's settings set it); None for the defaults."""
    _state["options"] = provider


def set_mode_override(modes: Optional[Dict[str, str]]) -> None:
    """Per-format LoRA modes that win over the options for the next generations (a
    pasted infotext's ``GGUF LoRA`` field, to reproduce an image); None clears them."""
    from lib_lora.policy import MODES

    clean = {}
    for fmt, mode in (modes or {}).items():
        mode = mode.split("+")[0]  # "merge+runtime" (auto's mix): merge where it can
        if mode in MODES:
            clean[str(fmt).upper()] = mode
    _state["override"] = clean


def _options():
    from lib_lora.policy import LoraOptions

    provider = _state.get("options")
    try:
        opts = provider() if provider is not None else LoraOptions()
    except Exception as e:  # a broken options file must not stop a generation
        log.warning("GGUF LoRA options unreadable (%s): using the defaults", e)
        opts = LoraOptions()
    override = _state.get("override")
    if override:
        opts = LoraOptions.from_dict(dict(opts.to_dict(), mode_by_format={**opts.mode_by_format, **override}))
    return opts


def _patchers_of(sd_model) -> list:
    """The model patchers of a Forge model's parts (UNet/transformer, text encoders, VAE)."""
    fo = getattr(sd_model, "forge_objects", None)
    objs = [getattr(fo, name, None) for name in ("unet", "clip", "vae")]
    return [o if hasattr(o, "lora_loader") else getattr(o, "patcher", None) for o in objs
            if hasattr(o, "lora_loader") or hasattr(getattr(o, "patcher", None), "lora_loader")]


def _loaders_of(sd_model) -> list:
    """The LoRA loaders of a Forge model's parts; of a single part when given one (a
    ``ModelPatcher``, or a module with its loader)."""
    if not hasattr(sd_model, "forge_objects") and hasattr(sd_model, "lora_loader"):
        return [sd_model.lora_loader]
    out = []
    for patcher in _patchers_of(sd_model):
        if patcher.lora_loader is not None and patcher.lora_loader not in out:
            out.append(patcher.lora_loader)
    return out


def last_modes(sd_model=None) -> Dict[str, str]:
    """Per GGUF format, the LoRA mode(s) in use (``"merge"``, ``"runtime"`` or
    ``"merge+runtime"``): what the infotext records. Each LoRA loader keeps the modes
    of its own last refresh (a model reloaded with the same patches keeps them, a VAE
    without GGUF weights adds none); ``sd_model``: only that model's parts."""
    loaders = _loaders_of(sd_model) if sd_model is not None else list(_state["loaders"])
    merged: Dict[str, set] = {}
    for loader in loaders:
        for fmt, mode in (getattr(loader, "_gguf_modes", None) or {}).items():
            merged.setdefault(fmt, set()).update(mode.split("+"))
    return {k: "+".join(sorted(v)) for k, v in sorted(merged.items())}


def options_signature(opts=None) -> str:
    return repr((opts if opts is not None else _options()).to_dict())


def apply_options_now(sd_model) -> int:
    """Re-apply the LoRAs of the parts of ``sd_model`` that Forge keeps loaded, when
    the options (the tab's, Forge's settings or a pasted infotext's modes) changed
    since their last refresh: Forge refreshes LoRAs only when it loads a model, and
    an unchanged LoRA set loads nothing. Called before each batch. Returns how many
    parts were refreshed."""
    sig = options_signature()
    try:
        from backend import memory_management as mm

        loaded = {id(getattr(lm, "model", None)) for lm in getattr(mm, "current_loaded_models", [])}
    except Exception:
        loaded = set()
    n = 0
    for patcher in filter(lambda p: hasattr(p, "refresh_loras"), _patchers_of(sd_model)):
        loader = patcher.lora_loader
        old = getattr(loader, "_gguf_options_sig", None)
        if old is None or old == sig or id(patcher) not in loaded:
            continue  # never refreshed by us, up to date, or refreshed when Forge loads it
        patcher.refresh_loras()
        n += 1
    if n:
        log.info("GGUF LoRA: options changed: LoRAs re-applied to %d loaded model part(s)", n)
    return n


def _layer_of(model, key: str):
    obj = model
    for part in key.split(".")[:-1]:
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _tag_float_layers(model) -> None:
    """Remember, on each layer, the GGUF file format of its float weights (Forge
    replaces the parameter objects later: a dtype cast in the forward, a merge)."""
    if model is None or getattr(model, "_gguf_float_tagged", False):
        return
    for m in model.modules():
        for pname, p in m.named_parameters(recurse=False):
            f = getattr(p, "gguf_float_format", None)
            if f:
                m.__dict__.setdefault("_gguf_float_formats", {})[pname] = f
    try:
        model._gguf_float_tagged = True
    except Exception:
        pass


def _weight_and_format(loader, key: str):
    """(the weight as loaded, its GGUF format object or None, its format name or None).
    The name is None for weights that did not come from a GGUF file: Forge decides."""
    weight = getattr(loader, "backup", {}).get(key)
    model = getattr(loader, "model", None)
    if weight is None:
        weight = getattr(_layer_of(model, key), key.rsplit(".", 1)[-1], None)
        if weight is None:
            return None, None, None  # Forge reports the bad key itself
    fmt = getattr(weight, "gguf_cls", None)
    if fmt is not None and hasattr(fmt, "can_quantize"):
        return weight, fmt, fmt.name
    if fmt is not None:
        return weight, None, None  # a format object that is not ours
    name = getattr(weight, "gguf_float_format", None)
    if name is None:
        layer = _layer_of(model, key)
        name = (getattr(layer, "__dict__", {}).get("_gguf_float_formats") or {}).get(key.rsplit(".", 1)[-1])
    return weight, None, name


def _decide(loader, key: str, plist, online: bool, opts, modes: Dict[str, set]) -> List[Tuple[bool, list]]:
    """Where this weight's patches go: ``[(online, patches), ...]`` (online: run time),
    as :func:`lib_lora.policy.decide` says for the weight's file format, with Forge's
    switch (``online``) as the hint for ``auto``. The plain low-rank LoRAs are the
    patches we run at run time; the rest (LoHa, LoKr, DoRA, ...) goes to the host's
    merge. Weights not from a GGUF file keep Forge's choice."""
    from lib_lora.policy import decide, is_linear_weight

    weight, fmt, name = _weight_and_format(loader, key)
    if name is None:
        return [(online, plist)]
    read = [(p, _read_host_patch(key, p)) for p in plist]
    simple = [p for p, r in read if r is not None]
    other = [p for p, r in read if r is None]
    attr = key.rsplit(".", 1)[-1]
    d = decide(weight if fmt is not None else name, [r for _p, r in read if r is not None], opts,
               shape=tuple(weight.shape), hint="runtime" if online else "merge",
               linear=is_linear_weight(_layer_of(getattr(loader, "model", None), key), attr, weight),
               others=[patch_kind(p) for p in other])
    if fmt is not None and d.target != fmt.name:
        weight.requantize_to = d.target  # Forge's merge writes this format (no quantizer, or rows not whole blocks)
    if d.kept is not None and d.mode == "runtime":
        log.info("GGUF LoRA: %s (%s) at run time: %s", key, name, d.why)
    parts: List[Tuple[bool, list]] = [(False, plist)] if d.mode == "merge" else \
        [(True, simple)] * bool(simple) + [(False, other)] * bool(other)
    if d.mode == "runtime" and other:
        log.info("GGUF LoRA: %s: %s patches merged (only plain LoRAs run at run time)", key,
                 ", ".join(sorted(set(d.others))))
    modes.setdefault(name, set()).update("runtime" if online_part else "merge" for online_part, _ in parts)
    return parts


def _finite(x) -> bool:
    import math

    import torch

    if isinstance(x, torch.Tensor):
        return not x.is_floating_point() or bool(torch.isfinite(x).all())
    if isinstance(x, (int, float)):
        return math.isfinite(x)
    return True


def _payload_tensors(v):
    if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str):
        v = v[1]
    elif hasattr(v, "weights"):
        v = v.weights
    if isinstance(v, (list, tuple)):
        for x in v:
            yield from _payload_tensors(x) if isinstance(x, (list, tuple)) else [x]
    else:
        yield v


def non_finite(group_key, patches) -> str:
    """Why one LoRA of the host's patches cannot be applied ("" when it can): a
    strength, or a value of one of its tensors, that is NaN or infinite (merged, it
    would turn rows of the weight into NaN or zeros)."""
    strengths = [x for x in tuple(group_key)[1:3] if isinstance(x, (int, float))]
    if not all(_finite(x) for x in strengths):
        return f"strength {strengths} is not finite"
    for key, plist in patches.items():
        for p in plist:
            strength_patch, v, strength_model, _offset, _fn = _patch_parts(p)
            if not (_finite(strength_patch) and _finite(strength_model)):
                return f"{key}: strength {strength_patch} / {strength_model} is not finite"
            for t in _payload_tensors(v):
                if not _finite(t):
                    return f"{key}: the LoRA's {patch_kind(p)} tensors hold NaN or infinite values"
    return ""


def route_patches(loader, lora_patches, opts) -> Tuple[dict, Dict[str, str]]:
    """Forge's ``lora_patches`` (``{(file, strength, strength_model, online): {key:
    patches}}``) with each GGUF weight's patches moved to the online (run-time) or
    offline (merged) group the policy picks. Returns (routed, modes by format)."""
    routed: dict = {}
    modes: Dict[str, set] = {}
    for gk, patches in lora_patches.items():
        bad = non_finite(gk, patches)
        if bad:
            log.error("GGUF LoRA: %s: LoRA skipped (never merged into a weight): %s", gk[0] if gk else "?", bad)
            continue
        head, online = tuple(gk[:-1]), bool(gk[-1])
        for key, plist in patches.items():
            for target, part in _decide(loader, key, plist, online, opts, modes):
                routed.setdefault(head + (target,), {}).setdefault(key, []).extend(part)
    return routed, {k: "+".join(sorted(v)) for k, v in modes.items()}


def _count_gguf_merges(loader, routed) -> Dict[str, int]:
    n: Dict[str, int] = {}
    for gk, patches in routed.items():
        if gk[-1]:
            continue
        for key in patches:
            _w, fmt, _name = _weight_and_format(loader, key)
            if fmt is not None:
                n[fmt.name] = n.get(fmt.name, 0) + 1
    return n


class _MergeProgress:
    """A progress bar over the GGUF weights Forge merges a LoRA into (each one is
    dequantized, merged and requantized: seconds for a whole model)."""

    def __init__(self, counts: Dict[str, int]):
        self.total = sum(counts.values())
        self.counts = counts
        self.bar = None

    def __enter__(self):
        if self.total:
            from lib_gguf.formats import add_requantize_observer

            log.info("GGUF LoRA: merging into %d GGUF weights (%s); the first merge of a format in a session "
                     "also prepares its kernels", self.total,
                     ", ".join(f"{k} x{v}" for k, v in sorted(self.counts.items())))
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=self.total, desc="GGUF LoRA merge", unit="weight", leave=False)
            except Exception:
                self.bar = None
            add_requantize_observer(self._step)
        return self

    def _step(self, _fmt_name: str) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def __exit__(self, *exc):
        if self.total:
            from lib_gguf.formats import remove_requantize_observer

            remove_requantize_observer(self._step)
            if self.bar is not None:
                self.bar.close()
        return False


def _wrap_refresh(original):
    def refresh(self, lora_patches, *args, **kwargs):
        try:
            opts = _options()
            _tag_float_layers(getattr(self, "model", None))
            routed, modes = route_patches(self, lora_patches, opts)
            counts = _count_gguf_merges(self, routed)
        except Exception as e:  # never fail a generation because of our routing: Forge's own way then
            log.error("GGUF LoRA: could not route the LoRA patches (%s: %s); Forge applies them its own way",
                      type(e).__name__, e)
            return original(self, lora_patches, *args, **kwargs)
        sig = repr(opts.to_dict())
        if sig != getattr(self, "_gguf_options_sig", None):
            if len(args) >= 2:  # refresh(lora_patches, offload_device, force_refresh)
                args = (args[0], True, *args[2:])
            else:
                kwargs["force_refresh"] = True  # options changed since the last refresh
        before = getattr(self, "online_backup", None)
        with _MergeProgress(counts):
            result = original(self, routed, *args, **kwargs)
        self._gguf_options_sig = sig
        _state["loaders"].add(self)
        if getattr(self, "online_backup", None) is before:
            # Forge found nothing to do (same patches: a model reload, a partial
            # unload and load): the run-time deltas attached last time stay as they are.
            return result
        for hook in getattr(self, "_gguf_runtime_hooks", []):
            hook.remove()
        self._gguf_runtime_hooks = []
        _attach_runtime(self, opts)
        self._gguf_modes = modes
        return result

    refresh.__wrapped__ = original
    refresh._forge_gguf_lora = True
    return refresh


def _attach_runtime(loader, opts=None) -> None:
    from lib_lora.apply import attach_runtime

    compute_dtype = opts.torch_compute_dtype() if opts is not None else None
    for layer in set(getattr(loader, "online_backup", [])):
        patches = getattr(layer, "forge_online_loras", None)
        if not patches or "weight" not in patches:
            continue
        weight = getattr(layer, "weight", None)
        from_gguf = getattr(weight, "gguf_cls", None) is not None or bool(
            layer.__dict__.get("_gguf_float_formats", {}).get("weight"))
        if not from_gguf:
            continue  # not from a GGUF file: Forge's own online LoRA
        ours, theirs = forge_patches_to_lib_lora("weight", patches["weight"])
        if not ours:
            continue
        loader._gguf_runtime_hooks.append(attach_runtime(layer, ours, compute_dtype))
        if theirs:
            patches["weight"] = theirs
        else:
            del patches["weight"]
    n = len(loader._gguf_runtime_hooks)
    if n:
        log.info("GGUF LoRA: %d layers take their LoRA at run time (low-rank delta, no per-step re-merge)", n)


def _patch(obj, name: str, new) -> None:
    _state["patched"].append((obj, name, getattr(obj, name)))
    setattr(obj, name, new)


def register() -> bool:
    """Install our GGUF backend into Forge's (idempotent). Returns False outside Forge."""
    if _state["registered"]:
        return True
    try:
        import backend.utils as butils
        from backend.patcher import lora as blora
    except ImportError:
        log.info("Forge's backend is not importable: nothing to register")
        return False
    original = butils.load_torch_file
    if getattr(original, "_forge_gguf_lora", False):
        _state["registered"] = True
        return True
    wrapped = _make_loader(original)
    for mod in list(sys.modules.values()):
        name = getattr(mod, "__name__", "") or ""
        if (name == "backend" or name.startswith("backend.") or name.startswith("modules")) and \
                getattr(mod, "load_torch_file", None) is original:
            _patch(mod, "load_torch_file", wrapped)
    _patch(blora.LoraLoader, "refresh", _wrap_refresh(blora.LoraLoader.refresh))
    _state["registered"] = True
    _console_logging()
    log.info("%s", startup_line())
    return True


def _console_logging() -> None:
    """Our INFO lines in the host's console, once each: the host's root logger shows
    warnings only (or is not configured at all), so our loggers get a handler of their
    own and do not propagate."""
    for name, fmt in (("forge_gguf_lora", "%(message)s"), ("lib_gguf", "forge-gguf-lora: %(message)s"),
                      ("lib_lora", "forge-gguf-lora: %(message)s")):
        lg = logging.getLogger(name)
        if not lg.handlers:
            handler = logging.StreamHandler(sys.stdout)
            handler.setFormatter(logging.Formatter(fmt))
            lg.addHandler(handler)
            lg.setLevel(logging.INFO)
            lg.propagate = False


def startup_line() -> str:
    """One line for the console: what is registered, and the LoRA mode defaults."""
    from lib_gguf.formats import FORMATS

    fmts = [f for f in FORMATS.values() if f.is_quantized and f.can_dequantize]
    opts = _options()
    try:
        import numba  # noqa: F401

        kernels = "compiled CPU kernels (numba)"
    except Exception:
        kernels = "torch kernels (pip install numba for faster CPU merges)"
    per = ", ".join(f"{k}:{v}" for k, v in sorted(opts.mode_by_format.items())) or "none"
    return (f"forge-gguf-lora: GGUF backend registered ({len(_state['patched'])} hook points): "
            f"{len(fmts)} quantized formats load ({', '.join(f.name for f in sorted(fmts, key=lambda f: f.type_id))}); "
            f"LoRA modes: quantized {opts.default_gguf_mode}, float {opts.default_mode}, per format {per}; {kernels}")


def unregister() -> None:
    """Put back every Forge function we replaced, exactly."""
    while _state["patched"]:
        obj, name, original = _state["patched"].pop()
        setattr(obj, name, original)
    _state["registered"] = False


def is_registered() -> bool:
    return bool(_state["registered"])


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="forge-gguf-lora: the GGUF tab, standalone on localhost")
    parser.add_argument("--port", type=int, default=7861)
    parser.add_argument("--model", default=None, help="a .gguf file (default: a small built-in sample model)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from gguf_tab.app import serve

    serve(port=args.port, model=args.model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
