"""BigBird-style random tiles and the hash that draws them.

A cell of ``cell x cell`` tokens is on when a deterministic 24-bit hash of (seed, head, cell row,
cell column) falls below ``density * 2**24``, so a pattern does not depend on the sequence length
or on the block size a kernel later uses. Layouts hash the cell grid a few rows at a time in
int32 and reduce it to tiles exactly (:func:`~workbench.layout.cells_to_tiles`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..layout import cells_to_tiles, num_blocks, tile_sum
from .base import Pattern, check_density, check_int

_HASH_HEAD, _HASH_ROW, _HASH_COL, _HASH_SEED = 0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F
_HASH_MIX = (0x7FEB352D, 0x846CA68B)
_GRID_CHUNK = 1 << 18  # cells hashed per step on a CPU when building a cell grid (in cache)
_GRID_CHUNK_GPU = 1 << 24  # the same on a GPU, where each step is a few kernel launches


def _signed32(x: int) -> int:
    """The int32 (two's complement) value with the same low 32 bits as ``x``."""
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x >= 1 << 31 else x


def _mix32(x: Tensor) -> Tensor:
    """The hash's 32-bit finalizer, returning its top 24 bits.

    ``x`` is either int64 holding values in ``[0, 2**32)`` or int32 holding the same bits
    (two's complement, where products wrap); both give the same result.
    """
    wide = x.dtype == torch.int64
    for mul in _HASH_MIX:
        x = x ^ ((x >> 16) & 0xFFFF)
        x = x * _signed32(mul)
        x = x & 0xFFFFFFFF if wide else x
    x = x ^ ((x >> 16) & 0xFFFF)
    return (x >> 8) & 0xFFFFFF


def hash_cells(seed: int, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
    """Deterministic 24-bit hash of (seed, head, cell row, cell column), elementwise: the
    random-tile patterns keep a cell below a threshold, attention dropout keeps a (query, key)
    pair at or above one.

    Computed in int64 whatever the index dtype (kernels pass int32), keeping the low 32 bits.
    """
    h, i, j = h.to(torch.int64), i.to(torch.int64), j.to(torch.int64)
    x = (h * _HASH_HEAD + i * _HASH_ROW + j * _HASH_COL + seed * _HASH_SEED) & 0xFFFFFFFF
    return _mix32(x)


def _hash_grid(seed: int, heads: Sequence[int], rows: tuple[int, int], cols: int,
               threshold: int, device: torch.device) -> Tensor:
    """Bool ``[len(heads), r1 - r0, cols]``: ``hash_cells(seed, h, i, j) < threshold`` for the
    cell rows ``i`` in ``rows = (r0, r1)``.

    The same hash in int32 (products wrap, which keeps exactly the low 32 bits), a few rows
    at a time so that the intermediates stay small (in cache, on a CPU) and the memory is the
    output alone.
    """
    def lanes(v: Tensor) -> Tensor:  # int64 in [0, 2**32) -> int32 with the same bits
        return torch.where(v >= 1 << 31, v - (1 << 32), v).to(torch.int32)

    col = lanes(torch.arange(cols, device=device) * _HASH_COL & 0xFFFFFFFF)
    first, end = rows
    out = torch.empty(len(heads), end - first, cols, dtype=torch.bool, device=device)
    chunk = _GRID_CHUNK if torch.device(device).type == "cpu" else _GRID_CHUNK_GPU
    step = max(1, chunk // cols)
    for n, h in enumerate(heads):
        base = (h * _HASH_HEAD + seed * _HASH_SEED) & 0xFFFFFFFF
        for r0 in range(first, end, step):
            r = torch.arange(r0, min(r0 + step, end), device=device)
            row = lanes((r * _HASH_ROW + base) & 0xFFFFFFFF)
            torch.lt(_mix32(row[:, None] + col[None, :]), threshold,
                     out=out[n, r0 - first : r0 - first + step])
    return out


class RandomBlocks(Pattern):
    """BigBird-style random tiles: each ``cell x cell`` tile is on with probability ``density``.

    The choice is a deterministic hash of (seed, head, tile row, tile column), so it does not
    depend on the sequence length or on the block size a kernel later uses.
    """

    def __init__(self, density: float, seed: int, cell: int, num_heads: int) -> None:
        self.p, self.seed, self.cell, self.num_heads = density, seed, cell, num_heads
        self.threshold = int(round(density * (1 << 24)))

    def allowed(self, h, q, k):
        c = self.cell
        hh = h if self.num_heads > 1 else torch.zeros_like(h)
        return hash_cells(self.seed, hh, q // c, k // c) < self.threshold

    def tiles(self, q_len, k_len, block_size, device, rows):
        c, b = self.cell, block_size
        cells = (rows[0] * b // c, (min(rows[1] * b, q_len) - 1) // c + 1)  # their cell rows
        on = _hash_grid(self.seed, range(self.num_heads), cells, num_blocks(k_len, c),
                        self.threshold, device)
        return cells_to_tiles(on, c, q_len, k_len, block_size, rows)

    def count_pairs(self, seq_len):
        c = self.cell
        n = num_blocks(seq_len, c)
        size = torch.clamp(seq_len - torch.arange(n, dtype=torch.int64) * c, max=c)
        on = _hash_grid(self.seed, range(self.num_heads), (0, n), n, self.threshold, "cpu")
        return int(tile_sum(on, size, size).sum())  # each on cell by its real pairs

    def key(self):
        return (self.p, self.seed, self.cell, self.num_heads)

    def __repr__(self) -> str:
        return f"random_blocks(density={self.p}, seed={self.seed}, cell={self.cell})"


def random_blocks(density: float, seed: int = 0, *, cell: int = 64, num_heads: int = 1) -> Pattern:
    """BigBird-style random tiles of ``cell x cell`` tokens, each on with probability ``density``.

    ``density`` is the expected fraction of pairs (and of cells); the realized value at a given
    length is reported by :meth:`Pattern.density`. ``num_heads > 1`` draws each head apart.
    """
    density = check_density(density, meaning="the expected fraction of cells on")
    check_int("seed", seed, 0, None)
    check_int("cell", cell, 1)
    check_int("num_heads", num_heads, 1)
    return RandomBlocks(density, seed, cell, num_heads)


