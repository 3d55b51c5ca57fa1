"""The committed ggml oracle (tests/data/ggml_quants.npz) is what tests/data/make_oracle.py makes.

ggml-python is a requirement of the test environment (requirements-test.txt): without it these
tests fail, they do not skip.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from conftest import ORACLE

_spec = importlib.util.spec_from_file_location("make_oracle", Path(__file__).parent / "data" / "make_oracle.py")
make_oracle = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_oracle)


def test_oracle_layout(oracle):
    kinds = list(make_oracle.KINDS)
    want = {"ggml_version"} | {f"{k}.x" for k in kinds} | {f"{k}.{f}" for k in kinds for f in make_oracle.FORMATS}
    assert set(oracle) == want
    assert str(oracle["ggml_version"]) == f"ggml-python {make_oracle.GGML_PYTHON}"


def test_oracle_inputs_come_from_the_script(oracle):
    for kind in make_oracle.KINDS:
        x = make_oracle.inputs(kind)
        assert x.dtype == np.float32 and x.shape == (make_oracle.ROWS, make_oracle.COLS)
        assert x.tobytes() == oracle[f"{kind}.x"].tobytes(), f"{kind}.x differs from make_oracle.inputs({kind!r})"


def test_script_remakes_the_oracle_byte_for_byte(tmp_path):
    """Needs ggml-python (a hard requirement of the test environments)."""
    import ggml  # noqa: F401  - ImportError here is a failure: pip install -r requirements-test.txt

    out = tmp_path / "o.npz"
    assert make_oracle.main([str(out), "--check", str(ORACLE)]) == 0
    with np.load(out) as new, np.load(ORACLE) as old:
        assert make_oracle.differences(dict(new), dict(old)) == []
