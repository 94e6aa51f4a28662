"""Toeplitz layouts: the tiles of a pattern that depends on the offset ``k - q`` alone.

A tile holds every offset from ``k_first - q_last`` to ``k_last - q_first``, so a prefix count of
the rule decides it in O(1); uniform tiles depend only on their block diagonal, and the ragged
last block row and column are computed on their own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..layout import block_extents, num_blocks

OffsetFn = Callable[[Tensor], Tensor]
"""``allowed(k - q)``, elementwise over int64 offsets, for patterns that depend on it alone."""


def _toeplitz(diag: Tensor, nq: int, nk: int, rows: tuple[int, int]) -> Tensor:
    """Rows ``[r0, r1)`` of the ``[nq, nk]`` matrix whose entry ``(i, j)`` is
    ``diag[j - i + nq - 1]`` (one copy, of those rows)."""
    r0, r1 = rows
    diag = diag.contiguous()
    # entry (i, j) = diag[nq - r1 + i + j]: rows nq - r1 ... nq - 1 - r0, flipped
    hankel = diag.as_strided((r1 - r0, nk), (1, 1), diag.storage_offset() + nq - r1)
    return hankel.flip(0)


def offset_tiles(
    rule: OffsetFn, q_len: int, k_len: int, block_size: int, device: torch.device,
    rows: tuple[int, int],
) -> tuple[Tensor, Tensor]:
    """Exact (any, all) ``[1, r1 - r0, nk]`` (query block rows ``rows = (r0, r1)``) of a
    pattern allowing ``(q, k)`` iff ``rule(k - q)``."""
    b = block_size
    nq, nk = num_blocks(q_len, b), num_blocks(k_len, b)
    d_first = 1 - nq * b  # the smallest offset any (padded) tile reaches
    ok = rule(torch.arange(d_first, nk * b, device=device))
    count = torch.nn.functional.pad(ok.to(torch.int64).cumsum(0), (1, 0))

    def status(d_min: Tensor, d_max: Tensor) -> tuple[Tensor, Tensor]:
        n = count[d_max - d_first + 1] - count[d_min - d_first]
        return n > 0, n == d_max - d_min + 1

    diag = torch.arange(1 - nq, nk, device=device) * b
    any_d, all_d = status(diag - (b - 1), diag + (b - 1))
    any_, all_ = _toeplitz(any_d, nq, nk, rows), _toeplitz(all_d, nq, nk, rows)
    qe = block_extents(q_len, b, device)[rows[0]:rows[1]]
    ke = block_extents(k_len, b, device)
    if rows[1] == nq:  # the ragged last block row
        any_[-1], all_[-1] = status(ke[:, 0] - qe[-1, 1], ke[:, 1] - qe[-1, 0])
    any_[:, -1], all_[:, -1] = status(ke[-1, 0] - qe[:, 1], ke[-1, 1] - qe[:, 0])
    return any_[None], all_[None]
