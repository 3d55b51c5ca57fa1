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
from typing import Any, Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

log = logging.getLogger("forge_gguf_lora")

_state: Dict[str, Any] = {"registered": False, "patched": []}


def _load_gguf_for_forge(path: str):
    import torch

    from lib_gguf import load_state_dict

    sd = load_state_dict(path)
    out = {}
    for k, v in sd.items():
        if getattr(v, "gguf_cls", None) is None and not isinstance(v, torch.nn.Parameter):
            v = torch.nn.Parameter(v, requires_grad=False)
        out[k] = v
    return out


def _make_loader(original):
    def load_torch_file(ckpt, *args, **kwargs):
        if isinstance(ckpt, str) and ckpt.lower().endswith(".gguf"):
            return _load_gguf_for_forge(ckpt)
        return original(ckpt, *args, **kwargs)

    load_torch_file.__wrapped__ = original
    load_torch_file._forge_gguf_lora = True
    return load_torch_file


def forge_patches_to_lib_lora(key: str, patches) -> Tuple[List[tuple], List]:
    """Split Forge's patch list for one weight into (lib_lora patches with strengths,
    patches left to Forge). Only plain low-rank LoRAs (no mid, no DoRA, strength_model
    1, no function, offsets along the output dim) run as deltas."""
    import torch

    from lib_lora.loader import Patch

    ours, theirs = [], []
    for p in patches:
        strength_patch, v, strength_model, offset, function = (list(p) + [None] * 5)[:5]
        kind, payload = (v[0], v[1]) if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str) else (None, v)
        simple = (kind == "lora" and function is None and (strength_model in (None, 1.0))
                  and (offset is None or offset[0] == 0))
        if simple:
            up, down, alpha, mid, dora = (list(payload) + [None] * 5)[:5]
            simple = mid is None and dora is None and isinstance(up, torch.Tensor) and isinstance(down, torch.Tensor)
        if not simple:
            theirs.append(p)
            continue
        sl = None if offset is None else (0, int(offset[1]), int(offset[2]))
        ours.append((Patch(key, "lora", {"up": up, "down": down}, None if alpha is None else float(alpha), None, sl,
                           key), float(strength_patch)))
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


def last_modes() -> Dict[str, str]:
    """Per GGUF format, the LoRA mode(s) the last refresh used (``"merge"``,
    ``"runtime"`` or ``"merge+runtime"``): what the infotext records."""
    return dict(_state.get("modes", {}))


def _decide(loader, key: str, plist, online: bool, opts, modes: Dict[str, set]) -> bool:
    """Whether this weight's patches go to run time (True) or are merged (False),
    by the user's choice for the weight's format; float weights keep Forge's choice."""
    from backend import utils as butils

    # the weight as loaded: Forge restores its backup before merging again
    weight = getattr(loader, "backup", {}).get(key)
    if weight is None:
        try:
            weight = butils.get_attr(loader.model, key)
        except AttributeError:
            return online  # Forge reports the bad key itself
    fmt = getattr(weight, "gguf_cls", None)
    if fmt is None or not hasattr(fmt, "can_quantize"):
        return online
    choice = opts.mode_by_format.get(fmt.name) or opts.default_gguf_mode
    if choice == "auto":
        want = "runtime" if online else "merge"
    else:
        want = choice
    ours, theirs = forge_patches_to_lib_lora(key, plist)
    if want == "merge" and not fmt.can_quantize:
        # no quantizer for this format: merge only when asked for explicitly, into the
        # requantize target the user picked (the weight then carries that format)
        target = opts.target_for(fmt)
        try:
            from lib_gguf import get_format

            tfmt = get_format(target)
            ok = choice == "merge" and tfmt.can_quantize and tfmt.fits(int(weight.shape[-1]))
        except Exception:
            ok = False
        if ok:
            weight.requantize_to = tfmt.name
            want = "merge"
        else:
            want = "runtime"
    elif want == "merge" and choice == "auto" and ours and not theirs:
        from lib_lora.apply import merge_keep

        try:
            kept = merge_keep(weight, ours, opts)
        except Exception as e:  # the estimate is advice; Forge's own merge will report real errors
            log.debug("merge estimate failed for %s: %s", key, e)
            kept = 1.0
        if kept < opts.keep_threshold:
            log.info("GGUF LoRA: %s (%s) at run time: a merge would keep %.0f%% of the delta", key, fmt.name,
                     100 * kept)
            want = "runtime"
    modes.setdefault(fmt.name, set()).add(want)
    return want == "runtime"


def route_patches(loader, lora_patches, opts) -> Tuple[dict, Dict[str, str]]:
    """Forge's ``lora_patches`` (``{(file, strength, strength_model, online): {key:
    patches}}``) with each GGUF weight's patches moved to the online (run-time) or
    offline (merged) group the policy picks. Returns (routed, modes by format)."""
    routed: dict = {}
    modes: Dict[str, set] = {}
    for gk, patches in lora_patches.items():
        head, online = tuple(gk[:-1]), bool(gk[-1])
        for key, plist in patches.items():
            target = _decide(loader, key, plist, online, opts, modes)
            routed.setdefault(head + (target,), {})[key] = plist
    return routed, {k: "+".join(sorted(v)) for k, v in modes.items()}


def _wrap_refresh(original):
    def refresh(self, lora_patches, *args, **kwargs):
        opts = _options()
        routed, modes = route_patches(self, lora_patches, opts)
        sig = repr(opts.to_dict())
        if sig != getattr(self, "_gguf_options_sig", None):
            kwargs["force_refresh"] = True  # options changed since the last refresh
        before = getattr(self, "online_backup", None)
        result = original(self, routed, *args, **kwargs)
        self._gguf_options_sig = sig
        if getattr(self, "online_backup", None) is before:
            # Forge found nothing to do (same patches: a model reload, a partial
            # unload and load): the run-time deltas attached last time stay as they are.
            return result
        for hook in getattr(self, "_gguf_runtime_hooks", []):
            hook.remove()
        self._gguf_runtime_hooks = []
        _attach_runtime(self, opts)
        _state["modes"] = modes
        return result

    refresh.__wrapped__ = original
    refresh._forge_gguf_lora = True
    return refresh


def _attach_runtime(loader, opts=None) -> None:
    from lib_lora.apply import _DTYPES, attach_runtime

    compute_dtype = _DTYPES.get(opts.compute_dtype) if opts is not None else None
    for layer in set(getattr(loader, "online_backup", [])):
        patches = getattr(layer, "forge_online_loras", None)
        if not patches or "weight" not in patches:
            continue
        weight = getattr(layer, "weight", None)
        if getattr(weight, "gguf_cls", None) is None:
            continue  # float weights: Forge's online merge is cheap enough and exact
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
    log.info("forge-gguf-lora: GGUF backend registered (%d hook points)", len(_state["patched"]))
    return True


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
    from scripts.gguf_ui import serve

    serve(port=args.port, model=args.model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
