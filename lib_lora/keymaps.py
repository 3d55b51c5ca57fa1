"""Where each LoRA key lands in the model: key formats and name maps.

A LoRA key is split into a *stem* (the layer it patches, in the file's naming)
and a *part* (``lora_down.weight``, ``lora_B.weight``, ``alpha``, ``hada_w1_a``
...). The stem is then resolved to a model parameter name, and for diffusers'
separate q/k/v (and single-block q/k/v/mlp) to a slice of the fused BFL weight.

Formats understood: kohya/sd-scripts (``lora_unet_double_blocks_0_img_attn_qkv``,
also kohya names of diffusers layers), diffusers/PEFT and AI-toolkit
(``transformer.transformer_blocks.0.attn.to_q``), BFL/ComfyUI
(``diffusion_model.double_blocks.0.img_attn.qkv``), XLabs
(``double_blocks.0.processor.qkv_lora1``), BFL's control LoRAs (``lora_B.bias`` bias
diffs, norm ``.scale`` replacements), LyCORIS (LoHa, LoKr, full ``diff``, ``diff_b`` bias
diffs, ``dora_scale``). tests/data/lora_keys/ lists the keys of real files of each format.

:meth:`KeyMap.resolve` gives the *pieces* a stem lands in: (parameter, slice of the
parameter, rows of the LoRA's own output). Most stems are one whole piece; diffusers'
``norm_out.linear`` is BFL's ``final_layer.adaLN_modulation.1`` with its two halves
swapped (diffusers orders scale, shift; BFL shift, scale), so it is two pieces.
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

# key part suffixes, longest first so that ".lora_A.default.weight" wins over ".weight"
PARTS = [
    "lora_down.weight", "lora_up.weight", "lora_mid.weight", "lora_A.default.weight", "lora_B.default.weight",
    "lora_A.weight", "lora_B.weight", "lora.down.weight", "lora.up.weight", "down.weight", "up.weight",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "alpha", "dora_scale", "diff", "diff_b", "set_weight", "lora_B.bias", "scale",
]
# normalised part names
CANON = {
    "lora_down.weight": "down", "lora_A.weight": "down", "lora_A.default.weight": "down", "lora.down.weight": "down",
    "down.weight": "down", "lora_up.weight": "up", "lora_B.weight": "up", "lora_B.default.weight": "up",
    "lora.up.weight": "up", "up.weight": "up", "lora_mid.weight": "mid",
    # BFL's LinearLora: lora_B has a bias, added to the layer's output (a bias diff)
    "lora_B.bias": "diff_b",
    # a value that replaces the model's (BFL control LoRAs' norm scales; ComfyUI's name for it)
    "scale": "set", "set_weight": "set",
}

PREFIXES = ["base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "unet.",
            "lora_unet_", "lora_transformer_", "lycoris_", "model."]

# Slice = (dim, start, length) of a fused weight, filled in from the model's shapes.
Slice = Tuple[int, int, int]
Target = Tuple[str, Optional[Slice]]
# Piece = (parameter, its slice, (start, length) of the LoRA's output rows or None for all)
Piece = Tuple[str, Optional[Slice], Optional[Tuple[int, int]]]


def split_key(key: str) -> Optional[Tuple[str, str]]:
    for part in sorted(PARTS, key=len, reverse=True):
        if key.endswith("." + part):
            return key[: -len(part) - 1], CANON.get(part, part)
    return None


def strip_prefix(stem: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in PREFIXES:
            if stem.startswith(p):
                stem = stem[len(p):]
                changed = True
    return stem


def _diffusers_flux_map(shapes: Mapping[str, Tuple[int, ...]]) -> Dict[str, Target]:
    """diffusers Flux layer name -> (BFL parameter, slice) for this model's sizes."""
    out: Dict[str, Target] = {}
    top = {
        "x_embedder": "img_in", "context_embedder": "txt_in",
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "proj_out": "final_layer.linear",
    }
    for d, b in top.items():
        out[d] = (f"{b}.weight", None)
    if "final_layer.adaLN_modulation.1.weight" in shapes:
        out["norm_out.linear"] = ("final_layer.adaLN_modulation.1.weight", None)  # halves swapped: see SWAPPED
    i = 0
    while f"double_blocks.{i}.img_attn.qkv.weight" in shapes:
        p = f"double_blocks.{i}"
        h = shapes[f"{p}.img_attn.qkv.weight"][0] // 3
        t = f"transformer_blocks.{i}"
        for j, n in enumerate("qkv"):
            out[f"{t}.attn.to_{n}"] = (f"{p}.img_attn.qkv.weight", (0, j * h, h))
            out[f"{t}.attn.add_{n}_proj"] = (f"{p}.txt_attn.qkv.weight", (0, j * h, h))
        out[f"{t}.attn.to_out.0"] = (f"{p}.img_attn.proj.weight", None)
        out[f"{t}.attn.to_add_out"] = (f"{p}.txt_attn.proj.weight", None)
        out[f"{t}.ff.net.0.proj"] = (f"{p}.img_mlp.0.weight", None)
        out[f"{t}.ff.net.2"] = (f"{p}.img_mlp.2.weight", None)
        out[f"{t}.ff_context.net.0.proj"] = (f"{p}.txt_mlp.0.weight", None)
        out[f"{t}.ff_context.net.2"] = (f"{p}.txt_mlp.2.weight", None)
        out[f"{t}.norm1.linear"] = (f"{p}.img_mod.lin.weight", None)
        out[f"{t}.norm1_context.linear"] = (f"{p}.txt_mod.lin.weight", None)
        i += 1
    i = 0
    while f"single_blocks.{i}.linear1.weight" in shapes:
        p = f"single_blocks.{i}"
        # the hidden size: from linear2, else from any layer that has it (a partial
        # model or file may lack linear2); without one the fused slices are unknown
        hs = [shapes[k][0] for k in (f"{p}.linear2.weight", "img_in.weight", "txt_in.weight") if k in shapes]
        if not hs:
            i += 1
            continue
        h = hs[0]
        mlp = shapes[f"{p}.linear1.weight"][0] - 3 * h
        t = f"single_transformer_blocks.{i}"
        for j, n in enumerate("qkv"):
            out[f"{t}.attn.to_{n}"] = (f"{p}.linear1.weight", (0, j * h, h))
        out[f"{t}.proj_mlp"] = (f"{p}.linear1.weight", (0, 3 * h, mlp))
        out[f"{t}.proj_out"] = (f"{p}.linear2.weight", None)
        out[f"{t}.norm.linear"] = (f"{p}.modulation.lin.weight", None)
        i += 1
    return out


