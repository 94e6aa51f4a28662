"""Patterns: the block layout is exactly the token predicate reduced over tiles."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import grads, make_qkv, sdpa_oracle
from hypothesis import given, settings
from hypothesis import strategies as st

import workbench as wb
from workbench import patterns as P
from workbench.patterns.random_tiles import _hash_grid


def reduce_mask(mask: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(any, all) of a dense ``[H, S, S]`` mask over ``block x block`` tiles (padding ignored)."""
    h, s, _ = mask.shape
    n = -(-s // block)
    pad = n * block - s
    m = F.pad(mask, (0, pad, 0, pad)).view(h, n, block, n, block)
    real = F.pad(torch.ones(s, dtype=torch.bool), (0, pad))
    real = (real[:, None] & real[None, :]).view(1, n, block, n, block)
    return m.any(4).any(2), (m | ~real).all(4).all(2)


def primitives(heads: int):
    return st.one_of(
        st.just(P.full()),
        st.just(P.causal()),
        st.builds(P.local_window, st.integers(1, 40), st.booleans()),
        st.builds(P.global_tokens, st.integers(1, 20)),
        st.builds(P.strided, st.integers(1, 12)),
        st.builds(P.dilated_window, st.integers(1, 40), st.integers(1, 8), st.booleans()),
        st.builds(P.prefix_lm, st.integers(1, 100)),
        st.builds(P.documents, st.lists(st.integers(1, 30), min_size=1, max_size=6),
                  st.booleans()),
        st.builds(lambda d, s, c: P.random_blocks(d, s, cell=c, num_heads=heads),
                  st.floats(0.05, 1.0), st.integers(0, 5), st.integers(1, 16)),
        st.builds(lambda ws, c: P.dilated([w for w, _ in ws], [r for _, r in ws], heads, c),
                  st.lists(st.integers(1, 30).flatmap(
                      lambda w: st.tuples(st.just(w), st.integers(1, w))), min_size=1,
                      max_size=min(heads, 3)), st.booleans()),
    )


def patterns_strategy(heads: int = 3):
    prim = primitives(heads)
    return st.one_of(prim, st.builds(lambda a, b: a | b, prim, prim),
                     st.builds(lambda a, b: a & b, prim, prim),
                     st.builds(lambda a, b, c: (a | b) & c, prim, prim, prim))


@settings(max_examples=150, deadline=None)
@given(pattern=patterns_strategy(), seq_len=st.integers(1, 90), block=st.integers(1, 40))
def test_block_layout_equals_token_mask_reduced(pattern, seq_len, block):
    any_, all_ = reduce_mask(pattern.token_mask(seq_len), block)
    lay = pattern.block_structure(seq_len, block)
    assert torch.equal(lay.active.expand_as(any_), any_)
    assert torch.equal(lay.full.expand_as(all_), all_ & any_)
    assert torch.equal(pattern.block_layout(seq_len, block).expand_as(any_), any_)


@settings(max_examples=150, deadline=None)
@given(pattern=patterns_strategy(), seq_len=st.integers(1, 90), block=st.integers(1, 40),
       data=st.data())
def test_a_range_of_query_rows_equals_those_rows_of_the_token_mask(pattern, seq_len, block,
                                                                    data):
    # what one rank of a ring builds: its own query blocks against every key block
    nq = -(-seq_len // block)
    r0 = data.draw(st.integers(0, nq - 1), "first row")
    r1 = data.draw(st.integers(r0 + 1, nq), "end row")
    any_, all_ = reduce_mask(pattern.token_mask(seq_len), block)
    lay = pattern.block_structure(seq_len, block, rows=(r0, r1))
    assert lay.q_len == min(r1 * block, seq_len) - r0 * block
    assert torch.equal(lay.active.expand_as(any_[:, r0:r1]), any_[:, r0:r1])
    assert torch.equal(lay.full.expand_as(all_[:, r0:r1]), (all_ & any_)[:, r0:r1])


@settings(max_examples=150, deadline=None)
@given(pattern=patterns_strategy(), seq_len=st.integers(1, 90))
def test_a_pattern_is_constant_on_the_aligned_squares_of_its_grain(pattern, seq_len):
    first = torch.arange(seq_len) // pattern.grain() * pattern.grain()  # each square's corner
    m = pattern.token_mask(seq_len)
    assert torch.equal(m, m[:, first][:, :, first])


def test_grains_of_the_families_and_of_their_combinations():
    rb = P.random_blocks(0.5, cell=48, num_heads=2)
    sel = P.BlockSelection(torch.rand(2, 4, 4) < 0.5, 32, 100, 100)
    assert (rb.grain(), sel.grain(), P.global_tokens(40).grain()) == (48, 32, 40)
    assert (P.documents([64, 96]).grain(), P.documents([64, 96], causal=True).grain()) == (32, 1)
    assert (rb | P.random_blocks(0.5, cell=64)).grain() == 16 and (rb & sel).grain() == 16
    assert (rb & P.causal()).grain() == 1 and P.tile_batch(rb, 3).grain() == 48
    assert P.Permuted(rb, torch.randperm(100)[None]).grain() == 1  # a new order: no squares


def test_query_rows_must_be_a_range_of_blocks():
    for rows in [(0, 0), (-1, 2), (3, 2), (0, 5), (1.0, 2)]:
        with pytest.raises(ValueError, match="rows must be"):
            P.causal().block_structure(256, 64, rows=rows)


def test_a_random_layouts_rows_cost_only_their_memory():
    # 16 heads at 1M tokens in 128-token cells: 1 GiB of booleans for the whole layout, 1/64
    # of it for the 128 rows one rank of 64 holds. (The whole one is not built here.)
    pat = P.random_blocks(0.1, seed=0, cell=128, num_heads=16)
    lay = pat.block_structure(1 << 20, 128, rows=(4096, 4224))
    assert lay.active.shape == (16, 128, 8192)
    assert lay.active.untyped_storage().nbytes() == 16 * 128 * 8192


@settings(max_examples=40, deadline=None)
@given(pattern=patterns_strategy(), seq_len=st.integers(1, 70), block=st.integers(1, 30))
def test_density_counts_pairs(pattern, seq_len, block):
    mask = pattern.token_mask(seq_len).expand(pattern.num_heads, seq_len, seq_len)
    assert pattern.allowed_pairs(seq_len, block) == int(mask.sum())
    any_, _ = reduce_mask(mask, block)
    tiles = any_.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :seq_len, :seq_len]
    assert pattern.density(seq_len, block) == pytest.approx(tiles.float().mean().item())


@pytest.mark.parametrize("chunk", [1, 7, 1 << 24])
def test_tile_sums_are_exact_whatever_the_chunk(monkeypatch, chunk):
    from workbench import layout as L

    monkeypatch.setattr(L, "REDUCE_CHUNK", chunk)
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(3, 11, 13, generator=g) < 0.4
    lq, lk = torch.randint(1, 9, (11,), generator=g), torch.randint(1, 9, (13,), generator=g)
    weighted = (mask.to(torch.int64) * lq[:, None] * lk[None, :]).sum((1, 2))
    assert torch.equal(L.tile_sum(mask, lq, lk), weighted)
    assert torch.equal(L.tile_sum(mask), mask.sum((1, 2)))
    assert torch.equal(L.key_block_counts(mask), mask.sum((0, 1)))
    # through a layout's statistics and a pair count with no closed form (ragged last block)
    pattern = P.local_window(20, causal=True) | P.global_tokens(3)
    seq_len, block = 301, 16
    tokens = pattern.token_mask(seq_len).expand(1, seq_len, seq_len)
    assert pattern.allowed_pairs(seq_len, block) == int(tokens.sum())
    any_, _ = reduce_mask(tokens, block)
    st_ = pattern.block_structure(seq_len, block).stats()
    assert st_.active_blocks == int(any_.sum())
    tiles = any_.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :seq_len, :seq_len]
    assert st_.density == pytest.approx(tiles.float().mean().item())


