"""The IQ quantizers' lattices: gguf-py's decoding grids, plus the neighbour maps ggml derives from them.

gguf-py's ``quants.py`` holds every IQ grid (for decoding): grid point ``j`` is ``n`` values, each one of a few
levels (``grid_map``). The quantizer needs, besides the points themselves, ggml's ``kmap`` (the index of the grid
point whose level code is ``u``, if ``u`` is on the grid) and, for every code that is not, its neighbour list: the
grid points at the ``nwant`` smallest squared distances (all of them, ties included), by distance then index. ggml
builds both in ``ggml_quantize_init`` (``iq2xs_init_impl``, ``iq3xs_init_impl``) with the points at the odd
coordinates ``2*level + 1``; ``lattice`` does the same, once per grid, on first use. Only codes whose levels a
quantizer can produce get a list (levels 0..2 on the 2-bit grids, every code on the 3-bit ones): a list depends on
its own code only.

``kmap[u] >= 0``: the grid index; ``kmap[u] = -(off + 1)``: ``neighbours[off]`` is the count and
``neighbours[off + 1 : off + 1 + count]`` the indices (ggml's layout). ``neighbour_values`` lays out, for a table of
the quantizer's value per level, the values of every list's points coordinate by coordinate, so that a search
computes all of a list's distances as vector lanes.
"""

from __future__ import annotations

from functools import cache
from typing import NamedTuple

import gguf
import numpy as np

from .common import jit


class Lattice(NamedTuple):
    levels: np.ndarray  # int32 [G, n]: the level (0, 1, ...) of each coordinate of each grid point
    kmap: np.ndarray  # int32 [4**n or 8**n]
    neighbours: np.ndarray  # int32


# (gguf-py class, bits per level code, nwant, levels a quantizer produces); ggml's grid_size is the grid's length
_SPECS = {
    "IQ2_XXS": (gguf.quants.IQ2_XXS, 2, 2, 3),
    "IQ2_XS": (gguf.quants.IQ2_XS, 2, 2, 3),
    "IQ2_S": (gguf.quants.IQ2_S, 2, 1, 3),
    "IQ1_S": (gguf.quants.IQ1_S, 2, 3, 3),  # IQ1_M shares IQ1_S's grid and maps in ggml
    "IQ3_XXS": (gguf.quants.IQ3_XXS, 3, 2, 8),
    "IQ3_S": (gguf.quants.IQ3_S, 3, 3, 8),
}


def _grid_levels(cls) -> np.ndarray:
    """int32 [G, n]: gguf-py's grid of ``cls`` as level indices into its (increasing) ``grid_map``."""
    cls.init_grid()
    values = np.asarray(cls.grid, dtype=np.float32).reshape(cls.grid_shape)
    grid_map = np.asarray(cls.grid_map, dtype=np.float32)
    levels = np.searchsorted(grid_map, values)
    assert np.array_equal(grid_map[levels], values), cls.__name__
    return levels.astype(np.int32)


@jit
def _distances(levels, code, bits, d2):
    """d2[j] = squared distance between grid point j and code's point (both at coordinates 2*level + 1)."""
    G, n = levels.shape
    mask = (1 << bits) - 1
    for j in range(G):
        acc = 0
        for k in range(n):
            diff = 2 * (levels[j, k] - ((code >> (bits * k)) & mask))
            acc += diff * diff
        d2[j] = acc


@jit
def _nearest_cut(d2, nwant, hist):
    """The largest distance among the nwant smallest distinct values of d2 (hist: scratch, one slot per distance)."""
    hist[:] = 0
    for v in d2:
        hist[v] += 1
    have = 0
    for v in range(hist.shape[0]):
        if hist[v]:
            have += 1
            if have == nwant:
                return v
    return hist.shape[0] - 1


@jit
def _build_neighbours(levels, bits, nwant, reach, kmap):
    """ggml's neighbour lists for every code whose levels are all < reach and that is not on the grid; fills kmap."""
    G, n = levels.shape
    mask = (1 << bits) - 1
    ncode = kmap.shape[0]
    d2 = np.empty(G, np.int64)
    hist = np.zeros(4 * n * (1 << bits) ** 2 + 1, np.int64)
    counts = np.zeros(ncode, np.int64)
    total = 0
    for code in range(ncode):
        ok = kmap[code] < 0
        for k in range(n):
            ok = ok and ((code >> (bits * k)) & mask) < reach
        if not ok:
            continue
        _distances(levels, code, bits, d2)
        cut = _nearest_cut(d2, nwant, hist)
        c = 0
        for v in range(cut + 1):
            c += hist[v]
        counts[code] = c
        total += 1 + c
    out = np.empty(total, np.int32)
    off = 0
    for code in range(ncode):
        if counts[code] == 0:
            continue
        _distances(levels, code, bits, d2)
        cut = _nearest_cut(d2, nwant, hist)
        kmap[code] = -(off + 1)
        out[off] = counts[code]
        p = off + 1
        for v in range(cut + 1):  # by distance, then by index: ggml's qsort on (d2, j)
            if hist[v]:
                for j in range(G):
                    if d2[j] == v:
                        out[p] = j
                        p += 1
        off = p
    return out


@cache
def lattice(qtype: str) -> Lattice:
    """The grid, map and neighbour lists ggml's ``ggml_quantize_init`` builds for ``qtype`` (IQ1_M: IQ1_S's)."""
    cls, bits, nwant, reach = _SPECS["IQ1_S" if qtype == "IQ1_M" else qtype]
    levels = _grid_levels(cls)
    G, n = levels.shape
    codes = (levels << (bits * np.arange(n, dtype=np.int32))).sum(axis=1)
    kmap = np.full(1 << (bits * n), np.iinfo(np.int32).min, np.int32)  # codes no quantizer produces stay at MIN
    kmap[codes] = np.arange(G, dtype=np.int32)
    neighbours = _build_neighbours(levels, bits, nwant, reach, kmap)
    return Lattice(levels, kmap, neighbours)


@jit
def neighbour_values(neighbours, levels, level_values):
    """float32 [len(neighbours) * n]: for the list at off with count c, V[(off+1)*n + i*c + j] is the value
    (level_values[level]) of coordinate i of its j-th point."""
    n = levels.shape[1]
    V = np.zeros(neighbours.shape[0] * n, np.float32)
    off = 0
    while off < neighbours.shape[0]:
        c = neighbours[off]
        for j in range(c):
            g = neighbours[off + 1 + j]
            for i in range(n):
                V[(off + 1) * n + i * c + j] = level_values[levels[g, i]]
        off += 1 + c
    return V


def lattice_values(qtype: str, level_values: np.ndarray) -> np.ndarray:
    """``neighbour_values`` of ``qtype``'s lattice for the float32 value of each level (computed once per pair)."""
    return _lattice_values(qtype, tuple(np.asarray(level_values, np.float32).tolist()))


@cache
def _lattice_values(qtype: str, level_values: tuple[float, ...]) -> np.ndarray:
    lat = lattice(qtype)
    return neighbour_values(lat.neighbours, lat.levels, np.asarray(level_values, np.float32))