# diffusers stems whose output halves are in the other order than the BFL weight's
SWAPPED = ("norm_out.linear",)


def _xlabs_map(shapes: Mapping[str, Tuple[int, ...]]) -> Dict[str, Target]:
    out: Dict[str, Target] = {}
    for name in shapes:
        m = re.match(r"^double_blocks\.(\d+)\.img_attn\.qkv\.weight$", name)
        if m:
            p = f"double_blocks.{m.group(1)}"
            out[f"{p}.processor.qkv_lora1"] = (f"{p}.img_attn.qkv.weight", None)
            out[f"{p}.processor.qkv_lora2"] = (f"{p}.txt_attn.qkv.weight", None)
            out[f"{p}.processor.proj_lora1"] = (f"{p}.img_attn.proj.weight", None)
            out[f"{p}.processor.proj_lora2"] = (f"{p}.txt_attn.proj.weight", None)
        m = re.match(r"^single_blocks\.(\d+)\.linear2\.weight$", name)
        if m:
            p = f"single_blocks.{m.group(1)}"
            h = shapes[name][0]
            out[f"{p}.processor.qkv_lora"] = (f"{p}.linear1.weight", (0, 0, 3 * h))
            out[f"{p}.processor.proj_lora"] = (name, None)  # on linear2's input (attention and mlp)
    return out


class KeyMap:
    """Resolves LoRA stems to model parameters for one model."""

    def __init__(self, model_shapes: Mapping[str, Tuple[int, ...]]):
        self.shapes = {k: tuple(v) for k, v in model_shapes.items()}
        self.direct: Dict[str, Target] = {}
        for name in self.shapes:
            layer, _, attr = name.rpartition(".")
            if attr in ("weight", "scale") and layer:
                self.direct.setdefault(layer, (name, None))
                self.direct.setdefault(layer.replace(".", "_"), (name, None))
        for d, target in list(_diffusers_flux_map(self.shapes).items()) + list(_xlabs_map(self.shapes).items()):
            self.direct.setdefault(d, target)
            self.direct.setdefault(d.replace(".", "_"), target)

    def target(self, stem: str) -> Optional[Target]:
        """The parameter (and slice) a stem names, in this model's naming."""
        s = strip_prefix(stem)
        return self.direct.get(s) or self.direct.get(s.replace(".", "_"))

    def resolve(self, stem: str) -> Optional[List[Piece]]:
        """The pieces a stem lands in (see the module's docstring); None when it names no layer."""
        t = self.target(stem)
        if t is None:
            return None
        name, sl = t
        s = strip_prefix(stem)
        if any(s in (d, d.replace(".", "_")) for d in SWAPPED):
            h = self.shapes[name][0] // 2
            return [(name, (0, h, h), (0, h)), (name, (0, 0, h), (h, h))]
        return [(name, sl, None)]

    def bias_of(self, weight_name: str) -> Optional[str]:
        b = weight_name.rpartition(".")[0] + ".bias"
        return b if b in self.shapes else None
