"""Writes the LoRA key listings in this folder: the tensor names, shapes and dtypes of
published Flux LoRA files, one listing per publisher format (no weights).

    python tests/data/lora_keys/make_listings.py

The names follow the code that writes (or reads) each format; each listing's header says
which. Shapes are those of FLUX.1-dev (hidden 3072, MLP 12288, 19 double and 38 single
blocks, 64 latent channels, 4096-wide T5 context, 768-wide CLIP vector) at each listing's
rank. tests/test_keymaps_real.py builds small tensors from them (every model width scaled
to the tiny test Flux) and checks where lib_lora places every key.
"""
from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent
H, MLP, C, VEC, CTX, T = 3072, 12288, 64, 768, 4096, 256
DOUBLE, SINGLE = 19, 38
CLIP_LAYERS, CLIP_H, CLIP_MLP = 12, 768, 3072


def bfl_linears(guidance=True, final=True):
    """Every Linear of BFL's Flux: name -> (out, in)."""
    out = {"img_in": (H, C), "time_in.in_layer": (H, T), "time_in.out_layer": (H, H),
           "vector_in.in_layer": (H, VEC), "vector_in.out_layer": (H, H), "txt_in": (H, CTX)}
    if guidance:
        out.update({"guidance_in.in_layer": (H, T), "guidance_in.out_layer": (H, H)})
    for i in range(DOUBLE):
        for s in ("img", "txt"):
            p = f"double_blocks.{i}.{s}"
            out.update({f"{p}_mod.lin": (6 * H, H), f"{p}_attn.qkv": (3 * H, H), f"{p}_attn.proj": (H, H),
                        f"{p}_mlp.0": (MLP, H), f"{p}_mlp.2": (H, MLP)})
    for i in range(SINGLE):
        p = f"single_blocks.{i}"
        out.update({f"{p}.linear1": (3 * H + MLP, H), f"{p}.linear2": (H, H + MLP), f"{p}.modulation.lin": (3 * H, H)})
    if final:
        out.update({"final_layer.linear": (C, H), "final_layer.adaLN_modulation.1": (2 * H, H)})
    return out


def diffusers_linears(blocks=True, single_attn_only=False, top=False):
    """Linears of diffusers' FluxTransformer2DModel: name -> (out, in)."""
    out = {}
    if top:
        out.update({"x_embedder": (H, C), "context_embedder": (H, CTX), "proj_out": (C, H), "norm_out.linear": (2 * H, H),
                    "time_text_embed.timestep_embedder.linear_1": (H, T),
                    "time_text_embed.timestep_embedder.linear_2": (H, H),
                    "time_text_embed.text_embedder.linear_1": (H, VEC), "time_text_embed.text_embedder.linear_2": (H, H),
                    "time_text_embed.guidance_embedder.linear_1": (H, T),
                    "time_text_embed.guidance_embedder.linear_2": (H, H)})
    for i in range(DOUBLE if blocks else 0):
        p = f"transformer_blocks.{i}"
        for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
            out[f"{p}.attn.{n}"] = (H, H)
        out.update({f"{p}.ff.net.0.proj": (MLP, H), f"{p}.ff.net.2": (H, MLP), f"{p}.ff_context.net.0.proj": (MLP, H),
                    f"{p}.ff_context.net.2": (H, MLP)})
        if not single_attn_only:
            out.update({f"{p}.norm1.linear": (6 * H, H), f"{p}.norm1_context.linear": (6 * H, H)})
    for i in range(SINGLE if blocks else 0):
        p = f"single_transformer_blocks.{i}"
        for n in ("to_q", "to_k", "to_v"):
            out[f"{p}.attn.{n}"] = (H, H)
        if not single_attn_only:
            out.update({f"{p}.proj_mlp": (MLP, H), f"{p}.proj_out": (H, H + MLP), f"{p}.norm.linear": (3 * H, H)})
    return out


def clip_linears():
    out = {}
    for i in range(CLIP_LAYERS):
        p = f"text_model.encoder.layers.{i}"
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[f"{p}.self_attn.{n}"] = (CLIP_H, CLIP_H)
        out.update({f"{p}.mlp.fc1": (CLIP_MLP, CLIP_H), f"{p}.mlp.fc2": (CLIP_H, CLIP_MLP)})
    return out


def lora(stem, shape, r, down, up, dtype, alpha=True):
    o, i = shape
    r = min(r, o, i)
    rows = [(f"{stem}.{down}", dtype, (r, i)), (f"{stem}.{up}", dtype, (o, r))]
    return rows + ([(f"{stem}.alpha", dtype, ())] if alpha else [])


