"""BigBird-style random tiles and the hash that draws them: layouts hash the cell grid a band
of rows at a time in int32 and reduce each band to tiles exactly."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..layout import block_lengths, cells_to_tiles, num_blocks, tile_sum
from .base import Pattern, check_density, check_int

_HASH_HEAD, _HASH_ROW, _HASH_COL, _HASH_SEED = 0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F
_HASH_MIX = (0x7FEB352D, 0x846CA68B)
# cells hashed per step (a CPU's two int32 buffers stay in cache; a GPU's launches stay few),
# and per band of tile rows hashed and reduced at once (the cell grid is never held whole)
_HASH_STEP = {"cpu": 1 << 18, "cuda": 1 << 24}
_BAND_CELLS = {"cpu": 1 << 22, "cuda": 1 << 28}
_KERNEL_MAX_CELLS = 8  # cells per tile edge the CUDA kernel takes (it unrolls their hashes)


def _signed32(x: int | Tensor) -> int | Tensor:
    """The int32 (two's complement) value of ``x`` in ``[0, 2**32)``, an int or int64 tensor."""
    return x - (x >= 1 << 31) * (1 << 32)


_MULS = tuple(_signed32(m) for m in _HASH_MIX)


def _mix32(x: Tensor, scratch: Tensor | None = None) -> Tensor:
    """The hash's 32-bit finalizer of ``x``, int64 in ``[0, 2**32)`` or int32 of the same bits
    (products wrap); both end with the same bits. With ``scratch`` (``x``'s shape and dtype)
    ``x`` is mixed in place, allocating nothing; without, nothing is written in place (so a
    compiled ``mask_mod`` can trace it)."""
    into = None if scratch is None else x
    for mul in (*_MULS, None):  # x ^= x >>> 16, then x *= mul
        t = torch.bitwise_and(torch.bitwise_right_shift(x, 16, out=scratch), 0xFFFF, out=scratch)
        x = torch.bitwise_xor(x, t, out=into)
        if mul is not None:
            x = torch.mul(x, mul, out=into)
            if x.dtype == torch.int64:
                x = torch.bitwise_and(x, 0xFFFFFFFF, out=into)
    return x


def hash_cells(seed: int, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
    """Deterministic 24-bit hash of (seed, head, cell row, cell column), elementwise: the
    random-tile patterns keep a cell below a threshold, attention dropout keeps a (query, key)
    pair at or above one. Computed in int64 whatever the index dtype."""
    h, i, j = h.to(torch.int64), i.to(torch.int64), j.to(torch.int64)
    x = (h * _HASH_HEAD + i * _HASH_ROW + j * _HASH_COL + seed * _HASH_SEED) & 0xFFFFFFFF
    return _mix32(x) >> 8


def _hash_grid(seed: int, heads: Sequence[int], rows: tuple[int, int], cols: int,
               threshold: int, device: torch.device) -> Tensor:
    """Bool ``[len(heads), r1 - r0, cols]``: ``hash_cells(seed, h, i, j) < threshold`` for the
    cell rows ``i`` in ``rows = (r0, r1)``, hashed in int32 on two buffers of ``_HASH_STEP``
    cells; ``(y >>> 8) < t`` is ``y < 256 t`` on unsigned ``y``, signed once the sign flips."""
    first, end = rows
    out = torch.empty(len(heads), end - first, cols, dtype=torch.bool, device=device)
    if threshold <= 0 or threshold >= 1 << 24:  # no cell, or every cell
        return out.fill_(threshold > 0)
    col = _signed32(torch.arange(cols, device=device) * _HASH_COL & 0xFFFFFFFF).to(torch.int32)
    step = max(1, _HASH_STEP.get(torch.device(device).type, _HASH_STEP["cuda"]) // cols)
    x = torch.empty(min(step, end - first), cols, dtype=torch.int32, device=device)
    t = torch.empty_like(x)
    sign = -(1 << 31)
    below = threshold * 256 - 1 + sign  # y < 256 t  <=>  (y ^ sign) <= 256 t - 1 - 2**31
    for n, h in enumerate(heads):
        base = (h * _HASH_HEAD + seed * _HASH_SEED) & 0xFFFFFFFF
        for r0 in range(first, end, step):
            r = torch.arange(r0, min(r0 + step, end), device=device)
            xs = x[:len(r)]
            row = _signed32((r * _HASH_ROW + base) & 0xFFFFFFFF).to(torch.int32)
            torch.add(row[:, None], col, out=xs)
            _mix32(xs, t[:len(r)])
            # compared in place as int32 0/1, then cast: faster than comparing into bools
            out[n, r0 - first:r0 - first + len(r)] = xs.bitwise_xor_(sign).le_(below)
    return out


class RandomBlocks(Pattern):
    """BigBird-style random cells: each ``cell x cell`` cell is on when :func:`hash_cells` of
    (seed, head, cell row, cell column) is below ``density * 2**24``, whatever the length or
    the block size."""

    def __init__(self, density: float, seed: int, cell: int, num_heads: int) -> None:
        self.p, self.seed, self.cell, self.num_heads = density, seed, cell, num_heads
        self.threshold = int(round(density * (1 << 24)))

    def allowed(self, h, q, k):
        c = self.cell
        hh = h if self.num_heads > 1 else torch.zeros_like(h)
        return hash_cells(self.seed, hh, q // c, k // c) < self.threshold

    def tiles(self, q_len, k_len, block_size, device, rows):
        c, b = self.cell, block_size
        if device.type == "cuda" and ((b % c == 0 and b // c <= _KERNEL_MAX_CELLS) or c % b == 0):
            try:
                return self._kernel_tiles(q_len, k_len, b, device, rows)
            except ModuleNotFoundError as err:  # no Triton: PyTorch's path below
                if err.name != "triton":
                    raise
        # tile rows per band: each band's cell rows are hashed, then reduced to its tiles
        band = max(1, _BAND_CELLS.get(device.type, _BAND_CELLS["cuda"])
                   // (self.num_heads * num_blocks(k_len, c) * -(-b // c)))
        if band >= rows[1] - rows[0]:
            return self._band(q_len, k_len, b, device, rows)
        shape = (self.num_heads, rows[1] - rows[0], num_blocks(k_len, b))
        any_ = torch.empty(shape, dtype=torch.bool, device=device)
        all_ = torch.empty_like(any_)
        for r0 in range(rows[0], rows[1], band):
            r1 = min(r0 + band, rows[1])
            span = slice(r0 - rows[0], r1 - rows[0])
            any_[:, span], all_[:, span] = self._band(q_len, k_len, b, device, (r0, r1))
        return any_, all_

    def _kernel_tiles(self, q_len: int, k_len: int, b: int, device: torch.device,
                      rows: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """:meth:`tiles` by the Triton kernel (``b`` a multiple of the cell or a divisor), every
        tile's cells hashed in registers."""
        from ._random_kernel import random_tiles

        c = self.cell
        bases = [_signed32((h * _HASH_HEAD + self.seed * _HASH_SEED) & 0xFFFFFFFF)
                 for h in range(self.num_heads)]
        return random_tiles(torch.tensor(bases, dtype=torch.int32, device=device), rows,
                            num_blocks(k_len, b), num_blocks(q_len, c), num_blocks(k_len, c),
                            self.threshold, max(1, b // c), max(1, c // b),
                            (_HASH_ROW, _HASH_COL, *_HASH_MIX))

    def _band(self, q_len: int, k_len: int, b: int, device: torch.device,
              rows: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """:meth:`tiles` of the query blocks ``rows`` at once."""
        c = self.cell
        cells = (rows[0] * b // c, (min(rows[1] * b, q_len) - 1) // c + 1)  # their cell rows
        on = _hash_grid(self.seed, range(self.num_heads), cells, num_blocks(k_len, c),
                        self.threshold, device)
        return cells_to_tiles(on, c, q_len, k_len, b, rows)

    def count_pairs(self, seq_len):
        c = self.cell
        n = num_blocks(seq_len, c)
        size = block_lengths(seq_len, c)
        on = _hash_grid(self.seed, range(self.num_heads), (0, n), n, self.threshold, "cpu")
        return int(tile_sum(on, size, size).sum())  # each on cell by its real pairs

    def grain(self):
        return self.cell

    def key(self):
        return (self.p, self.seed, self.cell, self.num_heads)

    def __repr__(self) -> str:
        return f"random_blocks(density={self.p}, seed={self.seed}, cell={self.cell})"


def random_blocks(density: float, seed: int = 0, *, cell: int = 64, num_heads: int = 1) -> Pattern:
    """BigBird-style random cells of ``cell x cell`` tokens, each on with probability
    ``density`` (the expected fraction of pairs); ``num_heads > 1`` draws each head apart."""
    density = check_density(density, meaning="the expected fraction of cells on")
    check_int("seed", seed, 0, None)
    check_int("cell", cell, 1)
    check_int("num_heads", num_heads, 1)
    return RandomBlocks(density, seed, cell, num_heads)


