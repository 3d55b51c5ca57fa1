"""Torch dequantizers for the legacy and K-quant formats against gguf-py's numpy
reference (bit for bit in float32), ggml's own bytes and float math."""
import gguf
import numpy as np
import pytest
import torch

import lib_gguf
from lib_gguf.dequant import dequantize
from lib_gguf.formats import FORMATS as FORMATS_BY_ID, get_format

# the legacy and K-quant formats gguf-py dequantizes (the registry's list; Q8_1, Q8_K and Q1_0, which gguf-py
# lacks, are checked against float math below)
FORMATS = sorted(f.name for f in FORMATS_BY_ID.values()
                 if f.family in ("legacy", "k") and f.can_dequantize and hasattr(gguf.quants, f.name))
# the oracle's inputs
INPUT_KINDS = [
    "huge",
    "integers",
    "laplace_outliers",
    "negative",
    "normal",
    "positive",
    "sparse_zero_const_rows",
    "tiny",
    "weights",
]


def random_blocks(name, n_blocks, seed):
    """Random bytes whose float16 scale fields are finite (exponent 31 cleared)."""
    fmt = get_format(name)
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n_blocks, fmt.type_size), dtype=np.uint8)
    for field in fmt.layout.float_fields():
        off = field.offset
        hi = raw[:, off + 1]
        inf_nan = (hi & 0x7C) == 0x7C
        raw[inf_nan, off + 1] = hi[inf_nan] & 0xBF  # exponent 31 -> 15
    return raw


def reference(raw, name):
    qt = gguf.GGMLQuantizationType[name]
    out = gguf.quants.dequantize(raw, qt)
    return torch.from_numpy(np.ascontiguousarray(out).reshape(raw.shape[0], -1))


@pytest.mark.parametrize("name", FORMATS)
def test_float32_bit_exact_on_ggml_bytes(oracle, name):
    fmt = get_format(name)
    for kind in INPUT_KINDS:
        raw = oracle[f"{kind}.{name}"]
        x = oracle[f"{kind}.x"]
        assert raw.shape[-1] == x.shape[-1] // fmt.block_size * fmt.type_size
        ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name])
        ours = dequantize(torch.from_numpy(raw), name, x.shape, torch.float32)
        assert ours.shape == x.shape and ours.dtype == torch.float32
        assert torch.equal(ours, torch.from_numpy(np.ascontiguousarray(ref))), (name, kind)
        # and it is a reconstruction of the input (a loose sanity bound, not the oracle)
        err = (ours - torch.from_numpy(x)).abs().max().item()
        assert err <= 0.75 * float(np.abs(x).max()) + 1e-6, (name, kind, err)


@pytest.mark.parametrize("name", FORMATS)
def test_float32_bit_exact_on_random_bytes(name):
    raw = random_blocks(name, 600, seed=100 + FORMATS.index(name))
    ours = dequantize(torch.from_numpy(raw), name, (600 * get_format(name).block_size,), torch.float32)
    ref = reference(raw, name).reshape(-1)
    assert torch.equal(ours, ref), name
    # float16 output: the float32 result rounded once (Q8_0 takes its own path)
    half = dequantize(torch.from_numpy(raw), name, (600 * get_format(name).block_size,), torch.float16)
    assert torch.equal(half, ref.half()), name


@pytest.mark.parametrize("name", FORMATS)
def test_chunk_boundaries_and_leading_shapes(name, monkeypatch):
    """A 3-D tensor across several chunks, and a non-contiguous byte tensor."""
    from lib_gguf.families import torch_ops

    fmt = get_format(name)
    monkeypatch.setattr(torch_ops, "CHUNK_WEIGHTS_CPU", {fmt.block_size: 3 * fmt.block_size})  # chunks of 3 blocks
    per_row = 2 * fmt.block_size
    raw = random_blocks(name, 3 * 5 * 2, seed=7)
    shape = (3, 5, per_row)
    ref = reference(raw, name).reshape(shape)
    data = torch.from_numpy(raw).reshape(3, 5, 2 * fmt.type_size)
    assert torch.equal(dequantize(data, name, shape, torch.float32), ref)
    assert torch.equal(dequantize(data, name, shape, torch.float16), ref.half())
    # non-contiguous: every other row of a wider byte tensor
    wide = torch.zeros(3, 10, 2 * fmt.type_size, dtype=torch.uint8)
    wide[:, ::2] = data
    nc = wide[:, ::2]
    assert not nc.is_contiguous()
    assert torch.equal(dequantize(nc, name, shape, torch.float32), ref)
    # the public entry point also takes a numpy array
    assert torch.equal(dequantize(raw, name, shape, torch.float32), ref)


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_outputs_close_to_float32(oracle, name, dtype):
    raw = oracle[f"weights.{name}"]
    x = oracle["weights.x"]
    ref = dequantize(torch.from_numpy(raw), name, x.shape, torch.float32)
    out = dequantize(torch.from_numpy(raw), name, x.shape, dtype)
    assert out.dtype == dtype and out.shape == x.shape
    # computed in float32, rounded once: exactly the float32 result cast
    assert torch.equal(out, ref.to(dtype))
    eps = torch.finfo(dtype).eps
    assert torch.allclose(out.float(), ref, rtol=eps, atol=0)