def test_block_layout_never_builds_seq_squared():
    # 1M tokens: a dense [S, S] bool would need 1 TiB; the layout is (S/128)^2 per head.
    s = 1 << 20
    lay = (P.local_window(512, causal=True) | P.global_tokens(64)).block_structure(s, 128)
    assert lay.shape == (1, 8192, 8192)
    st_ = lay.stats()
    assert 0 < st_.density < 0.01
    dil = P.dilated([2048, 4096, 8192, 16384], [1, 2, 4, 8], 4).block_structure(s, 512)
    assert dil.shape == (4, 2048, 2048)


def test_token_mask_refuses_huge_lengths():
    with pytest.raises(ValueError, match="block_layout"):
        P.causal().token_mask(1 << 16)


def test_local_window_semantics():
    m = P.local_window(3).token_mask(6)[0]
    assert m[3].tolist() == [False, True, True, True, True, True]
    m = P.local_window(3, causal=True).token_mask(6)[0]
    assert m[3].tolist() == [False, True, True, True, False, False]
    assert int(m.sum(1).max()) == 3


def test_dilated_head_groups_and_offsets():
    p = P.dilated([4, 8], [1, 2], num_heads=5)
    # 5 heads over 2 groups: the first group gets the extra head.
    assert P.head_groups(5, 2) == [0, 0, 0, 1, 1]
    m = p.token_mask(16)
    assert m.shape == (5, 16, 16)
    # head 0 (w=4, r=1): dense 4x4 diagonal blocks
    assert torch.equal(m[0], torch.block_diag(*[torch.ones(4, 4, dtype=torch.bool)] * 4))
    # head 3 (w=8, r=2, offset 3 % 2 = 1): odd positions of each 8-segment
    kept = torch.tensor([i % 8 % 2 == 1 for i in range(16)])
    seg = torch.arange(16) // 8
    expect = kept[:, None] & kept[None, :] & (seg[:, None] == seg[None, :])
    assert torch.equal(m[3], expect)
    # head 4 offset 0
    assert m[4][0, 2] and not m[4][1, 1]


