"""The ring simulated on one device runs the distributed plan of contiguous shards, gives the
one-shot result and skips shard pairs with no active tile."""

from __future__ import annotations

import pytest
import torch
from conftest import grads, make_qkv, sdpa_oracle

import workbench as wb
from workbench import patterns as P
from workbench.sharding import distributed_plan, shard_plan


def _contiguous_plan(layout, ranks):
    return distributed_plan(layout, shard_plan(layout.q_len, ranks, layout.block_size))


@pytest.mark.parametrize("pattern", [
    P.causal(),
    P.local_window(40),
    P.global_local(3, 17) & P.causal(),
    P.dilated([64, 200], [1, 4], 4),
    P.random_blocks(0.3, seed=1, cell=16),
])
@pytest.mark.parametrize("chunks", [2, 3, 5])
def test_ring_equals_one_shot_and_reference(pattern, chunks):
    q, k, v = make_qkv(b=1, h=4, s=333, d=8)
    ring = wb.block_sparse_attention(q, k, v, pattern, 32, ring_chunks=chunks)
    one = wb.block_sparse_attention(q, k, v, pattern, 32)
    torch.testing.assert_close(ring, one, atol=1e-12, rtol=1e-12)
    mask = pattern.token_mask(333)
    rows = mask.any(-1)[None, ..., None]
    ref = torch.where(rows, sdpa_oracle(q, k, v, mask), 0.0)
    torch.testing.assert_close(ring, ref, atol=1e-10, rtol=1e-10)
    for a, b in zip(grads(ring, (q, k, v)), grads(one, (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_ring_lse_equals_one_shot_lse():
    q, k, v = make_qkv(b=2, h=2, s=200, d=8, requires_grad=False)
    pattern = P.local_window(30, causal=True)
    _, l1 = wb.block_sparse_attention(q, k, v, pattern, 16, ring_chunks=4, return_lse=True)
    _, l2 = wb.block_sparse_attention(q, k, v, pattern, 16, return_lse=True)
    torch.testing.assert_close(l1, l2, atol=1e-12, rtol=1e-12)


def test_ring_with_keys_of_another_length_equals_one_shot():
    q, _, _ = make_qkv(b=1, h=2, s=150, d=8)
    _, k, v = make_qkv(b=1, h=2, s=333, d=8)
    pattern = P.local_window(60)
    ring, ring_lse = wb.block_sparse_attention(q, k, v, pattern, 32, ring_chunks=3,
                                               return_lse=True)
    one, one_lse = wb.block_sparse_attention(q, k, v, pattern, 32, return_lse=True)
    torch.testing.assert_close(ring, one, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(ring_lse, one_lse, atol=1e-12, rtol=1e-12)
    for a, b in zip(grads(ring, (q, k, v)), grads(one, (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_plan_skips_and_counts():
    lay = P.local_window(16).block_structure(256, 16)  # reach of one block
    plan = _contiguous_plan(lay, 4)
    # each rank needs only its own shard and its two neighbours' edges
    assert plan.computed[:, 0].all()
    assert plan.skipped == 4 * 4 - 4 - 3 - 3  # step 0 + nearest ring neighbours
    assert int(plan.tiles.sum()) == int(lay.active.sum())
    causal = _contiguous_plan(P.causal().block_structure(256, 16), 4)
    # causal: rank p computes steps 0..p only (K/V shards that are not in its future)
    assert torch.equal(causal.computed, torch.ones(4, 4, dtype=torch.bool).tril())


def test_plan_kv_rank_rotation():
    plan = _contiguous_plan(P.full().block_structure(64, 8), 4)
    assert [plan.kv_rank(1, t) for t in range(4)] == [1, 0, 3, 2]


def test_contiguous_shards_are_even_and_cover():
    assert shard_plan(10 * 8, 3, 8).pieces == (((0, 4),), ((4, 7),), ((7, 10),))
    q, k, v = make_qkv(b=1, h=1, s=24, d=4, requires_grad=False)
    with pytest.raises(ValueError, match="ring_chunks=4 exceeds the 3 blocks"):
        wb.block_sparse_attention(q, k, v, P.full(), 8, ring_chunks=4)


@pytest.mark.parametrize("pattern", [P.causal(), P.local_window(40),
                                     P.random_blocks(0.3, seed=1, cell=16)])
@pytest.mark.parametrize("chunks", [3, 5])
def test_simulated_ring_runs_the_distributed_plan_of_contiguous_shards(monkeypatch, pattern,
                                                                       chunks):
    """Rank by rank, step by step, the simulated ring computes exactly the (query shard, K/V
    shard) pairs of the distributed plan that hold an active tile (found here from the layout),
    with rank ``r`` holding the K/V shard of rank ``r - d`` at step ``d``."""
    import workbench.ring as R

    calls, real = [], R.run_backend

    def run(name, q, k, v, problem, **kw):
        calls.append((problem.q_offset, q.shape[2], problem.k_offset, k.shape[2]))
        return real(name, q, k, v, problem, **kw)

    monkeypatch.setattr(R, "run_backend", run)
    q, k, v = make_qkv(b=1, h=2, s=333, d=4, requires_grad=False)
    wb.block_sparse_attention(q, k, v, pattern, 32, ring_chunks=chunks, backend="blockwise")
    layout = pattern.block_structure(333, 32)
    plan = _contiguous_plan(layout, chunks)
    sh = plan.sharding
    want = []
    for r in range(chunks):
        ((q0, q1),), ((t0, t1),) = sh.pieces[r], sh.token_ranges(r)
        for d in range(chunks):
            src = (r - d) % chunks
            ((k0, k1),), ((u0, u1),) = sh.pieces[src], sh.token_ranges(src)
            needed = bool(layout.active[:, q0:q1, k0:k1].any())
            assert bool(plan.computed[r, d]) == needed
            if needed:
                want.append((t0, t1 - t0, u0, u1 - u0))
    assert calls == want
    assert plan.skipped == chunks * chunks - len(want)


def test_rank_with_no_work_outputs_zeros():
    q, k, v = make_qkv(b=1, h=1, s=64, d=4, requires_grad=False)
    pattern = P.global_tokens(1) & P.local_window(1)  # only token 0 attends (itself)
    out = wb.block_sparse_attention(q, k, v, pattern, 8, ring_chunks=4)
    assert torch.all(out[:, :, 1:] == 0)
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0])


def test_merge_into_matches_merge_partials_slice_by_slice(monkeypatch):
    from workbench.backends import merge as M

    monkeypatch.setattr(M, "_MERGE_CHUNK", 40)  # several slices of the sequence
    g = torch.Generator().manual_seed(3)
    o1, o2 = (torch.randn(2, 3, 37, 5, generator=g, dtype=torch.float64) for _ in range(2))
    l1, l2 = (torch.randn(2, 3, 37, generator=g, dtype=torch.float64) for _ in range(2))
    l1[0, 0, :4] = -torch.inf  # rows where one side (or both) is empty
    l2[0, 0, 2:6] = -torch.inf
    want_o, want_l = M.merge_partials([o1, o2], [l1, l2])
    M.merge_into_(o1, l1, o2, l2)
    torch.testing.assert_close(o1, want_o)
    torch.testing.assert_close(l1, want_l)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_merge_of_low_precision_partials_accumulates_in_float32(dtype):
    from workbench.backends import merge as M

    g = torch.Generator().manual_seed(5)
    o1, o2 = (torch.randn(2, 3, 37, 8, generator=g).to(dtype) for _ in range(2))
    l1, l2 = (4 * torch.randn(2, 3, 37, generator=g) for _ in range(2))
    l1[0, 0, :3] = -torch.inf
    # the exact merge of the rounded inputs, rounded once to their dtype
    w1, w2 = (torch.exp(x.double() - torch.logaddexp(l1, l2).double())[..., None] for x in (l1, l2))
    want = torch.nan_to_num(w1) * o1.double() + w2 * o2.double()
    got, lse = M.merge_partials([o1, o2], [l1, l2])
    assert got.dtype == dtype and lse.dtype == torch.float32
    tol = max(torch.finfo(dtype).eps, 1e-6)  # one rounding to dtype (or float32's own error)
    torch.testing.assert_close(got.double(), want.to(dtype).double(), rtol=tol, atol=tol)
    acc_o, acc_l = o1.clone(), l1.clone()
    M.merge_into_(acc_o, acc_l, o2, l2)
    torch.testing.assert_close(acc_o, got, rtol=0, atol=0)
    torch.testing.assert_close(acc_l, torch.logaddexp(l1, l2))


def test_a_modules_ring_plans_and_slices_once(monkeypatch):
    """A module's cached layout keeps its ring schedule, and each step's slice is the same
    layout object at every call, so what a backend derives from it is built once."""
    import workbench.ring as R

    plans, slices = [], []
    real_plan, real_run = R.distributed_plan, R.run_backend
    monkeypatch.setattr(R, "distributed_plan", lambda *a: plans.append(1) or real_plan(*a))

    def run(name, q, k, v, problem, **kw):
        slices.append(problem.layout)
        return real_run(name, q, k, v, problem, **kw)

    monkeypatch.setattr(R, "run_backend", run)
    q, k, v = make_qkv(b=1, h=2, s=256, d=16, requires_grad=False)
    attn = wb.BlockSparseAttention(P.local_window(40, causal=True), 64, ring_chunks=2)
    first = attn(q, k, v)
    torch.testing.assert_close(attn(q, k, v), first, atol=0, rtol=0)
    assert len(plans) == 1 and len(slices) == 6  # 3 of the 4 shard pairs are active
    assert all(a is b for a, b in zip(slices[:3], slices[3:]))
