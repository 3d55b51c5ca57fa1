import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


ORACLE = ROOT / "tests" / "data" / "ggml_quants.npz"


@pytest.fixture(scope="session")
def oracle():
    """ggml's reference bytes (tests/data/ggml_quants.npz, made by tests/data/make_oracle.py).
    A missing oracle fails the tests that need it: it is committed, never optional."""
    import numpy as np

    if not ORACLE.exists():
        pytest.fail(f"ggml oracle not found at {ORACLE}: it is part of the repository "
                    f"(remake it with python tests/data/make_oracle.py)")
    with np.load(ORACLE, allow_pickle=False) as data:
        return dict(data)


@pytest.fixture(params=["torch", "numba"])
def backend(request):
    """Run a test once on the torch kernels and once on the compiled (numba) ones."""
    from lib_gguf import backend as bk, numba_support

    if request.param == "numba" and not numba_support.available():  # requirements.txt has it
        pytest.fail("numba does not import here: the compiled kernels cannot be tested (pip install numba)")
    old = bk.set_backend(request.param)
    yield request.param
    bk.set_backend(old)
