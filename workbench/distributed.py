"""The ring over real processes: sequence-sharded block-sparse attention with ``torch.distributed``.

Each rank holds one shard of the sequence (:mod:`workbench.sharding`), never the whole. At step
``d`` rank ``r`` attends its queries to the K/V shard of rank ``(r - d) mod P``, sent only when an
active tile needs it; partials merge by log-sum-exp, the backward pass is a ring too, and every
wait has a deadline (:class:`RingTimeoutError`). The schedule in full: ``docs/reference.md``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from .backends import (
    Problem,
    accumulation_dtype,
    check_backend,
    empty_partial,
    merge_into_,
    run_backend,
)
from .backends.dropout import AttentionDropout
from .layout import BlockLayout, num_blocks
from .patterns import Pattern, check_positive_int, head_predicate
from .plan import Plan, Plans, plan_for
from .score_mods import ScoreMod, missed_reads, reads
from .sharding import (
    SHARDINGS,
    DistributedPlan,
    Sharding,
    check_sharding,
    distributed_plan,
    run_tile_rows,
    shard_plan,
)

__all__ = ["SHARDINGS", "barrier", "RingCommunicationError", "RingPlanError", "RingStats",
           "RingTimeoutError", "DistributedPlan", "Sharding", "distributed_plan",
           "distributed_ring_attention", "gather_block_summaries", "init_ring", "shard_plan",
           "step_work"]

DEFAULT_TIMEOUT_S = 300.0


class RingTimeoutError(RuntimeError):
    """A peer did not deliver (or accept) a shard before the deadline."""


class RingCommunicationError(RuntimeError):
    """A transfer failed (e.g. the peer's connection closed)."""


class RingPlanError(ValueError):
    """Ranks disagree on shapes, dtypes, shard lengths or the schedule."""


def init_ring(backend: str | None = None, *, timeout: float = DEFAULT_TIMEOUT_S,
              init_method: str | None = None, rank: int | None = None,
              world_size: int | None = None) -> None:
    """``torch.distributed.init_process_group`` (NCCL when CUDA is available, else gloo;
    ``env://`` by default, as under ``torchrun``) whose ``timeout`` (seconds, also the group's
    deadline for collectives) ends in a :class:`RingTimeoutError` when a rank never joins."""
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    kw = {} if rank is None else {"rank": rank, "world_size": world_size}
    try:
        dist.init_process_group(backend, init_method=init_method,
                                timeout=timedelta(seconds=timeout), **kw)
    except RuntimeError as e:  # torch raises DistStoreError (a RuntimeError) on its deadline
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "imeout" not in str(e) and "timed out" not in str(e).lower():
            raise
        raise RingTimeoutError(
            f"rank {rank if rank is not None else '?'}: not every rank joined the process group "
            f"within {timeout:g} s ({first}); a rank may have died before joining") from e


def barrier(timeout: float = DEFAULT_TIMEOUT_S, process_group=None) -> None:
    """``torch.distributed.barrier`` with a deadline: :class:`RingTimeoutError` (or
    :class:`RingCommunicationError`) instead of waiting forever for a rank that is gone."""
    work = dist.barrier(group=process_group, async_op=True)
    _wait_all([work], timeout, f"rank {dist.get_rank(process_group)}: barrier")


def gather_block_summaries(x: Tensor, local_len: int, block_size: int, *, process_group=None,
                           sharding: str = "contiguous", timeout: float = DEFAULT_TIMEOUT_S
                           ) -> tuple[Tensor, int]:
    """Every rank's per-block summaries in global block order ``[B, H, num_blocks(S), D]``, and
    the global length ``S``, from ``x [B, H, n_r, D]``: one row per block of this rank's shard
    of ``local_len`` tokens (e.g. :func:`workbench.adaptive.pool_blocks` of its queries)."""
    rank = dist.get_rank(process_group)
    mine = torch.tensor([local_len], dtype=torch.int64, device=x.device)
    lens = [int(t) for t in _all_gather(mine, process_group, timeout,
                                        f"rank {rank}: exchanging shard lengths")]
    shards = _check_shard_lengths(lens, block_size, sharding, rank)
    counts = [sum(b1 - b0 for b0, b1 in runs) for runs in shards.pieces]
    if x.shape[2] != counts[rank]:
        raise RingPlanError(f"rank {rank}: {x.shape[2]} block summaries, the {sharding} "
                            f"sharding gives this rank {counts[rank]} blocks")
    padded = torch.nn.functional.pad(x, (0, 0, 0, max(counts) - x.shape[2])).contiguous()
    parts = _all_gather(padded, process_group, timeout, f"rank {rank}: gathering block summaries")
    seq_len = shards.seq_len
    by_block = Sharding(num_blocks(seq_len, block_size), 1, sharding, shards.pieces)
    return by_block.unshard([p[:, :, :c] for p, c in zip(parts, counts)]), seq_len


# --------------------------------------------------------------------- statistics
@dataclass
class RingStats:
    """What one rank did in its forward passes, accumulated over the calls given this object
    (``backward``: the same for backward passes). ``bytes_*`` count K/V shards and gradients;
    ``wait_s`` is host time blocked on transfers, :meth:`gpu_wait_ms` the CUDA stream's."""

    steps: int = 0
    pairs_computed: int = 0
    pairs_skipped: int = 0
    tiles_computed: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    wait_s: float = 0.0
    backward: RingStats | None = None
    wait_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = field(
        default_factory=list, repr=False)

    def gpu_wait_ms(self) -> float:
        """Milliseconds the CUDA stream waited on transfers (synchronizes; 0 off CUDA)."""
        if not self.wait_events:
            return 0.0
        self.wait_events[-1][1].synchronize()
        return float(sum(a.elapsed_time(b) for a, b in self.wait_events))

    def as_dict(self) -> dict[str, float | int]:
        """The scalar counters (forward)."""
        return {k: v for k, v in self.__dict__.items() if k not in ("backward", "wait_events")}


# --------------------------------------------------------------------- communication
@dataclass
class _Transfer:
    """Posted sends/receives of one step and the buffers being received (None: nothing)."""

    works: list
    recv: list[Tensor] | None
    where: str  # the ring step and its peers, for errors
    sent: Sequence[Tensor] | None  # held until the transfer is waited for


class _Ring:
    """Point-to-point transfers of one call, with deadlines and byte counters."""

    def __init__(self, setup: _Setup, device: torch.device, stats: RingStats) -> None:
        self.group, self.rank, self.timeout = setup.group, setup.rank, setup.timeout
        self.device, self.stats = device, stats

    def _global(self, r: int) -> int:
        return dist.get_global_rank(self.group, r) if self.group is not None else r

    def post(self, step: int, send: Sequence[Tensor] | None, send_to: int,
             recv_like: Sequence[tuple[tuple[int, ...], torch.dtype]] | None,
             recv_from: int) -> _Transfer:
        """Post the sends of ``send`` to ``send_to`` and receives of tensors shaped like
        ``recv_like`` from ``recv_from`` (each side optional) as one batch."""
        ops, bufs, peers = [], None, []
        if send is not None:
            peers.append(f"to rank {send_to}")
            for x in send:
                ops.append(dist.P2POp(dist.isend, x, self._global(send_to), self.group))
                self.stats.bytes_sent += x.numel() * x.element_size()
        if recv_like is not None:
            peers.insert(0, f"from rank {recv_from}")
            bufs = [torch.empty(shape, dtype=dt, device=self.device) for shape, dt in recv_like]
            for b in bufs:
                ops.append(dist.P2POp(dist.irecv, b, self._global(recv_from), self.group))
                self.stats.bytes_received += b.numel() * b.element_size()
        works = dist.batch_isend_irecv(ops) if ops else []
        return _Transfer(works, bufs, f"ring step {step} ({', '.join(peers)})", send)

    def wait(self, tr: _Transfer, what: str) -> list[Tensor] | None:
        t0 = time.perf_counter()
        events = None
        if self.device.type == "cuda" and tr.works:
            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            events[0].record()
        _wait_all(tr.works, self.timeout, f"rank {self.rank}: {what} at {tr.where}")
        if events is not None:
            events[1].record()  # fires once the stream has the transfer: e1 - e0 = exposed wait
            self.stats.wait_events.append(events)
        self.stats.wait_s += time.perf_counter() - t0
        return tr.recv


def _wait_all(works: Sequence, timeout: float, what: str) -> None:
    """Wait for ``works`` with a deadline; raise a :class:`RingTimeoutError` or
    :class:`RingCommunicationError` that says ``what`` was being done."""
    for w in works:
        try:
            done = w.wait(timeout=timedelta(seconds=timeout))
        except RuntimeError as e:  # gloo: the peer's connection closed, or its own deadline
            first = str(e).splitlines()[0]
            timed_out = "imeout" in first or "timed out" in first
            kind = RingTimeoutError if timed_out else RingCommunicationError
            after = f" after {timeout:g} s" if timed_out else ""
            raise kind(f"{what} failed{after}; a peer may have died or never joined ({first})"
                       ) from e
        if done is False:
            raise RingTimeoutError(f"{what} did not complete within {timeout:g} s; a peer may "
                                   "have died or never joined")


def _all_gather(x: Tensor, group, timeout: float, what: str) -> list[Tensor]:
    """Every rank's ``x`` (all of one shape), in rank order, waited for with a deadline."""
    everyone = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    _wait_all([dist.all_gather(everyone, x, group=group, async_op=True)], timeout, what)
    return everyone


def _check_shard_lengths(lens: list[int], block_size: int, sharding: str, rank: int
                         ) -> Sharding:
    """The sharding of ``sum(lens)`` tokens; a :class:`RingPlanError` unless it gives rank
    ``r`` exactly ``lens[r]`` tokens."""
    seq_len = sum(lens)
    shards = shard_plan(seq_len, len(lens), block_size, sharding)
    expected = [shards.local_len(r) for r in range(len(lens))]
    if lens != expected:
        raise RingPlanError(
            f"rank {rank}: shard lengths {lens} do not match the {sharding} sharding of "
            f"{seq_len} tokens in blocks of {block_size}, which needs {expected}; cut the "
            "sequence with workbench.distributed.shard_plan(...).shard(x, rank)")
    return shards


# --------------------------------------------------------------------- validation
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _agree(q: Tensor, k: Tensor, v: Tensor, dropout: AttentionDropout | None, block_size: int,
           sharding: str, group, rank: int, timeout: float, has_score_mod: bool = False
           ) -> tuple[Sharding, AttentionDropout | None]:
    """The sharding every rank's shapes and settings agree on, and the dropout with rank 0's
    seed; raises :class:`RingPlanError` naming what differs (``TypeError``: a bad dtype)."""
    if q.dtype not in _DTYPES:
        raise TypeError(f"dtype {q.dtype} is not supported by the distributed ring")
    drop = (-1, -1) if dropout is None else (round(dropout.p * 1e6), dropout.seed)
    mine = torch.tensor([q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3], v.shape[3],
                         _DTYPES.index(q.dtype), *drop, block_size, SHARDINGS.index(sharding),
                         int(has_score_mod)],
                        dtype=torch.int64, device=q.device)
    meta = torch.stack(_all_gather(mine, group, timeout, f"rank {rank}: exchanging shard shapes "
                                   "with the other ranks")).cpu()
    names = ("batch", "heads", "q shard length", "k shard length", "head_dim", "value dim",
             "dtype", "dropout probability (ppm)", "dropout seed", "block_size", "sharding",
             "whether a score_mod is given")
    for col in (0, 1, 4, 5, 6, 7, 9, 10, 11):
        vals = meta[:, col].tolist()
        if len(set(vals)) > 1:
            shown = ([str(_DTYPES[x]) for x in vals] if col == 6
                     else [SHARDINGS[x] for x in vals] if col == 10 else vals)
            raise RingPlanError(f"rank {rank}: ranks disagree on {names[col]}: "
                                f"{dict(enumerate(shown))}")
    if not torch.equal(meta[:, 2], meta[:, 3]):
        raise RingPlanError(f"rank {rank}: every rank's q and k/v shards must have the same "
                            f"length (self-attention), got q {meta[:, 2].tolist()} and k "
                            f"{meta[:, 3].tolist()}")
    shards = _check_shard_lengths(meta[:, 2].tolist(), block_size, sharding, rank)
    return shards, None if dropout is None else AttentionDropout(dropout.p, int(meta[0, 8]))