def factorization(dim, factor):
    """LyCORIS's lokr factorization (lycoris/modules/lokr.py): (m, n), m <= n, m * n == dim."""
    if factor > 0 and dim % factor == 0:
        m, n = factor, dim // factor
        return (n, m) if m > n else (m, n)
    m, n = 1, dim
    f = dim if factor < 0 else factor
    while m < n:
        new_m = m + 1
        while dim % new_m:
            new_m += 1
        new_n = dim // new_m
        if new_m + new_n > m + n or new_m > f:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def kohya():
    rows = []
    for name, shape in bfl_linears(final=False).items():
        rows += lora("lora_unet_" + name.replace(".", "_"), shape, 16, "lora_down.weight", "lora_up.weight", "BF16")
    for name, shape in clip_linears().items():
        rows += lora("lora_te1_" + name.replace(".", "_"), shape, 16, "lora_down.weight", "lora_up.weight", "BF16")
    return rows


def lora_ab(prefix, layers, r, dtype):
    """diffusers/PEFT naming: lora_A / lora_B, no alpha."""
    return [row for name, shape in layers.items()
            for row in lora(prefix + name, shape, r, "lora_A.weight", "lora_B.weight", dtype, alpha=False)]


def ai_toolkit():
    return lora_ab("transformer.", diffusers_linears(), 16, "F16")


def diffusers():
    clip_attn = {k: v for k, v in clip_linears().items() if ".self_attn." in k}
    return (lora_ab("transformer.", diffusers_linears(single_attn_only=True), 4, "BF16")
            + lora_ab("text_encoder.", clip_attn, 4, "BF16"))


def peft():
    return lora_ab("base_model.model.", diffusers_linears(top=True), 8, "F32")


def xlabs():
    rows = []
    for i in range(DOUBLE):
        p = f"double_blocks.{i}.processor"
        for n, shape in (("qkv_lora1", (3 * H, H)), ("qkv_lora2", (3 * H, H)), ("proj_lora1", (H, H)),
                         ("proj_lora2", (H, H))):
            rows += lora(f"{p}.{n}", shape, 16, "down.weight", "up.weight", "BF16", alpha=False)
    for i in range(SINGLE):
        p = f"single_blocks.{i}.processor"
        rows += lora(f"{p}.qkv_lora", (3 * H, H), 16, "down.weight", "up.weight", "BF16", alpha=False)
        rows += lora(f"{p}.proj_lora", (H, H + MLP), 16, "down.weight", "up.weight", "BF16", alpha=False)
    return rows


def bfl_control():
    rows = []
    lin = bfl_linears()
    lin["img_in"] = (H, 2 * C)  # the control image's latent beside the noise
    for name, shape in lin.items():
        rows += lora(name, shape, 128, "lora_A.weight", "lora_B.weight", "BF16", alpha=False)
        rows.append((f"{name}.lora_B.bias", "BF16", (shape[0],)))
    head = H // 24
    for i in range(DOUBLE):
        for s in ("img", "txt"):
            for n in ("query_norm", "key_norm"):
                rows.append((f"double_blocks.{i}.{s}_attn.norm.{n}.scale", "BF16", (head,)))
    for i in range(SINGLE):
        for n in ("query_norm", "key_norm"):
            rows.append((f"single_blocks.{i}.norm.{n}.scale", "BF16", (head,)))
    return rows


def lycoris_lokr():
    rows = []
    for name, (o, i) in diffusers_linears(single_attn_only=True).items():
        factor = 8 if ".ff" in name else 16  # SimpleTuner's preset: Attention 16, FeedForward 8
        (ol, ok), (im, i_n) = factorization(o, factor), factorization(i, factor)
        stem = "lycoris_" + name.replace(".", "_")
        rows += [(f"{stem}.alpha", "F32", ()), (f"{stem}.lokr_w1", "BF16", (ol, im)), (f"{stem}.lokr_w2", "BF16", (ok, i_n))]
    return rows


def lycoris_loha():
    rows = []
    for name, (o, i) in bfl_linears(final=False).items():
        if not name.startswith(("double_blocks", "single_blocks")):
            continue
        stem = "lora_unet_" + name.replace(".", "_")
        r = 8
        rows += [(f"{stem}.alpha", "BF16", ()), (f"{stem}.hada_w1_a", "BF16", (o, r)), (f"{stem}.hada_w1_b", "BF16", (r, i)),
                 (f"{stem}.hada_w2_a", "BF16", (o, r)), (f"{stem}.hada_w2_b", "BF16", (r, i))]
    return rows


def lycoris_dora():
    rows = []
    for name, shape in bfl_linears(final=False).items():
        if name.startswith("double_blocks.0.") or name.startswith("single_blocks.0."):
            stem = "lora_unet_" + name.replace(".", "_")
            rows += lora(stem, shape, 16, "lora_down.weight", "lora_up.weight", "BF16")
            rows.append((f"{stem}.dora_scale", "BF16", (1, shape[1])))
    return rows


