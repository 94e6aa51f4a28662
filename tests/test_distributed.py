"""The distributed ring across real processes (gloo on the CPU): equivalence and faults.

Each test spawns its ranks with a file-based rendezvous (no ports); every rank checks its own
shard against the single-process result computed from the same seeded full tensors.
"""

from __future__ import annotations

import os
import tempfile
import time
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import workbench as wb
from workbench import distributed as D
from workbench import score_mods
from workbench.adaptive import AdaptiveBlockSparseAttention
from workbench.backends import gather as G
from workbench.multihead import BlockSparseMultiheadAttention

P = wb.patterns
S, BLOCK = 203, 16  # odd: the last block is partial, shards are uneven


def _patterns():
    return {
        "causal": P.causal(),
        "local": P.local_window(20),
        "dilated": P.dilated([32, 64], [1, 2], num_heads=3),
        "random": P.random_blocks(0.3, seed=1, cell=16) | P.local_window(8, causal=True),
        "global_local": P.global_local(5, 12) & P.causal(),
        # the first 112 queries attend nothing: a contiguous rank 0, or a zigzag rank's first
        # run, computes nothing and must output zeros and -inf
        "late_queries_only": P.random_blocks(0.3, seed=8, cell=64),
    }


def _spawn(fn, world: int, *args) -> None:
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(fn, args=(world, os.path.join(d, "rendezvous"), *args), nprocs=world)


def _init(rank: int, world: int, path: str, timeout: float = 60.0) -> None:
    torch.set_num_threads(1)
    D.init_ring("gloo", init_method=f"file://{path}", rank=rank, world_size=world,
                timeout=timeout)


