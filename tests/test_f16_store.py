"""The compiled kernels' float16 store (numba_support.f16_bits / f16_value / put_f16,
and the dequantizers' ``half`` read and ``put`` store) against torch's conversions, and the bit-level block scans and
IQ4 level thresholds the legacy and IQ4 numba quantizers are built on, against
plain scalar references of ggml's rules.

f16_bits was also checked once over all 2**32 float32 patterns (equal to torch
except NaN payloads); these are the boundaries and a fixed random sample of it.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lib_gguf import numba_support

pytestmark = pytest.mark.skipif(not numba_support.available(), reason="numba is not installed")

if numba_support.available():
    from numba import njit

    from lib_gguf.families import iq4_numba, legacy_numba

    @njit(cache=False)
    def _bits_of(xs, out):
        for j in range(xs.shape[0]):
            out[j] = numba_support.f16_bits(xs[j])

    @njit(cache=False)
    def _values_of(hs, out):
        for j in range(hs.shape[0]):
            out[j] = numba_support.f16_value(hs[j])

    @njit(cache=False)
    def _put_all(xs, out, back):
        for j in range(xs.shape[0]):
            back[j] = numba_support.put_f16(out, j, 1, xs[j])

    @njit(cache=False)
    def _halves_of(lo, hi, out):
        for j in range(lo.shape[0]):
            out[j] = numba_support.half(lo[j], hi[j])

    @njit(cache=False)
    def _put_rows(x, out):
        for i in range(x.shape[0]):
            o = out[i]
            for j in range(x.shape[1]):
                numba_support.put(o, j, x[i, j])

    @njit(cache=False)
    def _scans(x, lo, hi, mx, amax):
        fb = x.view(np.int32)
        for i in range(x.shape[0]):
            lo[i], hi[i] = legacy_numba.min_max(x, fb, i, 0, x.shape[1])
            mx[i], amax[i] = legacy_numba.first_abs_max(x, fb, i, 0, x.shape[1])

    @njit(cache=False)
    def _level_indices(v, out):
        for j in range(v.shape[0]):
            out[j] = iq4_numba.level_index(v[j])


def _boundary_patterns() -> np.ndarray:
    """float32 bit patterns around every place the conversion changes rule, both signs."""
    g = np.random.default_rng(20240516)
    around = [0x00000000, 0x00800000, 0x33000000, 0x33800000, 0x337FFFFF, 0x38000000, 0x38800000,
              0x387FC000, 0x3F800000, 0x477FE000, 0x477FF000, 0x47800000, 0x7F7FFFFF, 0x7F800000,
              0x7FC00000]
    parts = [np.arange(c - 4096, c + 4096, dtype=np.int64) for c in around]
    # every binade's edges
    e = np.arange(256, dtype=np.int64) << 23
    parts += [(e[:, None] + np.arange(-64, 64)).ravel()]
    # ties and their neighbours at every rounding position, for each exponent the half
    # range uses (subnormal halves drop 14..24 bits, normal ones 13)
    for exp in range(102, 144):
        drop = 13 if exp >= 113 else 126 - exp
        hi = g.integers(0, 1 << (23 - drop), 64, dtype=np.int64) << drop if drop < 23 else np.zeros(1, np.int64)
        tie = 1 << (drop - 1)
        for low in (tie - 1, tie, tie + 1, 0, (1 << drop) - 1):
            parts.append((exp << 23) | (hi & 0x7FFFFF) | low)
    parts.append(g.integers(0, 1 << 32, 3_000_000, dtype=np.int64))
    b = np.concatenate(parts) & 0xFFFFFFFF
    return np.concatenate([b, b ^ 0x80000000]).astype(np.uint32)


def test_f16_bits_equals_torch():
    bits = _boundary_patterns()
    x = bits.view(np.float32)
    ours = np.empty(x.shape[0], dtype=np.int64)
    _bits_of(x, ours)
    ref = torch.from_numpy(x).half().view(torch.int16).numpy().view(np.uint16).astype(np.int64)
    nan = np.isnan(x)
    bad = np.flatnonzero((ours != ref) & ~nan)
    assert bad.size == 0, [(hex(bits[i]), hex(ours[i]), hex(ref[i])) for i in bad[:8]]
    # NaN: the quiet NaN with the float's sign, a NaN to torch too with the same sign
    sign = (bits[nan].astype(np.int64) >> 16) & 0x8000
    assert np.array_equal(ours[nan], sign | 0x7E00)
    assert np.all((ref[nan] & 0x7C00) == 0x7C00) and np.all(ref[nan] & 0x3FF) and np.array_equal(ref[nan] & 0x8000, sign)


@pytest.mark.parametrize("value, half", [
    (0.0, 0x0000), (-0.0, 0x8000), (65504.0, 0x7BFF), (65519.996, 0x7BFF), (65520.0, 0x7C00),
    (-65520.0, 0xFC00), (np.inf, 0x7C00), (-np.inf, 0xFC00), (2.0 ** -24, 0x0001), (2.0 ** -25, 0x0000),
    (np.nextafter(np.float32(2.0 ** -25), np.float32(1)), 0x0001), (1.5 * 2.0 ** -24, 0x0002),
    (2.5 * 2.0 ** -24, 0x0002), (2.0 ** -14, 0x0400), (1.0 + 2.0 ** -11, 0x3C00), (1.0 + 3 * 2.0 ** -11, 0x3C02),
    (np.nan, 0x7E00), (-np.nan, 0xFE00),
])
def test_f16_bits_edges(value, half):
    out = np.empty(1, dtype=np.int64)
    _bits_of(np.array([value], dtype=np.float32), out)
    assert int(out[0]) == half


def test_f16_value_all_halves():
    h = np.arange(1 << 16, dtype=np.int64)
    ours = np.empty(h.shape[0], dtype=np.float32)
    _values_of(h, ours)
    ref = torch.from_numpy(h.astype(np.uint16).view(np.int16)).view(torch.float16).float().numpy()
    nan = np.isnan(ref)
    assert np.array_equal(ours[~nan].view(np.uint32), ref[~nan].view(np.uint32))
    assert np.all(np.isnan(ours[nan])) and np.array_equal(np.signbit(ours[nan]), np.signbit(ref[nan]))


def test_put_f16_stores_little_endian_and_returns_the_stored_value():
    x = np.random.default_rng(3).standard_normal(4096).astype(np.float32) * np.float32(300)
    out = np.zeros((x.shape[0], 4), dtype=np.uint8)
    back = np.empty(x.shape[0], dtype=np.float32)
    _put_all(x, out, back)
    ref = torch.from_numpy(x).half()
    assert np.array_equal(out[:, 1:3].copy().view(np.uint16).ravel(), ref.view(torch.int16).numpy().view(np.uint16))
    assert np.array_equal(back, ref.float().numpy())
    assert not out[:, 0].any() and not out[:, 3].any()


def test_half_reads_every_half_as_torch_does():
    """The dequantizers' scale read (one F16C conversion) over all 65536 patterns, from
    the block's two little-endian bytes: torch's float32 value; NaN stays NaN, signed."""
    h = np.arange(1 << 16, dtype=np.int64)
    ours = np.empty(h.shape[0], dtype=np.float32)
    _halves_of((h & 0xFF).astype(np.uint8), (h >> 8).astype(np.uint8), ours)
    ref = torch.from_numpy(h.astype(np.uint16).view(np.int16)).view(torch.float16).float().numpy()
    nan = np.isnan(ref)
    assert np.array_equal(ours[~nan].view(np.uint32), ref[~nan].view(np.uint32))
    assert np.all(np.isnan(ours[nan])) and np.array_equal(np.signbit(ours[nan]), np.signbit(ref[nan]))


def test_put_stores_float32_as_is_and_float16_as_torch_rounds():
    """``put`` into a float32 row keeps the bits; into a uint16 row it stores torch's
    float16 of the value (ties to even, subnormals, overflow to inf), at every lane
    position of a vectorized row (rows of 37, so vector bodies and their remainders)."""
    bits = _boundary_patterns()
    x = bits.view(np.float32)
    x = x[: x.shape[0] // 37 * 37].reshape(-1, 37)
    f = np.empty(x.shape, dtype=np.float32)
    _put_rows(x, f)
    assert np.array_equal(f.view(np.uint32), x.view(np.uint32))
    h = np.empty(x.shape, dtype=np.uint16)
    _put_rows(x, h)
    ref = torch.from_numpy(x).half().view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(x)
    assert np.array_equal(h[~nan], ref[~nan])
    assert np.all((h[nan] & 0x7C00) == 0x7C00) and np.all(h[nan] & 0x3FF)


# -- the legacy kernels' scans on the floats' bits -----------------------------------------------

def _scalar_scans(row):
    """The scalar rules: lo/hi from row[0] with strict comparisons, and the first value
    of largest magnitude (strictly larger replaces; starts at 0)."""
    lo = hi = row[0]
    for v in row[1:]:
        if v < lo:
            lo = v
        if v > hi:
            hi = v
    mx = amax = np.float32(0)
    for v in row:
        if abs(v) > amax:
            amax, mx = abs(v), v
    return lo, hi, mx, amax


def _same(a, b):
    a, b = np.float32(a), np.float32(b)
    return (np.isnan(a) and np.isnan(b)) or a.view(np.uint32) == b.view(np.uint32)


def test_block_scans_keep_the_scalar_choices():
    g = np.random.default_rng(7)
    n = 3000
    x = g.integers(-2, 3, (n, 32)).astype(np.float32)            # many ties, many zeros
    x[g.random((n, 32)) < 0.3] = -0.0
    x[:500] = np.abs(x[:500])                                      # min a zero, +0 and -0 mixed
    x[:500][g.random((500, 32)) < 0.3] = -0.0
    x[500:1000] = -np.abs(x[500:1000])                             # max a zero, -0 and +0 mixed
    x[500:1000][g.random((500, 32)) < 0.3] = 0.0
    x[1000:1500] = torch.from_numpy(g.standard_normal((500, 32)).astype(np.float32)).bfloat16().float().numpy()
    x[1500:2000][g.random((500, 32)) < 0.2] = np.nan
    x[1500:1600, 0] = np.nan
    x[2000:2100] = 0.0
    x[2100:2200] = -0.0
    x[np.arange(2200, 2400), g.integers(0, 32, 200)] = np.inf
    x[2400:2600, 7] = -np.inf
    lo, hi, mx, amax = (np.empty(n, dtype=np.float32) for _ in range(4))
    _scans(x, lo, hi, mx, amax)
    for i in range(n):
        r = _scalar_scans(x[i])
        got = (lo[i], hi[i], mx[i], amax[i])
        assert all(_same(a, b) for a, b in zip(got, r)), (i, x[i], got, r)


# -- IQ4: nearest level by thresholds --------------------------------------------------------

def _best_index_int8(levels, v):
    """ggml's binary search, scalar float32."""
    n = len(levels)
    if v <= levels[0]:
        return 0
    if v >= levels[n - 1]:
        return n - 1
    ml, mu = 0, n - 1
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if v < levels[mav]:
            mu = mav
        else:
            ml = mav
    return mu - 1 if np.float32(v - levels[mu - 1]) < np.float32(levels[mu] - v) else mu


def test_level_index_equals_ggml_search():
    lv = np.array(iq4_numba.LEVELS, dtype=np.float32)
    g = np.random.default_rng(11)
    mids = (lv[:-1] + lv[1:]) / np.float32(2)
    walk = []
    for m in np.concatenate([mids, lv]):
        up = dn = np.float32(m)
        for _ in range(40):
            up, dn = np.nextafter(up, np.float32(np.inf)), np.nextafter(dn, np.float32(-np.inf))
            walk += [up, dn]
    v = np.concatenate([mids, lv, np.array(walk, dtype=np.float32),
                        g.uniform(-140, 130, 20000).astype(np.float32),
                        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e30, -1e30, 1e-30], dtype=np.float32)])
    got = np.empty(v.shape[0], dtype=np.int32)
    _level_indices(v, got)
    ref = np.array([_best_index_int8(lv, x) for x in v])
    bad = np.flatnonzero(got != ref)
    assert bad.size == 0, [(float(v[i]), int(got[i]), int(ref[i])) for i in bad[:8]]
