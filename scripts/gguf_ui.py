"""The "GGUF" tab: LoRA options per GGUF format, a GGUF inspector, the converter
and the LoRA baker; Forge settings ("GGUF LoRA" section); standalone serving.

Inside Forge this file is executed as a script at startup: importing it does
nothing heavy (no gradio, torch or lib_gguf import at module level); it only
registers two callbacks (``on_ui_tabs``, ``on_ui_settings``) when Forge's
``modules`` package is importable. Outside Forge, :func:`serve` shows the same
tab alone on 127.0.0.1.

Public API (for ``extension.py`` and the tests):

- :func:`current_options` -> ``lib_lora.policy.LoraOptions``, read at each call
  (so a saved change applies at the next generation); :func:`current_options_dict`
  gives the same as a plain dict and works before ``lib_lora`` exists.
- :func:`lora_infotext` -> ``{"GGUF LoRA": "Q4_K:runtime,Q8_0:merge"}`` for the
  generation parameters; :func:`parse_lora_infotext` reads it back.
- :func:`set_loaded_model` / :func:`loaded_model`: the model the inspector opens.
- :func:`build_tab` (the gr.Blocks), :func:`serve` (standalone).
- the handlers :func:`inspect_file`, :func:`convert_file`, :func:`bake_file`,
  :func:`save_options` (plain functions; they return page text, never raise).

Settings are stored in Forge's ``shared.opts`` (keys ``gguf_lora_*``) inside
Forge, or in a JSON file standalone (``$FORGE_GGUF_LORA_OPTIONS``, else
``<repo>/.samples/gguf_lora_options.json``).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import types
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

log = logging.getLogger("forge_gguf_lora.ui")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # standalone / tests: make lib_gguf and lib_lora importable
    sys.path.append(str(ROOT))

TAB_TITLE = "GGUF"
TAB_ELEM_ID = "forge_gguf_lora"
SECTION = ("gguf_lora", "GGUF LoRA")
INFOTEXT_KEY = "GGUF LoRA"
KEY_PREFIX = "gguf_lora_"
CACHE_ENV = "FORGE_GGUF_LORA_CACHE"
OPTIONS_ENV = "FORGE_GGUF_LORA_OPTIONS"

MODES = ("merge", "runtime", "auto")
MODE_CHOICES = [("merge", "merge"), ("run-time", "runtime"), ("auto", "auto")]
# a per-format setting may also be "default": no entry in mode_by_format
FORMAT_MODE_CHOICES = [("default", "default")] + MODE_CHOICES
COMPUTE_DTYPES = ("auto", "float16", "bfloat16", "float32")
FAMILY_TITLES = {
    "legacy": "Legacy quants (Q4_0 ... Q8_0)",
    "k": "K-quants (Q2_K ... Q6_K)",
    "iq": "IQ formats",
    "float": "Float (F16, BF16, F32)",
    "ternary": "Ternary (TQ1_0, TQ2_0)",
    "fp4": "FP4 (MXFP4, NVFP4)",
}
_FAMILY_ORDER = ("legacy", "k", "iq", "float", "ternary", "fp4")
# Formats never used for weights people apply LoRAs to.
_SKIP_FORMATS = {"F64", "Q8_1", "Q8_K"}

# The defaults of lib_lora.policy.LoraOptions (kept here so the tab works before lib_lora lands).
DEFAULT_OPTIONS: Dict[str, Any] = {
    "mode_by_format": {},
    "default_mode": "auto",
    "default_gguf_mode": "runtime",
    "requantize_target": {},
    "fallback_format": "Q8_0",
    "compute_dtype": "auto",
    "keep_threshold": 0.90,
}

# State shared by every copy of this module: Forge executes this file as a script
# (a module object of its own) while extension.py imports ``scripts.gguf_ui``.
_STATE = sys.modules.setdefault("_forge_gguf_lora_ui_state", types.ModuleType("_forge_gguf_lora_ui_state"))
if not hasattr(_STATE, "loaded_model"):
    _STATE.loaded_model = None
    _STATE.options_file = None


class UIError(Exception):
    """An error whose message is shown as it is in the page."""


# -- what is available ------------------------------------------------------------

def _not_yet(what: str) -> UIError:
    return UIError(f"{what} is not available yet in this version of the extension")


def _import(modname: str, what: str):
    import importlib

    try:
        return importlib.import_module(modname)
    except ModuleNotFoundError as e:
        if e.name and (modname == e.name or modname.startswith(e.name + ".")):
            raise _not_yet(what) from None
        raise


def _forge():
    """``(shared, script_callbacks)`` inside Forge, else None."""
    if getattr(_STATE, "forge", None) is not None:
        return _STATE.forge
    try:
        from modules import script_callbacks, shared  # type: ignore
    except Exception:
        return None
    if not hasattr(shared, "opts") or not hasattr(script_callbacks, "on_ui_tabs"):
        return None
    _STATE.forge = (shared, script_callbacks)
    return _STATE.forge


# -- the format lists -------------------------------------------------------------

def lora_formats() -> List[Tuple[str, List[str]]]:
    """``[(family, [format names])]`` that get a per-format LoRA mode."""
    from lib_gguf.formats import FORMATS

    by_family: Dict[str, List[str]] = {}
    for f in sorted(FORMATS.values(), key=lambda f: f.type_id):
        if f.family in FAMILY_TITLES and f.name not in _SKIP_FORMATS and f.can_dequantize:
            by_family.setdefault(f.family, []).append(f.name)
    return [(fam, by_family[fam]) for fam in _FAMILY_ORDER if fam in by_family]


def requantize_formats() -> List[str]:
    """Quantized formats we cannot write back after a merge (no quantizer, or one
    that needs an importance matrix): each gets a requantize target."""
    from lib_gguf.formats import get_format

    out = []
    for _, names in lora_formats():
        for n in names:
            f = get_format(n)
            if f.is_quantized and (not f.can_quantize or f.needs_imatrix):
                out.append(n)
    return out


def target_formats() -> List[str]:
    """Formats a merged weight can be requantized to."""
    from lib_gguf.formats import get_format

    out = []
    for _, names in lora_formats():
        for n in names:
            f = get_format(n)
            if f.can_quantize and not f.needs_imatrix and f.family != "float":
                out.append(n)
    for n in ("F16", "BF16", "F32"):
        out.append(n)
    return out


# -- options: a plain dict, stored in Forge's opts or a JSON file -------------------

def normalize_options(d: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """A complete, valid options dict from ``d`` (unknown values raise UIError)."""
    out = json.loads(json.dumps(DEFAULT_OPTIONS))
    d = dict(d or {})
    for k in ("default_mode", "default_gguf_mode"):
        if k in d:
            if d[k] not in MODES:
                raise UIError(f"option {k}: expected one of {', '.join(MODES)}, got {d[k]!r}")
            out[k] = d[k]
    mbf = {}
    for fmt, mode in dict(d.get("mode_by_format") or {}).items():
        if mode in (None, "", "default"):
            continue
        if mode not in MODES:
            raise UIError(f"option mode_by_format[{fmt}]: expected one of {', '.join(MODES)}, got {mode!r}")
        mbf[str(fmt).upper()] = mode
    out["mode_by_format"] = mbf
    rq = {}
    for fmt, tgt in dict(d.get("requantize_target") or {}).items():
        if tgt in (None, "", "default"):
            continue
        rq[str(fmt).upper()] = str(tgt).upper()
    out["requantize_target"] = rq
    if d.get("fallback_format"):
        out["fallback_format"] = str(d["fallback_format"]).upper()
    if "compute_dtype" in d:
        if d["compute_dtype"] not in COMPUTE_DTYPES:
            raise UIError(f"option compute_dtype: expected one of {', '.join(COMPUTE_DTYPES)}, got {d['compute_dtype']!r}")
        out["compute_dtype"] = d["compute_dtype"]
    if "keep_threshold" in d:
        try:
            kt = float(d["keep_threshold"])
        except (TypeError, ValueError):
            raise UIError(f"option keep_threshold: expected a number, got {d['keep_threshold']!r}") from None
        if not 0.0 <= kt <= 1.0:
            raise UIError(f"option keep_threshold: expected a number from 0 to 1, got {kt}")
        out["keep_threshold"] = kt
    return out


def options_file() -> Path:
    if _STATE.options_file is not None:
        return Path(_STATE.options_file)
    env = os.environ.get(OPTIONS_ENV)
    if env:
        return Path(env)
    return cache_dir() / "gguf_lora_options.json"


def set_options_file(path) -> None:
    """Where standalone options are stored (None: the default)."""
    _STATE.options_file = None if path is None else str(path)


def _forge_keys() -> Dict[str, Tuple[str, Optional[str]]]:
    """Forge settings key -> (options field, format name or None)."""
    keys = {
        KEY_PREFIX + "default_mode": ("default_mode", None),
        KEY_PREFIX + "default_gguf_mode": ("default_gguf_mode", None),
        KEY_PREFIX + "fallback_format": ("fallback_format", None),
        KEY_PREFIX + "compute_dtype": ("compute_dtype", None),
        KEY_PREFIX + "keep_threshold": ("keep_threshold", None),
    }
    for _, names in lora_formats():
        for n in names:
            keys[f"{KEY_PREFIX}mode_{n}"] = ("mode_by_format", n)
    for n in requantize_formats():
        keys[f"{KEY_PREFIX}requant_{n}"] = ("requantize_target", n)
    return keys


def _to_flat(opts: Mapping[str, Any]) -> Dict[str, Any]:
    """Options dict -> Forge settings values (every key present)."""
    flat = {}
    for key, (field, fmt) in _forge_keys().items():
        if fmt is None:
            flat[key] = opts[field]
        else:
            flat[key] = opts[field].get(fmt, "default")
    return flat


def _from_flat(get: Callable[[str, Any], Any]) -> Dict[str, Any]:
    d: Dict[str, Any] = {"mode_by_format": {}, "requantize_target": {}}
    defaults = _to_flat(DEFAULT_OPTIONS)
    for key, (field, fmt) in _forge_keys().items():
        v = get(key, defaults[key])
        if fmt is None:
            d[field] = v
        else:
            d[field][fmt] = v
    return d


def load_options() -> Dict[str, Any]:
    """The saved options (Forge's settings inside Forge, else the JSON file)."""
    forge = _forge()
    if forge is not None:
        shared = forge[0]
        data = getattr(shared.opts, "data", {})
        return normalize_options(_from_flat(lambda k, dflt: data.get(k, dflt)))
    path = options_file()
    if not path.exists():
        return normalize_options(None)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        log.warning("could not read LoRA options from %s (%s); using the defaults", path, e)
        return normalize_options(None)
    try:
        return normalize_options(raw)
    except UIError as e:
        log.warning("bad LoRA options in %s (%s); using the defaults", path, e)
        return normalize_options(None)


def store_options(opts: Mapping[str, Any]) -> Dict[str, Any]:
    """Validate and save ``opts``; returns the saved (normalized) dict."""
    opts = normalize_options(opts)
    forge = _forge()
    if forge is not None:
        shared = forge[0]
        labels = getattr(shared.opts, "data_labels", {})
        for k, v in _to_flat(opts).items():
            if k in labels:
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


def current_options_dict() -> Dict[str, Any]:
    """The options to use for the next generation, as a plain dict."""
    return load_options()


def current_options():
    """The options to use for the next generation, as ``lib_lora.policy.LoraOptions``."""
    policy = _import("lib_lora.policy", "lib_lora.policy (LoraOptions)")
    return policy.LoraOptions.from_dict(current_options_dict())


def mode_for(fmt_name: str, opts: Optional[Mapping[str, Any]] = None) -> str:
    """The configured mode for a format: its own entry, else the default for GGUF
    quantized formats or for float formats."""
    opts = normalize_options(opts) if opts is not None else current_options_dict()
    name = fmt_name.upper()
    if name in opts["mode_by_format"]:
        return opts["mode_by_format"][name]
    try:
        from lib_gguf.formats import get_format

        quantized = get_format(name).is_quantized
    except Exception:
        quantized = True
    return opts["default_gguf_mode"] if quantized else opts["default_mode"]


# -- infotext ----------------------------------------------------------------------

def lora_infotext(modes: Optional[Mapping[str, str]] = None, formats: Optional[Iterable[str]] = None,
                  options: Optional[Mapping[str, Any]] = None) -> Dict[str, str]:
    """Generation parameters recording the LoRA mode used per format.

    ``modes``: format name -> mode actually used (from the planner); or
    ``formats``: the formats the LoRAs touched, looked up in ``options`` (default:
    the current options). Returns ``{}`` when there is nothing to record.
    """
    if modes is None:
        if options is not None and not isinstance(options, Mapping):
            options = options.to_dict()  # a LoraOptions
        modes = {f: mode_for(f, options) for f in (formats or ())}
    if not modes:
        return {}
    text = ",".join(f"{k}:{v}" for k, v in sorted(modes.items()))
    return {INFOTEXT_KEY: text}


def parse_lora_infotext(text: str) -> Dict[str, str]:
    """``"Q4_K:runtime,Q8_0:merge"`` -> ``{"Q4_K": "runtime", "Q8_0": "merge"}``."""
    out = {}
    for part in (text or "").split(","):
        k, sep, v = part.strip().partition(":")
        if sep and k and v:
            out[k.strip()] = v.strip()
    return out


# -- the loaded model, the sample model ---------------------------------------------

def set_loaded_model(path) -> None:
    """Tell the inspector which GGUF file is loaded (extension.py calls this)."""
    _STATE.loaded_model = None if path is None else str(path)


def loaded_model() -> Optional[str]:
    if _STATE.loaded_model:
        return _STATE.loaded_model
    forge = _forge()
    if forge is not None:
        info = getattr(getattr(forge[0], "sd_model", None), "sd_checkpoint_info", None)
        fn = getattr(info, "filename", None)
        if fn and str(fn).lower().endswith(".gguf"):
            return str(fn)
    return None


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or (ROOT / ".samples"))


