"""The compiled lattice quantizers (IQ3_XXS, IQ3_S, IQ2_S, IQ1_M): their vector steps
give the scalar code's values bit for bit, their padded neighbour tables keep ggml's
order, and their bytes are ggml's on awkward blocks (their speed is measured by
bench/quantize.py, not asserted here)."""

import numpy as np
import pytest
import torch

import lib_gguf
from lib_gguf import ggml_ref, numba_support, quant
from lib_gguf.families.lattice import SPECS
from lib_gguf.families.lattice_fit import tables_np

pytestmark = pytest.mark.skipif(not numba_support.available(), reason="the compiled kernels need numba")

FORMATS = ["IQ3_XXS", "IQ3_S", "IQ2_S", "IQ1_M"]
GRIDS = [(s.grid, s.kmaxq, s.bits, s.nwant) for s in SPECS.values()] + [("IQ1_S", 3, 2, 3)]


@pytest.mark.parametrize("grid", GRIDS, ids=[g[0] + str(g[3]) for g in GRIDS])
def test_padded_neighbour_lists_keep_ggml_order(grid):
    from lib_gguf.families.lattice_search_numba import search_tables

    kmap, nb, lev = tables_np(*grid)
    k2, start, index, vals = search_tables(*grid)
    _, _, _, centred = search_tables(*grid, True)
    assert np.array_equal(k2, kmap)
    dim = lev.shape[1]
    for u in np.flatnonzero((nb >= 0).any(axis=1)):
        lst = nb[u][nb[u] >= 0]
        slots = index[8 * start[u]:8 * start[u + 1]]
        assert len(slots) % 8 == 0 and len(slots) - len(lst) < 8
        assert np.array_equal(slots[:len(lst)], lst) and (slots[len(lst):] == lst[0]).all()
        for b in range(start[u], start[u + 1]):
            block = vals[8 * dim * b:8 * dim * (b + 1)].reshape(dim, 8).T     # (lane, coordinate)
            assert np.array_equal(block, 2 * lev[index[8 * b:8 * b + 8]] + 1)
            block = centred[8 * dim * b:8 * dim * (b + 1)].reshape(dim, 8).T
            assert np.array_equal(block, lev[index[8 * b:8 * b + 8]] - 1)


def _scalar_distances(vals, base, delta, scale, x, w, o, ow, dim):
    f = np.float32
    d = []
    for lane in range(8):
        d2 = f(0)
        for i in range(dim):
            v = vals[base + 8 * i + lane]
            if delta is not None:
                v = f(v + delta)
            diff = f(f(scale * v) - x[o + i])
            d2 = f(d2 + f(f(w[ow + i] * diff) * diff))
        d.append(d2)
    return d


def test_block_min_is_the_scalar_first_minimum():
    from numba import njit

    from lib_gguf.families.lattice_lanes_numba import block_min, block_min_shifted

    @njit
    def plain(vals, base, scale, x, w, o, ow, dim):
        return block_min(vals, base, np.float32(0), scale, x, w, o, ow, dim)

    @njit
    def shifted(vals, base, delta, scale, x, w, o, ow, dim):
        return block_min_shifted(vals, base, delta, scale, x, w, o, ow, dim)

    rng = np.random.default_rng(0)
    for trial in range(300):
        dim = 4 if trial % 2 else 8
        vals = rng.integers(-3, 16, 8 * dim * 2).astype(np.float32)
        if trial % 3 == 0:                                 # exact ties: repeated candidates
            for i in range(dim):
                vals[8 * dim + 8 * i + 5] = vals[8 * dim + 8 * i + 2]
        x = (rng.standard_normal(12) * 4).astype(np.float32)
        w = rng.random(12).astype(np.float32)
        if trial % 7 == 0:
            w[2] = np.nan                                  # every distance NaN: none is taken
        scale = np.float32(rng.random() * 2)
        for fn, delta in ((plain, None), (shifted, np.float32(-0.125))):
            args = (vals, 8 * dim, scale, x, w, 1, 2, dim)
            m, lane = fn(*args) if delta is None else fn(vals, 8 * dim, delta, *args[2:])
            ref = _scalar_distances(vals, 8 * dim, delta, scale, x, w, 1, 2, dim)
            best, pick = np.float32(np.finfo(np.float32).max), -1
            for j, d2 in enumerate(ref):
                if d2 < best:
                    best, pick = d2, j
            if pick < 0:
                assert not m < np.finfo(np.float32).max
            else:
                assert m == best and lane == pick, (trial, ref, m, lane)


