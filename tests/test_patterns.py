"""Patterns: the block layout is exactly the token predicate reduced over tiles."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import workbench as wb
from workbench import patterns as P


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


@settings(max_examples=40, deadline=None)
@given(pattern=patterns_strategy(), seq_len=st.integers(1, 70), block=st.integers(1, 30))
def test_density_counts_pairs(pattern, seq_len, block):
    mask = pattern.token_mask(seq_len).expand(pattern.num_heads, seq_len, seq_len)
    assert pattern.allowed_pairs(seq_len, block) == int(mask.sum())
    any_, _ = reduce_mask(mask, block)
    tiles = any_.repeat_interleave(block, 1).repeat_interleave(block, 2)[:, :seq_len, :seq_len]
    assert pattern.density(seq_len, block) == pytest.approx(tiles.float().mean().item())


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
    P.dilated([16, 24, 50], [1, 3, 7], 5), P.dilated_branch(13, 4, 3),
])
@pytest.mark.parametrize("seq_len", [1, 45, 100])
def test_closed_form_pair_counts(pattern, seq_len):
    mask = pattern.token_mask(seq_len).expand(pattern.num_heads, seq_len, seq_len)
    assert pattern._count_pairs(seq_len) == int(mask.sum())