SAMPLE_NAME = "tiny-flux-sample-v1.gguf"
# The sample shows several formats: Q4_K where rows fit, Q8_0 for the MLPs, the
# recipe's high-precision choices (F16 / F32) for the rest.
SAMPLE_RULES = {"*_mlp.*": "Q8_0", "single_blocks.*.linear2.*": "Q8_0"}


def sample_model(folder=None) -> Path:
    """The built-in sample: a tiny Flux quantized to GGUF, written on first use."""
    folder = Path(folder) if folder is not None else cache_dir()
    dst = folder / SAMPLE_NAME
    if dst.exists():
        return dst
    converter = _import("lib_gguf.converter", "the converter (lib_gguf.converter)")
    from safetensors.torch import save_file

    from lib_gguf.sample import tiny_flux_state_dict

    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=str(folder)) as tmp:
        src = Path(tmp) / "tiny-flux.safetensors"
        save_file(tiny_flux_state_dict(), str(src))
        try:
            converter.convert(src, dst, "Q4_K_S", rules=SAMPLE_RULES)
        except ModuleNotFoundError as e:
            raise _not_yet(f"writing GGUF files ({e.name})") from None
    log.info("wrote the sample model %s", dst)
    return dst


# -- handlers: plain functions returning page text ------------------------------------

