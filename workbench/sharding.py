"""The ring's plan: which tokens each rank holds, and which (query run, K/V run) pairs compute.

Pure bookkeeping, no processes: :func:`shard_plan` cuts a sequence into whole-block shards,
:func:`distributed_plan` reduces a block layout to per-(query run, K/V run) tile counts. At step
``d`` rank ``r`` holds the K/V shard of rank ``(r - d) mod P``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from .layout import BlockLayout, key_block_counts, num_blocks
from .patterns import check_positive_int

__all__ = ["SHARDINGS", "DistributedPlan", "Sharding", "check_sharding", "distributed_plan",
           "run_tile_rows", "shard_plan"]

SHARDINGS = ("contiguous", "zigzag")


@dataclass(frozen=True)
class Sharding:
    """Which block runs of a sequence each rank holds: ``pieces[r]`` lists rank ``r``'s runs as
    ``(first block, end block)``; its shard is their tokens concatenated in that order."""

    seq_len: int
    block_size: int
    kind: str
    pieces: tuple[tuple[tuple[int, int], ...], ...]

    @property
    def world_size(self) -> int:
        return len(self.pieces)

    def token_ranges(self, rank: int) -> list[tuple[int, int]]:
        """Rank ``rank``'s ``(start, end)`` token ranges, in shard order."""
        b = self.block_size
        return [(b0 * b, min(b1 * b, self.seq_len)) for b0, b1 in self.pieces[rank]]

    def local_offsets(self, rank: int) -> list[tuple[int, int]]:
        """(start, length) of each run inside rank ``rank``'s shard tensor."""
        out, at = [], 0
        for s, e in self.token_ranges(rank):
            out.append((at, e - s))
            at += e - s
        return out

    def local_len(self, rank: int) -> int:
        """Tokens rank ``rank`` holds."""
        return sum(e - s for s, e in self.token_ranges(rank))

    def run_index(self, rank: int, run: int) -> int:
        """Global index of rank ``rank``'s ``run``-th run (runs numbered rank by rank)."""
        return sum(len(runs) for runs in self.pieces[:rank]) + run

    def run_rank(self) -> Tensor:
        """int64 ``[number of runs]``: the rank holding each run (by global run index)."""
        return torch.tensor([r for r, runs in enumerate(self.pieces) for _ in runs],
                            dtype=torch.int64)

    def run_of_block(self) -> Tensor:
        """int64 ``[num_blocks]``: the global run index of each block."""
        run = torch.empty(num_blocks(self.seq_len, self.block_size), dtype=torch.int64)
        for n, (b0, b1) in enumerate(x for runs in self.pieces for x in runs):
            run[b0:b1] = n
        return run

    def owner(self) -> Tensor:
        """int64 ``[num_blocks]``: the rank holding each block."""
        return self.run_rank()[self.run_of_block()]

    def shard(self, x: Tensor, rank: int, dim: int = 2) -> Tensor:
        """Rank ``rank``'s shard of a full-sequence tensor ``x`` (sequence along ``dim``)."""
        if x.shape[dim] != self.seq_len:
            raise ValueError(f"x has {x.shape[dim]} positions along dim {dim}, the sharding "
                             f"is for {self.seq_len}")
        return torch.cat([x.narrow(dim, s, e - s) for s, e in self.token_ranges(rank)], dim)

    def unshard(self, shards: Sequence[Tensor], dim: int = 2) -> Tensor:
        """Reassemble every rank's shard into the full sequence (single-process use)."""
        if len(shards) != self.world_size:
            raise ValueError(f"need {self.world_size} shards, got {len(shards)}")
        pieces = [(s, x.narrow(dim, at, n)) for r, x in enumerate(shards)
                  for (s, _), (at, n) in zip(self.token_ranges(r), self.local_offsets(r))]
        return torch.cat([p for _, p in sorted(pieces, key=lambda t: t[0])], dim)


def check_sharding(kind: object) -> str:
    """``kind`` if it is one of :data:`SHARDINGS`; otherwise a ``ValueError`` listing them."""
    if kind not in SHARDINGS:
        raise ValueError(f"sharding must be one of {SHARDINGS}, got {kind!r}")
    return kind


def shard_plan(seq_len: int, world_size: int, block_size: int,
               kind: str = "contiguous") -> Sharding:
    """Split ``seq_len`` tokens over ``world_size`` ranks in whole blocks, as evenly as possible
    (longer runs first): ``"contiguous"`` gives rank ``r`` the ``r``-th of ``P`` runs,
    ``"zigzag"`` runs ``r`` and ``2P - 1 - r`` of ``2P``.

    Raises:
        ValueError: a non-positive argument, an unknown ``kind``, or fewer blocks than runs.
    """
    for name, val in (("seq_len", seq_len), ("world_size", world_size),
                      ("block_size", block_size)):
        check_positive_int(name, val)
    check_sharding(kind)
    nb = num_blocks(seq_len, block_size)
    runs = 2 * world_size if kind == "zigzag" else world_size
    if runs > nb:
        raise ValueError(
            f"{kind} sharding of {seq_len} tokens over {world_size} ranks needs at least {runs} "
            f"blocks of {block_size} tokens, the sequence has {nb}; use a smaller block_size "
            "or fewer ranks")
    base, extra = divmod(nb, runs)  # as even as possible, longer runs first
    edges = [c * base + min(c, extra) for c in range(runs + 1)]
    bounds = list(zip(edges[:-1], edges[1:]))
    if kind == "zigzag":
        pieces = tuple((bounds[r], bounds[runs - 1 - r]) for r in range(world_size))
    else:
        pieces = tuple((bounds[r],) for r in range(world_size))
    return Sharding(seq_len, block_size, kind, pieces)


