"""The "Inspect" tab: a GGUF file's tensors, formats and sizes, and, for a LoRA, which
layers :func:`lib_lora.policy.decide` would merge or run at run time."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from . import common, options
from .common import UIError

Row = Tuple[str, str, Tuple[int, ...], int]  # (name, format, logical shape, bytes)


def read_tensor_infos(path: Path) -> Tuple[List[Row], Dict[str, Any], int]:
    """``([(name, format, shape, nbytes)], metadata, version)`` of a GGUF file (headers only)."""
    from lib_gguf.reader import GGUFFile

    f = GGUFFile(path)
    rows = [(t.name, t.format.name, tuple(int(s) for s in t.shape), int(t.nbytes)) for t in f.tensors]
    return rows, dict(f.metadata), int(f.version)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def histogram(rows: Sequence[Row]) -> List[Tuple[str, int, int, int]]:
    """``[(format, tensors, weights, bytes)]``, most bytes first."""
    h: Dict[str, List[int]] = {}
    for _, fmt, shape, nbytes in rows:
        e = h.setdefault(fmt, [0, 0, 0])
        e[0] += 1
        e[1] += _numel(shape)
        e[2] += nbytes
    return sorted(((k, *v) for k, v in h.items()), key=lambda r: (-r[2], r[0]))


def _mib(n: int) -> str:
    return f"{n / 2**20:.3f}"


def _plan_cell(d) -> str:
    """What the inspector's LoRA plan shows for one decision."""
    if d.choice == "auto" and d.mode == "merge":  # decided at load: the host's switch, then the keep estimate
        return "auto"
    cell = "merge" if d.mode == "merge" else "runtime"
    if d.target != d.format and (d.mode == "merge" or d.others):
        cell += f" (into {d.target})"
    if d.others:
        cell += f" + {', '.join(sorted(set(d.others)))} merged"
    return cell


def lora_plan(path: Path, rows: Sequence[Row], lora_path: str, opts: Mapping[str, Any]) -> str:
    """Markdown: which layers the LoRA would merge or apply at run time, as the Forge glue
    decides (in Forge only plain low-rank LoRAs run at run time; the rest is merged)."""
    from lib_lora import LoraOptions, decide, load_lora

    lora = common.existing_file(lora_path, "LoRA file", (".safetensors", ".pt", ".ckpt", ".bin"))
    fmt_of = {name: fmt for name, fmt, _, _ in rows}
    shape_of = {name: tuple(shape) for name, _, shape, _ in rows}
    lf = load_lora(str(lora), shape_of)
    if not lf.patches:
        raise UIError(f"the LoRA {lora.name} matches none of the layers of {path.name}: "
                      "it is probably for another model")
    policy = LoraOptions.from_dict(opts)
    out_rows, counts = [], {}
    for t in sorted(lf.patches):
        plain = [(p, 1.0) for p in lf.patches[t] if p.is_lowrank and p.dora_scale is None]
        others = [("dora" if p.dora_scale is not None else p.kind) for p in lf.patches[t]
                  if not (p.is_lowrank and p.dora_scale is None)]
        d = decide(fmt_of[t], plain, policy, shape=shape_of[t], others=others,
                   linear=t.endswith(".weight") and len(shape_of[t]) == 2)
        cell = _plan_cell(d)
        counts[cell.split(" ")[0]] = counts.get(cell.split(" ")[0], 0) + 1
        out_rows.append(f"| `{t}` | {fmt_of[t]} | {list(shape_of[t])} | {cell} |")
    head = (f"**LoRA {lora.name}**: {len(lf.patches)} layers; "
            + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
            + (" ('auto': Forge's '(fp16 LoRA)' switch decides at load, and a merge that would keep less "
               "than the keep threshold of the delta runs at run time)" if "auto" in counts else ""))
    lines = [head, "", "| layer | format | shape | mode |", "|---|---|---|---|", *out_rows]
    if lf.unplaced:
        lines += ["", f"{len(lf.unplaced)} LoRA keys not placed: "
                  + ", ".join(f"`{k}` ({why})" for k, why in sorted(lf.unplaced.items())[:20])
                  + (" ..." if len(lf.unplaced) > 20 else "")]
    return "\n".join(lines)


def inspect_file(path: str, lora_path: str = "", opts: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Inspect a GGUF file (and what a LoRA would do to it).

    Returns ``{"ok", "summary" (markdown), "histogram" (markdown), "rows" (table rows),
    "lora" (markdown)}``; errors are in ``summary`` (or ``lora``), never raised."""
    out: Dict[str, Any] = {"ok": False, "summary": "", "histogram": "", "rows": [], "lora": ""}
    try:
        p = common.existing_file(path, "GGUF file")
        if p.is_dir():
            raise UIError(f"{p} is a folder; expected a .gguf file")
        rows, meta, version = read_tensor_infos(p)
    except Exception as e:  # shown in the page
        out["summary"] = common.error_text(e)
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
        o = options.normalize_options(opts) if opts is not None else options.load_options()
    except UIError:
        o = options.default_options()
    lines = ["| format | tensors | weights | MiB | bits/weight | share | LoRA mode | |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    for fmt, count, n, nb in hist:
        share = n / max(total_w, 1)
        lines.append(f"| {fmt} | {count} | {n} | {_mib(nb)} | {nb * 8 / max(n, 1):.3f} | {share:.1%} "
                     f"| {options.mode_for(fmt, o)} | {'█' * max(1, round(share * 30))} |")
    out["histogram"] = "\n".join(lines)
    out["rows"] = [[name, fmt, " × ".join(str(s) for s in shape), round(nb * 8 / max(_numel(shape), 1), 3),
                    float(_mib(nb))] for name, fmt, shape, nb in rows]
    out["ok"] = True
    if lora_path and str(lora_path).strip():
        try:
            out["lora"] = lora_plan(p, rows, lora_path, o)
        except Exception as e:
            out["lora"] = common.error_text(e)
    return out


def build(gr) -> None:
    """The "Inspect" tab, inside the ``gr.Blocks`` being built."""
    with gr.Tab("Inspect", elem_id="gguf_tab_inspect"):
        with gr.Row():
            path = gr.Textbox(value=common.loaded_model() or "", label="GGUF file", scale=4,
                              placeholder="/path/to/model.gguf", elem_id="gguf_inspect_path")
            lora = gr.Textbox(value="", label="LoRA (optional): which layers it would merge or run",
                              scale=3, placeholder="/path/to/lora.safetensors", elem_id="gguf_inspect_lora")
        with gr.Row():
            btn = gr.Button("Inspect", variant="primary", elem_id="gguf_inspect_btn")
            loaded = gr.Button("Use the loaded model", elem_id="gguf_inspect_loaded")
        summary = gr.Markdown("", elem_id="gguf_inspect_summary")
        hist = gr.Markdown("", elem_id="gguf_inspect_hist")
        plan = gr.Markdown("", elem_id="gguf_inspect_lora_plan")
        table = gr.Dataframe(headers=["tensor", "format", "shape", "bits/weight", "MiB"],
                             datatype=["str", "str", "str", "number", "number"], interactive=False,
                             label="Tensors", elem_id="gguf_inspect_table")

        def _on_inspect(p, lora_path):
            r = inspect_file(p, lora_path)
            return r["summary"], r["histogram"], r["lora"], r["rows"] or None

        btn.click(_on_inspect, inputs=[path, lora], outputs=[summary, hist, plan, table])
        loaded.click(lambda: common.loaded_model() or "", inputs=[], outputs=[path])