def _error_text(e: BaseException) -> str:
    """A one-paragraph message for the page (no traceback)."""
    from lib_gguf.errors import GGUFFormatError

    lora_error = ()
    try:
        from lib_lora.errors import LoraError  # type: ignore

        lora_error = (LoraError,)
    except Exception:
        pass
    if isinstance(e, UIError):
        return f"**Error:** {e}"
    if isinstance(e, ModuleNotFoundError) and str(e.name or "").startswith(("lib_gguf", "lib_lora")):
        return f"**Error:** {_not_yet(e.name)}"
    if isinstance(e, FileNotFoundError):
        return f"**File not found:** {e.filename or e}"
    if isinstance(e, (GGUFFormatError, *lora_error)):
        return f"**Error:** {e}"
    if isinstance(e, (ValueError, OSError)):
        return f"**Error:** {e}"
    log.error("unexpected error in the GGUF tab", exc_info=e)
    return f"**Unexpected error** ({type(e).__name__}): {e}. The full report is in the console log."


def _existing_file(path: str, what: str, suffixes: Sequence[str] = ()) -> Path:
    p = Path(str(path or "").strip().strip('"')).expanduser()
    if not str(path or "").strip():
        raise UIError(f"no {what} given")
    if not p.exists():
        raise UIError(f"{what} not found: {p}")
    if suffixes and p.is_file() and p.suffix.lower() not in suffixes:
        raise UIError(f"{what} {p}: expected a {' or '.join(suffixes)} file")
    return p


