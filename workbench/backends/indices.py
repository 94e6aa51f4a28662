"""Per-row block lists of a layout, the form tile-list kernels read (FlexAttention's
``BlockMask`` and the triton backend): for each (head, query block) the number of selected key
blocks and their indices, selected ones first."""

from __future__ import annotations

import torch
from torch import Tensor

from ..layout import BlockLayout

__all__ = ["sorted_block_indices", "visit_rank"]

SORT_CHUNK = {"cpu": 1 << 20, "cuda": 1 << 26}
"""Tiles placed per step, by device type (other devices use the ``cuda`` value)."""


def sorted_block_indices(sel: Tensor, rank: Tensor | None = None,
                         chunk: int | None = None) -> tuple[Tensor, Tensor]:
    """(count ``[H, nq]``, column indices ``[H, nq, nk]`` with selected ones first), int32.

    Selected columns come in increasing order, then the others in increasing order; or the
    selected ones by ``rank`` (int64 ``[H, nq, nk]``, the position of each tile in a visit
    order) when given. Natural order needs no sort: a column's place is the number of selected
    (or unselected) columns left of it, one running sum per row. A visit order is sorted. Either
    way rows go ``chunk`` tiles at a time into the int32 result, so the int64 temporaries stay
    small whatever the length; ``chunk`` defaults to :data:`SORT_CHUNK` of the device.
    """
    if chunk is None:
        chunk = SORT_CHUNK.get(sel.device.type, SORT_CHUNK["cuda"])
    nk = sel.shape[-1]
    out = torch.empty(sel.shape, dtype=torch.int32, device=sel.device)
    count = torch.empty(sel.shape[:-1], dtype=torch.int32, device=sel.device)
    flat, out_rows, counts = sel.reshape(-1, nk), out.view(-1, nk), count.view(-1)
    ranks = None if rank is None else rank.reshape(flat.shape)
    cols = torch.arange(nk, device=sel.device, dtype=torch.int32)
    step = max(1, chunk // max(1, nk))  # rows (of every head) per step
    for r0 in range(0, flat.shape[0], step):
        part = flat[r0:r0 + step]
        if ranks is None:
            taken = part.to(torch.int32)
            upto = torch.cumsum(taken, -1, dtype=torch.int32)
            left = upto - taken  # selected columns left of c
            n = upto[:, -1:]
            place = torch.where(part, left, n + cols - left)
            out_rows[r0:r0 + step].scatter_(-1, place.to(torch.int64), cols.expand_as(place))
            counts[r0:r0 + step] = n[:, 0]
        else:
            out_rows[r0:r0 + step] = torch.argsort(
                torch.where(part, ranks[r0:r0 + step], torch.iinfo(torch.int64).max), dim=-1)
            counts[r0:r0 + step] = part.sum(-1, dtype=torch.int32)
    return count, out


def visit_rank(layout: BlockLayout, block_order: str | None) -> Tensor | None:
    """Position of every active tile in the ``block_order`` visit (None: natural order)."""
    if block_order is None:
        return None
    from ..orderings import block_visit_order

    tiles = block_visit_order(layout, block_order)
    rank = torch.zeros(layout.shape, dtype=torch.int64, device=tiles.device)
    rank[tuple(tiles.T)] = torch.arange(tiles.shape[0], device=tiles.device)
    return rank
