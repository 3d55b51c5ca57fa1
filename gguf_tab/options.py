"""The "LoRA options" tab and Forge's "GGUF LoRA" settings: how a LoRA is applied to
each GGUF format (:mod:`lib_lora.policy` decides with them), stored in Forge's
``shared.opts`` (keys ``gguf_lora_*``) inside Forge, else in a JSON file
(``$FORGE_GGUF_LORA_OPTIONS``, else ``<cache>/gguf_lora_options.json``); and the
infotext that records the modes used."""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

from . import common
from .common import UIError, log

SECTION = ("gguf_lora", "GGUF LoRA")
INFOTEXT_KEY = "GGUF LoRA"
KEY_PREFIX = "gguf_lora_"
OPTIONS_ENV = "FORGE_GGUF_LORA_OPTIONS"
MODE_LABELS = {"merge": "merge", "runtime": "run-time", "auto": "auto"}
FAMILY_TITLES = {
    "legacy": "Legacy quants (Q4_0 ... Q8_0)",
    "k": "K-quants (Q2_K ... Q6_K)",
    "iq": "IQ formats",
    "float": "Float (F16, BF16, F32)",
    "ternary": "Ternary (TQ1_0, TQ2_0)",
    "fp4": "FP4 (MXFP4, NVFP4)",
}
_SKIP_FORMATS = {"F64", "Q8_1", "Q8_K"}  # never the format of weights people apply LoRAs to

_options_file: Optional[str] = None


def mode_choices(with_default: bool = False) -> List[Tuple[str, str]]:
    """``[(label, mode)]`` in the policy's order; a per-format choice also has "default" (no entry)."""
    from lib_lora.policy import MODES

    return [("default", "default")] * with_default + [(MODE_LABELS[m], m) for m in MODES]


# -- the format lists ---------------------------------------------------------------

def lora_formats() -> List[Tuple[str, List[str]]]:
    """``[(family, [format names])]`` that get a per-format LoRA mode."""
    from lib_gguf.formats import FORMATS

    by_family: Dict[str, List[str]] = {}
    for f in sorted(FORMATS.values(), key=lambda f: f.type_id):
        if f.family in FAMILY_TITLES and f.name not in _SKIP_FORMATS and f.can_dequantize:
            by_family.setdefault(f.family, []).append(f.name)
    return [(fam, by_family[fam]) for fam in FAMILY_TITLES if fam in by_family]


def requantize_formats() -> List[str]:
    """Quantized formats we cannot write back after a merge: each gets a requantize target."""
    from lib_gguf.formats import get_format

    return [n for _, names in lora_formats() for n in names
            if get_format(n).is_quantized and (not get_format(n).can_quantize or get_format(n).needs_imatrix)]


def target_formats() -> List[str]:
    """Formats a merged weight can be requantized to."""
    from lib_gguf.formats import get_format

    out = [n for _, names in lora_formats() for n in names
           if get_format(n).can_quantize and not get_format(n).needs_imatrix and get_format(n).family != "float"]
    return out + ["F16", "BF16", "F32"]


# -- options: a plain dict, stored in Forge's opts or a JSON file ----------------------

def default_options() -> Dict[str, Any]:
    from lib_lora.policy import LoraOptions

    return LoraOptions().to_dict()