def read_tensor_infos(path: Path) -> Tuple[List[Tuple[str, str, Tuple[int, ...], int]], Dict[str, Any], int]:
    """``([(name, format, shape, nbytes)], metadata, version)`` of a GGUF file."""
    reader = _import("lib_gguf.reader", "the GGUF reader (lib_gguf.reader)")
    from lib_gguf.formats import get_format

    f = reader.GGUFFile(path)
    try:
        rows = []
        for info in f.tensors:
            fmt = getattr(info, "format", None)
            if fmt is None:
                fmt = get_format(getattr(info, "type", getattr(info, "tensor_type", None)), tensor=info.name)
            shape = tuple(int(s) for s in info.shape)
            nbytes = getattr(info, "nbytes", None)
            if nbytes is None:
                n = 1
                for s in shape:
                    n *= s
                nbytes = n // fmt.block_size * fmt.type_size
            rows.append((info.name, fmt.name, shape, int(nbytes)))
        meta = dict(getattr(f, "metadata", {}) or {})
        version = int(getattr(f, "version", 0) or 0)
    finally:
        close = getattr(f, "close", None)
        if callable(close):
            close()
    return rows, meta, version


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def histogram(rows) -> List[Tuple[str, int, int, int]]:
    """``[(format, tensors, weights, bytes)]``, most weights first."""
    h: Dict[str, List[int]] = {}
    for _, fmt, shape, nbytes in rows:
        e = h.setdefault(fmt, [0, 0, 0])
        e[0] += 1
        e[1] += _numel(shape)
        e[2] += nbytes
    return sorted(((k, *v) for k, v in h.items()), key=lambda r: (-r[2], r[0]))


def _mib(n: int) -> str:
    return f"{n / 2**20:.3f}"


def _lora_plan(path: Path, rows, lora_path: str, opts: Mapping[str, Any]) -> str:
    """Markdown: which layers the LoRA would merge or apply at run time."""
    lora = _existing_file(lora_path, "LoRA file", (".safetensors", ".pt", ".ckpt", ".bin"))
    from lib_lora import load_lora

    fmt_of = {name: fmt for name, fmt, _, _ in rows}
    shape_of = {name: tuple(shape) for name, _, shape, _ in rows}
    lf = load_lora(str(lora), shape_of)
    targets = sorted(lf.patches)
    if not targets:
        raise UIError(f"the LoRA {lora.name} matches none of the layers of {path.name}: "
                      "it is probably for another model")
    out_rows = []
    counts: Dict[str, int] = {}
    for t in targets:
        fmt = fmt_of.get(t, "?")
        mode = mode_for(fmt, opts) if fmt != "?" else "?"
        counts[mode] = counts.get(mode, 0) + 1
        out_rows.append(f"| `{t}` | {fmt} | {list(shape_of.get(t, ()))} | {mode} |")
    head = (f"**LoRA {lora.name}**: {len(targets)} layers; "
            + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
            + (" ('auto': Forge's '(fp16 LoRA)' switch decides at load, and a merge that would keep less "
               "than the keep threshold of the delta runs at run time)" if "auto" in counts else ""))
    lines = [head, "", "| layer | format | shape | mode |", "|---|---|---|---|", *out_rows]
    if lf.unplaced:
        lines += ["", f"{len(lf.unplaced)} LoRA keys not placed: "
                  + ", ".join(f"`{k}` ({why})" for k, why in sorted(lf.unplaced.items())[:20])
                  + (" ..." if len(lf.unplaced) > 20 else "")]
    return "\n".join(lines)


