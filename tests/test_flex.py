"""FlexAttention backend: BlockMask from the exact layout, same output as the oracle."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import make_qkv

import workbench as wb
from workbench import patterns as P
from workbench.backends import Problem
from workbench.backends.flex import build_block_mask


def test_block_mask_lists_match_the_layout():
    pattern = (P.local_window(150) | P.global_tokens(4)) & P.causal()
    lay = pattern.block_structure(300, 64)
    mask = build_block_mask(Problem(lay, pattern.allowed, 1.0), "cpu")
    dense = mask.to_dense()[0]  # [H, nq, nk] active tiles as FlexAttention sees them
    assert torch.equal(dense.bool(), lay.active)
    # full tiles skip the mask, except the padded last row/column of tiles
    n_full = int(mask.full_kv_num_blocks.sum())
    assert 0 < n_full <= int(lay.full.sum())


def test_cpu_training_or_lse_is_refused_with_a_pointer():
    q, k, v = make_qkv(b=1, h=2, s=64, d=8, dtype=torch.float32)
    with pytest.raises(NotImplementedError, match="blockwise"):
        wb.block_sparse_attention(q, k, v, P.causal(), 32, backend="flex")


@pytest.mark.slow
def test_flex_matches_reference_on_cpu():
    q, k, v = make_qkv(b=1, h=4, s=300, d=32, dtype=torch.float32, requires_grad=False)
    pattern = P.dilated([64, 128], [1, 2], 4, causal=True) | P.global_tokens(3)
    out = wb.block_sparse_attention(q, k, v, pattern, 64, backend="flex")
    ref = wb.block_sparse_attention(q, k, v, pattern, 64, backend="reference")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


GPU_PATTERNS = {
    "causal": P.causal(),
    "local_global": P.local_window(100, causal=True) | P.global_tokens(8),
    "random": P.random_blocks(0.3, seed=4, cell=64, num_heads=4) | P.local_window(1),
    "sparse_transformer": (P.strided(50) | P.local_window(50)) & P.causal(),
    "dilated_causal": P.dilated([128, 512], [1, 4], 4, causal=True),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(GPU_PATTERNS))
@pytest.mark.parametrize("block", [64, 128])
def test_flex_forward_backward_lse_on_gpu(name, block):
    q, k, v = (x.cuda() for x in make_qkv(b=1, h=4, s=1000, d=64, dtype=torch.float32))
    pattern = GPU_PATTERNS[name]
    out, lse = wb.block_sparse_attention(q, k, v, pattern, block, backend="flex", return_lse=True)
    ref, rlse = wb.block_sparse_attention(q, k, v, pattern, block, backend="reference",
                                          return_lse=True)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, rlse, atol=1e-4, rtol=1e-4)
    blockwise = wb.block_sparse_attention(q, k, v, pattern, block, backend="blockwise")
    torch.testing.assert_close(blockwise, ref, atol=1e-4, rtol=1e-4)
    g1 = torch.autograd.grad(out.sum(), (q, k, v))
    g2 = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["blockwise", "flex"])
def test_ring_and_dilated_on_gpu(backend):
    q, k, v = (x.cuda() for x in make_qkv(b=1, h=4, s=777, d=64, dtype=torch.float32))
    pattern = P.dilated([128, 512], [1, 4], 4, causal=True)
    ring = wb.block_sparse_attention(q, k, v, pattern, 128, backend=backend, ring_chunks=3)
    ref = wb.block_sparse_attention(q, k, v, pattern, 128, backend="reference")
    torch.testing.assert_close(ring, ref, atol=1e-4, rtol=1e-4)
    hg = wb.dilated_attention(q, k, v, [128, 512], [1, 4], mode="head_groups", causal=True)
    torch.testing.assert_close(hg, ref, atol=1e-4, rtol=1e-4)
    paper = wb.dilated_attention(q, k, v, [128, 512], [1, 4], mode="paper", backend=backend)
    paper_ref = wb.dilated_attention(q, k, v, [128, 512], [1, 4], mode="paper",
                                     backend="reference")
    torch.testing.assert_close(paper, paper_ref, atol=1e-4, rtol=1e-4)
    g1 = torch.autograd.grad(paper.sum(), (q, k, v))
    g2 = torch.autograd.grad(paper_ref.sum(), (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_building_a_ring_slice_mask_never_waits_for_the_gpu():
    # The ring builds each (query run, K/V run) mask while the previous pair's kernel runs: a
    # host-device synchronization there would leave the GPU idle until the mask is built.
    pattern = P.random_blocks(0.3, seed=4, cell=128) | P.local_window(200, causal=True)
    layout = pattern.block_structure(4096, 128, "cuda")
    problem = Problem(layout, pattern.predicate("cuda"), 0.1, label=repr(pattern))
    build_block_mask(problem.slice((0, 16), (16, 32)), "cuda")  # first-call setup
    dilated = P.dilated([256, 512], [1, 2], num_heads=4)
    dilated.predicate("cuda")  # its per-head tables go to the GPU once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        build_block_mask(problem.slice((16, 32), (0, 16)), "cuda")
        dilated.predicate("cuda")  # what every ring call asks for
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_block_mask_follows_a_visit_order_within_rows():
    from workbench.orderings import block_visit_order

    pattern = P.local_window(200) | P.global_tokens(3)
    lay = pattern.block_structure(640, 64)
    natural = build_block_mask(Problem(lay, pattern.predicate("cpu"), 1.0), "cpu")
    curve = build_block_mask(Problem(lay, pattern.predicate("cpu"), 1.0, block_order="hilbert"),
                             "cpu")
    assert torch.equal(natural.to_dense(), curve.to_dense())  # same tiles
    order = block_visit_order(lay, "hilbert")
    rank = {tuple(t): i for i, t in enumerate(order.tolist())}
    for i in range(lay.shape[1]):
        n = int(curve.kv_num_blocks[0, 0, i])
        cols = curve.kv_indices[0, 0, i, :n].tolist()
        assert [rank[(0, i, c)] for c in cols] == sorted(rank[(0, i, c)] for c in cols)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_flex_visit_order_on_gpu_gives_the_same_output():
    q, k, v = (x.cuda() for x in make_qkv(b=1, h=4, s=1000, d=64, dtype=torch.float32))
    pattern = P.local_window(300) | P.global_tokens(8)
    a = wb.block_sparse_attention(q, k, v, pattern, 128, backend="flex")
    b = wb.block_sparse_attention(q, k, v, pattern, 128, backend="flex", block_order="hilbert")
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_block_mask_cache_reuses_a_layout_and_never_outlives_it():
    import gc
    import weakref

    from workbench.backends import flex as F

    pattern = P.causal()
    layout = pattern.block_structure(512, 64)
    problem = Problem(layout, pattern.predicate("cpu"), 0.1, label=repr(pattern))
    assert F.cached_block_mask(problem, "cpu") is F.cached_block_mask(problem, "cpu")
    sliced = problem.slice((0, 4), (0, 4))  # a ring slices its problem at every call
    mask = F.cached_block_mask(sliced, "cpu")
    assert problem.slice((0, 4), (0, 4)).layout is sliced.layout  # the same slice object
    assert F.cached_block_mask(problem.slice((0, 4), (0, 4)), "cpu") is mask  # built once
    masks = [weakref.ref(mask), weakref.ref(F.cached_block_mask(problem, "cpu"))]
    del sliced, mask
    gc.collect()
    assert masks[0]() is not None  # the slice lives as long as its layout
    del problem, layout
    gc.collect()
    assert [m() for m in masks] == [None, None]  # the masks went with the layout


def test_many_layers_never_evict_each_others_masks(monkeypatch):
    """A model of more layers than a bounded cache would hold builds each layer's mask once."""
    from workbench.backends import flex as F

    built = []
    real = F.build_block_mask
    monkeypatch.setattr(F, "build_block_mask", lambda *a, **k: built.append(1) or real(*a, **k))
    layers = [wb.BlockSparseAttention(P.local_window(100), 64, backend="flex")
              for _ in range(6)]  # a pattern object each: a layout each
    problems = [Problem(m.layout(300, 300, torch.device("cpu")), m.pattern.predicate("cpu"), 0.1)
                for m in layers]
    for _ in range(2):  # two training steps through six layers, each its own layout
        for pr in problems:
            F.cached_block_mask(pr, "cpu")
            F.cached_block_mask(pr.slice((0, 2), (0, 3)), "cpu")  # and a ring's slice of it
    assert len(built) == 12


