"""Random tiles' layout in one Triton kernel: each tile's cells hashed and reduced to (any, all)
in registers, so the cell grid never reaches memory (imported on first use, so that
``TRITON_INTERPRET`` is read when the kernel is defined)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_BLOCK_J = 128  # tile columns per program


@triton.jit
def _mix32(x, MIX0: tl.constexpr, MIX1: tl.constexpr):
    """The hash's 32-bit finalizer on uint32 (``random_tiles._mix32``)."""
    x = x ^ (x >> 16)
    x = x * MIX0
    x = x ^ (x >> 16)
    x = x * MIX1
    return x ^ (x >> 16)


@triton.jit
def _tiles_kernel(ANY, ALL, BASES, first_row, n_rows, nk, cells_q, cells_k, threshold,
                  ROW: tl.constexpr, COL: tl.constexpr, MIX0: tl.constexpr, MIX1: tl.constexpr,
                  F: tl.constexpr, SPLIT: tl.constexpr, BLOCK_J: tl.constexpr):
    """Tile row ``first_row + program_id(0)`` of head ``program_id(2)``, ``BLOCK_J`` tile
    columns from ``program_id(1) * BLOCK_J``: a tile is active if one of its ``F x F`` cells is
    on, full if every real one is (a cell past the grid counts as on). With ``SPLIT`` tiles a
    cell edge (``F`` 1) a tile takes its cell's state, and ``ALL`` is not written."""
    i = tl.program_id(0)
    h = tl.program_id(2)
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    base = tl.load(BASES + h).to(tl.uint32, bitcast=True)
    any_ = tl.zeros([BLOCK_J], dtype=tl.int1)
    all_ = tl.full([BLOCK_J], 1, dtype=tl.int1)
    for a in tl.static_range(F):
        ci = (first_row + i) // SPLIT * F + a
        row = base + ci.to(tl.uint32) * ROW
        for b in tl.static_range(F):
            cj = j // SPLIT * F + b
            x = _mix32(row + cj.to(tl.uint32) * COL, MIX0, MIX1)
            on = (x >> 8).to(tl.int32) < threshold
            real = (ci < cells_q) & (cj < cells_k)
            any_ = any_ | (on & real)
            all_ = all_ & (on | ~real)
    at = (h * n_rows + i).to(tl.int64) * nk + j
    tl.store(ANY + at, any_, mask=j < nk)
    if F > 1:
        tl.store(ALL + at, all_, mask=j < nk)


def random_tiles(bases: Tensor, rows: tuple[int, int], nk: int, cells_q: int, cells_k: int,
                 threshold: int, f: int, split: int, hash_constants: tuple[int, int, int, int]
                 ) -> tuple[Tensor, Tensor]:
    """Bool ``(any, all)`` ``[len(bases), r1 - r0, nk]`` of tiles of ``f x f`` cells (or, ``f``
    1, of a ``split``-th of a cell edge: then one tensor, ``all`` is ``any``), cell ``(i, j)``
    of head ``n`` on when ``mix(bases[n] + i * row + j * col) >> 8 < threshold`` in uint32,
    ``hash_constants = (row, col, *mix)``; ``bases`` int32 (the bits of each head's uint32
    offset), on the device it runs on."""
    n_rows = rows[1] - rows[0]
    any_ = torch.empty(len(bases), n_rows, nk, dtype=torch.bool, device=bases.device)
    all_ = torch.empty_like(any_) if f > 1 else any_
    grid = (n_rows, triton.cdiv(nk, _BLOCK_J), len(bases))
    _tiles_kernel[grid](any_, all_, bases, rows[0], n_rows, nk, cells_q, cells_k, threshold,
                        *hash_constants, F=f, SPLIT=split, BLOCK_J=_BLOCK_J)
    return any_, all_