# --------------------------------------------------------------------- compute
@dataclass(frozen=True)
class _Setup:
    """Everything one call needs, identical on every rank but ``rank``."""

    rank: int
    plan: DistributedPlan
    run_problems: tuple[Problem, ...]  # per query run of this rank: its rows, every key block
    backend: str
    group: object = None
    timeout: float = DEFAULT_TIMEOUT_S
    need_lse: bool = True  # False: the caller wants no log-sum-exp and no gradients
    mod_tensors: tuple[Tensor, ...] = ()  # what the score mod reads that requires grad


def _run_problems(run_layouts: Sequence[BlockLayout], runs: Sequence[tuple[int, int]],
                  pattern: Pattern, device: torch.device | str, scale: float,
                  block_order: str | None = None, dropout: AttentionDropout | None = None,
                  score_mod: ScoreMod | None = None) -> tuple[Problem, ...]:
    """One :class:`Problem` per query run ``(first block, end block)``, from the layout of
    its rows against every key block (positions absolute, as in the whole problem)."""
    pred, b = head_predicate(pattern, device), run_layouts[0].block_size
    return tuple(Problem(lay, pred, scale, q_offset=r[0] * b, label=repr(pattern),
                         block_order=block_order, dropout=dropout, pattern=pattern,
                         score_mod=score_mod)
                 for lay, r in zip(run_layouts, runs))