def test_dilated_last_segment_is_the_remainder():
    m = P.dilated([8], [2], num_heads=1).token_mask(11)[0]
    # positions 8 and 10 form the short last segment (offset 0 kept), 9 is dropped
    assert m[8, 10] and m[10, 8] and not m[9].any() and not m[8, 6]


KNOBS = [
    (lambda x: P.local_window(x), 4, 20, 8),
    (lambda x: P.local_window(x, causal=True), 4, 20, 8),
    (lambda x: P.global_local(x, 8), 3, 20, 8),
    (lambda x: P.strided(x), 50, 70, 8),
    (lambda x: P.random_blocks(x, seed=0, cell=8), 0.1, 0.5, 8),
    (lambda x: P.random_blocks(0.3, seed=x, cell=8), 1, 2, 8),
    (lambda x: P.dilated([x, 64], [1, 2], num_heads=2), 16, 32, 8),
    # in natural order a dilation only shows in the layout once tiles are finer than it
    (lambda x: P.dilated([32, 64], [1, x], num_heads=2), 2, 4, 2),
]


@pytest.mark.parametrize("make, a, b, block", KNOBS)
def test_every_knob_changes_the_layout(make, a, b, block):
    pa, pb = make(a), make(b)
    assert not torch.equal(pa.token_mask(200), pb.token_mask(200))
    assert not torch.equal(pa.block_layout(200, block), pb.block_layout(200, block))


def test_random_blocks_density_is_near_requested():
    p = P.random_blocks(0.1, seed=3, cell=64)
    d = p.density(64 * 200, 64)
    assert abs(d - 0.1) < 0.01
    assert p.density(64 * 200) == pytest.approx(d)  # cells align with blocks: no waste


