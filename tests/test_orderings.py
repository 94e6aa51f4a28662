"""Token orderings of 2-D/3-D grids, the grid neighbourhood pattern, block visit orders
(the Hilbert post-pattern variant) and the LRU cache model."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import grads, make_qkv
from hypothesis import given, settings
from hypothesis import strategies as st
from test_patterns import reduce_mask
from torch.overrides import TorchFunctionMode

import workbench as wb

ORD = wb.orderings
P = wb.patterns


# --------------------------------------------------------------------- token orderings
@pytest.mark.parametrize("order", ["raster", "morton", "hilbert"])
def test_grid_permutation_and_inverse(order):
    perm = ORD.grid_permutation((6, 10), order)
    inv = ORD.inverse_permutation(perm)
    x = torch.randn(60)
    assert torch.equal(x[perm][inv], x)
    assert torch.equal(perm[inv], torch.arange(60))


def grid_mask_direct(shape, radius, order):
    """Dense mask of the neighbourhood computed straight from 2-D/3-D coordinates."""
    perm = ORD.grid_permutation(shape, order)
    coords = torch.stack(torch.unravel_index(perm, shape), dim=-1)
    diff = (coords[:, None, :] - coords[None, :, :]).abs()
    return (diff <= radius).all(-1)[None]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 11), min_size=2, max_size=3), st.integers(0, 4),
       st.sampled_from(wb.curves.CURVES), st.integers(1, 20))
def test_neighborhood_layout_is_exact(shape, radius, order, block):
    if order == "gilbert" and len(shape) == 3:
        order = "hilbert"  # gilbert is 2-D only
    pat = ORD.grid_neighborhood(shape, radius, order)
    s = math.prod(shape)
    mask = pat.token_mask(s)
    assert torch.equal(mask, grid_mask_direct(shape, radius, order))
    lay = pat.block_structure(s, block)
    any_, all_ = reduce_mask(mask, block)
    assert torch.equal(lay.active, any_)
    assert torch.equal(lay.full, all_ & any_)
    assert pat.allowed_pairs(s) == int(mask.sum())


@pytest.mark.parametrize("options", [{}, {"dilation": 2, "border": "shift"}])
def test_neighborhood_predicate_creates_no_tensors(options):
    pat = ORD.grid_neighborhood((8, 8), 1, "hilbert", **options)
    fn = pat.predicate("cpu")
    q = torch.arange(64)[:, None]
    k = torch.arange(64)[None, :]
    h = torch.zeros((), dtype=torch.int64)
    factories = {"arange", "tensor", "as_tensor", "zeros", "ones", "full", "empty", "to"}
    seen = []

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    with Spy():
        fn(h, q, k)
    assert not factories.intersection(seen), seen


def test_neighborhood_rejects_bad_arguments():
    with pytest.raises(ValueError, match="order"):
        ORD.grid_neighborhood((4, 4), 1, "zigzag")
    with pytest.raises(ValueError, match="radius"):
        ORD.grid_neighborhood((4, 4), -1)
    with pytest.raises(ValueError, match="seq_len = 16"):
        ORD.grid_neighborhood((4, 4), 1).block_structure(20, 4)


def test_hilbert_order_makes_local_attention_sparser():
    """The point of arXiv 2511.05832: a curve order puts a 2-D window into fewer tiles, when a
    block is smaller than a grid row (64 x 64 grid, 16-token blocks, radius 3)."""
    dens = {o: ORD.grid_neighborhood((64, 64), 3, o).density(4096, 16)
            for o in ("raster", "morton", "hilbert")}
    assert dens["hilbert"] < 0.6 * dens["raster"]
    assert dens["morton"] < 0.6 * dens["raster"]
    # ...but not always: blocks of two whole rows and radius 1 favour raster order
    narrow = {o: ORD.grid_neighborhood((32, 32), 1, o).density(1024, 64)
              for o in ("raster", "hilbert")}
    assert narrow["raster"] < narrow["hilbert"]


def test_neighborhood_attention_matches_oracle():
    pat = ORD.grid_neighborhood((7, 9), 2, "hilbert")
    q, k, v = make_qkv(b=1, h=2, s=63, d=8)
    out = wb.block_sparse_attention(q, k, v, pat, block_size=16, backend="blockwise")
    ref = wb.block_sparse_attention(q, k, v, pat, block_size=16, backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def natten_axis(n, c, radius, dilation, border):
    """Brute force, one axis: the key coordinates of a query at ``c``, NATTEN's definition."""
    sub = [x for x in range(n) if x % dilation == c % dilation]  # the query's dilated sub-grid
    if border == "cut":
        return {x for x in sub if abs(x - c) <= radius * dilation}
    k, t = 2 * radius + 1, sub.index(c)
    start = min(max(t - radius, 0), len(sub) - k)  # centred, shifted inwards at the border
    return set(sub[start:start + k])