def _mod_tensors(score_mod: ScoreMod | None, q: Tensor) -> tuple[Tensor, ...]:
    """The tensors ``score_mod`` reads that require grad, while gradients are on
    (:func:`~workbench.score_mods.reads`); raises when it reads one that ``reads`` cannot find,
    as the graph of one call on scalars tells: the ring's backward could give that one no
    gradient."""
    if score_mod is None or not torch.is_grad_enabled():
        return ()
    found = reads(score_mod)
    z = torch.zeros((), dtype=torch.int64, device=q.device)
    probe = score_mod(torch.zeros((), dtype=q.dtype, device=q.device), z, z, z, z)
    if isinstance(probe, Tensor) and probe.requires_grad and missed_reads(probe, found):
        raise NotImplementedError(
            "score_mod reads a tensor that requires grad where workbench.score_mods.reads "
            "cannot find it, so the distributed ring could not give it a gradient: keep it in "
            "an nn.Module, a closure cell, a default, a functools.partial or a global, or "
            "freeze it (requires_grad_(False))")
    return found


def _pairs(setup: _Setup, src: int, stats: RingStats | None
           ) -> Iterator[tuple[int, tuple[int, int], tuple[int, int], Problem]]:
    """``(query run, its (start, length) in this rank's shard, the K/V run's in the shard of
    src, their sub-problem)`` for every pair of runs with an active tile (read from the plan,
    on the host), counted into ``stats``."""
    sh = setup.plan.sharding
    qo, ko = sh.local_offsets(setup.rank), sh.local_offsets(src)
    for i, j, k_blocks, tiles in setup.plan.pairs(setup.rank, src):
        if stats is not None:
            stats.pairs_computed += 1
            stats.tiles_computed += tiles
        q0, q1 = sh.pieces[setup.rank][i]
        yield i, qo[i], ko[j], setup.run_problems[i].slice((0, q1 - q0), k_blocks)


