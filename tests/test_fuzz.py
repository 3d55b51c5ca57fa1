"""Thousands of mutated GGUF files: only GGUFFormatError (or a clean load) comes out."""
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import lib_gguf
from lib_gguf import GGUFFormatError, GGUFParameter


def _seed_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("fuzz") / "seed.gguf"
    w = torch.randn(2, 64)
    q8 = lib_gguf.GGUFParameter(torch.randint(0, 255, (2, 68), dtype=torch.uint8), "Q8_0", (2, 64))
    lib_gguf.save(p, {"a.weight": q8, "a.bias": torch.randn(2), "b": w.half()},
                  {"general.architecture": "flux", "list": [1, 2, 3], "names": ["x", "y"]})
    return p.read_bytes()


@pytest.fixture(scope="module")
def seed(tmp_path_factory):
    return _seed_file(tmp_path_factory)


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("u64"), st.integers(0, 10_000), st.sampled_from([0, 1, 2**31, 2**32 - 1, 2**62, 2**64 - 1])),
    st.tuples(st.just("u32"), st.integers(0, 10_000), st.sampled_from([0, 9, 13, 99, 2**31, 2**32 - 1])),
)


@settings(max_examples=2500, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(muts=st.lists(mutation, min_size=1, max_size=3))
def test_mutated_files_fail_cleanly(seed, muts, tmp_path_factory):
    data = bytearray(seed)
    header_end = min(len(data), 400)  # the interesting part: header, metadata, tensor infos
    for kind, pos, val in muts:
        if not data:
            break
        pos = pos % max(1, min(header_end, len(data)))
        if kind == "flip":
            data[pos] ^= 1 << val
        elif kind == "truncate":
            data = data[: pos]
        elif kind == "u64" and pos + 8 <= len(data):
            data[pos:pos + 8] = struct.pack("<Q", val)
        elif kind == "u32" and pos + 4 <= len(data):
            data[pos:pos + 4] = struct.pack("<I", val)
    p = _path(tmp_path_factory)
    p.write_bytes(bytes(data))
    try:
        sd = lib_gguf.load_state_dict(p)
    except GGUFFormatError:
        sd = {}  # a clear error: what a damaged file must give, else it loads and is usable
    for t in sd.values():  # a file that loads must be usable
        if isinstance(t, GGUFParameter):
            t.dequantize(torch.float32)


_tmp = {}


def _path(factory):
    if "p" not in _tmp:
        _tmp["p"] = factory.mktemp("fz") / "m.gguf"
    return _tmp["p"]