def normalize_options(d: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """A complete, valid options dict from ``d`` (a bad value raises UIError naming it)."""
    from lib_lora.policy import LoraOptions

    try:
        return LoraOptions.from_dict(d).to_dict()
    except ValueError as e:
        raise UIError(str(e)) from None


def options_file() -> Path:
    if _options_file is not None:
        return Path(_options_file)
    env = os.environ.get(OPTIONS_ENV)
    return Path(env) if env else common.cache_dir() / "gguf_lora_options.json"


def set_options_file(path) -> None:
    """Where standalone options are stored (None: the default)."""
    global _options_file
    _options_file = None if path is None else str(path)


def _forge_keys() -> Dict[str, Tuple[str, Optional[str]]]:
    """Forge settings key -> (options field, format name or None), in the page's order."""
    keys = {KEY_PREFIX + f: (f, None) for f in ("default_gguf_mode", "default_mode")}
    keys.update({f"{KEY_PREFIX}mode_{n}": ("mode_by_format", n) for _, names in lora_formats() for n in names})
    keys.update({f"{KEY_PREFIX}requant_{n}": ("requantize_target", n) for n in requantize_formats()})
    keys.update({KEY_PREFIX + f: (f, None) for f in ("fallback_format", "compute_dtype", "keep_threshold")})
    return keys


def to_flat(opts: Mapping[str, Any]) -> Dict[str, Any]:
    """Options dict -> Forge settings values (every key present, "default" for no entry)."""
    return {key: opts[field] if fmt is None else opts[field].get(fmt, "default")
            for key, (field, fmt) in _forge_keys().items()}


def _from_flat(get: Callable[[str, Any], Any]) -> Dict[str, Any]:
    d: Dict[str, Any] = {"mode_by_format": {}, "requantize_target": {}}
    defaults = to_flat(default_options())
    for key, (field, fmt) in _forge_keys().items():
        v = get(key, defaults[key])
        if fmt is None:
            d[field] = v
        else:
            d[field][fmt] = v
    return d


def load_options() -> Dict[str, Any]:
    """The saved options (Forge's settings inside Forge, else the JSON file)."""
    shared = common.host()
    if shared is not None:
        data = shared.opts.data
        return normalize_options(_from_flat(lambda k, dflt: data.get(k, dflt)))
    path = options_file()
    if not path.exists():
        return default_options()
    try:
        return normalize_options(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, UIError) as e:
        log.warning("could not read LoRA options from %s (%s); using the defaults", path, e)
        return default_options()


def store_options(opts: Mapping[str, Any]) -> Dict[str, Any]:
    """Validate and save ``opts``; returns the saved (normalized) dict."""
    opts = normalize_options(opts)
    shared = common.host()
    if shared is not None:
        for k, v in to_flat(opts).items():
            if k in shared.opts.data_labels:
                shared.opts.set(k, v)
            else:  # the settings page has not registered it (yet): store it as it is
                shared.opts.data[k] = v
        try:
            shared.opts.save(shared.config_filename)
        except AssertionError:
            raise UIError("Forge's settings are frozen (--freeze-settings): the options were not saved") from None
        return opts
    path = options_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(opts, fh, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return opts


def current_options():
    """The options for the next generation, as ``lib_lora.policy.LoraOptions`` (read at
    each call: a saved change applies at the next generation)."""
    from lib_lora.policy import LoraOptions

    return LoraOptions.from_dict(load_options())


def mode_for(fmt_name: str, opts: Optional[Mapping[str, Any]] = None) -> str:
    """The configured mode of a format (its own entry, else the quantized or float default)."""
    from lib_gguf.formats import get_format
    from lib_lora.policy import LoraOptions

    o = LoraOptions.from_dict(normalize_options(opts) if opts is not None else load_options())
    return o.choice_for(fmt_name, get_format(fmt_name).is_quantized)


def save_options(opts: Mapping[str, Any]) -> str:
    try:
        saved = store_options(opts)
    except Exception as e:
        return common.error_text(e)
    return saved_text(saved)


def saved_text(saved: Mapping[str, Any]) -> str:
    where = "Forge's settings" if common.host() is not None else str(options_file())
    n = len(saved["mode_by_format"])
    return f"Saved to {where}: {n} per-format mode{'s' if n != 1 else ''}; applies at the next generation."


# -- infotext -------------------------------------------------------------------------

def lora_infotext(modes: Optional[Mapping[str, str]] = None, formats: Optional[Iterable[str]] = None,
                  options: Optional[Mapping[str, Any]] = None) -> Dict[str, str]:
    """Generation parameters recording the LoRA mode per format: ``modes`` (format ->
    mode used), or the configured modes of ``formats``. ``{}`` when there is nothing."""
    if modes is None:
        modes = {f: mode_for(f, options) for f in (formats or ())}
    if not modes:
        return {}
    return {INFOTEXT_KEY: ",".join(f"{k}:{v}" for k, v in sorted(modes.items()))}


def parse_lora_infotext(text: str) -> Dict[str, str]:
    """``"Q4_K:runtime,Q8_0:merge"`` -> ``{"Q4_K": "runtime", "Q8_0": "merge"}``."""
    out = {}
    for part in (text or "").split(","):
        k, sep, v = part.strip().partition(":")
        if sep and k and v:
            out[k.strip()] = v.strip()
    return out


# -- Forge's settings page ---------------------------------------------------------------

def add_settings(shared) -> None:
    """The options as Forge settings (section "GGUF LoRA"), through ``shared.opts.add_option``."""
    gr = common.gradio()
    from lib_lora.policy import COMPUTE_DTYPES

    defaults = to_flat(default_options())
    targets = target_formats()
    labels = {"default_gguf_mode": "LoRA mode for quantized GGUF formats without their own setting",
              "default_mode": "LoRA mode for float weights of GGUF files without their own setting",
              "fallback_format": "Fallback requantize format", "compute_dtype": "Run-time LoRA compute dtype",
              "keep_threshold": "Keep threshold"}
    for key, (field, fmt) in _forge_keys().items():
        if field in ("default_gguf_mode", "default_mode"):
            label, comp, args = labels[field], gr.Radio, {"choices": mode_choices()}
        elif field == "mode_by_format":
            label, comp, args = f"LoRA mode for {fmt}", gr.Radio, {"choices": mode_choices(True)}
        elif field == "requantize_target":
            label, comp, args = (f"Requantize target for {fmt} (no quantizer)", gr.Dropdown,
                                 {"choices": ["default"] + targets})
        elif field == "fallback_format":
            label, comp, args = labels[field], gr.Dropdown, {"choices": targets}
        elif field == "compute_dtype":
            label, comp, args = labels[field], gr.Dropdown, {"choices": list(COMPUTE_DTYPES)}
        else:
            label, comp, args = labels[field], gr.Slider, {"minimum": 0.0, "maximum": 1.0, "step": 0.01}
        shared.opts.add_option(key, shared.OptionInfo(defaults[key], label, comp, args, section=SECTION))
    _extend_api_options_model(shared)


def _extend_api_options_model(shared) -> None:
    """GET /sdapi/v1/options answers through the pydantic model Forge builds from the
    settings known when ``modules.api.models`` is first imported, which a built-in
    extension does before ours loads: without our keys in it, the API drops them. The
    model gets our keys (with their defaults) before the API is set up."""
    models = sys.modules.get("modules.api.models")  # Forge's, when it has been imported
    base = getattr(models, "OptionsModel", None)
    if base is None:
        return  # not built yet: it will be built with our settings in it
    known = getattr(base, "model_fields", None) or getattr(base, "__fields__", {}) or {}
    labels = shared.opts.data_labels
    missing = [k for k in labels if k.startswith(KEY_PREFIX) and k not in known]
    if not missing:
        return
    try:
        from pydantic import Field, create_model

        extra = {k: (Optional[type(labels[k].default)], Field(default=labels[k].default, description=labels[k].label))
                 for k in missing}
        models.OptionsModel = create_model("Options", __base__=base, **extra)
    except Exception as e:  # POST still takes them; only GET would leave them out
        log.warning("GGUF LoRA settings not added to the API's options model: %s", e)


# -- the tab ----------------------------------------------------------------------------

def build(gr, demo) -> None:
    """The "LoRA options" tab, inside ``demo`` (a ``gr.Blocks`` being built)."""
    from lib_lora.policy import COMPUTE_DTYPES

    opts = load_options()
    rq_formats = requantize_formats()
    targets = target_formats()
    targets += [v for v in [opts["fallback_format"], *opts["requantize_target"].values()] if v not in targets]
    with gr.Tab("LoRA options", elem_id="gguf_tab_options"):
        gr.Markdown("How a LoRA is applied to each GGUF format: **merge** (into the weight, then "
                    "requantize to the same format), **run-time** (a low-rank delta added at each step), or "
                    "**auto** (chosen per layer). Saved options apply at the next generation.")
        inputs: Dict[str, Any] = {}
        with gr.Row():
            inputs[KEY_PREFIX + "default_gguf_mode"] = gr.Radio(
                mode_choices(), value=opts["default_gguf_mode"], label="Default for quantized GGUF formats",
                elem_id="gguf_default_gguf_mode")
            inputs[KEY_PREFIX + "default_mode"] = gr.Radio(
                mode_choices(), value=opts["default_mode"], label="Default for float weights of GGUF files "
                "(F16, BF16, F32)", elem_id="gguf_default_mode")
        for fam, names in lora_formats():
            with gr.Accordion(FAMILY_TITLES[fam], open=fam in ("legacy", "k")), gr.Row():
                for n in names:
                    inputs[f"{KEY_PREFIX}mode_{n}"] = gr.Radio(
                        mode_choices(True), value=opts["mode_by_format"].get(n, "default"), label=n,
                        elem_id=f"gguf_mode_{n}", min_width=220)
        with gr.Accordion("Requantize target (formats we cannot write back after a merge)", open=False):
            if not rq_formats:
                gr.Markdown("Every format has a quantizer.")
            with gr.Row():
                for n in rq_formats:
                    inputs[f"{KEY_PREFIX}requant_{n}"] = gr.Dropdown(
                        ["default"] + targets, value=opts["requantize_target"].get(n, "default"), label=n,
                        elem_id=f"gguf_requant_{n}", min_width=160)
        with gr.Row():
            inputs[KEY_PREFIX + "fallback_format"] = gr.Dropdown(
                targets, value=opts["fallback_format"], label="Fallback requantize format ('default' above)",
                elem_id="gguf_fallback_format")
            inputs[KEY_PREFIX + "compute_dtype"] = gr.Dropdown(
                list(COMPUTE_DTYPES), value=opts["compute_dtype"], label="Compute dtype", elem_id="gguf_compute_dtype")
            inputs[KEY_PREFIX + "keep_threshold"] = gr.Slider(
                0.0, 1.0, value=opts["keep_threshold"], step=0.01, label="Keep threshold",
                elem_id="gguf_keep_threshold")
        with gr.Row():
            save_btn = gr.Button("Save options", variant="primary", elem_id="gguf_opt_save")
            reload_btn = gr.Button("Reload saved", elem_id="gguf_opt_reload")
        status = gr.Markdown("", elem_id="gguf_opt_status")
    keys = list(inputs)
    all_inputs = [inputs[k] for k in keys]

    def _collect(*values):
        flat = dict(zip(keys, values))
        return _from_flat(lambda k, dflt: flat.get(k, dflt))

    # the same options on Forge's settings page ("GGUF LoRA"): a save here shows there at
    # once (else its stale values would be written back by "Apply settings"), and a
    # change there shows here
    settings = dict(getattr(common.host(), "settings_components", None) or {})
    linked = [(k, inputs[k], settings[k]) for k in keys if k in settings]

    def _on_save(*values):
        try:
            saved = store_options(_collect(*values))
        except Exception as e:
            text, shown = common.error_text(e), [gr.update() for _ in linked]
        else:
            flat = to_flat(saved)
            text, shown = saved_text(saved), [flat[k] for k, _c, _s in linked]
        return [text, *shown] if linked else text

    for _k, tab_c, set_c in linked:
        set_c.change(lambda v: v, inputs=[set_c], outputs=[tab_c], queue=False)

    def _on_reload():
        flat = to_flat(load_options())
        return [flat[k] for k in keys]

    save_btn.click(_on_save, inputs=all_inputs, outputs=[status] + [sc for _k, _c, sc in linked])
    reload_btn.click(_on_reload, inputs=[], outputs=all_inputs)
    # each page load shows what is saved now (the values above are the build-time ones)
    demo.load(_on_reload, inputs=[], outputs=all_inputs)