def _partials(setup: _Setup, q: Tensor, k: Tensor, v: Tensor, src: int,
              stats: RingStats | None, need_lse: bool = True
              ) -> Iterator[tuple[int, Tensor, Tensor | None]]:
    """This rank's partials ``(run, out, lse)`` against the K/V shard of ``src``, one pair of
    runs at a time (merge each before asking for the next: one partial is alive at a time).
    ``lse`` may be None when ``need_lse`` is False."""
    for i, qo, ko, sub in _pairs(setup, src, stats):
        o, lse = run_backend(setup.backend, q.narrow(2, *qo), k.narrow(2, *ko), v.narrow(2, *ko),
                             sub, need_lse=need_lse)
        yield i, o, lse


def _post_kv(ring: _Ring, setup: _Setup, step: int, k: Tensor, v: Tensor) -> _Transfer:
    """Post step ``step``'s K/V transfers: own shard to ``r + step``, shard of ``r - step`` in
    (keys and values as two messages: no concatenated copy of either)."""
    p, r, plan = setup.plan.world_size, setup.rank, setup.plan
    dst, src = (r + step) % p, (r - step) % p
    n = plan.sharding.local_len(src)
    like = [((*x.shape[:2], n, x.shape[3]), x.dtype) for x in (k, v)]
    return ring.post(step, (k, v) if plan.needed(dst, r) else None, dst,
                     like if plan.needed(r, src) else None, src)