LISTINGS = {
    "kohya_flux.txt": (kohya, """kohya-ss/sd-scripts, networks/lora_flux.py (flux_train_network.py, network_module networks.lora_flux,
train_blocks all, in_dims set so img_in/time_in/vector_in/guidance_in/txt_in are trained, text encoder trained):
lora_unet_ + the BFL module path with '_' for '.', lora_te1_ for CLIP-L; lora_down/lora_up/alpha.
Cross-checked with diffusers' _convert_kohya_flux_lora_to_diffusers (src/diffusers/loaders/lora_conversion_utils.py),
which pops exactly these names. Rank 16 (--network_dim 16)."""),
    "ai_toolkit_flux.txt": (ai_toolkit, """ostris/ai-toolkit (Flux LoRA, saved in diffusers/PEFT naming, save dtype float16): transformer. + the
module path of diffusers' FluxTransformer2DModel; lora_A/lora_B, no alpha (scale 1). Every Linear of the
double blocks (transformer_blocks) and single blocks (single_transformer_blocks). Rank 16."""),
    "diffusers_flux.txt": (diffusers, """diffusers, examples/dreambooth/train_dreambooth_lora_flux.py: its default target modules (attn.to_k/q/v,
to_out.0, add_k/q/v_proj, to_add_out, ff.net.0.proj, ff.net.2, ff_context...) of FluxTransformer2DModel under
transformer., and with --train_text_encoder CLIP-L's self-attention under text_encoder.; lora_A/lora_B. Rank 4."""),
    "peft_flux.txt": (peft, """PEFT (peft.get_peft_model on diffusers' FluxTransformer2DModel, target_modules all-linear, saved with
save_pretrained): base_model.model. + the module path; lora_A/lora_B. Includes the top-level layers
(x_embedder, context_embedder, time_text_embed.*, norm_out.linear, proj_out); diffusers' norm_out.linear is
BFL's final_layer.adaLN_modulation.1 with its halves swapped (swap_scale_shift in lora_conversion_utils.py). Rank 8."""),
    "xlabs_flux.txt": (xlabs, """XLabs-AI/x-flux (train_flux_lora_deepspeed.py; src/flux/modules/layers.py DoubleStreamBlockLoraProcessor:
qkv_lora1/proj_lora1 on the image stream, qkv_lora2/proj_lora2 on the text stream; SingleStreamBlockLoraProcessor:
qkv_lora (dim -> 3*dim, added to linear1's qkv) and proj_lora (15360 -> dim, beside linear2)); LoRALinearLayer
down/up, no alpha in the file. Cross-checked with diffusers' _convert_xlabs_flux_lora_to_diffusers. Rank 16."""),
    "bfl_control_flux.txt": (bfl_control, """black-forest-labs FLUX.1-Canny-dev-lora / FLUX.1-Depth-dev-lora (black-forest-labs/flux
src/flux/modules/lora.py LinearLora: lora_A without bias, lora_B with a bias, on every Linear; BFL names, no
prefix), plus the trained RMSNorm scales (norm.query_norm.scale / key_norm.scale) as full values, and img_in
taking 128 channels (noise latent + control latent). Names as diffusers' _convert_bfl_flux_control_lora_to_diffusers
and ComfyUI's comfy/lora_convert.py (convert_lora_bfl_control: lora_B.bias -> diff_b, _norm.scale -> set_weight,
img_in reshaped) read them. The rank (128) is this listing's; the files' own may differ."""),
    "lycoris_lokr_flux.txt": (lycoris_lokr, """LyCORIS LoKr (KohakuBlueleaf/LyCORIS lycoris/modules/lokr.py) on diffusers' Flux as SimpleTuner trains it
(its documented lycoris config: algo lokr, linear_dim 10000, factor 16 for Attention, 8 for FeedForward):
lycoris_ + the module path with '_' for '.' (ComfyUI's 'simpletrainer lycoris' key map); full lokr_w1
(out_l, in_m) and lokr_w2 (out_k, in_n) from LyCORIS's factorization, alpha (scale 1 for two full factors)."""),
    "lycoris_loha_flux.txt": (lycoris_loha, """LyCORIS LoHa (lycoris/modules/loha.py) through kohya sd-scripts on Flux (network_module lycoris.kohya,
algo loha): lora_unet_ + the BFL module path; hada_w1_a (out, r), hada_w1_b (r, in), hada_w2_a, hada_w2_b, alpha.
Rank 8."""),
    "lycoris_dora_flux.txt": (lycoris_dora, """LyCORIS LoCon with weight decomposition (dora_wd=True, lycoris/modules/locon.py) through kohya sd-scripts:
lora_down/lora_up/alpha plus dora_scale of shape (1, in) (LyCORIS's default, wd_on_out=False: one magnitude per
input column). First double and single block only. Rank 16."""),
}


def write(folder: Path = HERE) -> None:
    for fname, (make, source) in LISTINGS.items():
        lines = [f"# {line}" for line in source.splitlines()]
        lines.append("# name\tdtype\tshape (FLUX.1-dev)")
        lines += [f"{name}\t{dtype}\t{','.join(map(str, shape))}" for name, dtype, shape in make()]
        (folder / fname).write_text("\n".join(lines) + "\n")


def read(path) -> list:
    """A listing's rows: (name, dtype, shape)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, dtype, shape = line.split("\t")
        rows.append((name, dtype, tuple(int(s) for s in shape.split(",")) if shape else ()))
    return rows


if __name__ == "__main__":
    write()