def test_block_indices_sorted_in_chunks_equal_one_sort():
    from workbench.blockmask import sorted_block_indices

    g = torch.Generator().manual_seed(3)
    sel = torch.rand(3, 37, 29, generator=g) < 0.3
    rank = torch.randperm(3 * 37 * 29, generator=g).view(3, 37, 29)
    for r in (None, rank):
        whole = sorted_block_indices(sel, r, chunk=1 << 30)
        for chunk in (1, 29, 100, 29 * 5):  # one row, rows that do not divide 37, ...
            parts = sorted_block_indices(sel, r, chunk=chunk)
            assert all(torch.equal(a, b) for a, b in zip(whole, parts)), (chunk, r is None)
        if r is None:  # the running-sum placement is the stable sort of "not selected"
            order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).int()
            assert torch.equal(whole[1], order)
        n, idx = whole  # the selected columns come first, in increasing (or visit) order
        for h, i in ((0, 0), (2, 36)):
            cols = idx[h, i, : n[h, i]]
            assert torch.equal(cols.sort().values, sel[h, i].nonzero().flatten().int())
            if r is None:
                assert torch.equal(cols, cols.sort().values)
            else:
                assert bool((r[h, i][cols.long()].diff() > 0).all())


def test_block_indices_of_an_empty_grid_are_every_column_in_order():
    """The shortcut for a grid with nothing selected gives what the sort gives: no count, the
    columns in increasing order (cut to ``width``), into the caller's tensors."""
    from workbench.blockmask import empty_lists, sorted_block_indices

    sel = torch.zeros(2, 5, 7, dtype=torch.bool)
    rank = torch.randperm(70).view(2, 5, 7)
    one = sel.clone()
    one[1, 4, 3] = True  # one selected tile: the sorting path
    _, sorted_idx = sorted_block_indices(one)
    for r in (None, rank):
        for width in (None, 3):
            into = empty_lists((2, 5), 7 if width is None else width, sel.device)
            n, idx = sorted_block_indices(sel, r, width=width, out=into)
            assert n is into[0] and idx is into[1]
            assert not n.any() and torch.equal(idx, torch.arange(idx.shape[-1]).int()
                                               .expand(2, 5, -1))
            assert torch.equal(idx[0], sorted_idx[0][..., :idx.shape[-1]])