def _kv_ring(ring: _Ring, setup: _Setup, k: Tensor, v: Tensor
             ) -> Iterator[tuple[int, int, list[Tensor] | None]]:
    """``(step, src, the K/V shard of src)`` for every step up to the last any rank needs (the
    shard is None when this rank needs none). Each step's transfers are posted once the
    previous step's have arrived, so they travel while it computes, and every rank posts them
    in one global step order."""
    last, p, r = setup.plan.last_step(), setup.plan.world_size, setup.rank
    pending = _post_kv(ring, setup, 1, k, v) if last else None
    ring.stats.steps += 1  # step 0, then each step in which this rank sends or receives
    yield 0, r, [k, v]
    for step in range(1, last + 1):
        if pending.works:
            ring.stats.steps += 1
        held = ring.wait(pending, "receiving a K/V shard")
        pending = _post_kv(ring, setup, step + 1, k, v) if step < last else None
        yield step, (r - step) % p, held
        del held  # at most two received shards are alive: this one's and the next


def _ring_forward(setup: _Setup, q: Tensor, k: Tensor, v: Tensor, stats: RingStats
                  ) -> tuple[Tensor, Tensor | None]:
    """This rank's ``(out, lse)``. Each partial is merged into its query run's slice of the
    output as soon as it exists: one partial is alive besides the result, whatever the world
    size; rows that attend nothing keep zeros and a log-sum-exp of -inf."""
    sh, rank = setup.plan.sharding, setup.rank
    runs = sh.local_offsets(rank)
    active = setup.plan.run_tiles[[sh.run_index(rank, i) for i in range(len(runs))]] > 0
    stats.pairs_skipped += int((~active).sum())
    # A query run with one partial has nothing to merge: when no run of this rank has more,
    # and there are no gradients or requested log-sum-exp, the partials are computed without
    # one (e.g. SDPA for dilated segments; a zigzag shard's two runs are written apart).
    need_lse = setup.need_lse or bool((active.sum(1) > 1).any())
    # a shard of one run adopts its first partial; the runs of a zigzag shard share one output
    out, lse = empty_partial(q, v.shape[-1], lse=need_lse) if len(runs) > 1 else (None, None)
    started = [False] * len(runs)
    ring = _Ring(setup, q.device, stats)
    for _, src, held in _kv_ring(ring, setup, k.contiguous(), v.contiguous()):
        if held is None:
            continue
        for i, o, l_c in _partials(setup, q, held[0], held[1], src, stats, need_lse):
            l_c = l_c if need_lse else None  # (a backend may return one it was not asked for)
            if out is None:
                out, lse = o, None if l_c is None else l_c.to(accumulation_dtype(l_c.dtype))
            elif started[i]:  # merged in place, a slice at a time: no full-size temporaries
                merge_into_(out.narrow(2, *runs[i]),
                            None if lse is None else lse.narrow(2, *runs[i]), o, l_c)
            else:
                out.narrow(2, *runs[i]).copy_(o)
                if lse is not None:
                    lse.narrow(2, *runs[i]).copy_(l_c)
            started[i] = True
            del o, l_c
        del held
    if out is None:  # nothing attended
        return empty_partial(q, v.shape[-1], lse=need_lse)
    return out.to(q.dtype), lse