def _full(seed: int, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _check_attention(rank, world, sharding, names, dropout=0.0):
    """Forward, log-sum-exp and gradients of this rank's shard equal the single-process run."""
    q, k, v = (_full(i, 2, 3, S, 8) for i in range(3))
    sh = D.shard_plan(S, world, BLOCK, sharding)
    for name in names:
        pat = _patterns()[name]
        kw = dict(dropout_p=dropout, dropout_seed=11) if dropout else {}
        full = [x.clone().requires_grad_() for x in (q, k, v)]
        ref, ref_lse = wb.block_sparse_attention(*full, pat, BLOCK, return_lse=True, **kw)
        g = _full(5, *ref.shape)
        torch.autograd.backward((ref, ref_lse), (g, _full(6, *ref_lse.shape)))
        mine = [sh.shard(x, rank).clone().requires_grad_() for x in (q, k, v)]
        out, lse = wb.block_sparse_attention(*mine, pat, BLOCK, return_lse=True, sharding=sharding,
                                             process_group=dist.group.WORLD, **kw)
        torch.autograd.backward((out, lse), (sh.shard(g, rank), sh.shard(_full(6, *ref_lse.shape),
                                                                          rank)))
        torch.testing.assert_close(out, sh.shard(ref, rank), msg=f"{name} {sharding} out")
        torch.testing.assert_close(lse, sh.shard(ref_lse, rank), msg=f"{name} {sharding} lse")
        for a, b, what in zip(mine, full, "qkv"):
            torch.testing.assert_close(a.grad, sh.shard(b.grad, rank),
                                       msg=f"{name} {sharding} d{what}")


def _check_inference(rank, world, sharding):
    """Without gradients or a requested log-sum-exp, a rank whose query runs have one partial
    each computes them without one (SDPA for aligned dilated segments): the same output."""
    s = 128 * world  # shards of 128 tokens (zigzag: two runs of 64): segments inside a run
    q, k, v = (_full(i, 2, 3, s, 8) for i in range(3))
    sh = D.shard_plan(s, world, BLOCK, sharding)
    asked, plain = [], G.dilated_pattern_attention

    def spy(*args, need_lse=True, **kw):
        asked.append(need_lse)
        return plain(*args, need_lse=need_lse, **kw)

    G.dilated_pattern_attention = spy
    try:
        for pat in (P.dilated([32, 64], [1, 2], num_heads=3), P.local_window(20), P.causal()):
            ref = wb.block_sparse_attention(q, k, v, pat, BLOCK, backend="reference")
            stats = D.RingStats()
            with torch.no_grad():
                out = D.distributed_ring_attention(*(sh.shard(x, rank) for x in (q, k, v)), pat,
                                                   BLOCK, sharding=sharding, stats=stats)
            torch.testing.assert_close(out, sh.shard(ref, rank),
                                       msg=f"{pat!r} {sharding} no grad")
            assert out.dtype == q.dtype and stats.pairs_computed >= 1
    finally:
        G.dilated_pattern_attention = plain
    # every dilated run took the dilation ordering, and none computed a log-sum-exp
    assert asked == [False] * len(sh.pieces[rank]), (sharding, asked)


def _check_layouts(rank, world, sharding):
    """Each rank builds only its own rows of the layout; the plan the ranks assemble from them
    equals the one from the global layout, and a global ``layout=`` gives the same output."""
    q, k, v = (_full(i, 1, 3, S, 8) for i in range(3))
    sh = D.shard_plan(S, world, BLOCK, sharding)
    mine = [sh.shard(x, rank) for x in (q, k, v)]
    for pat in (P.random_blocks(0.3, seed=2, cell=16, num_heads=3),
                P.dilated([32, 64], [1, 2], num_heads=3, causal=True),
                _patterns()["global_local"]):
        whole = pat.block_structure(S, BLOCK)
        built: list = []

        def spy(*args, plain=pat.block_structure, built=built, **kw):  # what gets built
            built.append(kw.get("rows"))
            return plain(*args, **kw)

        pat.block_structure = spy  # until the ring has run (it reuses these rows)
        held = wb.Plan(pat, S, S, BLOCK)
        rows = held.rows(sh.pieces[rank])
        assert [lay.active.shape[1] for lay in rows] == [b1 - b0 for b0, b1 in sh.pieces[rank]]
        plan = D._gather_plan(rows, sh, dist.group.WORLD, rank, 30.0)
        assert torch.equal(plan.run_tiles, D.distributed_plan(whole, sh).run_tiles)
        with torch.no_grad():
            out = D.distributed_ring_attention(*mine, pat, BLOCK, sharding=sharding, plan=held)
        del pat.block_structure
        assert built == list(sh.pieces[rank]), built  # this rank's rows, never the whole
        with torch.no_grad():
            for given in (whole, lambda n, whole=whole: whole):
                again = D.distributed_ring_attention(*mine, pat, BLOCK, sharding=sharding,
                                                     layout=given)
                assert torch.equal(out, again), f"{pat!r} {sharding}: layout={given!r}"


def _check_modules(rank, world, sharding):
    """The multi-head module (fixed and adaptive) on shards equals it on the whole sequence."""
    for selector in (None, AdaptiveBlockSparseAttention(BLOCK, 0.3, causal=True)):
        _check_module(rank, world, sharding, selector=selector,
                      pattern=None if selector else P.local_window(24, causal=True))


def _check_module(rank, world, sharding, **options):
    """The multi-head module of ``options`` on this rank's shard: the whole sequence's output
    and input gradient, and (summed over the ranks) its input projection's gradient."""
    x = _full(7, 2, S, 12)
    sh = D.shard_plan(S, world, BLOCK, sharding)
    kw = dict(block_size=BLOCK, batch_first=True, dtype=torch.float64, **options)
    torch.manual_seed(0)
    single = BlockSparseMultiheadAttention(12, 3, **kw)
    multi = BlockSparseMultiheadAttention(12, 3, process_group=dist.group.WORLD,
                                          sharding=sharding, **kw)
    multi.load_state_dict(single.state_dict())
    xf = x.clone().requires_grad_()
    ref, _ = single(xf, xf, xf)
    (ref * _full(8, *ref.shape)).sum().backward()
    xs = sh.shard(x, rank, dim=1).clone().requires_grad_()
    out, _ = multi(xs, xs, xs)
    (out * sh.shard(_full(8, *ref.shape), rank, dim=1)).sum().backward()
    torch.testing.assert_close(out, sh.shard(ref, rank, dim=1))
    torch.testing.assert_close(xs.grad, sh.shard(xf.grad, rank, dim=1))
    w_grad = multi.in_proj_weight.grad.clone()
    dist.all_reduce(w_grad)  # parameter gradients: the sum over ranks
    torch.testing.assert_close(w_grad, single.in_proj_weight.grad)


def _record_batches() -> list[list[tuple[str, int]]]:
    """Record every batch of point-to-point operations this process posts, as
    ``[(\"isend\" | \"irecv\", peer), ...]`` per batch, in order."""
    log: list[list[tuple[str, int]]] = []
    post = dist.batch_isend_irecv

    def recording(ops):
        log.append([(op.op.__name__, op.peer) for op in ops])
        return post(ops)

    dist.batch_isend_irecv = recording  # this spawned rank only
    return log


def _deadlock(queues: list[list[list[tuple[str, int]]]]) -> str | None:
    """Run every rank's batches as NCCL does: one batch at a time per rank, in order; a batch
    completes only together with the current batches of its peers that hold the matching
    operations. Returns where the ranks would wait for each other forever, or None."""
    head = [0] * len(queues)
    while any(h < len(q) for h, q in zip(head, queues)):
        ready = {r for r, q in enumerate(queues) if head[r] < len(q)}
        changed = True
        while changed:  # drop the batches whose peers are not all at the matching batch
            changed = False
            for r in sorted(ready):
                batch = queues[r][head[r]]
                for op, peer in batch:
                    want = ("irecv" if op == "isend" else "isend", r)
                    if (peer not in ready or batch.count((op, peer))
                            != queues[peer][head[peer]].count(want)):
                        ready.discard(r)
                        changed = True
                        break
        if not ready:
            return "; ".join(f"rank {r} waits in batch {head[r]}: {q[head[r]]}"
                             for r, q in enumerate(queues) if head[r] < len(q))
        for r in ready:
            head[r] += 1
    return None


def _check_transfer_order(batches, rank: int, world: int) -> None:
    """Every rank's recorded batches, replayed as NCCL runs them, never hang."""
    everyone: list = [None] * world
    dist.all_gather_object(everyone, batches)
    if rank == 0:
        assert _deadlock(everyone) is None, _deadlock(everyone)


def test_the_nccl_order_model_catches_a_receive_posted_before_the_send():
    # both ranks receive first, then send, in separate batches: NCCL would hang
    hangs = [[[("irecv", 1)], [("isend", 1)]], [[("irecv", 0)], [("isend", 0)]]]
    assert _deadlock(hangs) is not None
    assert _deadlock([[[("irecv", 1), ("isend", 1)]], [[("isend", 0), ("irecv", 0)]]]) is None


def _equivalence_worker(rank, world, path, shardings, names, faults):
    _init(rank, world, path)
    batches = _record_batches()
    for sharding in shardings:
        _check_attention(rank, world, sharding, names)
    _check_attention(rank, world, "zigzag", ["local"], dropout=0.3)
    for sharding in shardings:
        _check_inference(rank, world, sharding)
        _check_layouts(rank, world, sharding)
    _check_modules(rank, world, shardings[-1])
    # gloo buffers transfers, so a hang NCCL would hit must be found from the order
    _check_transfer_order(batches, rank, world)
    for mode in faults:  # last: "never_calls" leaves the group unusable
        _fault(rank, mode)
    dist.destroy_process_group()


def test_world_size_2_equals_single_process_and_faults_are_reported():
    _spawn(_equivalence_worker, 2, ["contiguous", "zigzag"], sorted(_patterns()),
           ["mismatched_shapes", "mismatched_block_size", "bad_shard_lengths", "never_calls"])


def test_world_size_3_equals_single_process():
    _spawn(_equivalence_worker, 3, ["contiguous", "zigzag"], ["causal", "dilated", "local"], [])


def _score_mod_worker(rank, world, path):
    """Score mods give every rank the single-process forward, log-sum-exp and gradients, and
    the tensors they read that require grad their share of the gradient (summed over the ranks:
    the whole sequence's); one such tensor that ``reads`` cannot find is refused while
    gradients are on; ranks that disagree on having a mod are told so."""
    _init(rank, world, path)
    q, k, v = (_full(i, 2, 3, S, 8) for i in range(3))
    frozen = _full(9, 3)
    mods = {"alibi": score_mods.alibi(3), "soft_cap": score_mods.soft_cap(1.5),
            "closure": lambda s, b, h, qi, ki: s + frozen[h] * (qi >= ki)}
    pat = _patterns()["random"]
    for sharding in ("contiguous", "zigzag"):
        sh = D.shard_plan(S, world, BLOCK, sharding)
        for name, mod in mods.items():
            full = [x.clone().requires_grad_() for x in (q, k, v)]
            ref, ref_lse = wb.block_sparse_attention(*full, pat, BLOCK, return_lse=True,
                                                     score_mod=mod)
            g, g_lse = _full(5, *ref.shape), _full(6, *ref_lse.shape)
            torch.autograd.backward((ref, ref_lse), (g, g_lse))
            mine = [sh.shard(x, rank).clone().requires_grad_() for x in (q, k, v)]
            out, lse = wb.block_sparse_attention(*mine, pat, BLOCK, return_lse=True,
                                                 sharding=sharding, score_mod=mod,
                                                 process_group=dist.group.WORLD)
            torch.autograd.backward((out, lse), (sh.shard(g, rank), sh.shard(g_lse, rank)))
            torch.testing.assert_close(out, sh.shard(ref, rank), msg=f"{name} {sharding} out")
            torch.testing.assert_close(lse, sh.shard(ref_lse, rank), msg=f"{name} {sharding}")
            for a, b, what in zip(mine, full, "qkv"):
                torch.testing.assert_close(a.grad, sh.shard(b.grad, rank),
                                           msg=f"{name} {sharding} d{what}")
    # trainable tensors a mod reads: each rank gets its queries' share of their gradient
    sh = D.shard_plan(S, world, BLOCK)
    mine = [sh.shard(x, rank) for x in (q, k, v)]
    slopes = torch.linspace(0.1, 0.3, 3, dtype=torch.float64, requires_grad=True)
    bias = score_mods.RelativePositionBias(3, 12, dtype=torch.float64)
    torch.nn.init.normal_(bias.bias, generator=torch.Generator().manual_seed(3))
    for mod, trained in ((lambda s, b, h, qi, ki: s + slopes[h] * (ki - qi), slopes),
                         (bias, bias.bias)):
        ref = wb.block_sparse_attention(q, k, v, pat, BLOCK, score_mod=mod)
        g = _full(5, *ref.shape)
        (whole,) = torch.autograd.grad(ref, trained, g)
        out = wb.block_sparse_attention(*mine, pat, BLOCK, score_mod=mod,
                                        process_group=dist.group.WORLD)
        (share,) = torch.autograd.grad(out, trained, sh.shard(g, rank))
        torch.testing.assert_close(out, sh.shard(ref, rank).detach())
        dist.all_reduce(share)
        torch.testing.assert_close(share, whole)
    holder = types.SimpleNamespace(slopes=slopes.detach().clone().requires_grad_())
    hidden = lambda s, b, h, qi, ki: s + holder.slopes[h] * (ki - qi)  # noqa: E731  (unseen)
    beside = lambda s, b, h, qi, ki: hidden(s, b, h, qi, ki) + slopes[h]  # noqa: E731
    for mod in (hidden, beside):  # alone, and beside a tensor reads() finds
        with pytest.raises(NotImplementedError, match="cannot find it"):
            wb.block_sparse_attention(*mine, pat, BLOCK, score_mod=mod,
                                      process_group=dist.group.WORLD)
    with torch.no_grad():  # no gradient wanted: nothing to find
        ref = wb.block_sparse_attention(q, k, v, pat, BLOCK, score_mod=hidden)
        out = wb.block_sparse_attention(*mine, pat, BLOCK, score_mod=hidden,
                                        process_group=dist.group.WORLD)
    torch.testing.assert_close(out, sh.shard(ref, rank))
    _check_module(rank, world, "zigzag", pattern=P.local_window(24, causal=True),
                  score_mod=score_mods.alibi(3))
    with pytest.raises(D.RingPlanError, match="score_mod"):
        wb.block_sparse_attention(*mine, pat, BLOCK, score_mod=mods["alibi"] if rank else None,
                                  process_group=dist.group.WORLD)
    dist.destroy_process_group()


def test_score_mods_on_the_distributed_ring():
    _spawn(_score_mod_worker, 2)


def _uneven_steps_worker(rank, world, path, steps):
    _init(rank, world, path)
    batches = _record_batches()
    for sharding in ("contiguous", "zigzag"):
        _check_attention(rank, world, sharding, ["global_local"])
    _check_transfer_order(batches, rank, world)
    sh, stats = D.shard_plan(S, world, BLOCK), D.RingStats()
    q, k, v = (sh.shard(_full(i, 1, 3, S, 8), rank).requires_grad_() for i in range(3))
    D.distributed_ring_attention(q, k, v, _patterns()["global_local"], BLOCK,
                                 stats=stats).sum().backward()
    assert stats.steps == stats.backward.steps == len(steps[rank]), (stats, steps[rank])
    dist.destroy_process_group()


def test_world_size_4_with_ranks_on_different_steps():
    # global_local & causal over 4 ranks: the ranks take part in different ring steps
    # ([0, 1, 2, 3], [0, 1], [0, 1, 2], [0, 1, 3] with contiguous shards), the case where
    # transfers posted in each rank's own order could cross under NCCL
    plan = D.distributed_plan(_patterns()["global_local"].block_structure(S, BLOCK),
                              D.shard_plan(S, 4, BLOCK))
    steps = [[d for d in range(4) if d == 0 or plan.needed(r, (r - d) % 4)
              or plan.needed((r + d) % 4, r)] for r in range(4)]
    assert len({tuple(x) for x in steps}) > 2, steps
    _spawn(_uneven_steps_worker, 4, steps)  # each rank counts exactly its own steps


# ----------------------------------------------------------------------------- faults
def _fault(rank, mode):
    """Run one fault on a healthy group; every rank that calls must get a clear error."""
    q = k = v = _full(0, 1, 2, 32, 8)
    if rank == 1 and mode == "never_calls":
        time.sleep(4)  # longer than rank 0's deadline
        return
    if rank == 1 and mode == "dies_mid_ring":
        D._post_kv = lambda *a, **kw: os._exit(0)  # the process vanishes while the ring runs
    if rank == 1 and mode == "mismatched_shapes":
        q = k = v = _full(0, 1, 2, 32, 4)
    if mode == "bad_shard_lengths":
        q = k = v = _full(0, 1, 2, 16 * (rank + 1), 8)  # 16 + 32 tokens: not a contiguous split
    block = BLOCK * 2 if rank == 1 and mode == "mismatched_block_size" else BLOCK
    expected = {"never_calls": D.RingTimeoutError, "mismatched_shapes": D.RingPlanError,
                "bad_shard_lengths": D.RingPlanError, "mismatched_block_size": D.RingPlanError,
                "dies_mid_ring": (D.RingCommunicationError, D.RingTimeoutError)}[mode]
    t0 = time.perf_counter()
    with pytest.raises(expected) as err:
        D.distributed_ring_attention(q, k, v, P.full(), block, timeout=2.0)
    assert time.perf_counter() - t0 < 5.0
    assert f"rank {rank}" in str(err.value)
    if mode == "mismatched_shapes":
        assert "head_dim" in str(err.value)
    if mode == "bad_shard_lengths":
        assert "shard_plan" in str(err.value)
    if mode == "mismatched_block_size":  # every rank learns the cause
        assert f"block_size: {{0: {BLOCK}, 1: {2 * BLOCK}}}" in str(err.value)


def _dies_worker(rank, world, path):
    _init(rank, world, path)
    _fault(rank, "dies_mid_ring")


def test_a_rank_dying_mid_ring_ends_the_others_with_an_error():
    _spawn(_dies_worker, 2)


def _never_joins_worker(rank, world, path):
    if rank == 1:
        return  # never calls init
    t0 = time.perf_counter()
    with pytest.raises(D.RingTimeoutError, match="joined"):
        _init(rank, world, path, timeout=2.0)
    assert time.perf_counter() - t0 < 10.0


def test_a_rank_that_never_joins_times_out():
    _spawn(_never_joins_worker, 2)


def _longest_worker(rank, world, path):
    from workbench.lab import ring_bench

    torch.set_num_threads(1)
    if rank == 1:  # this rank "runs out of memory" from 512 tokens on
        real = D.distributed_ring_attention

        def short_of_memory(q, *args, **kwargs):
            if q.shape[2] * world >= 512:
                raise torch.cuda.OutOfMemoryError("simulated")
            return real(q, *args, **kwargs)

        D.distributed_ring_attention = short_of_memory
    t0 = time.perf_counter()
    rows = ring_bench.ring_bench("test_longest", [128], ["causal", "local"], heads=2, head_dim=8,
                                 block_size=16, reps=1, warmup=0, timeout=2.0,
                                 double_until=4096, init=(f"file://{path}", rank, world))
    assert time.perf_counter() - t0 < 30
    seen = {(r["seq_len"], r["family"], r["rank"]): r["status"] for r in rows}
    assert seen[(256, "local", 0)] == seen[(256, "local", 1)] == "ok"
    assert seen[(512, "causal", 1)] == "oom" and seen[(512, "causal", 0)] == "peer_failed"
    assert max(s for s, _, _ in seen) == 512 and (512, "local", 0) not in seen  # stopped there
    if rank == 0:  # the file holds every case, the failed one included
        from workbench.lab.records import read_csv

        written = {(int(r["seq_len"]), r["family"], int(r["rank"])): r["status"]
                   for r in read_csv("ring_test_longest")}
        assert written == seen
    # The ring was left with unmatched transfers on purpose (a peer failed mid-case), so the
    # process group is not torn down; end the process as the command line does (os._exit),
    # since gloo may abort the interpreter's normal exit over the pending receives.
    os._exit(0)


def test_longest_sequence_search_stops_cleanly_when_a_rank_runs_out_of_memory():
    _spawn(_longest_worker, 2)


def _profile_and_baseline_worker(rank, world, path):
    from workbench.lab import ring_bench
    from workbench.lab.records import read_csv

    torch.set_num_threads(1)
    rows = ring_bench.ring_bench("test_profile", [256], ["random10", "local"], ["contiguous",
                                 "zigzag"], heads=2, head_dim=8, block_size=16, reps=1,
                                 warmup=0, profile=3, baseline=True,
                                 init=(f"file://{path}", rank, world))
    if rank != 0:
        return
    ops = read_csv("ring_test_profile_profile")
    for r in range(world):  # per rank and case: the call's wall time, the 3 costliest operators
        mine = [op for op in ops if int(op["rank"]) == r and op["family"] == "random10"
                and op["sharding"] == "zigzag"]
        assert [op["op"] for op in mine][0] == "(call)" and len(mine) == 4
        assert float(mine[0]["wall_ms"]) > 0
        cost = [float(op["self_cpu_ms"]) for op in mine[1:]]
        assert cost == sorted(cost, reverse=True) and cost[0] > 0
    # every case has its one-rank baseline at S / world, and the efficiency it implies
    assert len(rows) == 4 * (world + 1)
    for family in ("random10", "local"):
        for sharding in ("contiguous", "zigzag"):
            case = [r for r in rows if (r["family"], r["sharding"]) == (family, sharding)]
            (one,) = [r for r in case if r["world_size"] == 1]
            many = [r for r in case if r["world_size"] == world]
            assert one["seq_len"] == 256 // world and one["rank"] == 0 and len(many) == world
            want = (sum(r["tiles"] for r in many) / world / max(r["ms"] for r in many)
                    / (one["tiles"] / one["ms"]))
            # the row rounds the efficiency to 4 decimals (small on a loaded machine)
            assert one["efficiency"] == pytest.approx(want, rel=1e-3, abs=1e-4)
            assert one["efficiency"] > 0


def test_ring_bench_profiles_and_measures_efficiency_against_one_rank():
    _spawn(_profile_and_baseline_worker, 2)
    from workbench.lab.ring_bench import ring_bench

    with pytest.raises(ValueError, match="profile"):
        ring_bench("x", [256], ["causal"], profile=-1)


# ----------------------------------------------------------------------------- plans (no processes)
def test_sharding_round_trip_and_errors():
    x = torch.arange(S)[None, None, :, None]
    for kind in D.SHARDINGS:
        sh = D.shard_plan(S, 3, BLOCK, kind)
        shards = [sh.shard(x, r) for r in range(3)]
        assert sum(s.shape[2] for s in shards) == S
        assert torch.equal(sh.unshard(shards), x)
    assert D.shard_plan(S, 3, BLOCK, "zigzag").pieces[0] == ((0, 3), (11, 13))
    with pytest.raises(ValueError, match="needs at least 8 blocks"):
        D.shard_plan(100, 4, 16, "zigzag")
    with pytest.raises(ValueError, match="sharding"):
        D.shard_plan(100, 2, 16, "striped")


def test_plan_stops_early_for_short_reach_and_balances_causal_with_zigzag():
    s, b, world = 4096, 64, 4
    local = D.distributed_plan(P.local_window(64, causal=True).block_structure(s, b),
                               D.shard_plan(s, world, b))
    assert local.last_step() == 1 and local.shards_sent().tolist() == [1, 1, 1, 0]
    segments = D.distributed_plan(P.dilated([512], [2], num_heads=2).block_structure(s, b),
                                  D.shard_plan(s, world, b))
    assert segments.last_step() == 0 and segments.shards_sent().sum() == 0
    causal = P.causal().block_structure(s, b)
    work = {kind: D.distributed_plan(causal, D.shard_plan(s, world, b, kind)).tiles.sum(1)
            for kind in D.SHARDINGS}
    imbalance = {k: float(w.max() / w.float().mean() - 1) for k, w in work.items()}
    assert imbalance["contiguous"] > 0.5 and imbalance["zigzag"] < 0.02, imbalance


def test_a_plan_builds_only_the_rows_asked_for_and_keeps_them():
    pat = P.random_blocks(0.2, seed=1, cell=16, num_heads=2)
    runs = ((2, 5), (9, 12))
    plan = wb.Plan(pat, 1000, block_size=64)
    lays = plan.rows(runs)
    assert plan.rows(runs) is lays and not plan.built  # the next call: no rebuild
    whole = pat.block_structure(1000, 64)
    for lay, (b0, b1) in zip(lays, runs):
        ref = whole.slice((b0, b1), (0, whole.shape[2]))
        assert torch.equal(lay.active, ref.active) and lay.q_len == ref.q_len
    assert plan.nbytes() == sum(2 * lay.active.numel() for lay in lays)  # two bool maps each


def test_needs_an_initialized_process_group():
    q = _full(0, 1, 1, 32, 8)
    with pytest.raises(RuntimeError, match="init_process_group"):
        D.distributed_ring_attention(q, q, q, P.full(), BLOCK)


# ----------------------------------------------------------------------------- GPU (NCCL)
def _nccl_worker(rank, world, path, backend):
    """Forward and gradients of each rank's shard equal a float64 dense reference, through
    NCCL, with and without a trainable score mod. The upstream gradient is drawn from a seeded
    CPU generator: each process's own CUDA generator differs, and a different gradient per rank
    would fail for a reason that is not the ring's."""
    D.init_ring("nccl", init_method=f"file://{path}", rank=rank, world_size=world, timeout=120)
    torch.cuda.set_device(rank)
    s, b = 4096 + 200, 128
    q, k, v = (_full(i, 1, 4, s, 64).cuda() for i in range(3))
    g = _full(5, 1, 4, s, 64).cuda()
    shardings = ("zigzag",) if backend == "flex" else D.SHARDINGS  # flex: compiles are slow
    bias = score_mods.RelativePositionBias(4, 256, num_buckets=32)
    torch.nn.init.normal_(bias.bias, generator=torch.Generator().manual_seed(3))
    bias = bias.cuda()  # a trainable score mod: its gradient, summed over the ranks, too
    cases = [(P.causal(), None), (P.random_blocks(0.2, seed=0, cell=128), None),
             (P.local_window(300), None), (P.local_window(700, causal=True), bias)]
    for pat, mod in cases:
        full = [x.clone().requires_grad_() for x in (q, k, v)]
        ref = wb.block_sparse_attention(*full, pat, b, score_mod=mod, backend="reference")
        ref.backward(g)
        whole = bias.bias.grad
        for sharding in shardings:
            bias.bias.grad = None
            sh = D.shard_plan(s, world, b, sharding)
            mine = [sh.shard(x, rank).float().requires_grad_() for x in (q, k, v)]
            out = wb.block_sparse_attention(*mine, pat, b, score_mod=mod, sharding=sharding,
                                            process_group=dist.group.WORLD, backend=backend)
            out.backward(sh.shard(g, rank).float())
            what = f"{backend} {sharding} {pat!r} score_mod={mod is not None}"
            torch.testing.assert_close(out, sh.shard(ref, rank).float(), rtol=2e-3, atol=2e-3,
                                       msg=f"{what}: out")
            for a, f, n in zip(mine, full, "qkv"):
                torch.testing.assert_close(a.grad, sh.shard(f.grad, rank).float(), rtol=5e-3,
                                           atol=5e-3, msg=f"{what}: d{n}")
            if mod is not None:
                share = bias.bias.grad.clone()
                dist.all_reduce(share)
                torch.testing.assert_close(share, whole, rtol=5e-3, atol=5e-3,
                                           msg=f"{what}: d bias")
    dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["blockwise", "flex"])
