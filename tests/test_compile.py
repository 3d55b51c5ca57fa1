"""torch.compile on a module of GGUF Linears (issue 14, part 3): CPU inductor.

Not done yet: dynamo fails while building its guards for a GGUFParameter, whose
``size()`` / ``.shape`` are the logical shape while the tensor underneath is the bytes
(``AssertionError: Guard failed on the same frame it was created ... size mismatch at
index 1. expected 64, actual 68``), so ``torch.compile`` of any module holding one
raises. The fix belongs in lib_gguf/parameter.py (a weight dynamo can trace: e.g. a
``__torch_dispatch__`` wrapper subclass with ``__tensor_flatten__``, or plain uint8 bytes
plus a ``torch.library.custom_op`` dequantizer with a fake kernel). The test is a
strict xfail: it passes (and so fails the run, to be turned into a plain test) once
compile works.
"""
import pytest
import torch
import torch.nn.functional as F

import lib_gguf
from lib_gguf.layers import GGUFLinear


def _module(fmt):
    torch.manual_seed(0)
    layers = []
    for n, k in ((96, 64), (64, 96)):
        lin = torch.nn.Linear(k, n)
        w = lib_gguf.GGUFParameter(lib_gguf.quantize(lin.weight.detach(), fmt), fmt, (n, k))
        layers.append(GGUFLinear.from_linear(lin, w, lin.bias))
    return torch.nn.Sequential(layers[0], torch.nn.GELU(), layers[1])


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="dynamo cannot guard a GGUFParameter (logical shape != bytes' shape); see module docstring")
@pytest.mark.parametrize("fmt", ["Q8_0"])
def test_gguf_linears_compile_without_graph_breaks(fmt):
    import torch._dynamo as dynamo

    m = _module(fmt)
    x = torch.randn(4, 64)
    want = m(x)
    dynamo.reset()
    explained = dynamo.explain(m)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    got = torch.compile(m, fullgraph=True, backend="inductor")(x)
    assert torch.allclose(got, want, atol=1e-5)
    ref = F.linear(F.gelu(F.linear(x, lib_gguf.dequantize(m[0].weight, torch.float32), m[0].bias)),
                   lib_gguf.dequantize(m[2].weight, torch.float32), m[2].bias)
    assert torch.allclose(got, ref, atol=1e-5)