def _ring_backward(setup: _Setup, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   dout: Tensor, dlse: Tensor | None, stats: RingStats
                   ) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """``(dq, dk, dv)`` of this rank's shards, and the gradients of ``setup.mod_tensors`` from
    this rank's queries (their sum over the ranks is the whole sequence's)."""
    ring = _Ring(setup, q.device, stats)
    p, r, acc = setup.plan.world_size, setup.rank, accumulation_dtype(q.dtype)
    dq = torch.zeros_like(q, dtype=acc)
    d_mod = [torch.zeros_like(t) for t in setup.mod_tensors]
    dk_own, dv_own = torch.zeros_like(k, dtype=acc), torch.zeros_like(v, dtype=acc)
    like = [(tuple(x.shape), acc) for x in (k, v)]
    returning: _Transfer | None = None  # the gradient exchange of the last step that had one

    def take(tr: _Transfer) -> None:  # wait for a gradient exchange; add what came back
        got = ring.wait(tr, "exchanging K/V gradients")
        if got is not None:
            dk_own.add_(got[0])
            dv_own.add_(got[1])

    # NCCL runs a rank's batches in order, so every rank posts in one global order (K/V of step
    # d + 1, then the gradients of step d) and a step's gradient exchange is ONE batch (a receive
    # posted apart from its send would wait for a peer doing the same): those of the shard of
    # ``src`` go back to it, those of our own K/V come back from ``dst``. The previous exchange
    # is taken once this one is posted: at most two steps' gradient buffers are alive.
    for step, src, held in _kv_ring(ring, setup, k.contiguous(), v.contiguous()):
        dst = (r + step) % p
        grads = None
        if held is not None:
            g_k, g_v = ((dk_own, dv_own) if step == 0 else
                        tuple(torch.zeros_like(x, dtype=acc) for x in held))
            _backward_step(setup, q, held[0], held[1], src, out, lse, dout, dlse, dq, g_k, g_v,
                           d_mod, stats)
            grads = (g_k, g_v) if step else None
            del held
        back = step > 0 and setup.plan.needed(dst, r)
        if grads is not None or back:
            posted = ring.post(step, grads, src, like if back else None, dst)
            if returning is not None:
                take(returning)
            returning = posted
    if returning is not None:
        take(returning)
    return dq.to(q.dtype), dk_own.to(k.dtype), dv_own.to(v.dtype), d_mod


def _backward_step(setup: _Setup, q: Tensor, k: Tensor, v: Tensor, src: int, out: Tensor,
                   lse: Tensor, dout: Tensor, dlse: Tensor | None, dq: Tensor, dk: Tensor,
                   dv: Tensor, d_mod: list[Tensor], stats: RingStats | None) -> None:
    """One backward ring step: recompute this rank's partials against the K/V shard of ``src``
    and accumulate their gradients into ``dq`` (this rank's queries), ``dk, dv`` (that
    shard's keys and values) and ``d_mod`` (the score mod's ``setup.mod_tensors``)."""
    for _, qo, ko, sub in _pairs(setup, src, stats):
        qs = q.narrow(2, *qo).detach().requires_grad_(True)
        ks, vs = (x.narrow(2, *ko).detach().requires_grad_(True) for x in (k, v))
        with torch.enable_grad():
            o, l_c = run_backend(setup.backend, qs, ks, vs, sub, need_lse=True)
            go, gl = _partial_grads(o, l_c, *(None if x is None else x.narrow(2, *qo)
                                              for x in (out, lse, dout, dlse)))
            g_q, g_ks, g_vs, *g_mod = torch.autograd.grad(
                (o, l_c), (qs, ks, vs, *setup.mod_tensors), (go, gl), allow_unused=True)
        for into, g in zip(d_mod, g_mod):
            if g is not None:
                into.add_(g)
        dq.narrow(2, *qo).add_(g_q)
        dk.narrow(2, *ko).add_(g_ks)
        dv.narrow(2, *ko).add_(g_vs)


