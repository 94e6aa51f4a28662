"""The edges of the public API: non-finite inputs, empty batches, huge pattern arguments,
one-head patterns, layouts and caches that must not be confused, and arguments refused where
they are given."""

from __future__ import annotations

import copy
import gc
import math
import pickle

import pytest
import torch
from conftest import make_qkv, sdpa_oracle
from hypothesis import given, settings
from hypothesis import strategies as st

import workbench as wb
from workbench import patterns as P


# --------------------------------------------------------------------- non-finite inputs
def exact_oracle(q, k, v, mask, scale):
    """Float64 softmax attention summed over the allowed pairs only: the IEEE result of each
    row's own allowed terms (a disallowed pair contributes nothing, not ``0 * value``)."""
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, -math.inf)
    empty = ~mask.any(-1)
    lse = torch.logsumexp(s.masked_fill(empty[..., None], 0.0), -1)
    p = torch.exp(s - lse[..., None]).masked_fill(~mask, 0.0)
    terms = p[..., None] * v.double()[..., None, :, :]
    out = torch.where(mask[..., None], terms, 0.0).sum(-2)
    return out, lse.masked_fill(empty, -math.inf)


def same_nonfinite(a, b):
    """Equal NaN and infinity positions, close finite values."""
    assert torch.equal(a.isnan(), b.isnan())
    assert torch.equal(a.isinf(), b.isinf())
    assert torch.equal(a[a.isinf()], b[b.isinf()])
    ok = torch.isfinite(a)
    torch.testing.assert_close(a[ok], b[ok], atol=1e-9, rtol=1e-9)


POISONS = {
    "nan_key": ("k", 0, 5, 0, math.nan),
    "nan_value": ("v", 1, 12, 2, math.nan),
    "inf_value": ("v", 1, 20, 1, math.inf),
    "inf_query": ("q", 1, 30, 1, math.inf),
    "nan_query": ("q", 0, 3, 0, math.nan),
}


@pytest.mark.parametrize("poison", list(POISONS))
@pytest.mark.parametrize("backend", ["reference", "blockwise"])
@pytest.mark.parametrize("ring_chunks", [1, 2, 3])
def test_non_finite_inputs_reach_exactly_the_rows_allowed_to_see_them(poison, backend,
                                                                       ring_chunks):
    q, k, v = make_qkv(b=1, h=2, s=40, d=8, requires_grad=False)
    name, h, pos, d, value = POISONS[poison]
    {"q": q, "k": k, "v": v}[name][0, h, pos, d] = value
    pattern = P.local_window(6) & P.causal()
    mask = pattern.token_mask(40)
    out, lse = wb.block_sparse_attention(q, k, v, pattern, 8, backend=backend,
                                         return_lse=True, ring_chunks=ring_chunks)
    ref_out, ref_lse = exact_oracle(q, k, v, mask, 8 ** -0.5)
    assert not torch.isfinite(out).all()  # the poison reached some rows: the allowed ones
    same_nonfinite(out, ref_out)
    same_nonfinite(lse, ref_lse)


def test_a_row_with_a_nan_score_has_a_nan_lse_and_the_ring_agrees_with_one_shot():
    q, k, v = make_qkv(b=1, h=1, s=50, d=8, requires_grad=False)
    k[0, 0, 7, 3] = math.nan
    pattern = P.local_window(9)
    _, one = wb.block_sparse_attention(q, k, v, pattern, 8, backend="blockwise",
                                       return_lse=True)
    rows = pattern.token_mask(50)[0, :, 7]  # the queries allowed to see key 7
    assert torch.equal(one[0, 0].isnan(), rows)
    assert not one.isneginf().any()
    for chunks in (2, 3, 5):
        _, ring = wb.block_sparse_attention(q, k, v, pattern, 8, backend="blockwise",
                                            return_lse=True, ring_chunks=chunks)
        same_nonfinite(ring, one)


# --------------------------------------------------------------------- empty inputs
@pytest.mark.parametrize("shape", [(0, 2, 10, 4), (2, 0, 10, 4)])
@pytest.mark.parametrize("backend", ["auto", "blockwise", "reference", "flex"])
def test_no_batch_or_no_heads_gives_empty_results_with_gradients(shape, backend):
    q = torch.randn(shape, requires_grad=True)
    pattern = P.local_window(3)
    out, lse = wb.block_sparse_attention(q, q, q, pattern, 4, backend=backend,
                                         return_lse=True)
    assert out.shape == shape and lse.shape == shape[:3]
    out.sum().backward()
    assert q.grad.shape == shape
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, q, q)
    assert sdpa.shape == out.shape


# --------------------------------------------------------------------- pattern arguments
@pytest.mark.parametrize("window", [2**31, 2**63 - 1, 2**63, 2**64, 10**30])
def test_a_window_longer_than_any_sequence_allows_every_pair_in_reach(window):
    q, k, v = make_qkv(b=1, h=2, s=37, d=8, requires_grad=False)
    for causal in (False, True):
        pattern = P.local_window(window, causal=causal)
        mask = P.causal().token_mask(37) if causal else torch.ones(1, 37, 37, dtype=torch.bool)
        assert torch.equal(pattern.token_mask(37), mask)
        out = wb.block_sparse_attention(q, k, v, pattern, 8, backend="blockwise")
        torch.testing.assert_close(out, sdpa_oracle(q, k, v, mask))


