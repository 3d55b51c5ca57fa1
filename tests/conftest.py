import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def oracle_path() -> Path:
    """ggml's reference bytes: $GGML_ORACLE, else ../shared/oracle beside the checkout."""
    env = os.environ.get("GGML_ORACLE")
    if env:
        return Path(env)
    return ROOT.parent / "shared" / "oracle" / "ggml_quants.npz"


@pytest.fixture(scope="session")
def oracle():
    import numpy as np

    p = oracle_path()
    if not p.exists():
        if os.environ.get("CI"):
            pytest.fail(f"ggml oracle not found at {p} (CI must have ../shared/oracle)")
        pytest.skip(f"ggml oracle not found at {p}")
    return dict(np.load(p, allow_pickle=False))


@pytest.fixture(params=["torch", "numba"])
def backend(request):
    """Run a test once on the torch kernels and once on the compiled (numba) ones."""
    from lib_gguf import backend as bk, quant_numba

    if request.param == "numba" and not quant_numba.available():
        pytest.skip("numba is not installed")
    old = bk.set_backend(request.param)
    yield request.param
    bk.set_backend(old)
