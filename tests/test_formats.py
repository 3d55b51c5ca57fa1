"""The format table against the gguf package in this environment."""
import gguf
import numpy as np
import pytest
import torch

import lib_gguf
from lib_gguf.formats import FORMATS, GGMLType, get_format


def test_table_covers_every_type_gguf_knows_with_its_sizes():
    for t in gguf.GGMLQuantizationType:
        fmt = get_format(t)  # by enum
        assert fmt.type_id == int(t)
        assert fmt.name == t.name
        bs, ts = gguf.GGML_QUANT_SIZES[t]
        if t.name == "Q8_1":  # gguf-py says 40 bytes; ggml's block_q8_1 is 36 (two halves + 32 int8)
            ts = 36
        assert (fmt.block_size, fmt.type_size) == (bs, ts), t.name
        assert get_format(int(t)) is fmt and get_format(t.name.lower()) is fmt


def test_unknown_type_id_names_tensor_and_id():
    with pytest.raises(lib_gguf.GGUFFormatError) as e:
        get_format(1234, tensor="double_blocks.0.img_attn.qkv.weight")
    msg = str(e.value)
    assert "1234" in msg and "double_blocks.0.img_attn.qkv.weight" in msg


def test_bits_per_weight():
    assert get_format("Q4_0").bits_per_weight == 4.5
    assert get_format("Q4_K").bits_per_weight == 4.5
    assert get_format("Q6_K").bits_per_weight == 6.5625
    assert get_format("F16").bits_per_weight == 16


@pytest.mark.parametrize("name,src", [("F32", np.float32), ("F16", np.float16), ("F64", np.float64),
                                      ("I8", np.int8), ("I16", np.int16), ("I32", np.int32)])
def test_plain_types_match_gguf(name, src):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 40)) * 50).astype(src)
    raw = x.view(np.uint8)
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[name]) if name in ("F32", "F16") else x.astype(np.float32)
    got = lib_gguf.dequantize(torch.from_numpy(raw.copy()), name, x.shape, torch.float32)
    assert torch.equal(got, torch.from_numpy(np.asarray(ref, dtype=np.float32)))


def test_bf16_matches_gguf():
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 2**16, size=(4, 64), dtype=np.uint16)
    bits = bits[(bits & 0x7F80) != 0x7F80].reshape(-1)[:128].reshape(2, 64)  # finite only
    raw = bits.view(np.uint8)
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.BF16)
    got = lib_gguf.dequantize(torch.from_numpy(raw.copy()), GGMLType.BF16, (2, 64), torch.float32)
    assert torch.equal(got, torch.from_numpy(ref.astype(np.float32)))


def test_float_quantize_roundtrip():
    x = torch.randn(3, 64)
    for name in ("F32", "F16", "BF16"):
        q = lib_gguf.quantize(x, name)
        assert q.dtype == torch.uint8 and q.shape == (3, 64 * get_format(name).type_size)
        back = lib_gguf.dequantize(q, name, x.shape, torch.float32)
        assert torch.allclose(back, x, rtol=1e-2, atol=1e-2)


def test_format_objects_survive_pickling_as_singletons():
    import pickle, copy
    f = get_format("Q4_K")
    assert pickle.loads(pickle.dumps(f)) is f
    assert copy.deepcopy(f) is f