def test_a_huge_number_of_global_tokens_is_every_token():
    pattern = P.global_tokens(2**70)
    assert bool(pattern.token_mask(20).all())
    assert pattern.allowed_pairs(20) == 400


@pytest.mark.parametrize("build", [
    lambda: P.strided(2**40), lambda: P.random_blocks(0.5, cell=2**40),
    lambda: P.dilated([2**40], [1], num_heads=2), lambda: P.dilated_branch(2**33, 2, 2),
])
def test_lengths_beyond_int32_positions_are_refused_by_name(build):
    with pytest.raises(ValueError, match=r"must be <= 2147483647"):
        build()


# --------------------------------------------------------------------- one-head patterns
ONE_HEAD = {
    "dilated_branch": P.dilated_branch(16, 2, 1),
    "dilated": P.dilated([16], [2], num_heads=1),
    "branch_and_causal": P.dilated_branch(8, 2, 1) & P.causal(),
    "branch_or_heads": P.dilated_branch(16, 4, 1) | P.dilated([8, 16], [1, 2], num_heads=3),
}


@pytest.mark.parametrize("name", list(ONE_HEAD))
@pytest.mark.parametrize("backend", ["blockwise", "reference", "auto"])
def test_a_one_head_pattern_broadcasts_over_every_head(name, backend):
    pattern = ONE_HEAD[name]
    q, k, v = make_qkv(b=2, h=3, s=70, d=8)
    mask = pattern.token_mask(70)
    out = wb.block_sparse_attention(q, k, v, pattern, 16, backend=backend)
    ref = sdpa_oracle(q, k, v, mask)
    rows = mask.any(-1)[None, ..., None].expand_as(ref)
    torch.testing.assert_close(out, torch.where(rows, ref, torch.zeros_like(ref)))


# --------------------------------------------------------------------- layouts and caches
def test_a_layout_of_another_pattern_is_refused():
    q, k, v = make_qkv(b=1, h=2, s=64, d=8, requires_grad=False)
    other = P.local_window(4).block_structure(64, 16)
    with pytest.raises(ValueError, match="layout was built for local_window"):
        wb.block_sparse_attention(q, k, v, P.local_window(40), 16, layout=other)
    # an equal pattern built separately may use it
    out = wb.block_sparse_attention(q, k, v, P.local_window(4), 16, layout=other)
    torch.testing.assert_close(out, wb.block_sparse_attention(q, k, v, P.local_window(4), 16))


def test_patterns_with_equal_definitions_are_equal():
    assert P.local_window(5) == P.local_window(5)
    assert hash(P.local_window(5)) == hash(P.local_window(5))
    assert P.local_window(5) != P.local_window(6)
    assert P.local_window(5, causal=True) != P.local_window(5)
    assert (P.strided(4) | P.causal()) == (P.strided(4) | P.causal())
    assert (P.strided(4) | P.causal()) != (P.strided(4) & P.causal())
    assert P.dilated([8, 16], [1, 2], 4) == P.dilated([8, 16], [1, 2], 4)
    assert P.random_blocks(0.5, seed=1) != P.random_blocks(0.5, seed=2)
    mask = torch.ones(1, 4, dtype=torch.bool)
    a, b = P.KeyMask(mask), P.KeyMask(mask.clone())
    assert a == a and a != b  # tensor-defined patterns compare by identity


def _deepcopied_or_pickled(module, how):
    return copy.deepcopy(module) if how == "deepcopy" else pickle.loads(pickle.dumps(module))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_module_never_serves_another_patterns_layout(how):
    q, k, v = make_qkv(b=1, h=2, s=70, d=8, requires_grad=False)
    reused = 0
    for _ in range(5):
        old = P.local_window(3)
        old_id = id(old)
        module = wb.BlockSparseAttention(old, block_size=16, backend="blockwise")
        module(q, k, v)
        copied = _deepcopied_or_pickled(module, how)
        del module, old
        gc.collect()
        # patterns of old's class (its allocation size) but another window: one takes its id
        fresh = [P.local_window(40) for _ in range(200)]
        same_id = [p for p in fresh if id(p) == old_id]
        reused += bool(same_id)
        copied.pattern = same_id[0] if same_id else fresh[0]
        ref = sdpa_oracle(q, k, v, copied.pattern.token_mask(70))
        torch.testing.assert_close(copied(q, k, v), ref)
    if not reused:  # the allocator never handed old's id to a new pattern: nothing was tried
        pytest.skip("no new pattern took the dropped pattern's id in 5 tries")