def natten_mask(shape, radius, dilation, border, order):
    """Brute force: the dense mask, query cell by query cell, in the token order ``order``."""
    cells = [tuple(int(x) for x in torch.unravel_index(torch.tensor(p), shape))
             for p in ORD.grid_permutation(shape, order).tolist()]
    m = torch.zeros(1, len(cells), len(cells), dtype=torch.bool)
    for i, qc in enumerate(cells):
        window = [natten_axis(n, c, radius, dilation, border) for n, c in zip(shape, qc)]
        for j, kc in enumerate(cells):
            m[0, i, j] = all(c in w for c, w in zip(kc, window))
    return m


@pytest.mark.parametrize("border", ["shift", "cut"])
@pytest.mark.parametrize("dilation", [1, 2, 3])
@pytest.mark.parametrize("radius", [0, 1, 2])
@pytest.mark.parametrize("shape, order", [((7, 9), "raster"), ((9, 7), "hilbert"),
                                          ((11, 5), "gilbert"), ((8, 13), "morton"),
                                          ((5, 3, 6), "hilbert")])
def test_neighborhood_is_natten_s_definition(shape, order, radius, dilation, border):
    kernel = 2 * radius + 1
    if border == "shift" and kernel * dilation > min(shape):
        with pytest.raises(ValueError, match=r"border='shift' needs .* window spans"):
            P.grid_neighborhood(shape, radius, order, dilation=dilation, border=border)
        return
    pat = P.grid_neighborhood(shape, radius, order, dilation=dilation, border=border)
    s = math.prod(shape)
    mask = natten_mask(shape, radius, dilation, border, order)
    assert torch.equal(pat.token_mask(s), mask)
    if border == "shift":  # a fixed-size window: every query sees exactly prod(kernel) keys
        assert mask[0].sum(1).tolist() == [kernel ** len(shape)] * s
    for block in (5, 16):
        any_, all_ = reduce_mask(mask, block)
        lay = pat.block_structure(s, block)
        assert torch.equal(lay.active, any_) and torch.equal(lay.full, all_ & any_)
    assert pat.allowed_pairs(s) == int(mask.sum())


def test_neighborhood_radius_and_dilation_per_axis():
    shape = (6, 11)
    pat = P.grid_neighborhood(shape, (0, 2), "raster", dilation=(2, 1), border="shift")
    cells = [divmod(p, 11) for p in range(66)]
    expect = torch.tensor([[kr == qr and kc in natten_axis(11, qc, 2, 1, "shift")
                            for kr, kc in cells] for qr, qc in cells])
    assert torch.equal(pat.token_mask(66)[0], expect)
    assert repr(pat) == ("grid_neighborhood((6, 11), radius=(0, 2), order='raster', "
                         "dilation=(2, 1), border='shift')")
    assert ORD.grid_neighborhood is P.grid_neighborhood  # the orderings name is kept
    assert pat == P.grid_neighborhood(shape, [0, 2], "raster", dilation=[2, 1], border="shift")
    assert pat != P.grid_neighborhood(shape, (0, 2), "raster", dilation=(2, 1))


