"""Orderings: permutations of tokens (dilation grouping, grid curves), which move a pattern's
pairs, and visit orders of tiles, which change only the order active tiles are computed in.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence

import torch
from torch import Tensor

from .curves import CURVES, curve_order, hilbert_encode, inverse_permutation, morton_encode
from .layout import BlockLayout, num_blocks
from .patterns import Pattern, Permuted, check_positive_int, grid_neighborhood

__all__ = ["BLOCK_ORDERS", "CURVES", "block_accesses", "block_visit_order", "cache_model",
           "check_block_order", "dilation_gather", "dilation_permutation", "grid_neighborhood",
           "grid_permutation", "inverse_permutation", "permuted", "reuse_distances", "visit_rank"]

BLOCK_ORDERS = (None, "natural", "hilbert", "morton")


def dilation_gather(
    seq_len: int, segment: int, dilation: int, offsets: Sequence[int] | Tensor,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """``(pos, valid)``, ``[H, num_segments, ceil(segment / dilation)]``: the positions ``m *
    segment + offsets[h] + j * dilation`` head ``h`` keeps in segment ``m`` (int64, 0 where
    not ``valid``: outside the segment or the sequence)."""
    off = torch.as_tensor(offsets, dtype=torch.int64, device=device)[:, None, None]
    m = torch.arange(num_blocks(seq_len, segment), device=device)[None, :, None]
    j = torch.arange(num_blocks(segment, dilation), device=device)[None, None, :]
    inner = off + j * dilation
    pos = m * segment + inner
    valid = (inner < segment) & (pos < seq_len)
    return torch.where(valid, pos, torch.zeros_like(pos)), valid


def dilation_permutation(seq_len: int, segment: int, dilation: int, offset: int = 0) -> Tensor:
    """Token order putting, in every segment, the kept positions first: ``x[perm]`` holds old
    position ``perm[i]`` at new position ``i``."""
    pos = torch.arange(seq_len)
    inner = pos % segment
    kept = (inner % dilation) == (offset % dilation)
    key = (pos // segment) * 2 + (~kept).to(torch.int64)  # segment-major, kept first
    return torch.argsort(key * seq_len + pos)


def permuted(pattern: Pattern, perm: Tensor) -> Pattern:
    """``pattern`` seen in the token order ``perm`` ``[S]`` or ``[H, S]`` (one per head; new
    position i = old position perm[i]); its layout evaluates every tile: small lengths only."""
    perm = torch.as_tensor(perm, dtype=torch.int64)
    rows = perm[None] if perm.dim() == 1 else perm
    n = rows.shape[-1] if rows.dim() == 2 else 0
    if rows.dim() != 2 or not torch.equal(torch.sort(rows, -1).values,
                                          torch.arange(n).expand_as(rows)):
        raise ValueError("perm must be a permutation of range(seq_len), [S] or one per head "
                         "[H, S]")
    if rows.shape[0] > 1 and pattern.num_heads not in (1, rows.shape[0]):
        raise ValueError(f"perm has {rows.shape[0]} rows but the pattern has "
                         f"{pattern.num_heads} heads")
    return Permuted(pattern, rows)


# --------------------------------------------------------------------- token grids
def grid_permutation(shape: Sequence[int], order: str = "hilbert") -> Tensor:
    """Token order of a 2-D/3-D grid along curve ``order`` (:data:`CURVES`): new position ``i``
    holds raster token ``perm[i]``; :func:`inverse_permutation` undoes it."""
    return curve_order(shape, order)


# --------------------------------------------------------------------- block visit orders
def check_block_order(block_order: str | None) -> str | None:
    """Validate a ``block_order`` argument; returns None for the natural order."""
    if block_order not in BLOCK_ORDERS:
        raise ValueError(f"block_order must be one of {BLOCK_ORDERS} (None = natural row-major "
                         f"visit), got {block_order!r}")
    return None if block_order == "natural" else block_order


def block_visit_order(layout: BlockLayout | Tensor, block_order: str | None = "hilbert") -> Tensor:
    """The active tiles of ``layout`` in visit order: int64 ``[P, 3]`` (head, q-block, k-block),
    row-major for ``None``/``"natural"``, else head by head along the curve over the blocks."""
    order = check_block_order(block_order)
    active = layout.active if isinstance(layout, BlockLayout) else layout
    tiles = active.nonzero()
    if order is None or tiles.shape[0] == 0:
        return tiles
    nq, nk = active.shape[1], active.shape[2]
    bits = max(1, math.ceil(math.log2(max(nq, nk))))
    encode = hilbert_encode if order == "hilbert" else morton_encode
    key = encode(tiles[:, 1:], bits) + tiles[:, 0] * (1 << (2 * bits))
    return tiles[torch.argsort(key)]


def visit_rank(layout: BlockLayout, block_order: str | None) -> Tensor | None:
    """Position of every active tile in the ``block_order`` visit: int64 ``[H, nq, nk]``
    (:func:`block_visit_order`; None for the natural order)."""
    if check_block_order(block_order) is None:
        return None
    tiles = block_visit_order(layout, block_order)
    rank = torch.zeros(layout.shape, dtype=torch.int64, device=tiles.device)
    rank[tuple(tiles.T)] = torch.arange(tiles.shape[0], device=tiles.device)
    return rank


def block_accesses(tiles: Tensor) -> list[tuple[str, int, int]]:
    """The blocks a visit touches, in order: per tile ``("q", h, qb)`` (queries and running
    output), then ``("kv", h, kb)``."""
    return [touch for h, qb, kb in tiles.tolist() for touch in (("q", h, qb), ("kv", h, kb))]


def reuse_distances(accesses: Iterable[Hashable]) -> Tensor:
    """LRU stack distance of every access: the number of distinct other blocks touched since
    this block's previous access (int64 ``[N]``; -1 for a first touch). A cache of ``C`` blocks
    hits exactly the accesses with ``0 <= distance < C``. A Fenwick tree over access times."""
    acc = list(accesses)
    n = len(acc)
    tree = [0] * (n + 1)

    def add(i: int, v: int) -> None:
        i += 1
        while i <= n:
            tree[i] += v
            i += i & -i

    def prefix(i: int) -> int:  # sum over times [0, i)
        s = 0
        while i > 0:
            s += tree[i]
            i -= i & -i
        return s

    last: dict[Hashable, int] = {}
    out = []
    for t, a in enumerate(acc):
        p = last.get(a)
        if p is None:
            out.append(-1)
        else:
            out.append(prefix(t) - prefix(p + 1))  # blocks whose latest touch is in (p, t)
            add(p, -1)
        add(t, 1)
        last[a] = t
    return torch.tensor(out, dtype=torch.int64)


def cache_model(tiles: Tensor, capacities: Sequence[int]) -> list[dict[str, float]]:
    """LRU cache model of a tile visit order (:func:`block_accesses`): per capacity (blocks) a row
    of ``capacity``, ``accesses``, ``hits``, ``hit_rate``, ``cold_misses`` and the visit's
    ``mean_reuse_distance`` and ``median_reuse_distance`` over re-accesses."""
    d = reuse_distances(block_accesses(tiles))
    again = d[d >= 0].to(torch.float64)  # none: mean and median are nan
    mean, median = float(again.mean()), float(again.median())
    rows = []
    for c in capacities:
        check_positive_int("capacity", c, None)
        hits = int(((d >= 0) & (d < c)).sum())
        rows.append({"capacity": c, "accesses": d.numel(), "hits": hits,
                     "hit_rate": hits / d.numel() if d.numel() else float("nan"),
                     "cold_misses": int((d < 0).sum()), "mean_reuse_distance": mean,
                     "median_reuse_distance": median})
    return rows