def test_round_lanes_are_nearest_int_and_the_clamp():
    from numba import njit

    from lib_gguf.families.lattice_lanes_numba import round4, round8
    from lib_gguf.numba_support import nearest_int

    @njit
    def lanes(xv, o, idv, lmax, bits, q, wide):
        return round8(xv, o, idv, lmax, bits, q) if wide else round4(xv, o, idv, lmax, bits, q)

    @njit
    def scalar(xv, o, idv, lmax, bits, n, q):
        u = 0
        for i in range(n):
            y = np.float32(np.float32(0.5) * np.float32(np.float32(idv * xv[o + i]) - np.float32(1)))
            lv = max(0, min(lmax, nearest_int(y)))
            q[o + i] = np.float32(2 * lv + 1)
            u |= lv << (bits * i)
        return u

    rng = np.random.default_rng(1)
    for trial in range(400):
        xv = (rng.standard_normal(16) * 6).astype(np.float32)
        xv[::5] = np.round(xv[::5]) + 0.5                  # halves: ties to even
        xv[3] = -xv[3]
        if trial % 9 == 0:
            xv[4:8] = [np.inf, np.nan, 3e38, -1e30]
        idv = np.float32(1 + rng.random() * 3 if trial % 2 else 1.0)
        wide = trial % 2 == 0
        n, lmax, bits = (8, 2, 2) if wide else (4, 7, 3)
        q1, q2 = np.zeros(16, np.float32), np.zeros(16, np.float32)
        assert lanes(xv, 4, idv, lmax, bits, q1, wide) == scalar(xv, 4, idv, lmax, bits, n, q2)
        assert np.array_equal(q1, q2)


def _awkward_rows():
    """Rows of 256-weight blocks that take the rare paths: skipped sub-blocks (all zero,
    or below IQ3_XXS's and IQ2_S's 1e-8), one weight alone, odd counts of minus signs,
    a sub-block whose fitted scale comes out negative, constant and integer rows."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((10, 1024)).astype(np.float32)
    x[0] = 0
    x[1, 32:96] = 0
    x[1, 200:216] = 5e-9
    x[2, :] = 0
    x[2, 5] = -3
    x[3] = -np.abs(x[3])
    x[3, ::8] = np.abs(x[3, ::8]) * 0.01                   # odd minus counts, tiny plus weights
    x[4] = 1.5
    x[5] = np.round(x[5] * 3)
    x[6] *= 1e-7
    x[7, 512:] *= 1e4
    x[8, ::2] = 0
    x[9] = np.where(np.arange(1024) % 32 == 0, 8.0, 0.01)  # one dominant weight a sub-block
    return x


@pytest.mark.parametrize("fmt", FORMATS)
def test_compiled_quantizers_are_ggml_and_torch_on_awkward_blocks(fmt):
    x = _awkward_rows()
    old = quant.set_backend("numba")
    try:
        got = lib_gguf.quantize(torch.from_numpy(x), fmt).numpy()
        quant.set_backend("torch")
        want = lib_gguf.quantize(torch.from_numpy(x), fmt).numpy()
    finally:
        quant.set_backend(old)
    assert np.array_equal(got, want)
    if ggml_ref.available():
        assert np.array_equal(got, ggml_ref.quantize(x, fmt))
