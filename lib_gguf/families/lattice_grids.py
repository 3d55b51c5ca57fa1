"""Lattice grids of the IQ2, IQ3 and IQ1 formats: format constants of ggml, in our
own compact form.

The data are in ``lattice_grids.json``: for each grid its levels, its shape
(entries, coordinates) and the index of each coordinate into the levels, one byte
a coordinate, row after row, deflated and base64-encoded. :func:`grid_indices`
gives those bytes, :func:`grid` the float32 lattice points, :func:`ksigns` ggml's
128 sign patterns.
"""
from __future__ import annotations

import base64
import json
import zlib
from functools import lru_cache
from pathlib import Path

import torch

IQ1_DELTA = 0.125  # IQ1_S / IQ1_M: every grid group is shifted by +-IQ1_DELTA

_DATA = json.loads(Path(__file__).with_name("lattice_grids.json").read_text(encoding="utf-8"))
# name -> (levels, shape, data); IQ1_M uses IQ1_S's grid
GRIDS = {name: (tuple(g["levels"]), tuple(g["shape"]), g["deflated_base64"]) for name, g in _DATA.items()}
GRIDS["IQ1_M"] = GRIDS["IQ1_S"]


@lru_cache(maxsize=None)
def grid_indices(name: str) -> bytes:
    """The grid as level indices, one byte a coordinate, row after row."""
    levels, shape, data = GRIDS[name]
    raw = zlib.decompress(base64.b64decode(data))
    if len(raw) != shape[0] * shape[1]:
        raise ValueError(f"corrupt {name} grid")
    return raw


_cache: dict = {}


def grid(name: str, device=None) -> torch.Tensor:
    """float32 lattice points of ``name``'s grid, shape (entries, 8 or 4), on ``device``."""
    key = (name, str(device))
    t = _cache.get(key)
    if t is None:
        levels, shape, _ = GRIDS[name]
        idx = torch.frombuffer(bytearray(grid_indices(name)), dtype=torch.uint8).long().reshape(shape)
        t = torch.tensor(levels, dtype=torch.float32)[idx].to(device)
        _cache[key] = t
    return t


def ksigns(device=None) -> torch.Tensor:
    """(128, 8) float32 signs: bit k of the 7-bit index is the sign of value k, and the
    eighth sign makes the count of minus signs even."""
    key = ("ksigns", str(device))
    t = _cache.get(key)
    if t is None:
        i = torch.arange(128)
        bits = (i[:, None] >> torch.arange(7)[None, :]) & 1
        parity = bits.sum(dim=1, keepdim=True) & 1
        allbits = torch.cat([bits, parity], dim=1)
        t = (1.0 - 2.0 * allbits.to(torch.float32)).to(device)
        _cache[key] = t
    return t
