"""Small models with the real architectures' parameter names and random weights.

Used by the tests, the benchmarks and the standalone tab's built-in sample model:
nothing is downloaded, ever. Shapes follow the reference (BFL) Flux layout that
Forge's ``IntegratedFluxTransformer2DModel`` loads, only smaller.
"""
from __future__ import annotations

from dataclasses import dataclass, asdict
from typing import Dict, Tuple

import torch

from .formats import get_format
from .parameter import GGUFParameter
from .quant import quantize


@dataclass(frozen=True)
class FluxConfig:
    """Constructor arguments of a Flux transformer (Forge's and BFL's names)."""

    in_channels: int = 16  # latent channels; the model sees in_channels * 4 after 2x2 patching
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 256
    mlp_ratio: float = 4.0
    num_heads: int = 2
    depth: int = 1
    depth_single_blocks: int = 1
    axes_dim: Tuple[int, ...] = (16, 56, 56)
    theta: int = 10000
    qkv_bias: bool = True
    guidance_embed: bool = True

    def as_kwargs(self) -> dict:
        d = asdict(self)
        d["axes_dim"] = list(self.axes_dim)
        return d


def flux_shapes(cfg: FluxConfig = FluxConfig()) -> Dict[str, Tuple[int, ...]]:
    """Every parameter name of a Flux transformer and its shape, in file order."""
    h = cfg.hidden_size
    mlp = int(h * cfg.mlp_ratio)
    head = h // cfg.num_heads
    c = cfg.in_channels * 4
    shapes: Dict[str, Tuple[int, ...]] = {}

    def lin(name, out_f, in_f, bias=True):
        shapes[f"{name}.weight"] = (out_f, in_f)
        if bias:
            shapes[f"{name}.bias"] = (out_f,)

    lin("img_in", h, c)
    lin("time_in.in_layer", h, 256)
    lin("time_in.out_layer", h, h)
    lin("vector_in.in_layer", h, cfg.vec_in_dim)
    lin("vector_in.out_layer", h, h)
    if cfg.guidance_embed:
        lin("guidance_in.in_layer", h, 256)
        lin("guidance_in.out_layer", h, h)
    lin("txt_in", h, cfg.context_in_dim)
    for i in range(cfg.depth):
        p = f"double_blocks.{i}"
        for s in ("img", "txt"):
            lin(f"{p}.{s}_mod.lin", 6 * h, h)
            lin(f"{p}.{s}_attn.qkv", 3 * h, h, bias=cfg.qkv_bias)
            shapes[f"{p}.{s}_attn.norm.query_norm.scale"] = (head,)
            shapes[f"{p}.{s}_attn.norm.key_norm.scale"] = (head,)
            lin(f"{p}.{s}_attn.proj", h, h)
            lin(f"{p}.{s}_mlp.0", mlp, h)
            lin(f"{p}.{s}_mlp.2", h, mlp)
    for i in range(cfg.depth_single_blocks):
        p = f"single_blocks.{i}"
        lin(f"{p}.linear1", 3 * h + mlp, h)
        lin(f"{p}.linear2", h, h + mlp)
        shapes[f"{p}.norm.query_norm.scale"] = (head,)
        shapes[f"{p}.norm.key_norm.scale"] = (head,)
        lin(f"{p}.modulation.lin", 3 * h, h)
    lin("final_layer.linear", c, h)
    lin("final_layer.adaLN_modulation.1", 2 * h, h)
    return shapes


def tiny_flux_state_dict(cfg: FluxConfig = FluxConfig(), seed: int = 0, dtype=torch.float32) -> Dict[str, torch.Tensor]:
    """A Flux state dict of random weights (deterministic for a seed).

    Weights are scaled like a trained model's (about 1/sqrt(fan_in)), norms'
    scales near 1, so that a forward pass stays finite in float16.
    """
    g = torch.Generator().manual_seed(seed)
    sd: Dict[str, torch.Tensor] = {}
    for name, shape in flux_shapes(cfg).items():
        if name.endswith(".scale"):
            t = 1.0 + 0.05 * torch.randn(shape, generator=g)
        elif name.endswith(".bias"):
            t = 0.02 * torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) / (shape[-1] ** 0.5)
        sd[name] = t.to(dtype)
    return sd


class _Node(torch.nn.Module):
    pass


def build_module(shapes: Dict[str, Tuple[int, ...]], dtype=torch.float32) -> torch.nn.Module:
    """A module tree with exactly these parameter names: ``X.weight`` (2-D) with an
    optional ``X.bias`` becomes an ``nn.Linear`` at ``X``; anything else a plain
    parameter. Enough to load a state dict and run each Linear, for tests."""
    root = _Node()

    def node(path: str) -> torch.nn.Module:
        m = root
        for part in path.split(".") if path else []:
            if not hasattr(m, part):
                m.add_module(part, _Node())
            m = getattr(m, part)
        return m

    for name, shape in shapes.items():
        path, _, attr = name.rpartition(".")
        if attr == "weight" and len(shape) == 2:
            parent_path, _, child = path.rpartition(".")
            parent = node(parent_path)
            lin = torch.nn.Linear(shape[1], shape[0], bias=f"{path}.bias" in shapes, dtype=dtype)
            lin.requires_grad_(False)
            parent.add_module(child, lin)
        elif attr == "bias" and f"{path}.weight" in shapes and len(shapes[f"{path}.weight"]) == 2:
            continue
        else:
            node(path).register_parameter(attr, torch.nn.Parameter(torch.zeros(shape, dtype=dtype),
                                                                   requires_grad=False))
    return root


def random_blocks(fmt, shape: Tuple[int, int], seed: int = 3) -> torch.Tensor:
    """Valid bytes of ``fmt`` for a (rows, cols) weight, for formats with no quantizer
    here (IQ2_XXS needs an importance matrix): random codes under a small float16 scale
    (0x0C00, about 2.4e-4) in each block's first two bytes."""
    f = get_format(fmt)
    g = torch.Generator().manual_seed(seed)
    rows = shape[0]
    blocks = torch.randint(0, 256, (rows * shape[1] // f.block_size, f.type_size), generator=g, dtype=torch.uint8)
    blocks[:, 0], blocks[:, 1] = 0x00, 0x0C
    return blocks.reshape(rows, -1)


def in_format(sd: Dict[str, torch.Tensor], fmt) -> Dict[str, torch.Tensor]:
    """``sd`` as a GGUF checkpoint of format ``fmt``: every 2-D weight whose rows fit the
    format's blocks quantized (random valid bytes where we have no quantizer), except
    the input and output layers, which stay F16 as in the files people publish; the
    other 2-D weights F16, 1-D tensors as they are."""
    f = get_format(fmt)
    out: Dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if v.ndim == 2 and f.is_quantized and f.fits(v.shape[1]) and not k.startswith(("img_in", "final_layer")):
            data = quantize(v, f) if f.can_quantize else random_blocks(f, tuple(v.shape))
            out[k] = GGUFParameter(data, f, v.shape)
        else:
            out[k] = v.half() if v.ndim == 2 else v
    return out