@dataclass(frozen=True)
class DistributedPlan:
    """Which (query run, K/V run) pairs compute: ``run_tiles[m, n]``, active tiles (all heads)
    of query run ``m`` against key run ``n`` (global run indices), zero for a skipped pair;
    ``tiles[r, c]`` sums them per (query rank, K/V rank). ``kv_sharding`` cuts the keys when their
    length differs (cross-attention, simulated ring only); by default they follow ``sharding``.
    """

    sharding: Sharding
    run_tiles: Tensor
    kv_sharding: Sharding | None = None

    @property
    def kv(self) -> Sharding:
        """The keys' sharding."""
        return self.sharding if self.kv_sharding is None else self.kv_sharding

    @cached_property
    def tiles(self) -> Tensor:
        p = self.world_size
        rows = torch.zeros(p, self.run_tiles.shape[1], dtype=torch.int64).index_add_(
            0, self.sharding.run_rank(), self.run_tiles)
        return torch.zeros(p, p, dtype=torch.int64).index_add_(1, self.kv.run_rank(), rows)

    def pair_tiles(self, rank: int, run: int, src: int, src_run: int) -> int:
        """Active tiles of rank ``rank``'s ``run``-th query run against ``src``'s ``src_run``."""
        return int(self.run_tiles[self.sharding.run_index(rank, run),
                                  self.kv.run_index(src, src_run)])

    def pairs(self, rank: int, src: int) -> Iterator[tuple[int, int, tuple[int, int], int]]:
        """``(query run, K/V run, K/V run's (first block, end block), active tiles)`` for every
        pair of runs of ``rank`` and ``src`` (indices within each shard) with an active tile."""
        for i in range(len(self.sharding.pieces[rank])):
            for j, blocks in enumerate(self.kv.pieces[src]):
                tiles = self.pair_tiles(rank, i, src, j)
                if tiles:
                    yield i, j, blocks, tiles

    def needed(self, rank: int, src: int) -> bool:
        """Does ``rank``'s query shard attend to ``src``'s K/V shard?"""
        return bool(self.tiles[rank, src] > 0)

    @property
    def world_size(self) -> int:
        return self.sharding.world_size

    def kv_rank(self, rank: int, step: int) -> int:
        """The rank whose K/V shard rank ``rank`` holds at step ``step``."""
        return (rank - step) % self.world_size

    def last_step(self) -> int:
        """The last ring step any rank needs (0: every rank needs only its own shard)."""
        p = self.world_size
        return max([d for d in range(p) for r in range(p) if self.needed(r, (r - d) % p)],
                   default=0)

    def shards_sent(self) -> Tensor:
        """int64 ``[P]``: K/V shards each rank sends in the forward pass."""
        need = self.tiles > 0
        return need.sum(0) - need.diagonal().to(torch.int64)

    def tiles_per_step(self) -> Tensor:
        """int64 ``[P, P]``: tiles rank ``r`` computes at step ``d``."""
        p = self.world_size
        idx = (torch.arange(p)[:, None] - torch.arange(p)[None, :]) % p
        return self.tiles.gather(1, idx)

    @property
    def computed(self) -> Tensor:
        """bool ``[P, P]``: rank ``r`` computes at step ``d``."""
        return self.tiles_per_step() > 0

    @property
    def skipped(self) -> int:
        """(rank, step) pairs with nothing to compute."""
        return int((~self.computed).sum())


def run_tile_rows(run_layouts: Sequence[BlockLayout], sharding: Sharding) -> Tensor:
    """Rows of :attr:`DistributedPlan.run_tiles` (int64 ``[len(run_layouts), runs]``, on the
    layouts' device) from the layouts of some query runs against every key block."""
    if not run_layouts:
        raise ValueError("need at least one query run's layout")
    dev = run_layouts[0].active.device
    for lay in run_layouts:  # (a BlockLayout's key blocks follow from k_len and block_size)
        if (lay.k_len, lay.block_size) != (sharding.seq_len, sharding.block_size):
            raise ValueError("layout and sharding disagree on the sequence length or block size")
    rows = torch.stack([key_block_counts(lay.active) for lay in run_layouts])
    runs = sum(len(p) for p in sharding.pieces)
    return torch.zeros(len(run_layouts), runs, dtype=torch.int64, device=dev).index_add_(
        1, sharding.run_of_block().to(dev), rows)


def distributed_plan(layout: BlockLayout, sharding: Sharding,
                     kv_sharding: Sharding | None = None) -> DistributedPlan:
    """Reduce the global ``layout`` to per-(query run, K/V run) tile counts (one transfer to
    the host; every later decision of the ring reads them there, with no device sync).
    ``kv_sharding`` cuts the keys (default: ``sharding``)."""
    kv = sharding if kv_sharding is None else kv_sharding
    if (layout.q_len, layout.k_len, layout.block_size, kv.world_size) != (
            sharding.seq_len, kv.seq_len, sharding.block_size, sharding.world_size):
        raise ValueError("layout and sharding disagree on the sequence length, block size or "
                         "number of ranks")
    nk = layout.active.shape[2]
    runs = [r for pieces in sharding.pieces for r in pieces]
    return DistributedPlan(sharding, run_tile_rows([layout.slice(r, (0, nk)) for r in runs],
                                                   kv).cpu(), kv_sharding)