def inspect_file(path: str, lora_path: str = "", options: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Inspect a GGUF file (and what a LoRA would do to it).

    Returns ``{"ok", "summary" (markdown), "histogram" (markdown), "rows"
    (table rows), "lora" (markdown)}``; errors are in ``summary``, never raised.
    """
    out = {"ok": False, "summary": "", "histogram": "", "rows": [], "lora": ""}
    try:
        p = _existing_file(path, "GGUF file")
        if p.is_dir():
            raise UIError(f"{p} is a folder; expected a .gguf file")
        rows, meta, version = read_tensor_infos(p)
    except Exception as e:  # shown in the page
        out["summary"] = _error_text(e)
        return out
    total_w = sum(_numel(s) for _, _, s, _ in rows)
    total_b = sum(b for *_, b in rows)
    hist = histogram(rows)
    arch = meta.get("general.architecture")
    out["summary"] = (
        f"**{p.name}**: GGUF v{version}, {len(rows)} tensors, {total_w / 1e6:.3f} M weights, "
        f"{_mib(total_b)} MiB, {total_b * 8 / max(total_w, 1):.3f} bits per weight"
        + (f", architecture {arch}" if arch else "")
        + f"; {len(hist)} formats: " + ", ".join(f"{f} ×{c}" for f, c, _, _ in hist)
    )
    try:
        opts = normalize_options(options) if options is not None else current_options_dict()
    except UIError:
        opts = normalize_options(None)
    lines = ["| format | tensors | weights | MiB | bits/weight | share | LoRA mode | |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    for fmt, count, n, nb in hist:
        share = n / max(total_w, 1)
        bar = "█" * max(1, round(share * 30))
        lines.append(f"| {fmt} | {count} | {n} | {_mib(nb)} | {nb * 8 / max(n, 1):.3f} | {share:.1%} "
                     f"| {mode_for(fmt, opts)} | {bar} |")
    out["histogram"] = "\n".join(lines)
    out["rows"] = [[name, fmt, " × ".join(str(s) for s in shape), round(nb * 8 / max(_numel(shape), 1), 3),
                    float(_mib(nb))] for name, fmt, shape, nb in rows]
    out["ok"] = True
    if lora_path and str(lora_path).strip():
        try:
            out["lora"] = _lora_plan(p, rows, lora_path, opts)
        except Exception as e:
            out["lora"] = _error_text(e)
    return out


def _progress_adapter(progress, desc: str):
    if progress is None:
        return None

    def update(done: int, total: int, name: str = "") -> None:
        try:
            progress((int(done), int(total)), desc=f"{desc} {name}".strip())
        except Exception:  # progress is a nicety
            pass

    return update


def _default_output(src: Path, tag: str) -> Path:
    stem = src.name if src.is_dir() else src.stem
    return src.parent / f"{stem}-{tag}.gguf"


def convert_file(src: str, dst: str, preset: str, rules: str = "", progress=None) -> str:
    """The converter, for the page: returns markdown (a summary or an error)."""
    try:
        s = _existing_file(src, "source model", (".safetensors", ".gguf"))
        if not preset:
            raise UIError("no preset chosen")
        d = Path(dst.strip()).expanduser() if dst and dst.strip() else _default_output(s, preset.upper())
        if d.suffix.lower() != ".gguf":
            raise UIError(f"output {d}: expected a .gguf file name")
        if not d.parent.exists():
            raise UIError(f"output folder not found: {d.parent}")
        converter = _import("lib_gguf.converter", "the converter (lib_gguf.converter)")
        rule_arg = _parse_rules_text(rules)
        summary = converter.convert(s, d, preset, rules=rule_arg, progress=_progress_adapter(progress, "quantizing"))
        text = summary.text() if hasattr(summary, "text") else str(summary)
        return "**Done.**\n\n```\n" + text + "\n```"
    except Exception as e:
        return _error_text(e)


def _parse_rules_text(rules: str):
    text = (rules or "").strip()
    if not text:
        return None
    if text.startswith("{"):
        try:
            return json.loads(text)
        except ValueError as e:
            raise UIError(f"rules: not valid JSON ({e})") from None
    pairs = []
    for i, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        pat, sep, fmt = line.rpartition("=")
        if not sep or not pat.strip() or not fmt.strip():
            raise UIError(f"rules line {i}: expected 'PATTERN = FORMAT', got {line!r}")
        pairs.append((pat.strip(), fmt.strip()))
    return pairs


def _parse_lora_lines(text: str) -> List[Tuple[str, float]]:
    out = []
    for i, line in enumerate((text or "").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path, strength = line, 1.0
        head, sep, tail = line.rpartition(":")
        if sep and head and tail:
            try:
                path, strength = head, float(tail)
            except ValueError:
                pass
        out.append((path.strip(), strength))
    return out


def bake_file(model: str, loras: str, dst: str, progress=None) -> str:
    """The LoRA baker, for the page: returns markdown (a summary or an error)."""
    try:
        m = _existing_file(model, "model", (".gguf",))
        items = _parse_lora_lines(loras)
        if not items:
            raise UIError("no LoRA given (one 'path' or 'path:strength' a line)")
        for path, _ in items:
            _existing_file(path, "LoRA file")
        d = Path(dst.strip()).expanduser() if dst and dst.strip() else _default_output(m, "lora")
        if d.suffix.lower() != ".gguf":
            raise UIError(f"output {d}: expected a .gguf file name")
        if d.resolve() == m.resolve():
            raise UIError("the output would overwrite the model")
        bake = _import("lib_lora.bake", "the LoRA baker (lib_lora.bake)")
        result = bake.bake_loras(str(m), items, str(d), progress=_progress_adapter(progress, "baking"))
        text = result.text() if hasattr(result, "text") else (str(result) if result is not None else f"wrote {d}")
        return "**Done.**\n\n```\n" + text + "\n```"
    except Exception as e:
        return _error_text(e)


def _settings_components() -> Dict[str, Any]:
    """Forge's settings-page components by key (built before the extension tabs), or {}."""
    forge = _forge()
    if forge is None:
        return {}
    return dict(getattr(forge[0], "settings_components", None) or {})


def save_options(opts: Mapping[str, Any]) -> str:
    try:
        saved = store_options(opts)
    except Exception as e:
        return _error_text(e)
    return _saved_text(saved)


def _saved_text(saved: Mapping[str, Any]) -> str:
    where = "Forge's settings" if _forge() is not None else str(options_file())
    n = len(saved["mode_by_format"])
    return f"Saved to {where}: {n} per-format mode{'s' if n != 1 else ''}; applies at the next generation."


# -- the gradio UI -------------------------------------------------------------------

def _gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    return gr


def build_tab():
    """The tab's contents as a ``gr.Blocks`` (Forge puts it in a tab; serve() shows it alone)."""
    gr = _gradio()
    opts = load_options()
    families = lora_formats()
    rq_formats = requantize_formats()
    targets = target_formats()
    for v in [opts["fallback_format"], *opts["requantize_target"].values()]:
        if v not in targets:  # a saved choice stays choosable
            targets.append(v)
    from lib_gguf.recipes import PRESETS

    with gr.Blocks(analytics_enabled=False, title="GGUF") as demo:
        with gr.Tab("LoRA options", elem_id="gguf_tab_options"):
            gr.Markdown("How a LoRA is applied to each GGUF format: **merge** (into the weight, then "
                        "requantize to the same format), **run-time** (a low-rank delta added at each step), or "
                        "**auto** (chosen per layer). Saved options apply at the next generation.")
            with gr.Row():
                default_gguf = gr.Radio(MODE_CHOICES, value=opts["default_gguf_mode"],
                                        label="Default for quantized GGUF formats", elem_id="gguf_default_gguf_mode")
                default_mode = gr.Radio(MODE_CHOICES, value=opts["default_mode"],
                                        label="Default for float weights of GGUF files (F16, BF16, F32)", elem_id="gguf_default_mode")
            format_radios = []
            format_names = []
            for fam, names in families:
                with gr.Accordion(FAMILY_TITLES[fam], open=fam in ("legacy", "k")):
                    with gr.Row():
                        for n in names:
                            r = gr.Radio(FORMAT_MODE_CHOICES, value=opts["mode_by_format"].get(n, "default"),
                                         label=n, elem_id=f"gguf_mode_{n}", min_width=220)
                            format_radios.append(r)
                            format_names.append(n)
            rq_drops = []
            with gr.Accordion("Requantize target (formats we cannot write back after a merge)", open=False):
                if not rq_formats:
                    gr.Markdown("Every format has a quantizer.")
                with gr.Row():
                    for n in rq_formats:
                        rq_drops.append(gr.Dropdown(["default"] + targets,
                                                    value=opts["requantize_target"].get(n, "default"),
                                                    label=n, elem_id=f"gguf_requant_{n}", min_width=160))
            with gr.Row():
                fallback = gr.Dropdown(targets, value=opts["fallback_format"], label="Fallback requantize format ('default' above)",
                                       elem_id="gguf_fallback_format")
                compute = gr.Dropdown(list(COMPUTE_DTYPES), value=opts["compute_dtype"], label="Compute dtype",
                                      elem_id="gguf_compute_dtype")
                keep = gr.Slider(0.0, 1.0, value=opts["keep_threshold"], step=0.01, label="Keep threshold",
                                 elem_id="gguf_keep_threshold")
            with gr.Row():
                save_btn = gr.Button("Save options", variant="primary", elem_id="gguf_opt_save")
                reload_btn = gr.Button("Reload saved", elem_id="gguf_opt_reload")
            status = gr.Markdown("", elem_id="gguf_opt_status")

            all_inputs = [default_gguf, default_mode, *format_radios, *rq_drops, fallback, compute, keep]

            def _collect(*values):
                values = list(values)
                d = {"default_gguf_mode": values.pop(0), "default_mode": values.pop(0)}
                d["mode_by_format"] = {n: values.pop(0) for n in format_names}
                d["requantize_target"] = {n: values.pop(0) for n in rq_formats}
                d["fallback_format"], d["compute_dtype"], d["keep_threshold"] = values
                return d

            # the same options on Forge's settings page ("GGUF LoRA"): a save here shows
            # there at once (else its stale values would be written back by "Apply
            # settings"), and a change there shows here
            flat_keys = ([KEY_PREFIX + "default_gguf_mode", KEY_PREFIX + "default_mode"]
                         + [f"{KEY_PREFIX}mode_{n}" for n in format_names]
                         + [f"{KEY_PREFIX}requant_{n}" for n in rq_formats]
                         + [KEY_PREFIX + "fallback_format", KEY_PREFIX + "compute_dtype",
                            KEY_PREFIX + "keep_threshold"])
            settings = _settings_components()
            linked = [(k, c, settings[k]) for k, c in zip(flat_keys, all_inputs) if k in settings]

            def _on_save(*values):
                try:
                    saved = store_options(_collect(*values))
                except Exception as e:
                    text, shown = _error_text(e), [gr.update() for _ in linked]
                else:
                    flat = _to_flat(saved)
                    text, shown = _saved_text(saved), [flat[k] for k, _c, _s in linked]
                return [text, *shown] if linked else text

            for _k, tab_c, set_c in linked:
                set_c.change(lambda v: v, inputs=[set_c], outputs=[tab_c], queue=False)

            def _on_reload():
                o = load_options()
                return [o["default_gguf_mode"], o["default_mode"],
                        *[o["mode_by_format"].get(n, "default") for n in format_names],
                        *[o["requantize_target"].get(n, "default") for n in rq_formats],
                        o["fallback_format"], o["compute_dtype"], o["keep_threshold"]]

            save_btn.click(_on_save, inputs=all_inputs, outputs=[status] + [sc for _k, _c, sc in linked])
            reload_btn.click(_on_reload, inputs=[], outputs=all_inputs)
        # each page load shows what is saved now (the values above are the build-time ones)
        demo.load(_on_reload, inputs=[], outputs=all_inputs)

        with gr.Tab("Inspect", elem_id="gguf_tab_inspect"):
            with gr.Row():
                insp_path = gr.Textbox(value=loaded_model() or "", label="GGUF file", scale=4,
                                       placeholder="/path/to/model.gguf", elem_id="gguf_inspect_path")
                insp_lora = gr.Textbox(value="", label="LoRA (optional): which layers it would merge or run",
                                       scale=3, placeholder="/path/to/lora.safetensors", elem_id="gguf_inspect_lora")
            with gr.Row():
                insp_btn = gr.Button("Inspect", variant="primary", elem_id="gguf_inspect_btn")
                insp_loaded = gr.Button("Use the loaded model", elem_id="gguf_inspect_loaded")
            insp_summary = gr.Markdown("", elem_id="gguf_inspect_summary")
            insp_hist = gr.Markdown("", elem_id="gguf_inspect_hist")
            insp_lora_out = gr.Markdown("", elem_id="gguf_inspect_lora_plan")
            insp_table = gr.Dataframe(headers=["tensor", "format", "shape", "bits/weight", "MiB"],
                                      datatype=["str", "str", "str", "number", "number"], interactive=False,
                                      label="Tensors", elem_id="gguf_inspect_table")

            def _on_inspect(path, lora):
                r = inspect_file(path, lora)
                return r["summary"], r["histogram"], r["lora"], r["rows"] or None

            insp_btn.click(_on_inspect, inputs=[insp_path, insp_lora],
                           outputs=[insp_summary, insp_hist, insp_lora_out, insp_table])
            insp_loaded.click(lambda: loaded_model() or "", inputs=[], outputs=[insp_path])

        with gr.Tab("Convert", elem_id="gguf_tab_convert"):
            gr.Markdown("safetensors (a file or a folder of shards) or GGUF → GGUF with a quantization preset.")
            with gr.Row():
                conv_src = gr.Textbox(label="Source (.safetensors, folder, or .gguf)", scale=4,
                                      elem_id="gguf_convert_src")
                conv_dst = gr.Textbox(label="Output .gguf (empty: beside the source)", scale=4,
                                      elem_id="gguf_convert_dst")
                conv_preset = gr.Dropdown(list(PRESETS), value="Q4_K_S" if "Q4_K_S" in PRESETS else None,
                                          label="Preset", scale=1, elem_id="gguf_convert_preset")
            conv_rules = gr.Textbox(label="Rules (optional): one 'PATTERN = FORMAT' a line, or JSON", lines=3,
                                    placeholder="*_mlp.* = Q8_0\nre:^single_blocks\\.0\\. = keep",
                                    elem_id="gguf_convert_rules")
            conv_btn = gr.Button("Convert", variant="primary", elem_id="gguf_convert_btn")
            conv_out = gr.Markdown("", elem_id="gguf_convert_out")

            def _on_convert(src, dst, preset, rules, progress=gr.Progress()):
                return convert_file(src, dst, preset, rules, progress=progress)

            conv_btn.click(_on_convert, inputs=[conv_src, conv_dst, conv_preset, conv_rules], outputs=[conv_out])

        with gr.Tab("Bake LoRA", elem_id="gguf_tab_bake"):
            gr.Markdown("Merge LoRAs into a GGUF model, each tensor requantized to its own format.")
            with gr.Row():
                bake_model = gr.Textbox(value=loaded_model() or "", label="GGUF model", scale=4,
                                        elem_id="gguf_bake_model")
                bake_dst = gr.Textbox(label="Output .gguf (empty: beside the model)", scale=4,
                                      elem_id="gguf_bake_dst")
            bake_loras = gr.Textbox(label="LoRAs: one 'path' or 'path:strength' a line", lines=3,
                                    elem_id="gguf_bake_loras")
            bake_btn = gr.Button("Bake", variant="primary", elem_id="gguf_bake_btn")
            bake_out = gr.Markdown("", elem_id="gguf_bake_out")

            def _on_bake(model, loras, dst, progress=gr.Progress()):
                return bake_file(model, loras, dst, progress=progress)

            bake_btn.click(_on_bake, inputs=[bake_model, bake_loras, bake_dst], outputs=[bake_out])
    return demo


# -- Forge registration --------------------------------------------------------------

def on_ui_tabs():
    return [(build_tab(), TAB_TITLE, TAB_ELEM_ID)]


def on_ui_settings():
    forge = _forge()
    if forge is None:
        return
    shared = forge[0]
    gr = _gradio()
    defaults = _to_flat(DEFAULT_OPTIONS)
    targets = target_formats()

    def add(key, label, component, args):
        shared.opts.add_option(key, shared.OptionInfo(defaults[key], label, component, args, section=SECTION))

    add(KEY_PREFIX + "default_gguf_mode", "LoRA mode for quantized GGUF formats without their own setting",
        gr.Radio, {"choices": MODE_CHOICES})
    add(KEY_PREFIX + "default_mode", "LoRA mode for float weights of GGUF files without their own setting",
        gr.Radio, {"choices": MODE_CHOICES})
    for _, names in lora_formats():
        for n in names:
            add(f"{KEY_PREFIX}mode_{n}", f"LoRA mode for {n}", gr.Radio, {"choices": FORMAT_MODE_CHOICES})
    for n in requantize_formats():
        add(f"{KEY_PREFIX}requant_{n}", f"Requantize target for {n} (no quantizer)", gr.Dropdown,
            {"choices": ["default"] + targets})
    add(KEY_PREFIX + "fallback_format", "Fallback requantize format", gr.Dropdown, {"choices": targets})
    add(KEY_PREFIX + "compute_dtype", "Run-time LoRA compute dtype", gr.Dropdown, {"choices": list(COMPUTE_DTYPES)})
    add(KEY_PREFIX + "keep_threshold", "Keep threshold", gr.Slider, {"minimum": 0.0, "maximum": 1.0, "step": 0.01})
    _extend_api_options_model(shared)


def _extend_api_options_model(shared) -> None:
    """GET /sdapi/v1/options answers through the pydantic model Forge builds from the
    settings known when ``modules.api.models`` is first imported, which a built-in
    extension does before ours loads: without our keys in it, the API drops them. The
    model gets our keys (with their defaults) before the API is set up."""
    models = sys.modules.get("modules.api.models")
    base = getattr(models, "OptionsModel", None)
    if base is None:
        return  # not built yet: it will be built with our settings in it
    known = getattr(base, "model_fields", None) or getattr(base, "__fields__", {}) or {}
    labels = getattr(shared.opts, "data_labels", {})
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


def _register_with_forge() -> bool:
    """Register the tab and the settings once, however many copies of this module run."""
    forge = _forge()
    if forge is None:
        return False
    script_callbacks = forge[1]
    cmap = getattr(script_callbacks, "callback_map", {})
    done = any(str(getattr(c, "name", "")).endswith("/forge_gguf_lora_tab")
               for c in cmap.get("callbacks_ui_tabs", []))
    if not done:
        script_callbacks.on_ui_tabs(on_ui_tabs, name="forge_gguf_lora_tab")
        script_callbacks.on_ui_settings(on_ui_settings, name="forge_gguf_lora_settings")
        # the settings exist from the start, not only once the settings page is built:
        # the API's options model (GET /sdapi/v1/options) lists only keys known by then
        try:
            on_ui_settings()
        except Exception as e:  # the settings page will add them again
            log.warning("GGUF LoRA settings not registered early: %s", e)
    return True


# -- standalone ------------------------------------------------------------------------

def serve(port: int = 7861, model=None, block: bool = True, options_path=None):
    """Serve the tab alone on http://127.0.0.1:<port> (never on other interfaces, no
    share link, no analytics). ``model``: a GGUF to inspect, else the built-in sample
    (written to the cache folder on first use). Returns when the server is closed, or
    returns the running ``gr.Blocks`` when ``block`` is False (call ``.close()``)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    if options_path is not None:
        set_options_file(options_path)
    if model is None:
        try:
            model = sample_model()
        except UIError as e:
            log.warning("no sample model: %s", e)
    set_loaded_model(model)
    demo = build_tab()
    demo.queue()
    demo.launch(server_name="127.0.0.1", server_port=int(port), share=False, inbrowser=False,
                prevent_thread_lock=True, quiet=True, show_error=False)
    url = f"http://127.0.0.1:{int(port)}"
    log.info("GGUF tab at %s", url)
    print(f"GGUF tab: {url}  (model: {model})", flush=True)
    if not block:
        return demo
    try:
        demo.block_thread()
    finally:
        demo.close()
    return None


_register_with_forge()