@pytest.mark.parametrize("backend", ["blockwise", "reference"])
def test_shifted_dilated_neighborhood_attends_as_sdpa(backend):
    shape, radius, dilation = (9, 7), 1, 2
    pat = P.grid_neighborhood(shape, radius, "hilbert", dilation=dilation, border="shift")
    mask = natten_mask(shape, radius, dilation, "shift", "hilbert")
    q, k, v = make_qkv(b=1, h=2, s=63, d=8)
    out = wb.block_sparse_attention(q, k, v, pat, 16, backend=backend, ring_chunks=3)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, ref)
    for g, w in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("kwargs, match", [
    ({"border": "wrap"}, "border must be one of"),
    ({"dilation": 0}, "dilation must be >= 1"),
    ({"dilation": (1, 2, 3)}, "dilation must be an int or one int per axis"),
    ({"radius": (1,)}, "radius must be an int or one int per axis"),
    ({"radius": 3, "border": "shift"}, r"axis 0 has 5 cells but the window spans 7 x 1 = 7"),
    ({"dilation": (1, 3), "border": "shift"}, r"axis 1 has 8 cells .* 3 x 3 = 9"),
])
def test_neighborhood_options_raise_naming_them(kwargs, match):
    args = {"radius": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        P.grid_neighborhood((5, 8), args.pop("radius"), "raster", **args)


# --------------------------------------------------------------------- block visit orders
@pytest.mark.parametrize("order", ["hilbert", "morton"])
def test_visit_order_is_a_permutation_of_the_tiles(order):
    lay = P.dilated([32, 64], [1, 2], num_heads=3).block_structure(200, 16)
    nat = ORD.block_visit_order(lay, None)
    cur = ORD.block_visit_order(lay, order)
    assert torch.equal(nat, lay.expand_heads(lay.num_heads).active.nonzero())
    key = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
    assert key(nat) == key(cur)
    assert bool((cur[1:, 0] >= cur[:-1, 0]).all())  # head by head


def test_hilbert_visit_of_full_square_grid_is_a_path():
    lay = P.full().block_structure(128, 16)  # 8 x 8 tiles
    t = ORD.block_visit_order(lay, "hilbert")
    steps = (t[1:, 1:] - t[:-1, 1:]).abs().sum(-1)
    assert bool((steps == 1).all())


PATTERNS = [
    P.local_window(40, causal=True) | P.global_tokens(5),
    P.dilated([32, 64], [1, 2], num_heads=4),
    ORD.grid_neighborhood((10, 13), 2, "hilbert"),
]


@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
@pytest.mark.parametrize("order", ["hilbert", "morton"])
def test_post_pattern_order_equals_natural_float64(pattern, order):
    q, k, v = make_qkv(b=2, h=4, s=130, d=16, dtype=torch.float64)
    kw = dict(block_size=16, backend="blockwise", return_lse=True)
    o0, l0 = wb.block_sparse_attention(q, k, v, pattern, **kw)
    o1, l1 = wb.block_sparse_attention(q, k, v, pattern, block_order=order, **kw)
    torch.testing.assert_close(o1, o0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(l1, l0, rtol=1e-12, atol=1e-12)
    g0 = grads(o0 + l0[..., None], (q, k, v))
    g1 = grads(o1 + l1[..., None], (q, k, v))
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_post_pattern_order_float32_and_ring():
    pattern = P.local_window(48) | P.strided(17)
    q, k, v = make_qkv(b=1, h=2, s=300, d=32, dtype=torch.float32, requires_grad=False)
    o0 = wb.block_sparse_attention(q, k, v, pattern, 32, backend="blockwise")
    o1 = wb.block_sparse_attention(q, k, v, pattern, 32, backend="blockwise", block_order="hilbert")
    torch.testing.assert_close(o1, o0, rtol=1e-5, atol=1e-6)
    o2 = wb.block_sparse_attention(q, k, v, pattern, 32, backend="blockwise", block_order="hilbert",
                                   ring_chunks=3)
    torch.testing.assert_close(o2, o0, rtol=1e-5, atol=1e-6)


def test_post_pattern_order_small_chunks(monkeypatch):
    """Curve order interleaves query rows inside a chunk and across chunks."""
    import workbench.backends.blockwise as bw

    monkeypatch.setitem(bw._SCORE_BUDGET, "cpu", 16 * 16 * 3)  # 3 tiles per chunk
    pattern = ORD.grid_neighborhood((8, 12), 3, "raster")
    q, k, v = make_qkv(b=1, h=1, s=96, d=8)
    o0 = wb.block_sparse_attention(q, k, v, pattern, 16, backend="reference")
    o1 = wb.block_sparse_attention(q, k, v, pattern, 16, backend="blockwise", block_order="hilbert")
    torch.testing.assert_close(o1, o0, rtol=1e-12, atol=1e-12)


def test_module_block_order_and_errors():
    pattern = P.local_window(32)
    attn = wb.BlockSparseAttention(pattern, 16, backend="blockwise", block_order="hilbert")
    assert "block_order='hilbert'" in repr(attn)
    q, k, v = make_qkv(b=1, h=2, s=100, d=8, requires_grad=False)
    ref = wb.block_sparse_attention(q, k, v, pattern, 16, backend="blockwise")
    torch.testing.assert_close(attn(q, k, v), ref, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="block_order"):
        wb.block_sparse_attention(q, k, v, pattern, 16, block_order="peano")
    with pytest.raises(ValueError, match="block_order"):
        wb.BlockSparseAttention(pattern, 16, block_order="zorder")


# --------------------------------------------------------------------- cache model
def brute_reuse(acc):
    out = []
    for t, a in enumerate(acc):
        prev = [i for i in range(t) if acc[i] == a]
        out.append(-1 if not prev else len(set(acc[prev[-1] + 1 : t]) - {a}))
    return out


def brute_lru_hits(acc, cap):
    cache, hits = [], 0
    for a in acc:
        if a in cache:
            hits += 1
            cache.remove(a)
        elif len(cache) == cap:
            cache.pop(0)
        cache.append(a)
    return hits


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 6), max_size=40), st.integers(1, 5))
def test_reuse_distance_and_lru_hits_match_brute_force(acc, cap):
    d = ORD.reuse_distances(acc)
    assert d.tolist() == brute_reuse(acc)
    assert int(((d >= 0) & (d < cap)).sum()) == brute_lru_hits(acc, cap)