def test_nccl_ring_matches_single_process_on_every_gpu(backend):
    if not torch.cuda.is_available() or not dist.is_nccl_available():
        pytest.skip("needs CUDA and NCCL")
    _spawn(_nccl_worker, torch.cuda.device_count(), backend)


def test_ring_plan_runs_every_rank_and_step_on_one_device():
    from workbench.lab.ring_bench import ring_plan_study

    rows = ring_plan_study("test_plan", [1024], ["causal", "local"], world=2, heads=2,
                           head_dim=8, block_size=64, reps=1, device="cpu",
                           passes=("fwd", "fwd+bwd"))
    assert len(rows) == 2 * 2 * 2 * 2 * 2  # families x shardings x passes x ranks x steps
    both = {}
    for r in rows:
        both.setdefault((r["family"], r["sharding"], r["rank"], r["step"]), []).append(r)
    for fwd, fwdbwd in both.values():  # the backward repeats the forward's tiles and bytes
        assert (fwd["pass"], fwdbwd["pass"]) == ("fwd", "fwd+bwd")
        assert (fwd["tiles"], fwd["kv_bytes"]) == (fwdbwd["tiles"], fwdbwd["kv_bytes"])
        assert (fwd["compute_ms"] > 0) == (fwd["tiles"] > 0) == (fwdbwd["compute_ms"] > 0)
    by_case = {k: v[0] for k, v in both.items()}
    # causal, contiguous: rank 0 never needs rank 1's keys; rank 1 needs rank 0's at step 1
    assert by_case[("causal", "contiguous", 0, 1)]["tiles"] == 0
    step1 = by_case[("causal", "contiguous", 1, 1)]
    assert step1["tiles"] > 0 and step1["kv_bytes"] == 2 * 2 * 512 * 8 * 4  # k and v, fp32
    for sharding in ("contiguous", "zigzag"):
        plan = D.distributed_plan(P.causal().block_structure(1024, 64),
                                  D.shard_plan(1024, 2, 64, sharding))
        for (fam, sh, r, d), row in by_case.items():
            if fam == "causal" and sh == sharding:
                assert row["tiles"] == int(plan.tiles_per_step()[r, d])
    with pytest.raises(ValueError, match="passes"):
        ring_plan_study("test_plan", [1024], ["causal"], world=2, device="cpu", passes=("bwd",))
