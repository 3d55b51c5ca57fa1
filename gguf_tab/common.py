"""What the GGUF tab's modules share: the host, the loaded model, page text for
errors, file checks, progress, and the built-in sample model."""
from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

log = logging.getLogger("forge_gguf_lora.ui")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # standalone / tests: make lib_gguf and lib_lora importable
    sys.path.append(str(ROOT))

CACHE_ENV = "FORGE_GGUF_LORA_CACHE"
SAMPLE_NAME = "tiny-flux-sample-v1.gguf"
# The sample shows several formats: Q4_K where rows fit, Q8_0 for the MLPs, the
# recipe's high-precision choices (F16 / F32) for the rest.
SAMPLE_RULES = {"*_mlp.*": "Q8_0", "single_blocks.*.linear2.*": "Q8_0"}

_host: Any = None  # Forge's ``modules.shared`` inside Forge (set by scripts/gguf_ui.py), else None
_loaded_model: Optional[str] = None


class UIError(Exception):
    """An error whose message is shown as it is in the page."""


def set_host(shared) -> None:
    """Forge's ``modules.shared`` (its settings, its loaded model), or None standalone."""
    global _host
    _host = shared


def host():
    return _host


def set_loaded_model(path) -> None:
    """Which GGUF file the inspector and the baker open by default."""
    global _loaded_model
    _loaded_model = None if path is None else str(path)


def loaded_model() -> Optional[str]:
    if _loaded_model:
        return _loaded_model
    info = getattr(getattr(_host, "sd_model", None), "sd_checkpoint_info", None)
    fn = getattr(info, "filename", None)
    if fn and str(fn).lower().endswith(".gguf"):
        return str(fn)
    return None


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or (ROOT / ".samples"))


def gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    return gr


def error_text(e: BaseException) -> str:
    """A one-paragraph message for the page (no traceback)."""
    from lib_gguf.errors import GGUFFormatError
    from lib_lora.errors import LoraError

    if isinstance(e, FileNotFoundError):
        return f"**File not found:** {e.filename or e}"
    if isinstance(e, (UIError, GGUFFormatError, LoraError, ValueError, OSError)):
        return f"**Error:** {e}"
    log.error("unexpected error in the GGUF tab", exc_info=e)
    return f"**Unexpected error** ({type(e).__name__}): {e}. The full report is in the console log."


def existing_file(path: str, what: str, suffixes: Sequence[str] = ()) -> Path:
    p = Path(str(path or "").strip().strip('"')).expanduser()
    if not str(path or "").strip():
        raise UIError(f"no {what} given")
    if not p.exists():
        raise UIError(f"{what} not found: {p}")
    if suffixes and p.is_file() and p.suffix.lower() not in suffixes:
        raise UIError(f"{what} {p}: expected a {' or '.join(suffixes)} file")
    return p


def output_path(dst: str, src: Path, tag: str) -> Path:
    """The output .gguf: ``dst``, else ``<src stem>-<tag>.gguf`` beside the source."""
    if dst and dst.strip():
        d = Path(dst.strip()).expanduser()
    else:
        d = src.parent / f"{src.name if src.is_dir() else src.stem}-{tag}.gguf"
    if d.suffix.lower() != ".gguf":
        raise UIError(f"output {d}: expected a .gguf file name")
    return d


def progress_adapter(progress, desc: str):
    """``progress(done, total, name)`` for the libraries, from gradio's progress (or None)."""
    if progress is None:
        return None

    def update(done: int, total: int, name: str = "") -> None:
        try:
            progress((int(done), int(total)), desc=f"{desc} {name}".strip())
        except Exception:  # progress is a nicety
            pass

    return update


def done_text(result) -> str:
    return "**Done.**\n\n```\n" + result.text() + "\n```"


def sample_model(folder=None) -> Path:
    """The built-in sample: a tiny Flux quantized to GGUF, written on first use."""
    from safetensors.torch import save_file

    from lib_gguf.converter import convert
    from lib_gguf.sample import tiny_flux_state_dict

    folder = Path(folder) if folder is not None else cache_dir()
    dst = folder / SAMPLE_NAME
    if dst.exists():
        return dst
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=str(folder)) as tmp:
        src = Path(tmp) / "tiny-flux.safetensors"
        save_file(tiny_flux_state_dict(), str(src))
        convert(src, dst, "Q4_K_S", rules=SAMPLE_RULES)
    log.info("wrote the sample model %s", dst)
    return dst
