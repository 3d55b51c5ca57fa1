"""torch.compile on a module of GGUF Linears (CPU inductor).

The compiled graph never sees a ``GGUFParameter`` (its logical ``.shape`` is not its
storage's, which dynamo cannot guard): ``GGUFLinear`` keeps a plain view of the bytes
beside the weight and dequantizes them with one custom operator,
``lib_gguf::dequantize``, inside the graph. So: no graph break, one graph, the same
values as eager; a new weight assigned to the layer (a merged LoRA, another format) is
what the compiled module computes with next.
"""
import pytest
import torch
import torch.nn.functional as F

import lib_gguf
from lib_gguf.layers import GGUFLinear


def _module(fmt, k=256, n=256, seed=0):
    torch.manual_seed(seed)
    layers = []
    for out_f, in_f in ((n, k), (k, n)):
        lin = torch.nn.Linear(in_f, out_f)
        w = lib_gguf.GGUFParameter(lib_gguf.quantize(lin.weight.detach(), fmt), fmt, (out_f, in_f))
        layers.append(GGUFLinear.from_linear(lin, w, lin.bias))
    return torch.nn.Sequential(layers[0], torch.nn.GELU(), layers[1])


def _reference(m, x):
    h = F.linear(x, lib_gguf.dequantize(m[0].weight, torch.float32), m[0].bias)
    return F.linear(F.gelu(h), lib_gguf.dequantize(m[2].weight, torch.float32), m[2].bias)


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_K"])
def test_gguf_linears_compile_without_graph_breaks(fmt):
    import torch._dynamo as dynamo

    m = _module(fmt)
    x = torch.randn(4, 256)
    want = m(x)
    dynamo.reset()
    explained = dynamo.explain(m)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    compiled = torch.compile(m, fullgraph=True, backend="inductor")
    got = compiled(x)
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(got, _reference(m, x), atol=1e-5)
    # a new weight in the layer (what a merged LoRA or lib_lora's removal does): used at the next call
    other = _module("Q5_0", seed=1)
    m[0].weight = other[0].weight
    assert torch.allclose(compiled(x), _reference(m, x), atol=1e-5)
