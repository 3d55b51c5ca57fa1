"""Writes small random-weight models for a web UI test, in a web UI's models layout.

    FORGE_PYTHON make_models.py MODELS_DIR SIZES_JSON FORMAT [FORMAT ...]

Runs in the host's interpreter (it has torch, safetensors, transformers and diffusers);
``lib_gguf`` comes from this checkout. ``SIZES_JSON`` is ``host.TINY`` as JSON (the sizes
the host's configs are shrunk to, so that what is written here is what the host builds).
Writes, and prints as one JSON line:

* ``Stable-diffusion/tiny-flux-FORMAT.gguf``: a tiny Flux transformer per format (2-D
  weights quantized where the format's blocks divide the rows, as users' files are;
  ``img_in``/``final_layer`` and 1-D tensors kept in high precision);
* ``text_encoder/tiny-clip-l.safetensors`` (768 wide: Forge only recognises a CLIP-L file
  whose layers are 768 wide) and ``text_encoder/tiny-t5xxl.safetensors`` (more than 16 tensors);
* ``VAE/tiny-flux-vae.safetensors`` (diffusers layout, 16 latent channels, 8x down);
* ``Lora/tiny-flux-lora.safetensors``: kohya keys for the BFL layout
  (``lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight``, ``.lora_down.weight``, ``.alpha``),
  which Forge's built-in LoRA loader maps onto the Flux weights.
Files already there with the same sizes are kept (a ``.sizes`` stamp beside them).
"""
from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

LORA_TARGETS = (
    "double_blocks.0.img_attn.qkv",
    "double_blocks.0.img_attn.proj",
    "double_blocks.0.img_mlp.0",
    "double_blocks.0.txt_attn.qkv",
    "single_blocks.0.linear1",
    "single_blocks.0.linear2",
)


def flux_config(sizes):
    from lib_gguf.sample import FluxConfig

    f = sizes["flux"]
    return FluxConfig(hidden_size=f["hidden_size"], num_heads=f["num_heads"], depth=f["depth"],
                      depth_single_blocks=f["depth_single_blocks"], context_in_dim=sizes["t5"]["d_model"],
                      vec_in_dim=sizes["clip_l"]["hidden_size"])


def write_flux(path, fmt, sd):
    import lib_gguf
    from lib_gguf.sample import in_format

    lib_gguf.save(path, in_format(sd, fmt))


def save(path, sd):
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in sd.items()}, path)


def write_clip_l(path, sizes):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(11)
    cfg = CLIPTextConfig(**sizes["clip_l"])
    model = CLIPTextModel(cfg)
    save(path, {k: v.half() for k, v in model.state_dict().items()})


def write_t5(path, sizes):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(12)
    model = T5EncoderModel(T5Config(feed_forward_proj="gated-gelu", **sizes["t5"]))
    sd = {k: v.half() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    assert len(sd) > 16, len(sd)
    save(path, sd)


def write_vae(path, sizes):
    from diffusers import AutoencoderKL

    torch.manual_seed(13)
    v = sizes["vae"]
    n = len(v["block_out_channels"])
    model = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=tuple(v["block_out_channels"]),
                          layers_per_block=v["layers_per_block"], norm_num_groups=v["norm_num_groups"],
                          down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                          use_quant_conv=False, use_post_quant_conv=False)
    save(path, model.state_dict())


def write_lora(path, cfg, sd, rank=4):
    g = torch.Generator().manual_seed(21)
    out = {}
    for t in LORA_TARGETS:
        o, i = sd[t + ".weight"].shape
        key = "lora_unet_" + t.replace(".", "_")
        out[key + ".lora_down.weight"] = (torch.randn(rank, i, generator=g) / i ** 0.5).half()
        out[key + ".lora_up.weight"] = (torch.randn(o, rank, generator=g) * 0.5 / rank ** 0.5).half()
        out[key + ".alpha"] = torch.tensor(float(rank)).half()
    save(path, out)


def main(argv):
    models, sizes_json, formats = argv[0], argv[1], argv[2:]
    sizes = json.loads(sizes_json)
    from lib_gguf.sample import tiny_flux_state_dict

    cfg = flux_config(sizes)
    sd = tiny_flux_state_dict(cfg, seed=1)
    stamp = json.dumps({"sizes": sizes, "flux": cfg.as_kwargs()}, sort_keys=True)
    made = {"checkpoints": {}, "modules": [], "lora": None}
    for sub in ("Stable-diffusion", "text_encoder", "VAE", "Lora"):
        os.makedirs(os.path.join(models, sub), exist_ok=True)

    def fresh(path):
        s = path + ".sizes"
        if os.path.exists(path) and os.path.exists(s) and open(s).read() == stamp:
            return False
        return True

    def done(path):
        with open(path + ".sizes", "w") as fh:
            fh.write(stamp)

    jobs = [(os.path.join(models, "text_encoder", "tiny-clip-l.safetensors"), lambda p: write_clip_l(p, sizes)),
            (os.path.join(models, "text_encoder", "tiny-t5xxl.safetensors"), lambda p: write_t5(p, sizes)),
            (os.path.join(models, "VAE", "tiny-flux-vae.safetensors"), lambda p: write_vae(p, sizes))]
    for path, fn in jobs:
        if fresh(path):
            fn(path)
            done(path)
        made["modules"].append(path)
    lora = os.path.join(models, "Lora", "tiny-flux-lora.safetensors")
    if fresh(lora):
        write_lora(lora, cfg, sd)
        done(lora)
    made["lora"] = lora
    for fmt in formats:
        path = os.path.join(models, "Stable-diffusion", f"tiny-flux-{fmt}.gguf")
        if fresh(path):
            write_flux(path, fmt, sd)
            done(path)
        made["checkpoints"][fmt] = path
    print(json.dumps(made))


if __name__ == "__main__":
    main(sys.argv[1:])