def _partial_grads(o: Tensor, l_c: Tensor, out: Tensor, lse: Tensor, dout: Tensor,
                   dlse: Tensor | None) -> tuple[Tensor, Tensor]:
    """Gradients of one partial ``(o_c, l_c)`` from those of the merged ``(out, lse)``:
    ``dO_c = w_c dO`` and ``dl_c = w_c (<dO, o_c> - <dO, O> + dL)``, ``w_c = exp(l_c - L)``."""
    acc = accumulation_dtype(o.dtype)
    top = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).to(acc)
    w = torch.where(torch.isfinite(l_c), torch.exp(l_c.to(acc) - top), torch.zeros_like(top))
    d_o = dout.to(acc)
    gl = w * ((d_o * o.detach().to(acc)).sum(-1) - (d_o * out.to(acc)).sum(-1))
    if dlse is not None:
        gl = gl + w * dlse.to(acc)
    return (w[..., None] * d_o).to(o.dtype), gl.to(l_c.dtype)


class _RingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, setup, stats, *mod_tensors):  # type: ignore[override]
        out, lse = _ring_forward(setup, q, k, v, stats)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.setup, ctx.stats = setup, stats
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        ctx.stats.backward = ctx.stats.backward or RingStats()
        dq, dk, dv, d_mod = _ring_backward(ctx.setup, q, k, v, out, lse, dout, dlse,
                                           ctx.stats.backward)
        return dq, dk, dv, None, None, *d_mod


# --------------------------------------------------------------------- layouts and plan
def _gather_plan(run_layouts: Sequence[BlockLayout], shards: Sharding, group, rank: int,
                 timeout: float) -> DistributedPlan:
    """The :class:`DistributedPlan` from every rank's rows: each reduces its own query runs'
    layouts to tile counts per key run, and the ranks exchange those small rows."""
    mine = run_tile_rows(run_layouts, shards)  # [runs of this rank, all runs]
    everyone = [mine] if shards.world_size == 1 else _all_gather(  # runs numbered rank by rank
        mine, group, timeout, f"rank {rank}: exchanging the block plan with the other ranks")
    return DistributedPlan(shards, torch.cat(everyone).cpu())


