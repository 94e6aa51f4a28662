"""The ring simulated on one device: the distributed ring's plan over ``P`` contiguous shards,
rank by rank. At step ``d`` rank ``r`` attends to the K/V shard of rank ``(r - d) mod P``, skips
pairs with no active tile, and merges the partials exactly by log-sum-exp.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backends import Problem, empty_partial, merge_partials, run_backend
from .patterns import check_positive_int
from .sharding import distributed_plan, shard_plan

__all__ = ["ring_attention"]


def ring_attention(
    q: Tensor, k: Tensor, v: Tensor, problem: Problem, num_chunks: int, backend: str,
) -> tuple[Tensor, Tensor]:
    """``(out [B, H, Sq, Dv], lse [B, H, Sq])`` of ``problem`` for ``q, k, v`` ``[B, H, S, D]``,
    by the ring over ``num_chunks`` simulated ranks (the merge needs ``lse``). Raises
    ``ValueError`` for ``num_chunks`` not a positive int, or more chunks than blocks."""
    layout, b = problem.layout, problem.layout.block_size
    check_positive_int("ring_chunks", num_chunks)
    blocks = min(layout.active.shape[1:])
    if num_chunks > blocks:
        raise ValueError(
            f"ring_chunks={num_chunks} exceeds the {blocks} blocks of the sequence; use at "
            "most one chunk per block (or a smaller block_size)")
    # built once per layout object (a module's cached layout keeps it)
    plan = layout.derived(("ring", num_chunks), lambda: distributed_plan(
        layout, shard_plan(layout.q_len, num_chunks, b), shard_plan(layout.k_len, num_chunks, b)))
    outs, lses = [], []
    for r, ((q0, q1),) in enumerate(plan.sharding.pieces):
        qs = q[:, :, q0 * b : q1 * b]
        parts = [run_backend(backend, qs, k[:, :, k0 * b : k1 * b], v[:, :, k0 * b : k1 * b],
                             problem.slice((q0, q1), (k0, k1)), need_lse=True)
                 for d in range(num_chunks)
                 for _, _, (k0, k1), _ in plan.pairs(r, plan.kv_rank(r, d))]
        # a rank whose queries attend nothing gets zeros and a log-sum-exp of -inf
        o, lse = merge_partials(*zip(*(parts or [empty_partial(qs, v.shape[-1])])))
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)
