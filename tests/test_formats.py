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


def test_the_dtype_home():
    """Plain types map to their torch dtypes and back (one table); a block format has none,
    and a dtype without a GGUF type is an error naming it."""
    from lib_gguf.formats import format_for_dtype

    plain = [f for f in FORMATS.values() if f.torch_dtype is not None]
    assert sorted(f.name for f in plain) == ["BF16", "F16", "F32", "F64", "I16", "I32", "I64", "I8"]
    assert all(format_for_dtype(f.torch_dtype) is f and f.block_size == 1 and
               f.type_size == torch.empty(0, dtype=f.torch_dtype).element_size() for f in plain)
    assert get_format("Q4_K").torch_dtype is None
    with pytest.raises(lib_gguf.GGUFFormatError, match="torch.bool"):
        format_for_dtype(torch.bool)


def test_layouts_name_every_byte_of_a_block():
    """Every quantized format we read has a layout whose fields tile its block, and a
    family that registers a layout of the wrong size is refused."""
    from lib_gguf.formats import Layout, register

    for f in FORMATS.values():
        if f.is_quantized and f.can_dequantize:
            assert f.layout is not None and f.layout.size == f.type_size, f.name
            assert [fl.offset for fl in f.layout.fields.values()][0] == 0
    with pytest.raises(lib_gguf.GGUFFormatError, match="Q4_0"):
        register(GGMLType.Q4_0, layout=Layout(d="f16", qs=15))
    assert get_format("Q4_0").layout.size == 18  # the refused registration changed nothing


_REGISTRY_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
from lib_gguf.formats import get_format
print(get_format("Q4_K").can_quantize, get_format("IQ3_S").kernels.numba_dequantize, "numba" in sys.modules)
"""


def test_the_registry_is_complete_from_any_entry_point():
    """Importing lib_gguf.formats alone (as the glue does) already knows every family's
    kernels, without importing numba."""
    import subprocess
    import sys
    from pathlib import Path

    r = subprocess.run([sys.executable, "-c", _REGISTRY_SCRIPT, str(Path(__file__).resolve().parents[1])],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.split() == ["True", "True", "False"], r.stdout + r.stderr[-2000:]
