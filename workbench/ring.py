"""Ring schedule: K/V split into chunks that travel a ring of ranks, merged by log-sum-exp.

Rank ``p`` owns query chunk ``p`` and, at step ``t``, holds K/V chunk ``(p - t) mod P`` (each
step every rank passes its K/V chunk to rank ``p + 1``). A rank computes its queries against the
chunk it holds only if some tile of that (query chunk, K/V chunk) pair is active; skipped pairs
are counted in the :class:`RingPlan`. Partial results are merged exactly
(:func:`~workbench.backends.merge_partials`), so the output equals the one-shot computation.

This module simulates the ring on one device; the schedule (the plan) is what a distributed
run executes across processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .backends import Problem, merge_partials, run_backend
from .layout import BlockLayout, tile_sum

__all__ = ["RingPlan", "chunk_bounds", "ring_attention", "ring_plan"]


def chunk_bounds(num_blocks: int, num_chunks: int) -> list[tuple[int, int]]:
    """Split ``num_blocks`` blocks into ``num_chunks`` contiguous ranges, as even as possible."""
    if num_chunks < 1:
        raise ValueError(f"ring_chunks must be >= 1, got {num_chunks}")
    if num_chunks > num_blocks:
        raise ValueError(
            f"ring_chunks={num_chunks} exceeds the {num_blocks} blocks of the sequence; use at "
            "most one chunk per block (or a smaller block_size)"
        )
    base, extra = divmod(num_blocks, num_chunks)
    edges = [0]
    for c in range(num_chunks):
        edges.append(edges[-1] + base + (1 if c < extra else 0))
    return list(zip(edges[:-1], edges[1:]))


@dataclass(frozen=True)
class RingPlan:
    """Which (rank, step) pairs of a ring compute, and how many tiles each computes.

    Attributes:
        q_bounds, k_bounds: block range of every rank's query chunk and of every K/V chunk.
        tiles: int64 ``[P, P]``; active tiles (summed over heads) rank ``p`` computes at step
            ``t``; zero means the step is skipped.
    """

    q_bounds: list[tuple[int, int]]
    k_bounds: list[tuple[int, int]]
    tiles: Tensor

    @property
    def num_chunks(self) -> int:
        return len(self.q_bounds)

    def kv_chunk(self, rank: int, step: int) -> int:
        """The K/V chunk rank ``rank`` holds at step ``step``."""
        return (rank - step) % self.num_chunks

    @property
    def computed(self) -> Tensor:
        return self.tiles > 0

    @property
    def skipped(self) -> int:
        return int((~self.computed).sum())


def cached_ring_plan(layout: BlockLayout, num_chunks: int) -> RingPlan:
    """:func:`ring_plan`, built once per layout object (it sums the layout's tiles per chunk
    pair, a device synchronization each, which a module's cached layout need not repeat)."""
    return layout.derived(("ring", num_chunks), lambda: ring_plan(layout, num_chunks))


def ring_plan(layout: BlockLayout, num_chunks: int) -> RingPlan:
    """The ring schedule of ``layout`` over ``num_chunks`` ranks."""
    nq, nk = layout.active.shape[1:]
    qb, kb = chunk_bounds(nq, num_chunks), chunk_bounds(nk, num_chunks)
    per_pair = torch.zeros(num_chunks, num_chunks, dtype=torch.int64)  # [q chunk, k chunk]
    for i, (q0, q1) in enumerate(qb):
        for j, (k0, k1) in enumerate(kb):
            per_pair[i, j] = tile_sum(layout.active[:, q0:q1, k0:k1]).sum()
    tiles = torch.empty_like(per_pair)
    for p in range(num_chunks):
        for t in range(num_chunks):
            tiles[p, t] = per_pair[p, (p - t) % num_chunks]
    return RingPlan(qb, kb, tiles)


def ring_attention(
    q: Tensor, k: Tensor, v: Tensor, problem: Problem, num_chunks: int, backend: str,
    need_lse: bool,
) -> tuple[Tensor, Tensor | None]:
    """Run ``problem`` with the ring schedule over ``num_chunks`` simulated ranks."""
    plan = cached_ring_plan(problem.layout, num_chunks)
    b = problem.layout.block_size
    outs, lses = [], []
    for p, (q0, q1) in enumerate(plan.q_bounds):
        qs = q[:, :, q0 * b : q1 * b]
        parts_o, parts_l = [], []
        for t in range(num_chunks):
            if not plan.computed[p, t]:
                continue
            c = plan.kv_chunk(p, t)
            k0, k1 = plan.k_bounds[c]
            sub = problem.slice((q0, q1), (k0, k1))
            o, lse = run_backend(backend, qs, k[:, :, k0 * b : k1 * b], v[:, :, k0 * b : k1 * b],
                                 sub, need_lse=True)
            parts_o.append(o)
            parts_l.append(lse)
        if not parts_o:  # this rank's queries attend nothing
            shape = (*qs.shape[:-1], v.shape[-1])
            parts_o.append(torch.zeros(shape, dtype=q.dtype, device=q.device))
            parts_l.append(torch.full(qs.shape[:-1], -torch.inf, device=q.device))
        o, lse = merge_partials(parts_o, parts_l)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)