def test_cache_model_rows():
    lay = ORD.grid_neighborhood((16, 16), 2, "hilbert").block_structure(256, 16)
    rows = ORD.cache_model(ORD.block_visit_order(lay, "hilbert"), [1, 4, 16, 1000])
    rates = [r["hit_rate"] for r in rows]
    assert rates == sorted(rates)
    acc = rows[0]["accesses"]
    assert acc == 2 * int(lay.active.sum())
    # with room for every block only the cold misses remain
    assert rows[-1]["hits"] == acc - rows[-1]["cold_misses"]
    with pytest.raises(ValueError, match="capacity"):
        ORD.cache_model(ORD.block_visit_order(lay), [0])
    (one,) = ORD.cache_model(torch.tensor([[0, 0, 1]]), [4])  # two blocks, each touched once
    assert (one["accesses"], one["hits"], one["cold_misses"]) == (2, 0, 2)
    assert math.isnan(one["mean_reuse_distance"]) and math.isnan(one["median_reuse_distance"])


@pytest.mark.slow
def test_neighborhood_runs_under_flex_on_cpu():
    """The predicate is a valid FlexAttention mask_mod (captured tables, no tensor creation)."""
    pat = ORD.grid_neighborhood((12, 16), 2, "hilbert")
    q, k, v = make_qkv(b=1, h=2, s=192, d=16, dtype=torch.float32, requires_grad=False)
    out = wb.block_sparse_attention(q, k, v, pat, 32, backend="flex")
    ref = wb.block_sparse_attention(q, k, v, pat, 32, backend="reference")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_permuted_with_one_order_per_head_moves_each_head_by_its_own():
    from workbench.orderings import dilation_permutation, permuted

    pattern = P.dilated([16, 32], [2, 4], num_heads=4)
    perms = torch.stack([dilation_permutation(70, w, r, h % r)
                         for h, (w, r) in enumerate([(16, 2), (16, 2), (32, 4), (32, 4)])])
    moved = permuted(pattern, perms)
    mask = pattern.token_mask(70)
    for h in range(4):
        p = perms[h]
        assert torch.equal(moved.token_mask(70)[h], mask[h][p][:, p])
    # the per-head dilation ordering packs every head's pairs into fewer tiles
    assert moved.density(70, 8) < pattern.density(70, 8)
    with pytest.raises(ValueError, match="rows"):
        permuted(pattern, perms[:3])
    with pytest.raises(ValueError, match="permutation"):
        permuted(pattern, torch.zeros(4, 70, dtype=torch.int64))