# --------------------------------------------------------------------- entry point
def distributed_ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: Pattern,
    block_size: int,
    *,
    process_group=None,
    sharding: str = "contiguous",
    backend: str = "auto",
    scale: float | None = None,
    return_lse: bool = False,
    layout: BlockLayout | Callable[[int], BlockLayout] | None = None,
    block_order: str | None = None,
    dropout: AttentionDropout | None = None,
    timeout: float = DEFAULT_TIMEOUT_S,
    stats: RingStats | None = None,
    plan: Plan | Plans | None = None,
    score_mod: ScoreMod | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Block-sparse attention over a sequence sharded across the ranks of ``process_group``.

    Every rank calls it with its own shard, cut by :func:`shard_plan` (``sharding``), and gets
    its own output shard. Per rank, memory holds its shards, at most two received K/V shards,
    one partial being merged, and its own query rows of the block layout.

    Args:
        q, k, v: this rank's shards ``[B, H, S_r, D]`` (``v``: any ``Dv``); self-attention.
        pattern, block_size, backend, scale, block_order, return_lse: as for
            :func:`workbench.block_sparse_attention` (``auto`` chooses per pair of runs).
        process_group: the ring's ranks (``None``: the default group).
        sharding: ``"contiguous"`` or ``"zigzag"``, the same on every rank.
        layout: the *global* layout, or a function of ``S`` returning it (default: each rank
            builds only its own rows).
        dropout: attention dropout with rank 0's seed (as one process with that seed).
        timeout: seconds any wait may take; stats: a :class:`RingStats` to accumulate into.
        plan: a :class:`~workbench.plan.Plan` or :class:`~workbench.plan.Plans` of the global
            length that keeps this rank's rows between calls.
        score_mod: as for :func:`workbench.block_sparse_attention`, at absolute positions, the
            same function on every rank. The tensors it reads that require grad get this
            rank's share of their gradient (sum them over the ranks, as for any parameter of a
            sequence-parallel model).

    Returns:
        ``out [B, H, S_r, Dv]``, or ``(out, lse)``; differentiable in ``q, k, v``.

    Raises:
        RuntimeError: ``torch.distributed`` is not initialized.
        ValueError: a bad ``timeout``, ``sharding`` or ``block_size``.
        TypeError: a dtype other than float16, bfloat16, float32 or float64.
        RingPlanError: ranks disagree on shapes or settings, or shard lengths that are not the
            ``sharding``'s.
        NotImplementedError: a ``score_mod`` reading a tensor that requires grad where
            :func:`~workbench.score_mods.reads` cannot find it, with gradients on.
        RingTimeoutError, RingCommunicationError: a peer stopped answering or a transfer failed.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: call "
                           "torch.distributed.init_process_group first (or run under torchrun)")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    check_sharding(sharding)
    check_positive_int("block_size", block_size)
    mod_tensors = _mod_tensors(score_mod, q)
    rank = dist.get_rank(process_group)
    shards, dropout = _agree(q, k, v, dropout, block_size, sharding, process_group, rank,
                             timeout, score_mod is not None)  # dropout: rank 0's seed
    seq_len, runs = shards.seq_len, shards.pieces[rank]
    if layout is None:  # this rank's rows only: 1/P of the global layout
        held = (Plan(pattern, seq_len, seq_len, block_size, q.device) if plan is None else
                plan_for(plan, pattern, seq_len, seq_len, block_size, q.device))
        run_layouts = held.rows(runs)
    else:
        layout = layout(seq_len) if callable(layout) else layout
        layout.check(pattern, seq_len, seq_len, block_size)  # the whole sharded sequence's
        run_layouts = [layout.slice(r, (0, layout.shape[2])) for r in runs]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    plan = _gather_plan(run_layouts, shards, process_group, rank, timeout)
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, *mod_tensors))
    problems = _run_problems(run_layouts, runs, pattern, q.device, scale, block_order, dropout,
                             score_mod)
    setup = _Setup(rank, plan, problems, check_backend(backend), process_group, float(timeout),
                   need_lse=return_lse or grad, mod_tensors=mod_tensors)
    out, lse = _RingFunction.apply(q, k, v, setup, stats if stats is not None else RingStats(),
                                   *mod_tensors)
    return (out, lse) if return_lse else out


def step_work(pattern: Pattern, plan: DistributedPlan, rank: int,
              run_layouts: Sequence[BlockLayout], backend: str, scale: float
              ) -> Callable[..., None]:
    """What rank ``rank`` of ``plan`` computes at one ring step, with no process group:
    ``work(src, q, k, v, grads=None)`` computes the partials of its ``q`` against the K/V shard
    of rank ``src`` and, given ``grads = (out, lse, dout, dq, dk, dv)``, the backward step,
    adding into ``dq, dk, dv``. ``run_layouts``: its query runs' rows
    (:meth:`~workbench.plan.Plan.rows`)."""
    setup = _Setup(rank, plan, _run_problems(run_layouts, plan.sharding.pieces[rank], pattern,
                                             run_layouts[0].active.device, scale),
                   check_backend(backend))

    def work(src: int, q: Tensor, k: Tensor, v: Tensor,
             grads: tuple[Tensor, ...] | None = None) -> None:
        with torch.no_grad():
            for _ in _partials(setup, q, k, v, src, None):
                pass
        if grads is not None:
            out, lse, dout, dq, dk, dv = grads
            _backward_step(setup, q, k, v, src, out, lse, dout, None, dq, dk, dv, [], None)

    return work
