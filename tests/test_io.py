"""Reading and writing GGUF files: interop with gguf's reader and writer, mmap, atomicity, bad input."""
import os
import struct

import gguf
import numpy as np
import pytest
import torch

import lib_gguf
from lib_gguf import GGUFFormatError, GGUFParameter
from lib_gguf.reader import GGUFFile


def _q(x: np.ndarray, name: str) -> GGUFParameter:
    raw = gguf.quants.quantize(x, gguf.GGMLQuantizationType[name])
    return GGUFParameter(torch.from_numpy(raw), name, x.shape)


def test_our_file_reads_in_gguf_reader(tmp_path):
    rng = np.random.default_rng(0)
    long_name = "double_blocks.0.img_attn.qkv.weight." + "x" * 80
    tensors = {
        long_name: _q(rng.standard_normal((4, 64)).astype(np.float32), "Q8_0"),
        "b": torch.randn(3, 5).half(),
        "c": torch.randn(7),
        "d": torch.randn(2, 8).bfloat16(),
    }
    p = tmp_path / "ours.gguf"
    lib_gguf.save(p, tensors, {"general.architecture": "flux", "n": 3, "big": 2**40, "l": [1, 2], "s": ["a", "b"]})
    r = gguf.GGUFReader(str(p))
    got = {t.name: t for t in r.tensors}
    assert set(got) == set(tensors)  # names longer than 64 bytes kept whole
    assert got[long_name].tensor_type.name == "Q8_0"
    assert list(got[long_name].shape) == [64, 4]
    assert bytes(np.asarray(got[long_name].data).reshape(-1)) == bytes(tensors[long_name].data.numpy().reshape(-1))
    assert np.array_equal(np.asarray(got["b"].data).reshape(3, 5), tensors["b"].numpy())
    meta = lib_gguf.read_metadata(p)
    assert meta["general.architecture"] == "flux" and meta["big"] == 2**40 and meta["s"] == ["a", "b"]