@pytest.mark.parametrize("name", FORMATS)
def test_wrong_byte_count_is_a_format_error(name):
    fmt = get_format(name)
    raw = torch.zeros(4 * fmt.type_size + 1, dtype=torch.uint8)
    with pytest.raises(lib_gguf.GGUFFormatError, match=name):
        dequantize(raw, name, (4 * fmt.block_size,))
    with pytest.raises(lib_gguf.GGUFFormatError, match=name):
        dequantize(torch.zeros(4 * fmt.type_size, dtype=torch.uint8), name, (4 * fmt.block_size + 1,))


def _f16_bytes(v):
    return np.array([v], dtype=np.float16).view(np.uint8)


def test_q8_1_against_float_math():
    """ggml's block_q8_1 (36 bytes): f16 d, f16 s, 32 int8; x = d * q."""
    rng = np.random.default_rng(3)
    n = 257
    d = rng.uniform(-0.1, 0.1, n).astype(np.float16)
    q = rng.integers(-128, 128, (n, 32), dtype=np.int8)
    s = (d.astype(np.float32) * q.sum(1)).astype(np.float16)
    raw = np.concatenate([d.reshape(n, 1).view(np.uint8), s.reshape(n, 1).view(np.uint8), q.view(np.uint8)], axis=1)
    assert raw.shape == (n, 36) and get_format("Q8_1").type_size == 36
    want = torch.from_numpy(d.astype(np.float32).reshape(n, 1) * q.astype(np.float32))
    got = dequantize(torch.from_numpy(raw), "Q8_1", (n, 32), torch.float32)
    assert torch.equal(got, want)
    assert torch.equal(dequantize(torch.from_numpy(raw), "Q8_1", (n, 32), torch.float16), want.half())


def test_q8_k_against_float_math():
    """ggml's block_q8_K (292 bytes): f32 d, 256 int8, 16 int16 block sums."""
    rng = np.random.default_rng(4)
    n = 33
    d = rng.uniform(-0.01, 0.01, n).astype(np.float32)
    q = rng.integers(-127, 128, (n, 256), dtype=np.int8)
    bsums = q.reshape(n, 16, 16).astype(np.int16).sum(-1).astype(np.int16)
    raw = np.concatenate([d.reshape(n, 1).view(np.uint8), q.view(np.uint8), bsums.view(np.uint8)], axis=1)
    assert raw.shape == (n, 292)
    want = torch.from_numpy(d.reshape(n, 1) * q.astype(np.float32))
    got = dequantize(torch.from_numpy(raw), "Q8_K", (n, 256), torch.float32)
    assert torch.equal(got, want)


def test_legacy_against_float_math():
    """Hand-built blocks, independent of gguf-py: Q4_1 and Q5_0 layouts."""
    d, m = np.float16(0.5), np.float16(-3.0)
    q = np.arange(32) % 16
    qs = (q[:16] | (q[16:] << 4)).astype(np.uint8)
    raw = np.concatenate([_f16_bytes(d), _f16_bytes(m), qs])[None]
    got = dequantize(torch.from_numpy(raw), "Q4_1", (32,), torch.float32)
    assert torch.equal(got, torch.tensor(q * 0.5 - 3.0, dtype=torch.float32))

    q5 = (np.arange(32) * 7) % 32  # 5-bit codes
    qh = np.packbits((q5 >> 4).astype(np.uint8), bitorder="little")
    qs = ((q5[:16] & 15) | ((q5[16:] & 15) << 4)).astype(np.uint8)
    raw = np.concatenate([_f16_bytes(np.float16(0.25)), qh, qs])[None]
    got = dequantize(torch.from_numpy(raw), "Q5_0", (32,), torch.float32)
    assert torch.equal(got, torch.tensor((q5 - 16) * 0.25, dtype=torch.float32))


def test_empty_tensor():
    out = dequantize(torch.zeros(0, dtype=torch.uint8), "Q4_K", (0, 256), torch.float16)
    assert out.shape == (0, 256) and out.dtype == torch.float16


def test_format_object_and_forge_entry_points():
    raw = random_blocks("Q6_K", 4, seed=5)
    fmt = get_format("Q6_K")
    ref = reference(raw, "Q6_K").reshape(2, 512)
    data = torch.from_numpy(raw).reshape(2, 2 * fmt.type_size)
    assert torch.equal(fmt.dequantize(data, (2, 512), torch.float32), ref)
    p = torch.nn.Parameter(data, requires_grad=False)
    p.computation_dtype = torch.float32
    assert torch.equal(fmt.dequantize_pytorch(p), ref)