def test_heads_must_match_to_combine():
    with pytest.raises(ValueError, match="heads"):
        P.dilated([8], [1], 4) | P.dilated([8], [1], 3)
    assert (P.dilated([8], [1], 4) | P.causal()).num_heads == 4


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: P.local_window(0), "window"),
        (lambda: P.local_window(2.5), "window"),
        (lambda: P.strided(0), "stride"),
        (lambda: P.global_local(0, 4), "num_global"),
        (lambda: P.random_blocks(0.0), "density"),
        (lambda: P.random_blocks(1.5), "density"),
        (lambda: P.dilated([8, 16], [1], 4), "same length"),
        (lambda: P.dilated([8], [16], 4), "larger than its segment"),
        (lambda: P.dilated([8, 16, 32], [1, 2, 4], 2), "num_heads"),
        (lambda: P.dilated(8, 1, 2), "segment_lengths"),
        (lambda: P.causal().block_layout(16, 0), "block_size"),
        (lambda: P.causal().block_layout(0, 4), "seq_len"),
    ],
)
def test_bad_pattern_arguments_raise_naming_them(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_describe_reports_waste():
    row = P.describe(P.dilated([64, 128], [1, 4], 4), 512, 32)
    assert row["computed_density"] >= row["useful_density"] > 0
    assert row["waste"] >= 1
    assert "dilated" in row["pattern"]


def test_layout_stats_on_truncated_last_block():
    lay = wb.patterns.full().block_structure(10, 4)
    assert lay.stats().density == pytest.approx(1.0)
    assert lay.stats().active_blocks == 9


@pytest.mark.parametrize("factor", [2, 3])
def test_coarsen_equals_layout_at_the_larger_block(factor):
    pattern = (P.local_window(30, causal=True) | P.global_tokens(5)) & P.strided(2) | P.causal()
    for pat in (pattern, P.dilated([40, 64], [1, 2], 3)):
        fine = pat.block_structure(301, 16).coarsen(factor)
        coarse = pat.block_structure(301, 16 * factor)
        assert torch.equal(fine.active, coarse.active)
        assert torch.equal(fine.full, coarse.full)


@pytest.mark.parametrize("pattern", [
    P.full(), P.causal(), P.local_window(7), P.local_window(7, causal=True), P.global_tokens(5),
    P.strided(4), P.strided(1), P.random_blocks(0.4, seed=1, cell=6, num_heads=2),
    P.dilated([16, 24, 50], [1, 3, 7], 5), P.dilated_branch(13, 4, 3), P.dilated_window(7, 3),
    P.dilated_window(9, 2, causal=True), P.dilated_window(200, 5), P.prefix_lm(1),
    P.prefix_lm(13), P.prefix_lm(500), P.documents([7, 1, 30, 2]),
    P.documents([7, 1, 30, 2], causal=True), P.documents([3] * 50, causal=True),
])
@pytest.mark.parametrize("seq_len", [1, 45, 100])
def test_closed_form_pair_counts(pattern, seq_len):
    mask = pattern.token_mask(seq_len).expand(pattern.num_heads, seq_len, seq_len)
    assert pattern.count_pairs(seq_len) == int(mask.sum())


def rect_mask(pattern, q_len: int, k_len: int) -> torch.Tensor:
    """Dense ``[H, q_len, k_len]`` mask of a rectangular problem, from the token predicate."""
    h = torch.arange(pattern.num_heads)[:, None, None]
    q, k = torch.arange(q_len)[None, :, None], torch.arange(k_len)[None, None, :]
    return pattern.allowed(h, q, k).expand(pattern.num_heads, q_len, k_len)


def reduce_rect(mask: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(any, all) of a dense ``[H, Sq, Sk]`` mask over tiles (padding ignored)."""
    h, sq, sk = mask.shape
    nq, nk = -(-sq // block), -(-sk // block)
    m = F.pad(mask, (0, nk * block - sk, 0, nq * block - sq)).view(h, nq, block, nk, block)
    real = F.pad(torch.ones(sq, sk, dtype=torch.bool), (0, nk * block - sk, 0, nq * block - sq))
    real = real.view(1, nq, block, nk, block)
    return m.any(4).any(2), (m | ~real).all(4).all(2)


@settings(max_examples=120, deadline=None)
@given(pattern=patterns_strategy(), q_len=st.integers(1, 90), k_len=st.integers(1, 90),
       block=st.integers(1, 40))
def test_rectangular_layout_equals_token_mask_reduced(pattern, q_len, k_len, block):
    # Toeplitz (offset-only) layouts fix the ragged last row and column separately, and
    # dilated heads share work: both must stay exact when q_len != k_len.
    any_, all_ = reduce_rect(rect_mask(pattern, q_len, k_len), block)
    lay = pattern.block_structure(q_len, block, k_len=k_len)
    assert torch.equal(lay.active.expand_as(any_), any_)
    assert torch.equal(lay.full.expand_as(all_), all_)


@pytest.mark.parametrize("pattern", [
    P.strided(7) | P.local_window(5),
    (P.strided(3) & P.local_window(20, causal=True)) | P.causal(),
    P.dilated([24, 48], [1, 4], 8, causal=True),
    P.dilated_branch(32, 4, 6) | P.local_window(3),
    (P.local_window(9) | P.global_tokens(5)) & P.causal(),
])
@pytest.mark.parametrize("q_len, k_len, block", [(203, 203, 8), (203, 150, 8), (97, 260, 16)])
def test_periodic_and_toeplitz_fast_paths_are_exact(pattern, q_len, k_len, block):
    # Long enough that many undecided tiles are shifts of one another by the period.
    any_, all_ = reduce_rect(rect_mask(pattern, q_len, k_len), block)
    lay = pattern.block_structure(q_len, block, k_len=k_len)
    assert torch.equal(lay.active.expand_as(any_), any_)
    assert torch.equal(lay.full.expand_as(all_), all_)
    assert pattern.allowed_pairs(q_len, block) == int(rect_mask(pattern, q_len, q_len).sum())


def test_dilated_heads_sharing_a_block_view_are_copied_exactly():
    # Offsets a block cannot tell apart give identical layouts, computed once.
    p = P.dilated([64, 128, 256], [2, 4, 8], 12)
    lay = p.block_structure(1000, 32)
    any_, all_ = reduce_rect(rect_mask(p, 1000, 1000), 32)
    assert torch.equal(lay.active, any_) and torch.equal(lay.full, all_)
    branch = P.dilated_branch(64, 4, 8).block_structure(500, 16)
    assert branch.shape == (8, 32, 32)
    assert torch.equal(branch.active[0], branch.active[7])


@given(seed=st.integers(0, 2**31 - 1), heads=st.lists(st.integers(0, 300), min_size=1,
                                                    max_size=3),
       first=st.integers(0, 1000), rows=st.integers(1, 40), cols=st.integers(1, 40),
       threshold=st.integers(0, 1 << 24))
@settings(max_examples=100, deadline=None)
def test_hash_grid_matches_the_token_hash(seed, heads, first, rows, cols, threshold):
    # The int32 grid path (products wrap) must pick exactly the cells the int64 hash picks,
    # for any range of cell rows.
    h = torch.tensor(heads)[:, None, None]
    i = torch.arange(first, first + rows)[None, :, None]
    j = torch.arange(cols)[None, None, :]
    expect = P.hash_cells(seed, h, i, j) < threshold
    got = _hash_grid(seed, heads, (first, first + rows), cols, threshold, torch.device("cpu"))
    assert torch.equal(got, expect)


def test_hash_cells_is_the_recorded_hash():
    # Pinned values: layouts and recorded densities depend on this exact hash.
    def reference(seed, h, i, j):
        m = 0xFFFFFFFF
        x = (h * 0x9E3779B1 + i * 0x85EBCA77 + j * 0xC2B2AE3D + seed * 0x27D4EB2F) & m
        for mul in (0x7FEB352D, 0x846CA68B):
            x ^= x >> 16
            x = (x * mul) & m
        return (x ^ (x >> 16)) >> 8

    for seed, h, i, j in [(0, 0, 0, 0), (3, 5, 1000, 77), (2**31 - 1, 300, 2**20, 2**21 - 1)]:
        got = P.hash_cells(seed, torch.tensor(h), torch.tensor(i), torch.tensor(j))
        assert int(got) == reference(seed, h, i, j)


@pytest.mark.parametrize("cell, block", [(1, 2), (2, 8), (3, 9), (1, 16), (4, 16), (7, 7),
                                         (16, 4), (6, 4)])
@pytest.mark.parametrize("seq_len", [101, 61])
def test_random_tiles_built_in_bands_equal_the_token_mask(monkeypatch, cell, block, seq_len):
    # Bands of a tile row or two, hashed a few cells at a time: every band edge and hash step
    # lands inside the grid, on odd lengths whose last tile and cell are short.
    from workbench.patterns import random_tiles

    monkeypatch.setitem(random_tiles._BAND_CELLS, "cpu", 64)
    monkeypatch.setitem(random_tiles._HASH_STEP, "cpu", 5)
    pattern = P.random_blocks(0.35, seed=4, cell=cell, num_heads=3)
    any_, all_ = reduce_mask(pattern.token_mask(seq_len), block)
    nq = -(-seq_len // block)
    for rows in ((0, nq), (1, nq), (nq - 1, nq)):
        lay = pattern.block_structure(seq_len, block, rows=rows)
        assert torch.equal(lay.active, any_[:, rows[0]:rows[1]])
        assert torch.equal(lay.full, (all_ & any_)[:, rows[0]:rows[1]])


@pytest.mark.parametrize("cell, block", [(8, 16), (8, 24), (16, 8), (24, 8), (5, 15), (12, 4),
                                         (7, 10)])
@pytest.mark.parametrize("seq_len", [96, 101, 7])
def test_random_tiles_at_block_sizes_that_are_multiples_or_divisors_of_the_cell(cell, block,
                                                                                seq_len):
    pattern = P.random_blocks(0.4, seed=2, cell=cell, num_heads=2)
    any_, all_ = reduce_mask(pattern.token_mask(seq_len), block)
    nq = -(-seq_len // block)
    for rows in ((0, nq), (nq // 2, nq), (nq - 1, nq)):
        lay = pattern.block_structure(seq_len, block, rows=rows)
        assert torch.equal(lay.active, any_[:, rows[0]:rows[1]])
        assert torch.equal(lay.full, (all_ & any_)[:, rows[0]:rows[1]])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cell, block", [(8, 16), (16, 128), (32, 64), (64, 64), (256, 64),
                                         (3, 9), (6, 4)])
@pytest.mark.parametrize("seq_len", [101, 1000])
def test_random_tiles_on_the_gpu_equal_the_token_mask(cell, block, seq_len):
    """On CUDA, blocks of 1-8 cells a side or a divisor of one take the Triton kernel, the
    others PyTorch's path."""
    pattern = P.random_blocks(0.2, seed=2**33 + 1, cell=cell, num_heads=3)
    any_, all_ = reduce_mask(pattern.token_mask(seq_len), block)
    nq = -(-seq_len // block)
    for rows in ((0, nq), (nq // 2, nq)):
        lay = pattern.block_structure(seq_len, block, "cuda", rows=rows)
        assert torch.equal(lay.active.cpu(), any_[:, rows[0]:rows[1]])
        assert torch.equal(lay.full.cpu(), (all_ & any_)[:, rows[0]:rows[1]])


def test_dilated_window_semantics():
    m = P.dilated_window(7, 3).token_mask(12)[0]
    assert m[6].nonzero().flatten().tolist() == [0, 3, 6, 9]  # |i - j| < 7, (i - j) % 3 == 0
    m = P.dilated_window(7, 3, causal=True).token_mask(12)[0]
    assert m[6].nonzero().flatten().tolist() == [0, 3, 6]
    assert P.dilated_window(5, 1) == P.local_window(5)  # the same pairs: equal
    assert P.dilated_window(6, 2).offset_rule() is not None  # Toeplitz: an analytic layout


# --------------------------------------------------------------------- packed documents, prefix LM
def documents_mask(lengths, causal, q_len, k_len):
    """Brute force: the dense mask of packed documents, position by position."""
    doc = [d for d, n in enumerate(lengths) for _ in range(n)]
    m = torch.zeros(1, q_len, k_len, dtype=torch.bool)
    for i in range(min(q_len, len(doc))):
        for j in range(min(k_len, len(doc))):
            m[0, i, j] = doc[i] == doc[j] and (j <= i or not causal)
    return m


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths, q_len, k_len", [
    ([7, 20, 1, 13, 20], 61, 61),  # every position in a document
    ([7, 20, 1, 13], 61, 61),      # positions 41.. are padding
    ([30, 2, 29], 45, 70),         # rectangular, keys past the documents
])
def test_documents_are_the_brute_force_mask(lengths, causal, q_len, k_len):
    pattern = P.documents(lengths, causal)
    expect = documents_mask(lengths, causal, q_len, k_len)
    assert torch.equal(rect_mask(pattern, q_len, k_len), expect)
    for block in (1, 4, 7, 16):
        any_, all_ = reduce_rect(expect, block)
        lay = pattern.block_structure(q_len, block, k_len=k_len)
        assert torch.equal(lay.active, any_) and torch.equal(lay.full, all_)
    assert pattern.allowed_pairs(q_len) == int(documents_mask(lengths, causal, q_len, q_len).sum())
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    assert P.Documents.from_cu_seqlens(cu, causal) == pattern


@pytest.mark.parametrize("backend, ring", [("blockwise", 1), ("blockwise", 3), ("reference", 1),
                                           ("auto", 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_documents_attend_as_sdpa_and_padding_gets_nothing(backend, ring, causal):
    lengths, s, total = [7, 20, 1, 13], 61, 41
    q, k, v = make_qkv(b=2, h=3, s=s, d=8)
    out = wb.block_sparse_attention(q, k, v, P.documents(lengths, causal), 16, backend=backend,
                                    ring_chunks=ring)
    real = [x[:, :, :total] for x in (q, k, v)]
    ref = sdpa_oracle(*real, documents_mask(lengths, causal, total, total))
    torch.testing.assert_close(out[:, :, :total], ref)
    assert not out[:, :, total:].any()  # padding attends nothing
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, real, dout[:, :, :total])
    for g, w in zip(got, want):
        torch.testing.assert_close(g[:, :, :total], w[:, :, :total])
        assert not g[:, :, total:].any()


def test_packed_documents_at_long_lengths_are_decided_per_tile(monkeypatch):
    def no_tokens(*args, **kwargs):
        raise AssertionError("a tile was evaluated token by token")

    monkeypatch.setattr(P.base, "evaluate_tiles", no_tokens)
    lengths = [4096 * (1 + i % 7) + 13 * i for i in range(64)]
    s = sum(lengths)  # about 1M tokens
    for pattern in (P.documents(lengths, causal=True), P.prefix_lm(100_003)):
        lay = pattern.block_structure(s, 256, rows=(1000, 1100))  # any rows, no tokens
        assert lay.shape == (1, 100, -(-s // 256))
        assert pattern.density(s, 256) >= pattern.density(s) > 0  # counted in closed form
    n = torch.tensor(lengths)
    assert P.documents(lengths, causal=True).allowed_pairs(s) == int((n * (n + 1) // 2).sum())


def test_prefix_lm_is_bidirectional_over_the_prefix_and_causal_after():
    s, prefix = 53, 11
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    expect = ((j <= i) | ((i < prefix) & (j < prefix)))[None]
    pattern = P.prefix_lm(prefix)
    assert torch.equal(pattern.token_mask(s), expect)
    assert pattern.token_mask(s)[0, 3, 10] and not pattern.token_mask(s)[0, 3, 11]
    assert torch.equal(P.prefix_lm(1).token_mask(s), P.causal().token_mask(s))
    assert P.prefix_lm(1).dense_form() == "causal" and pattern.dense_form() is None
    q, k, v = make_qkv(b=1, h=2, s=s, d=8)
    for backend in ("blockwise", "reference"):
        out = wb.block_sparse_attention(q, k, v, pattern, 8, backend=backend)
        ref = sdpa_oracle(q, k, v, expect)
        torch.testing.assert_close(out, ref)
        for g, w in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
            torch.testing.assert_close(g, w)


@pytest.mark.parametrize("call, error, match", [
    (lambda: P.documents([]), ValueError, "lengths must be a non-empty"),
    (lambda: P.documents(5), TypeError, "lengths must be a sequence of ints"),
    (lambda: P.documents([3, 0, 2]), ValueError, r"lengths\[1\] must be >= 1"),
    (lambda: P.documents([3, -2]), ValueError, r"lengths\[1\]"),
    (lambda: P.documents([3, 2.0]), TypeError, r"lengths\[1\] must be an int"),
    (lambda: P.documents(torch.tensor([3.0, 2.0])), TypeError, r"lengths\[0\]"),
    (lambda: P.documents([True]), TypeError, r"lengths\[0\]"),
    (lambda: P.documents([2**30, 2**30]), ValueError, "more than"),
    (lambda: P.Documents.from_cu_seqlens([0]), ValueError, "cu_seqlens must start at 0"),
    (lambda: P.Documents.from_cu_seqlens([1, 4]), ValueError, "cu_seqlens must start at 0"),
    (lambda: P.Documents.from_cu_seqlens([0, 4, 4, 9]), ValueError, "increase strictly"),
    (lambda: P.Documents.from_cu_seqlens(torch.tensor([0.0, 4.0])), TypeError, "cu_seqlens"),
    (lambda: P.prefix_lm(0), ValueError, "prefix"),
    (lambda: P.prefix_lm(2.5), TypeError, "prefix"),
])
def test_bad_document_and_prefix_arguments_raise_naming_them(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("call, match", [
    (lambda: P.KeyMask([[True, False]]), r"valid must be a bool \[heads, keys\] tensor, got list"),
    (lambda: P.KeyMask(torch.ones(4, dtype=torch.bool)), r"valid .* got torch.bool \(4,\)"),
    (lambda: P.DenseMask(torch.ones(1, 3, 3)), r"allowed .* got torch.float32 \(1, 3, 3\)"),
    (lambda: P.DenseMask(None), "allowed must be a bool .* got NoneType"),
    (lambda: P.BlockSelection((1, 2), 32, 64, 64), "selected must be a bool .* got tuple"),
])
def test_masks_that_are_not_bool_tensors_of_their_dims_raise_naming_them(call, match):
    with pytest.raises(TypeError, match=match):
        call()


def test_documents_and_prefix_lm_are_equal_by_value():
    assert P.documents([3, 4], causal=True) == P.documents((3, 4), True)
    assert P.documents([3, 4]) != P.documents([3, 4], causal=True)
    assert P.documents(torch.tensor([3, 4])) == P.documents([3, 4])
    assert P.prefix_lm(5) == P.prefix_lm(5) != P.prefix_lm(6)
    assert repr(P.documents([3, 4], causal=True)) == "documents([3, 4], causal=True)"
    assert "64 documents" in repr(P.documents([2] * 64))


# --------------------------------------------------------------------- the family registry
def dense_attention(q, k, v, mask):
    """Float64 softmax attention over the allowed keys (``mask [H or 1, Sq, Sk]``); a query
    with no allowed key outputs zeros."""
    s = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
    p = torch.softmax(s.masked_fill(~mask, -math.inf), -1).nan_to_num(0.0)
    return p @ v.double()


@pytest.mark.parametrize("name", list(P.FAMILIES))
@pytest.mark.parametrize("q_len, k_len, block", [(333, 333, 16), (601, 250, 32), (77, 130, 24)])
def test_every_family_layout_equals_its_token_mask_reduced(name, q_len, k_len, block):
    pattern = P.family(name).pattern(q_len, num_heads=4)
    any_, all_ = reduce_rect(rect_mask(pattern, q_len, k_len), block)
    lay = pattern.block_structure(q_len, block, k_len=k_len)
    assert torch.equal(lay.active.expand_as(any_), any_)
    assert torch.equal(lay.full.expand_as(all_), all_)
    mask = pattern.token_mask(q_len).expand(pattern.num_heads, q_len, q_len)
    assert pattern.allowed_pairs(q_len, block) == int(mask.sum())


@pytest.mark.parametrize("name", list(P.FAMILIES))
@pytest.mark.parametrize("backend", ["blockwise", "reference"])
def test_every_family_attends_as_the_dense_reference(name, backend):
    s = 301
    pattern = P.family(name).pattern(s, num_heads=4)
    q, k, v = make_qkv(b=1, h=4, s=s, d=8, requires_grad=False)
    out = wb.block_sparse_attention(q, k, v, pattern, 32, backend=backend)
    torch.testing.assert_close(out, dense_attention(q, k, v, pattern.token_mask(s)))


def test_families_are_looked_up_and_registered_by_name(monkeypatch):
    with pytest.raises(ValueError, match="unknown family 'spiral'; choose from full, causal"):
        P.family("spiral")
    with pytest.raises(ValueError, match="already registered"):
        P.register_family(P.FAMILIES["local"])
    with pytest.raises(ValueError, match="are not arguments"):
        P.register_family(P.Family("x", "", P.strided, ("window",), lambda s, h: {}))
    with pytest.raises(ValueError, match="has no argument"):
        P.family("local").pattern(1024, window=8, dilation=2)
    assert P.family("local").pattern(1024, window=8) == P.local_window(8, causal=True)
    monkeypatch.setattr(P.families, "FAMILIES", dict(P.FAMILIES))  # registered for this test
    added = P.register_family(P.Family("stripes", "every 3rd offset", P.strided, ("stride",),
                                       lambda s, h: {"stride": 3}))
    assert P.family("stripes") is added and added.pattern(10) == P.strided(3)


# --------------------------------------------------------------------- a user's own pattern
class Checker(P.Pattern):
    """A pattern defined by ``allowed`` alone: a checkerboard of 16-token squares."""

    def allowed(self, h, q, k):
        return ((q // 16 + k // 16) % 2) == 0


@pytest.mark.parametrize("q_len, k_len, block", [(77, 77, 16), (77, 130, 16), (77, 50, 24),
                                                 (1, 1, 1), (40, 33, 7)])
def test_a_pattern_defined_by_allowed_alone_has_an_exact_layout(q_len, k_len, block):
    pattern = Checker()
    any_, all_ = reduce_rect(rect_mask(pattern, q_len, k_len), block)
    lay = pattern.block_structure(q_len, block, k_len=k_len)
    assert torch.equal(lay.active.expand_as(any_), any_)
    assert torch.equal(lay.full.expand_as(all_), all_)
    nq = -(-q_len // block)
    rows = pattern.block_structure(q_len, block, k_len=k_len, rows=(nq // 2, nq))
    assert torch.equal(rows.active.expand_as(any_[:, nq // 2:]), any_[:, nq // 2:])
    assert pattern.allowed_pairs(q_len, block) == int(rect_mask(pattern, q_len, q_len).sum())
    assert pattern != Checker() and pattern == pattern  # no key(): equal only to itself


@pytest.mark.parametrize("backend", ["auto", "blockwise", "reference"])
@pytest.mark.parametrize("k_len", [77, 50])
def test_a_pattern_defined_by_allowed_alone_attends_as_the_dense_reference(backend, k_len):
    q, k, v = make_qkv(b=2, h=3, s=77, d=8, sk=k_len, requires_grad=False)
    out = wb.block_sparse_attention(q, k, v, Checker(), 16, backend=backend)
    ref = dense_attention(q, k, v, rect_mask(Checker(), 77, k_len))
    torch.testing.assert_close(out, ref)
    ring = wb.block_sparse_attention(q, k, v, Checker(), 16, backend=backend, ring_chunks=2)
    torch.testing.assert_close(ring, ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["flex", "triton"])
def test_a_pattern_defined_by_allowed_alone_runs_on_the_gpu_kernels(backend):
    dtype, tol = (torch.float32, 1e-4) if backend == "flex" else (torch.float16, 1e-2)
    q, k, v = (x.cuda() for x in make_qkv(b=1, h=2, s=333, d=64, dtype=dtype,
                                          requires_grad=False))
    out = wb.block_sparse_attention(q, k, v, Checker(), 64, backend=backend)
    ref = dense_attention(q, k, v, Checker().token_mask(333, "cuda"))
    torch.testing.assert_close(out.double(), ref.double(), atol=tol, rtol=tol)


def test_a_patterns_tile_rule_is_used_when_it_has_one():
    calls = []

    class Rows(P.Pattern):  # at blocks of 8, query block i attends key block i alone
        def allowed(self, h, q, k):
            return q // 8 == k // 8

        def tiles(self, q_len, k_len, block_size, device, rows):
            calls.append(rows)
            i = torch.arange(*rows)[:, None]
            j = torch.arange(-(-k_len // block_size))[None, :]
            return (i == j)[None], (i == j)[None]

    lay = Rows().block_structure(100, 8, rows=(2, 9))
    assert calls == [(2, 9)]
    any_, _ = reduce_rect(rect_mask(Rows(), 100, 100), 8)
    assert torch.equal(lay.active[0], any_[0, 2:9])

    class Wrong(Rows):
        def tiles(self, q_len, k_len, block_size, device, rows):
            return torch.ones(1, 3, 3, dtype=torch.bool), torch.ones(1, 3, 3, dtype=torch.bool)

    with pytest.raises(ValueError, match=r"Wrong.tiles must return two bool tensors \[1 or 1, "
                                         r"13, 13\], got \(1, 3, 3\)"):
        Wrong().block_structure(100, 8)


def test_a_pattern_without_allowed_says_what_to_define():
    with pytest.raises(NotImplementedError, match="Nothing must define allowed"):
        type("Nothing", (P.Pattern,), {})().block_structure(64, 16)


def test_a_pattern_defined_by_allowed_alone_is_evaluated_in_bounded_chunks(monkeypatch):
    sizes = []

    class Counted(Checker):
        def allowed(self, h, q, k):
            sizes.append(torch.broadcast_shapes(h.shape, q.shape, k.shape).numel())
            return super().allowed(h, q, k)

    monkeypatch.setattr(P.base, "_TILE_EVAL_BUDGET", 1 << 14)
    lay = Counted().block_structure(4096, 64, k_len=3000)
    assert max(sizes) <= 1 << 14 and sum(sizes) >= 4096 * 3000  # every pair, a chunk at a time
    # checkerboard squares of 16 tokens in tiles of 64: every tile is half on
    assert bool(lay.active.all()) and not bool(lay.full.any())


def test_a_long_pattern_defined_by_allowed_alone_never_builds_seq_squared():
    lay = Checker().block_structure(8192, 128)  # 64 M pairs, evaluated 16 M at a time
    assert lay.shape == (1, 64, 64) and bool(lay.active.all()) and not bool(lay.full.any())


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_table_patterns_answer_int32_and_int64_positions_alike(dtype):
    """Compiled masks ask with int32 positions: the key and dense tables read the same pairs
    (and nothing past their ends) as with int64."""
    g = torch.Generator().manual_seed(4)
    valid = torch.rand(2, 37, generator=g) < 0.6
    dense = torch.rand(1, 29, 37, generator=g) < 0.5
    h = torch.arange(2)[:, None, None]
    q, k = torch.arange(31)[None, :, None], torch.arange(40)[None, None, :]
    want_key = valid[:, None, :].expand(2, 31, 37)
    want_dense = F.pad(dense.expand(2, 29, 37), (0, 3, 0, 2))
    for pattern, want in ((P.KeyMask(valid), F.pad(want_key, (0, 3))),
                          (P.DenseMask(dense), want_dense)):
        got = pattern.predicate("cpu")(h, q.to(dtype), k.to(dtype))
        assert torch.equal(got, want), repr(pattern)