# --------------------------------------------------------------------- arguments
BAD_MODULE_ARGS = [
    ({"ring_chunks": 0}, ValueError, "ring_chunks"),
    ({"ring_chunks": 1.5}, ValueError, "ring_chunks"),
    ({"sharding": "bogus"}, ValueError, "sharding"),
    ({"scale": "x"}, TypeError, "scale"),
    ({"scale": math.nan}, TypeError, "scale"),
    ({"backend": "x"}, ValueError, "backend"),
    ({"block_order": "spiral"}, ValueError, "block_order"),
    ({"block_size": 0}, ValueError, "block_size"),
    ({"process_group": object()}, TypeError, "process_group"),
]


@pytest.mark.parametrize("kwargs, error, name", BAD_MODULE_ARGS)
def test_block_sparse_attention_module_refuses_bad_arguments_when_built(kwargs, error, name):
    with pytest.raises(error, match=name):
        wb.BlockSparseAttention(P.local_window(4), **kwargs)


FAMILIES = [
    P.full(), P.causal(), P.local_window(5), P.local_window(9, causal=True), P.global_tokens(3),
    P.strided(4) | P.local_window(2), P.random_blocks(0.3, seed=1, cell=8),
    P.dilated([8, 16], [1, 2], num_heads=2), P.dilated_branch(12, 3, 1) & P.causal(),
]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    family=st.sampled_from(range(len(FAMILIES))),
    batch=st.integers(0, 2), heads=st.sampled_from([1, 2]), q_len=st.integers(1, 40),
    head_dim=st.integers(1, 9), block_size=st.sampled_from([1, 3, 8, 16, 64]),
    ring_chunks=st.integers(1, 4), backend=st.sampled_from(["auto", "blockwise", "reference"]),
    block_order=st.sampled_from([None, "hilbert"]), return_lse=st.booleans(),
)
def test_every_argument_combination_is_exact_or_refused_by_name(
        family, batch, heads, q_len, head_dim, block_size, ring_chunks, backend, block_order,
        return_lse):
    pattern = FAMILIES[family]
    q, k, v = (torch.randn(batch, heads, q_len, head_dim, dtype=torch.float64)
               for _ in range(3))
    call = dict(backend=backend, ring_chunks=ring_chunks, block_order=block_order,
                return_lse=return_lse)
    if pattern.num_heads not in (1, heads):
        with pytest.raises(ValueError, match="pattern has"):
            wb.block_sparse_attention(q, k, v, pattern, block_size, **call)
        return
    try:
        result = wb.block_sparse_attention(q, k, v, pattern, block_size, **call)
    except ValueError as error:  # more ring chunks than blocks: refused by name
        assert "ring_chunks" in str(error) and ring_chunks > -(-q_len // block_size)
        return
    out, lse = result if return_lse else (result, None)
    mask = pattern.token_mask(q_len).expand(heads, q_len, q_len)
    ref, ref_lse = exact_oracle(q, k, v, mask, head_dim ** -0.5)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    if lse is not None:
        torch.testing.assert_close(lse.double(), ref_lse, atol=1e-10, rtol=1e-10)


BAD_CALLS = [
    ({"dropout_p": 0.5, "dropout_seed": -1}, ValueError, "dropout_seed"),
    ({"dropout_p": 0.5, "dropout_seed": "3"}, ValueError, "dropout_seed"),
    ({"dropout_p": 0.5, "dropout_seed": 2**70}, ValueError, "dropout_seed"),
    ({"dropout_p": 1.0}, ValueError, "dropout_p"),
    ({"return_lse": "yes"}, TypeError, "return_lse"),
    ({"block_size": 2**70}, ValueError, "block_size"),
]


@pytest.mark.parametrize("kwargs, error, name", BAD_MODULE_ARGS + BAD_CALLS)
def test_the_function_names_each_bad_argument(kwargs, error, name):
    q, k, v = make_qkv(b=1, h=1, s=8, d=4, requires_grad=False)
    args = {"block_size": 4, **kwargs}
    with pytest.raises(error, match=name):
        wb.block_sparse_attention(q, k, v, P.local_window(4), **args)


@pytest.mark.parametrize("pattern", [None, "local", 3, [P.causal()]])
def test_modules_name_a_pattern_that_is_not_one(pattern):
    with pytest.raises(TypeError, match="pattern must be a workbench Pattern"):
        wb.BlockSparseAttention(pattern)


@pytest.mark.parametrize("build, name", [
    (lambda: P.dilated([8], [1], num_heads=2**70), "num_heads"),
    (lambda: P.local_window(3).block_structure(2**40, 64), "seq_len"),
    (lambda: P.local_window(3).block_structure(64, 2**40), "block_size"),
    (lambda: wb.orderings.grid_neighborhood((2**40, 4), 1), "cells"),
    (lambda: wb.BlockSparseMultiheadAttention(2**70, 2), "embed_dim"),
    (lambda: wb.BlockSparseMultiheadAttention(8, True), "num_heads"),
])
def test_absurd_sizes_are_refused_by_name_before_any_allocation(build, name):
    with pytest.raises(ValueError, match=name):
        build()
