"""Baking LoRAs into a new GGUF file: merge in float32, requantize each tensor to
its own format, stream tensor by tensor, write atomically, leave the inputs as
they are, and record the LoRAs (file name, sha256) and strengths in the metadata.

Before any work it refuses an output that is one of the inputs (the model or a
LoRA, after resolving links and ``..``) or a folder, non-finite strengths, and LoRA
files that are empty, incomplete or hold NaN or inf."""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .errors import LoraError
from .loader import check_strength, load_lora
from .merge import check_range, merged_weight
from .policy import LoraOptions, merge_target


@dataclass
class BakeResult:
    path: str
    merged: Dict[str, str] = field(default_factory=dict)  # tensor -> format written
    unplaced: Dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def text(self) -> str:
        lines = [f"{self.path}: merged {len(self.merged)} tensors in {self.seconds:.1f} s"]
        changed = {k: v for k, v in self.merged.items() if "->" in v}
        if changed:
            lines.append("requantized into another format (no quantizer for the original):")
            lines += [f"  {k}: {v}" for k, v in changed.items()]
        if self.unplaced:
            lines.append(f"{len(self.unplaced)} LoRA keys not placed:")
            lines += [f"  {k}: {why}" for k, why in sorted(self.unplaced.items())]
        return "\n".join(lines)


class _Merged:
    """A tensor the writer computes when it reaches it."""

    def __init__(self, name, param, patches, fmt, on_done):
        self.name, self.param, self.patches, self.on_done = name, param, patches, on_done
        self.gguf_cls = fmt
        self.gguf_shape = tuple(param.shape)

    def materialize(self):
        from lib_gguf import quantize

        w = merged_weight(self.param, self.patches, self.name)
        check_range(w, self.gguf_cls, self.name)
        self.on_done(self.name)
        if self.gguf_cls.is_float:
            return w.to(self.gguf_cls.torch_dtype)
        return quantize(w, self.gguf_cls, name=self.name)


def bake_loras(model_path: Union[str, Path], loras: Sequence[Tuple[Union[str, Path, dict], float]],
               out_path: Union[str, Path], progress: Optional[Callable[[int, int, str], None]] = None,
               options: Optional[LoraOptions] = None) -> BakeResult:
    from lib_gguf.errors import GGUFFormatError
    from lib_gguf.formats import format_for_dtype
    from lib_gguf.reader import GGUFFile
    from lib_gguf.writer import check_output, save

    t0 = time.perf_counter()
    options = options or LoraOptions()
    model_path, out_path = Path(model_path), Path(out_path)
    if not loras:
        raise LoraError("no LoRA given")
    loras = [(l, check_strength(s, None if isinstance(l, dict) else l)) for l, s in loras]
    check_output(out_path, [model_path] + [l for l, _ in loras if not isinstance(l, dict)])
    f = GGUFFile(model_path)
    sd = f.state_dict()
    files = [(load_lora(l, sd), s) for l, s in loras]
    result = BakeResult(str(out_path))
    by_param: Dict[str, list] = {}
    for lf, s in files:
        for k, why in lf.unplaced.items():
            result.unplaced[f"{Path(lf.path).name}: {k}" if lf.path else k] = why
        for name, patches in lf.patches.items():
            by_param.setdefault(name, []).extend((p, s) for p in patches)
    total = len(by_param)
    done: List[str] = []

    def on_done(name):
        done.append(name)
        if progress is not None:
            progress(len(done), total, name)

    tensors = {}
    for name, t in sd.items():
        if name not in by_param:
            tensors[name] = t
            continue
        fmt = getattr(t, "gguf_cls", None)
        if fmt is None:
            try:
                out = format_for_dtype(t.dtype, tensor=name)
            except GGUFFormatError:
                out = None
            if out is None or not out.is_float:
                raise LoraError(f"cannot merge into a {t.dtype} tensor", path=model_path, key=name)
            result.merged[name] = out.name
        else:
            out = merge_target(fmt, options, int(t.shape[-1]))
            result.merged[name] = out.name if out is fmt else f"{fmt.name} -> {out.name}"
        tensors[name] = _Merged(name, t, by_param[name], out, on_done)
    meta = dict(f.metadata)
    meta.pop("general.alignment", None)
    # file names and content hashes, never local paths
    meta["forge_gguf_lora.loras"] = json.dumps([_lora_record(l, s) for l, s in loras], allow_nan=False)
    meta["forge_gguf_lora.baked_from"] = model_path.name
    save(out_path, tensors, meta, alignment=f.alignment)
    result.seconds = time.perf_counter() - t0
    return result


def _lora_record(lora, strength: float) -> dict:
    if isinstance(lora, dict):
        return {"file": "<state dict>", "strength": strength}
    h = hashlib.sha256()
    with open(lora, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return {"file": Path(lora).name, "sha256": h.hexdigest(), "strength": strength}
