"""The main variant against PyTorch's own dense attention, forward and backward."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import grads, make_qkv, sdpa_oracle

import workbench as wb
from workbench import patterns as P

PATTERNS = {
    "local": P.local_window(37),
    "local_causal": P.local_window(50, causal=True),
    "causal": P.causal(),
    "global_local_causal": P.global_local(5, 21) & P.causal(),
    "sparse_transformer": P.strided(16) | P.local_window(16),
    "random": P.random_blocks(0.25, seed=2, cell=32) | P.local_window(1),
    "dilated": P.dilated([64, 160, 300], [1, 2, 5], num_heads=4),
    "dilated_causal": P.dilated([64, 300], [1, 3], num_heads=4, causal=True),
    "union_intersection": (P.local_window(40) | P.global_tokens(3)) & P.strided(2),
}


@pytest.mark.parametrize("name", list(PATTERNS))
@pytest.mark.parametrize("backend, s", [("blockwise", 1000), ("reference", 333)])
def test_matches_sdpa_forward_and_backward(name, backend, s):
    pattern = PATTERNS[name]
    q, k, v = make_qkv(b=2, h=4, s=s, d=16)  # lengths that are not multiples of the block
    mask = pattern.token_mask(s)
    has_empty_rows = not bool(mask.any(-1).all())
    out = wb.block_sparse_attention(q, k, v, pattern, block_size=64, backend=backend)
    ref = sdpa_oracle(q, k, v, mask)
    if has_empty_rows:  # SDPA gives NaN there; ours must give zeros
        rows = mask.any(-1)[None, ..., None].expand_as(out)
        assert torch.all(out[~rows] == 0)
        ref = torch.where(rows, ref, torch.zeros_like(ref))
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    for a, b in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("keeps_masks", [True, False])
def test_blockwise_evaluates_a_layouts_token_masks_once_within_its_budget(monkeypatch,
                                                                          keeps_masks):
    import workbench.backends.blockwise as bw

    if not keeps_masks:
        monkeypatch.setattr(bw, "MASK_BUDGET", 0)
    monkeypatch.setitem(bw._SCORE_BUDGET, "cpu", 2 * 64 * 64 * 5)  # 5 tiles a chunk, masks span
    evaluated = []
    real = bw._tile_masks
    monkeypatch.setattr(bw, "_tile_masks", lambda pr, t: evaluated.append(len(t)) or real(pr, t))
    # partial tiles, every row attends itself; a pattern object of its own, so a layout of its own
    pattern = P.random_blocks(0.25, seed=2, cell=32) | P.local_window(1)
    q, k, v = make_qkv(b=2, h=4, s=1000, d=16)
    attn = wb.BlockSparseAttention(pattern, 64, backend="blockwise")
    ref = sdpa_oracle(q, k, v, pattern.token_mask(1000))
    ref_grads = grads(ref, (q, k, v))
    lay = pattern.block_structure(1000, 64).expand_heads(4)
    ragged = torch.zeros_like(lay.active)  # the last block row and column hold padding
    ragged[:, -1], ragged[:, :, -1] = True, True
    needing = int((lay.active & (~lay.full | ragged)).sum())
    for call in range(2):
        out = attn(q, k, v)
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
        for a, b in zip(grads(out, (q, k, v)), ref_grads):
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
        if keeps_masks:  # at the first call only: each needing tile's mask once
            assert sum(evaluated) == needing > 5
        else:  # chunk by chunk, forward and backward, at every call
            assert sum(evaluated) > 2 * (call + 1) * 5
    if keeps_masks:
        first = list(evaluated)
        attn(q, k, v)
        assert evaluated == first


@pytest.mark.parametrize("block", [1, 7, 64, 128, 2000])
def test_any_block_size_gives_the_same_result(block):
    q, k, v = make_qkv(b=1, h=2, s=130, d=8, requires_grad=False)
    pattern = P.local_window(9, causal=True) | P.global_tokens(2)
    ref = sdpa_oracle(q, k, v, pattern.token_mask(130))
    out = wb.block_sparse_attention(q, k, v, pattern, block_size=block, backend="blockwise")
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
def test_low_precision_inputs(dtype, tol):
    q, k, v = make_qkv(b=1, h=2, s=200, d=32, dtype=dtype, requires_grad=False)
    pattern = P.local_window(30, causal=True)
    out = wb.block_sparse_attention(q, k, v, pattern, block_size=32)
    assert out.dtype == dtype
    ref = sdpa_oracle(*(x.double() for x in (q, k, v)), pattern.token_mask(200))
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


def test_lse_matches_logsumexp_and_has_gradients():
    q, k, v = make_qkv(b=1, h=2, s=150, d=8)
    pattern = P.local_window(20) & P.causal()
    out, lse = wb.block_sparse_attention(q, k, v, pattern, block_size=32, return_lse=True)
    mask = pattern.token_mask(150)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~mask, -torch.inf)
    ref_lse = torch.logsumexp(scores, -1)
    torch.testing.assert_close(lse, ref_lse, atol=1e-10, rtol=1e-10)
    g1 = torch.autograd.grad(lse.sum() + out.sum(), (q, k, v))
    g2 = torch.autograd.grad(ref_lse.sum() + sdpa_oracle(q, k, v, mask).sum(), (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_empty_rows_give_zeros_and_minus_inf_lse_never_nan():
    q, k, v = make_qkv(b=1, h=4, s=40, d=8)
    pattern = P.dilated([16], [4], num_heads=4)  # each head keeps 1 position in 4
    for backend in ("blockwise", "reference"):
        out, lse = wb.block_sparse_attention(q, k, v, pattern, 8, backend=backend,
                                             return_lse=True)
        kept = pattern.token_mask(40).any(-1)
        assert not torch.isnan(out).any() and not torch.isnan(lse).any()
        assert torch.all(out[:, ~kept] == 0)
        assert torch.all(lse[:, ~kept] == -torch.inf)
        gq, gk, gv = grads(out, (q, k, v))
        assert torch.isfinite(gq).all() and torch.isfinite(gk).all() and torch.isfinite(gv).all()


def test_cross_attention_rectangular():
    q, k, v = make_qkv(b=1, h=2, s=70, sk=150, d=8)
    pattern = P.local_window(40) | P.global_tokens(4)
    out = wb.block_sparse_attention(q, k, v, pattern, 16)
    mask = pattern.block_structure(70, 1, k_len=150)  # block 1: layout == token mask
    ref = sdpa_oracle(q, k, v, mask.active)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("pattern", [P.causal(), P.local_window(30, causal=True),
                                     P.dilated([32, 96], [1, 4], 4, causal=True)])
def test_causality_future_tokens_never_leak(pattern):
    q, k, v = make_qkv(b=2, h=4, s=120, d=8, requires_grad=False)
    t = 57
    out = wb.block_sparse_attention(q, k, v, pattern, 16)
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, :, t:] = torch.randn_like(x[:, :, t:]) * 10
    out2 = wb.block_sparse_attention(q2, k2, v2, pattern, 16)
    assert torch.equal(out[:, :, :t], out2[:, :, :t])
    assert not torch.equal(out[:, :, t:], out2[:, :, t:])


def test_batch_elements_are_independent():
    q, k, v = make_qkv(b=3, h=2, s=90, d=8, requires_grad=False)
    pattern = P.global_local(3, 10)
    out = wb.block_sparse_attention(q, k, v, pattern, 16)
    q[1] += 5.0
    v[1] *= -2.0
    out2 = wb.block_sparse_attention(q, k, v, pattern, 16)
    assert torch.equal(out[0], out2[0]) and torch.equal(out[2], out2[2])
    assert not torch.equal(out[1], out2[1])


@pytest.mark.parametrize("make, a, b", [
    (lambda x: P.local_window(x), 5, 40),
    (lambda x: P.global_local(x, 4), 2, 30),
    (lambda x: P.strided(x) | P.local_window(1), 3, 7),
    (lambda x: P.random_blocks(x, seed=1, cell=16) | P.local_window(1), 0.1, 0.6),
    (lambda x: P.dilated([x, 128], [1, 2], 2), 16, 64),
    (lambda x: P.dilated([32, 128], [1, x], 2), 2, 4),
])
def test_every_knob_changes_the_output(make, a, b):
    q, k, v = make_qkv(b=1, h=2, s=256, d=8, requires_grad=False)
    oa = wb.block_sparse_attention(q, k, v, make(a), 32)
    ob = wb.block_sparse_attention(q, k, v, make(b), 32)
    assert (oa - ob).abs().max() > 1e-3


def test_module_matches_functional_and_caches_layout():
    q, k, v = make_qkv(b=1, h=4, s=300, d=16)
    pattern = P.dilated([64, 128], [1, 2], 4, causal=True) | P.global_tokens(5)
    attn = wb.BlockSparseAttention(pattern, block_size=32)
    out = attn(q, k, v)
    torch.testing.assert_close(out, wb.block_sparse_attention(q, k, v, pattern, 32))
    assert len(attn.plans) == 1
    attn(q, k, v)
    assert len(attn.plans) == 1
    assert "dilated" in repr(attn)
    dilated = wb.BlockSparseAttention(P.dilated([64, 128], [1, 2], 4), block_size=32)
    dilated(q, k, v)
    assert not dilated.plan(300, 300, "cpu").built  # the gather backend needs no layout
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def _call(**over):
    q, k, v = make_qkv(b=1, h=2, s=32, d=8, requires_grad=False)
    args = dict(q=q, k=k, v=v, pattern=P.causal(), block_size=8)
    args.update(over)
    return wb.block_sparse_attention(**args)


@pytest.mark.parametrize("over, exc, match", [
    (dict(q=torch.randn(2, 32, 8, dtype=torch.float64)), ValueError, "q must be"),
    (dict(k=torch.randn(1, 2, 32, 4, dtype=torch.float64)), ValueError, "head_dim"),
    (dict(v=torch.randn(1, 2, 31, 8, dtype=torch.float64)), ValueError, "v has length 31"),
    (dict(v=torch.randn(1, 2, 32, 8, dtype=torch.float32)), TypeError, "dtype"),
    (dict(q=torch.ones(1, 2, 32, 8, dtype=torch.int64)), TypeError, "floating"),
    (dict(k=torch.randn(1, 3, 32, 8, dtype=torch.float64)), ValueError, "heads"),
    (dict(k=torch.randn(2, 2, 32, 8, dtype=torch.float64)), ValueError, "batch size"),
    (dict(q=torch.randn(1, 2, 0, 8, dtype=torch.float64)), ValueError, "empty"),
    (dict(v=torch.randn(1, 2, 32, 0, dtype=torch.float64)), ValueError, "empty"),
    (dict(k=torch.ones(1, 2, 32, 8, dtype=torch.int64)), TypeError, "floating"),
    (dict(v=[[0.0] * 8] * 32), TypeError, "torch.Tensor"),
    (dict(block_size=0), ValueError, "block_size"),
    (dict(block_size=-4), ValueError, "block_size"),
    (dict(pattern=P.dilated([8], [1], 3)), ValueError, "num_heads=2"),
    (dict(pattern="causal"), TypeError, "Pattern"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(ring_chunks=0), ValueError, "ring_chunks"),
    (dict(ring_chunks=5), ValueError, "ring_chunks"),
    (dict(window=3), TypeError, "window"),
])
def test_bad_input_raises_naming_the_argument(over, exc, match):
    with pytest.raises(exc, match=match):
        _call(**over)


def test_device_mismatch_is_reported():
    q, k, v = make_qkv(b=1, h=2, s=32, d=8, requires_grad=False)
    k = k.to("meta")
    with pytest.raises(ValueError, match="one device"):
        wb.block_sparse_attention(q, k, v, P.causal(), 8)