def test_block_indices_refuse_an_out_that_does_not_fit():
    from workbench.blockmask import empty_lists, sorted_block_indices

    sel = torch.rand(2, 5, 7, generator=torch.Generator().manual_seed(1)) < 0.3
    n, idx = sorted_block_indices(sel)
    count, into = empty_lists((2, 5), 7, sel.device)
    assert sorted_block_indices(sel, out=(count, into))[1] is into and torch.equal(into, idx)
    for bad in ("x", (count,), (count.long(), into), (count, into[..., :3].contiguous()[:1]),
                (count, into.transpose(1, 2).contiguous().transpose(1, 2))):
        with pytest.raises(ValueError, match="out must be"):
            sorted_block_indices(sel, out=bad)
    with pytest.raises(ValueError, match="differs from out's width"):
        sorted_block_indices(sel, width=3, out=(count, into))
    with pytest.raises(ValueError, match="width must be"):
        sorted_block_indices(sel, out=empty_lists((2, 5), 8, sel.device))


def test_narrow_block_lists_are_the_first_columns_of_the_whole_ones():
    """``width``: each row's first columns of the whole lists, in chunks or not, natural or
    visit order; a narrow mask cuts each direction's two lists to one width, the longest row
    (or column) of active tiles."""
    from workbench.blockmask import block_mask_from_layout, sorted_block_indices

    g = torch.Generator().manual_seed(5)
    sel = torch.rand(2, 23, 41, generator=g) < 0.2
    rank = torch.randperm(2 * 23 * 41, generator=g).view(2, 23, 41)
    width = int(sel.sum(-1).max())
    assert width < 41
    for r in (None, rank):
        n, whole = sorted_block_indices(sel, r)
        for chunk in (1, 41 * 3, 1 << 30):
            m, cut = sorted_block_indices(sel, r, chunk=chunk, width=width)
            assert cut.shape == (2, 23, width) and cut.is_contiguous()
            assert torch.equal(m, n) and torch.equal(cut, whole[..., :width]), (chunk, r is None)
        with pytest.raises(ValueError, match="would cut rows"):
            sorted_block_indices(sel, r, width=width - 1)
    for bad in (-1, 42, 2.5, True):
        with pytest.raises(ValueError, match="width must be"):
            sorted_block_indices(sel, width=bad)
    from workbench.orderings import visit_rank

    # partial and full tiles; full ones only (an empty grid is not sorted), then ragged (the
    # last row and column partial); partial ones only
    cells = P.random_blocks(0.3, seed=2, cell=32, num_heads=2)
    cases = [(P.random_blocks(0.3, seed=1, cell=32, num_heads=2) | P.local_window(40), 333),
             (cells, 320), (cells, 333), (P.local_window(5), 320)]
    only_full, only_partial = (p.block_structure(n, 32) for p, n in (cases[1], cases[3]))
    assert not (only_full.active ^ only_full.full).any() and not only_partial.full.any()
    for (pattern, length), order in itertools.product(cases, (None, "hilbert")):
        layout = pattern.block_structure(length, 32)
        widths = {"kv": int(layout.active.sum(-1).max()), "q": int(layout.active.sum(-2).max())}
        if pattern is cases[0][0]:
            assert widths["kv"] < layout.shape[2] and widths["q"] < layout.shape[1]
        rank = visit_rank(layout, order)
        wide = block_mask_from_layout(layout, pattern.predicate("cpu"), rank=rank)
        thin = block_mask_from_layout(layout, pattern.predicate("cpu"), rank=rank, narrow=True)
        for name in ("kv", "full_kv", "q", "full_q"):
            n, idx = getattr(wide, f"{name}_num_blocks"), getattr(wide, f"{name}_indices")
            assert torch.equal(getattr(thin, f"{name}_num_blocks"), n)
            narrow = getattr(thin, f"{name}_indices")
            assert narrow.shape[-1] == widths[name.removeprefix("full_")], (order, name)
            assert torch.equal(narrow, idx[..., :narrow.shape[-1]]), (order, name)