def test_gguf_writer_file_reads_in_ours(tmp_path):
    rng = np.random.default_rng(1)
    p = tmp_path / "theirs.gguf"
    w = gguf.GGUFWriter(str(p), "flux")
    x8 = rng.standard_normal((4, 64)).astype(np.float32)
    q8 = gguf.quants.quantize(x8, gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("q8", q8, raw_shape=q8.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    f16 = rng.standard_normal((3, 6)).astype(np.float16)
    w.add_tensor("f16", f16)
    w.add_string("k", "v")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    sd = lib_gguf.load_state_dict(p)
    assert sd["q8"].gguf_cls.name == "Q8_0" and tuple(sd["q8"].shape) == (4, 64)
    assert torch.equal(sd["q8"].data.reshape(-1), torch.from_numpy(q8.reshape(-1)))
    ref = gguf.quants.dequantize(q8, gguf.GGMLQuantizationType.Q8_0)
    assert torch.equal(sd["q8"].dequantize(torch.float32), torch.from_numpy(ref))
    assert torch.equal(sd["f16"], torch.from_numpy(f16))
    assert lib_gguf.read_metadata(p)["k"] == "v"


def test_load_is_zero_copy(tmp_path):
    p = tmp_path / "big.gguf"
    lib_gguf.save(p, {f"t{i}": torch.zeros(1024, 1024, dtype=torch.float16) for i in range(32)})  # 64 MiB
    f = GGUFFile(p)
    sd = f.state_dict()
    import ctypes

    base = ctypes.addressof(ctypes.c_char.from_buffer(f._mm))
    for t in sd.values():
        ptr = t.untyped_storage().data_ptr()
        assert base <= ptr < base + len(f._mm)  # a view into the mapping, not a copy


def test_save_is_atomic(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_bytes(b"old")

    class Boom:
        gguf_cls = lib_gguf.get_format("F32")
        gguf_shape = (4,)

        def materialize(self):
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        lib_gguf.save(p, {"a": torch.zeros(4), "b": Boom()})
    assert p.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["model.gguf"]


def _header(version=3, n_tensors=0, n_kv=0):
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


@pytest.mark.parametrize("blob,needle", [
    (b"GGUF\x03\x00", "too short"),
    (b"NOPE" + b"\0" * 40, "magic"),
    (_header(version=7) + b"\0" * 16, "version 7"),
    (_header(n_tensors=2**60) + b"\0" * 16, "corrupt header"),
    (_header(n_tensors=40, n_kv=3) + b"\0" * 16, "truncated: the header lists 40 tensors"),
    (_header(n_kv=1) + struct.pack("<Q", 2**62) + b"\0" * 16, "truncated"),
])
def test_bad_headers(tmp_path, blob, needle):
    p = tmp_path / "bad.gguf"
    p.write_bytes(blob)
    with pytest.raises(GGUFFormatError) as e:
        lib_gguf.load_state_dict(p)
    assert needle in str(e.value) and "bad.gguf" in str(e.value)


def _one_tensor_file(name=b"w", dims=(32, 2), type_id=8, offset=0, data_len=68, extra=b""):
    body = _header(n_tensors=1) + struct.pack("<Q", len(name)) + name + struct.pack("<I", len(dims))
    body += struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", type_id, offset) + extra
    body += b"\0" * ((-len(body)) % 32)
    return body + b"\0" * data_len


@pytest.mark.parametrize("kwargs,needle", [
    (dict(type_id=99), "unknown GGML type id 99"),
    (dict(data_len=10), "past the end"),
    (dict(offset=5), "not aligned"),
    (dict(dims=(2**40, 2**40)), "dimension"),
    (dict(dims=(1,) * 9), "dimensions"),
    (dict(dims=(33, 2)), "whole number"),
])
def test_bad_tensor_infos_name_the_tensor(tmp_path, kwargs, needle):
    p = tmp_path / "bad.gguf"
    p.write_bytes(_one_tensor_file(**kwargs))
    with pytest.raises(GGUFFormatError) as e:
        lib_gguf.load_state_dict(p)
    assert needle in str(e.value) and "'w'" in str(e.value), str(e.value)


def test_duplicate_names(tmp_path):
    p = tmp_path / "dup.gguf"
    lib_gguf.save(p, {"a": torch.zeros(4), "b": torch.zeros(4)})
    raw = p.read_bytes().replace(b"\x01\x00\x00\x00\x00\x00\x00\x00b", b"\x01\x00\x00\x00\x00\x00\x00\x00a")
    p.write_bytes(raw)
    with pytest.raises(GGUFFormatError, match="duplicate"):
        lib_gguf.load_state_dict(p)


def test_missing_file():
    with pytest.raises(GGUFFormatError, match="not found"):
        lib_gguf.load_state_dict("/nonexistent/model.gguf")


def test_integer_arrays_widen_to_one_type(tmp_path):
    """A metadata list of ints is stored in the narrowest type that holds them all (INT32,
    UINT64, INT64) and reads back as written, in our reader and in gguf-py's; ints that fit
    no 64-bit type are an error naming the key."""
    meta = {"t.small": [1, -2, 3], "t.big": [1, 2 ** 40], "t.unsigned": [1, 2 ** 63], "t.signed": [-1, 2 ** 40]}
    p = tmp_path / "m.gguf"
    lib_gguf.save(p, {"w": torch.zeros(4)}, meta)
    got = lib_gguf.read_metadata(p)
    assert all(list(got[k]) == v for k, v in meta.items()), got
    r = gguf.GGUFReader(str(p))
    types = {k: r.fields[k].types[-1] for k in meta}
    assert types == {"t.small": gguf.GGUFValueType.INT32, "t.big": gguf.GGUFValueType.UINT64,
                     "t.unsigned": gguf.GGUFValueType.UINT64, "t.signed": gguf.GGUFValueType.INT64}
    with pytest.raises(GGUFFormatError, match="t.huge"):
        lib_gguf.save(tmp_path / "n.gguf", {"w": torch.zeros(4)}, {"t.huge": [-1, 2 ** 63]})
