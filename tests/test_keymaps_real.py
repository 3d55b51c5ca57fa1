"""LoRA key maps on the key names of real published files (tests/data/lora_keys/, one listing per
publisher format: names, shapes and dtypes, no weights).

Each listing is turned into a small LoRA for the tiny test Flux (every FLUX.1-dev width scaled to the
tiny model's, ranks kept), saved as a .safetensors file and read by ``lib_lora.load_lora``. Where each
key must land is written here from the formats' own definitions (the diffusers <-> BFL layer table of
diffusers' conversion code, XLabs' processors, LyCORIS's factors), not from lib_lora's key maps, and the
placed deltas are compared with deltas computed here from the tensors.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lib_gguf.sample import FluxConfig, flux_shapes
from lib_lora import LoraError, load_lora

DATA = Path(__file__).parent / "data" / "lora_keys"
sys.path.insert(0, str(DATA))
import make_listings  # noqa: E402

CFG = FluxConfig(depth=2, depth_single_blocks=2)  # hidden 256, MLP 1024, head 128, 64 latent channels
H, MLP = CFG.hidden_size, int(CFG.hidden_size * CFG.mlp_ratio)
# FLUX.1-dev widths -> the tiny model's (multiples of the hidden size); every other width is kept
SCALE = {k * 3072: k * H for k in (1, 2, 3, 4, 5, 6, 7)}
DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def listing(fname):
    return make_listings.read(DATA / fname)


def _block_index(name):
    m = re.search(r"(double_blocks|transformer_blocks|single_blocks|single_transformer_blocks)[._](\d+)[._]", name)
    if not m:
        return None
    single = m.group(1).startswith("single")
    return ("single" if single else "double"), int(m.group(2))


def _in_model(name, cfg):
    b = _block_index(name)
    if b is None:
        return True
    return b[1] < (cfg.depth_single_blocks if b[0] == "single" else cfg.depth)


def _lokr_w2_shape(rows, name, shape):
    """LoKr's w2 for the scaled layer: w1 keeps its shape, w2 takes the rest (kron(w1, w2) is the layer)."""
    stem = name.rsplit(".", 1)[0]
    w1 = dict((n, s) for n, _d, s in rows)[f"{stem}.lokr_w1"]
    full_out, full_in = w1[0] * shape[0], w1[1] * shape[1]
    return (SCALE.get(full_out, full_out) // w1[0], SCALE.get(full_in, full_in) // w1[1])


def make_lora(fname, tmp_path, cfg=CFG, seed=0, only_model_blocks=True):
    """The listing's keys as random tensors of the tiny model's sizes, in the listed dtypes."""
    rows = listing(fname)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, dtype, shape in rows:
        if only_model_blocks and not _in_model(name, cfg):
            continue
        if name.endswith(".lokr_w2"):
            shape = _lokr_w2_shape(rows, name, shape)
        elif not name.endswith(".lokr_w1"):
            shape = tuple(SCALE.get(s, s) for s in shape)
        if name.endswith(".alpha"):
            t = torch.tensor(float(2 + len(sd) % 7))
        elif name.endswith(".scale") or name.endswith(".dora_scale"):
            t = 1 + 0.1 * torch.rand(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) * 0.05
        sd[name] = t.to(DTYPES[dtype])
    path = tmp_path / fname.replace(".txt", ".safetensors")
    save_file(sd, str(path))
    return path, {k: v.float() for k, v in sd.items()}


# ---- where each layer lands, from the formats' definitions --------------------------------------------


def diffusers_to_bfl(shapes):
    """diffusers' FluxTransformer2DModel layer -> (BFL parameter, first row, rows, halves swapped)."""
    out = {"x_embedder": ("img_in.weight", None, None, False), "context_embedder": ("txt_in.weight", None, None, False),
           "proj_out": ("final_layer.linear.weight", None, None, False),
           "norm_out.linear": ("final_layer.adaLN_modulation.1.weight", None, None, True)}
    for emb, bfl in (("timestep_embedder", "time_in"), ("text_embedder", "vector_in"), ("guidance_embedder", "guidance_in")):
        out[f"time_text_embed.{emb}.linear_1"] = (f"{bfl}.in_layer.weight", None, None, False)
        out[f"time_text_embed.{emb}.linear_2"] = (f"{bfl}.out_layer.weight", None, None, False)
    for i in range(CFG.depth):
        d, b = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for j, n in enumerate("qkv"):
            out[f"{d}.attn.to_{n}"] = (f"{b}.img_attn.qkv.weight", j * H, H, False)
            out[f"{d}.attn.add_{n}_proj"] = (f"{b}.txt_attn.qkv.weight", j * H, H, False)
        for dn, bn in (("attn.to_out.0", "img_attn.proj"), ("attn.to_add_out", "txt_attn.proj"),
                       ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"), ("ff_context.net.0.proj", "txt_mlp.0"),
                       ("ff_context.net.2", "txt_mlp.2"), ("norm1.linear", "img_mod.lin"),
                       ("norm1_context.linear", "txt_mod.lin")):
            out[f"{d}.{dn}"] = (f"{b}.{bn}.weight", None, None, False)
    for i in range(CFG.depth_single_blocks):
        d, b = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        for j, n in enumerate("qkv"):
            out[f"{d}.attn.to_{n}"] = (f"{b}.linear1.weight", j * H, H, False)
        out[f"{d}.proj_mlp"] = (f"{b}.linear1.weight", 3 * H, MLP, False)
        out[f"{d}.proj_out"] = (f"{b}.linear2.weight", None, None, False)
        out[f"{d}.norm.linear"] = (f"{b}.modulation.lin.weight", None, None, False)
    return out


def xlabs_to_bfl():
    out = {}
    for i in range(CFG.depth):
        p = f"double_blocks.{i}"
        for n, b in (("qkv_lora1", "img_attn.qkv"), ("qkv_lora2", "txt_attn.qkv"), ("proj_lora1", "img_attn.proj"),
                     ("proj_lora2", "txt_attn.proj")):
            out[f"{p}.processor.{n}"] = (f"{p}.{b}.weight", None, None, False)
    for i in range(CFG.depth_single_blocks):
        p = f"single_blocks.{i}"
        out[f"{p}.processor.qkv_lora"] = (f"{p}.linear1.weight", 0, 3 * H, False)  # added to linear1's qkv part
        out[f"{p}.processor.proj_lora"] = (f"{p}.linear2.weight", None, None, False)
    return out


def bfl_underscored(shapes):
    return {k[: -len(".weight")].replace(".", "_"): (k, None, None, False) for k in shapes if k.endswith(".weight")}


def where(stem, shapes):
    """The landing place of a stem, read off the file's own naming."""
    for prefix in ("base_model.model.", "transformer.", "lora_unet_", "lycoris_"):
        if stem.startswith(prefix):
            stem = stem[len(prefix):]
            break
    for table in (diffusers_to_bfl(shapes), xlabs_to_bfl()):
        if stem in table:
            return table[stem]
        under = {k.replace(".", "_"): v for k, v in table.items()}
        if stem in under:
            return under[stem]
    if f"{stem}.weight" in shapes:
        return (f"{stem}.weight", None, None, False)
    return bfl_underscored(shapes).get(stem)


def delta_of(parts):
    """A stem's delta from its tensors, by the format's formula."""
    if "lora_B.weight" in parts or "lora_up.weight" in parts or "up.weight" in parts:
        up = parts.get("lora_B.weight", parts.get("lora_up.weight", parts.get("up.weight")))
        down = parts.get("lora_A.weight", parts.get("lora_down.weight", parts.get("down.weight")))
        scale = float(parts["alpha"]) / down.shape[0] if "alpha" in parts else 1.0
        return up @ down * scale
    if "hada_w1_a" in parts:
        scale = float(parts["alpha"]) / parts["hada_w1_b"].shape[0]
        return (parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"]) * scale
    if "lokr_w1" in parts:  # two full factors: scale 1 (LyCORIS sets alpha = dim)
        return torch.kron(parts["lokr_w1"], parts["lokr_w2"])
    raise AssertionError(f"no delta formula for {sorted(parts)}")


def expected(sd, shapes):
    """param -> expected dense delta, and the keys that must stay unplaced (key -> a word of the reason)."""
    stems = {}
    for k, v in sd.items():
        m = re.match(r"^(.*?)\.((?:lora_[AB]|lora_up|lora_down|up|down)\.(?:weight|bias)|alpha|hada_\w+|lokr_\w+|"
                     r"dora_scale|scale)$", k)
        stem, part = m.group(1), m.group(2)
        stems.setdefault(stem, {})[part] = v
    want, unplaced = {}, {}
    for stem, parts in stems.items():
        if stem.startswith(("lora_te1_", "text_encoder.")):
            unplaced.update({f"{stem}.{p}": "text encoder" for p in parts})
            continue
        if set(parts) == {"scale"}:
            unplaced[f"{stem}.scale"] = "replacement"
            continue
        w = where(stem, shapes)
        assert w is not None, f"the test's own tables do not place {stem}"
        param, start, n, swapped = w
        d = delta_of(parts).reshape(-1, shapes[param][1])
        full = want.setdefault(param, torch.zeros(shapes[param]))
        if swapped:
            half = d.shape[0] // 2
            d = torch.cat([d[half:], d[:half]])
        full[slice(start, start + n) if start is not None else slice(None)] += d
        if "lora_B.bias" in parts:
            bias = param[: -len("weight")] + "bias"
            want.setdefault(bias, torch.zeros(shapes[bias]))
            want[bias][slice(start, start + n) if start is not None else slice(None)] += parts["lora_B.bias"]
    return want, unplaced


def placed(lf, shapes):
    got = {}
    for name, plist in lf.patches.items():
        t = got.setdefault(name, torch.zeros(shapes[name]))
        for p in plist:
            region = t if p.slice is None else t.narrow(*p.slice)
            region += p.delta(tuple(region.shape))
    return got


def check(fname, tmp_path, shapes=None):
    shapes = shapes or flux_shapes(CFG)
    path, sd = make_lora(fname, tmp_path)
    lf = load_lora(path, shapes)
    want, unplaced = expected(sd, shapes)
    assert set(lf.unplaced) == set(unplaced), lf.report()
    for k, word in unplaced.items():
        assert word in lf.unplaced[k], (k, lf.unplaced[k])
    got = placed(lf, shapes)
    assert set(got) == set(want), (sorted(set(got) ^ set(want)))
    for name in want:
        tol = 1e-5 * float(want[name].abs().max()) + 1e-7
        assert torch.allclose(got[name], want[name], atol=tol, rtol=1e-4), name
    return lf


@pytest.mark.parametrize("fname", ["kohya_flux.txt", "ai_toolkit_flux.txt", "diffusers_flux.txt", "peft_flux.txt",
                                   "xlabs_flux.txt", "lycoris_lokr_flux.txt", "lycoris_loha_flux.txt"])
def test_every_key_of_a_real_format_lands_on_its_weight(fname, tmp_path):
    lf = check(fname, tmp_path)
    assert lf.n_patches > 0


def test_listings_are_what_the_script_writes(tmp_path):
    make_listings.write(tmp_path)
    for f in DATA.glob("*.txt"):
        assert (tmp_path / f.name).read_text() == f.read_text(), f"{f.name}: run tests/data/lora_keys/make_listings.py"
    assert {f.name for f in DATA.glob("*.txt")} == set(make_listings.LISTINGS)


def test_layers_the_model_lacks_are_reported_not_dropped(tmp_path):
    """All 19 + 38 blocks of a FLUX.1-dev kohya LoRA on a 2 + 2 block model: the other blocks' keys are listed."""
    path, sd = make_lora("kohya_flux.txt", tmp_path, only_model_blocks=False)
    lf = load_lora(path, flux_shapes(CFG))
    missing = {k for k in sd if not _in_model(k, CFG)}
    assert missing and missing <= set(lf.unplaced)
    assert all(lf.unplaced[k] == "no matching layer in this model" for k in missing)


def test_bfl_control_lora_on_a_plain_model_is_refused_by_name(tmp_path):
    path, _ = make_lora("bfl_control_flux.txt", tmp_path)
    with pytest.raises(LoraError, match=r"Control LoRA.*img_in takes 128 input channels, this model's 64"):
        load_lora(path, flux_shapes(CFG))


def test_bfl_control_lora_on_a_control_model(tmp_path):
    """On a model whose img_in takes the control channels (FLUX.1 Canny/Depth [dev]): every LoRA pair and
    lora_B bias lands; the norm scales (replacements, not changes) are reported."""
    shapes = dict(flux_shapes(CFG), **{"img_in.weight": (H, 128)})  # 64 noise + 64 control channels in, 64 out
    lf = check("bfl_control_flux.txt", tmp_path, shapes)
    assert any(k.endswith(".bias") for k in lf.patches)


def test_lycoris_dora_per_input_magnitude_is_refused(tmp_path):
    path, _ = make_lora("lycoris_dora_flux.txt", tmp_path)
    with pytest.raises(LoraError, match=r"dora_scale of shape \(1, \d+\) is a per-input magnitude"):
        load_lora(path, flux_shapes(CFG))


def test_lycoris_dora_per_output_magnitude_is_placed(tmp_path):
    """The same file with wd_on_out=True magnitudes (shape (out, 1)): placed, one magnitude per output row."""
    shapes = flux_shapes(CFG)
    _, sd = make_lora("lycoris_dora_flux.txt", tmp_path)
    for k in [k for k in sd if k.endswith(".dora_scale")]:
        sd[k] = 1 + 0.1 * torch.rand(shapes[where(k[: -len(".dora_scale")], shapes)[0]][0], 1)
    lf = load_lora(sd, shapes)
    assert not lf.unplaced, lf.report()
    assert lf.n_patches == sum(k.endswith(".dora_scale") for k in sd)
    for plist in lf.patches.values():
        assert all(p.dora_scale is not None and p.dora_scale.shape == (shapes[p.key][0], 1) for p in plist)