NARROW_PATTERNS = {  # several heads, rows much shorter than the grid, full and partial tiles
    "random": P.random_blocks(0.1, seed=4, cell=128, num_heads=4) | P.local_window(1),
    "dilated_causal": GPU_PATTERNS["dilated_causal"],
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(NARROW_PATTERNS))
def test_flex_on_narrow_lists_on_gpu(name, monkeypatch):
    """Narrow lists give what the whole ones give (output, log-sum-exp, gradients), and that
    is the oracle's."""
    from workbench.backends import flex as F

    pattern = NARROW_PATTERNS[name]
    q, k, v = (x.cuda() for x in make_qkv(b=1, h=4, s=1000, d=64, dtype=torch.float32))
    runs = {}
    for label, limit in (("narrow", 0), ("whole", 1 << 62)):
        monkeypatch.setattr(F, "NARROW_MIN_BYTES", limit)
        mask = F.build_block_mask(Problem(pattern.block_structure(1000, 128, "cuda"),
                                          pattern.predicate("cuda"), 0.1), "cuda")
        assert mask.kv_indices.shape[-1] == mask.full_kv_indices.shape[-1]
        assert (mask.q_indices.shape[-1] < 8) == (label == "narrow")
        out, lse = wb.block_sparse_attention(q, k, v, pattern, 128, backend="flex",
                                             return_lse=True)
        runs[label] = (out, lse, *torch.autograd.grad(out.sum(), (q, k, v)))
    for a, b in zip(runs["narrow"], runs["whole"]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    ref, rlse = wb.block_sparse_attention(q, k, v, pattern, 128, backend="reference",
                                          return_lse=True)
    torch.testing.assert_close(runs["narrow"][0], ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(runs["narrow"][1], rlse, atol=1e-4, rtol=1e-4)


def test_a_forward_only_mask_leaves_out_the_backward_lists_and_is_upgraded_when_needed():
    from workbench.backends import flex as F

    pattern = P.random_blocks(0.4, seed=2, cell=32, num_heads=2) & P.causal()
    layout = pattern.block_structure(300, 32)
    problem = Problem(layout, pattern.predicate("cpu"), 0.1, label=repr(pattern))
    both = build_block_mask(problem, "cpu")
    fwd = build_block_mask(problem, "cpu", backward=False)
    assert fwd.q_indices is None and fwd.full_q_indices is None
    assert both.q_indices is not None
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices"):
        assert torch.equal(getattr(fwd, name), getattr(both, name)), name
    first = F.cached_block_mask(problem, "cpu", backward=False)
    assert F.cached_block_mask(problem, "cpu", backward=False) is first
    upgraded = F.cached_block_mask(problem, "cpu", backward=True)  # a backward needs the lists
    assert upgraded.q_indices is not None
    assert F.cached_block_mask(problem, "cpu", backward=False) is upgraded  # serves both


@pytest.mark.parametrize("block_order", [None, "hilbert"])
@pytest.mark.parametrize("pattern, s", [
    (P.random_blocks(0.3, seed=5, cell=16, num_heads=3) | P.local_window(20), 300),
    ((P.strided(7) | P.local_window(7)) & P.causal(), 257),
    (P.dilated([64, 128], [1, 2], num_heads=2), 200),
])
def test_query_major_block_lists_equal_flexattentions_own(pattern, s, block_order):
    # the lists the backward reads, built from the layout, equal the ones FlexAttention derives
    # from the key-major lists
    from torch.nn.attention.flex_attention import BlockMask

    lay = pattern.block_structure(s, 32)
    ours = build_block_mask(Problem(lay, pattern.predicate("cpu"), 0.1, block_order=block_order),
                            "cpu")
    theirs = BlockMask.from_kv_blocks(ours.kv_num_blocks, ours.kv_indices,
                                      ours.full_kv_num_blocks, ours.full_kv_indices,
                                      BLOCK_SIZE=32, seq_lengths=ours.seq_lengths)
    for name in ("q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name)), name


@pytest.mark.slow
def test_reaching_the_recompile_limit_says_what_to_do(monkeypatch):
    from workbench.backends import flex as F

    torch._dynamo.reset()  # count from zero: the first call compiles, the next length may not
    monkeypatch.setattr(F, "RECOMPILE_LIMIT", 1)
    try:
        with pytest.raises(RuntimeError, match="recompile limit.*pad to a few"):
            for s in (64, 96):
                q, k, v = make_qkv(b=1, h=1, s=s, d=16, dtype=torch.float32,
                                   requires_grad=False)
                wb.block_sparse_attention(q, k, v, P.causal(), 32, backend="flex")
    finally:
        torch._dynamo.reset()
