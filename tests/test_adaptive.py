"""Content-adaptive block selection: layout rules, exactness, gradients, batch independence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import workbench.patterns as P
from workbench.adaptive import (
    AdaptiveBlockSparseAttention,
    BlockSelection,
    distillation_loss,
    fold_batch,
    pool_blocks,
    select_blocks,
    topk_budget,
)
from workbench.attention import block_sparse_attention

DT = torch.float64


def _qkv(b=2, h=3, s=333, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, s, d, generator=g, dtype=DT) for _ in range(3))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("density", [0.1, 0.3, 1.0])
def test_layout_obeys_density_diagonal_causality(causal, density):
    q, k, _ = _qkv()
    mod = AdaptiveBlockSparseAttention(32, density, causal=causal)
    sel = mod.select(q, k).selected  # [B, H, nq, nk]
    nq, nk = sel.shape[-2:]
    kk = topk_budget(density, nk)
    i = torch.arange(nq)
    assert sel[..., i, i].all()  # diagonal always kept
    rows = sel.sum(-1)
    if causal:
        assert not sel.triu(1).any()
        assert torch.equal(rows, torch.clamp(i + 1, max=kk).expand_as(rows))
    else:
        assert (rows == kk).all()
    assert sel.float().mean() <= kk / nk + 1e-12


def test_attention_equals_reference_with_same_layout():
    q, k, v = _qkv(s=333)
    for causal in (False, True):
        mod = AdaptiveBlockSparseAttention(32, 0.25, causal=causal, backend="blockwise")
        out, sel = mod(q, k, v, return_selection=True)
        pat = sel.pattern()
        ref = block_sparse_attention(fold_batch(q), fold_batch(k), fold_batch(v), pat, 32,
                                     backend="reference")
        torch.testing.assert_close(out, ref.reshape(out.shape), rtol=1e-9, atol=1e-11)
        # and against SDPA with the dense token mask built independently from the selection
        blk = torch.arange(333) // 32
        mask = sel.selected[:, :, blk][:, :, :, blk]
        if causal:
            mask = mask & torch.ones(333, 333, dtype=torch.bool).tril()
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        torch.testing.assert_close(out, o, rtol=1e-9, atol=1e-11)


def test_block_selection_layout_exact_at_other_block_sizes():
    g = torch.Generator().manual_seed(3)
    sel = torch.rand(2, 11, 9, generator=g) < 0.3
    pat = BlockSelection(sel, 16, 170, 140)
    for bs in (8, 16, 24, 40):
        lay = pat.block_structure(170, bs, k_len=140)
        h = torch.arange(2)[:, None, None]
        m = pat.allowed(h, torch.arange(170)[None, :, None], torch.arange(140)[None, None, :])
        nq, nk = lay.active.shape[1:]
        mp = F.pad(m, (0, nk * bs - 140, 0, nq * bs - 170)).reshape(2, nq, bs, nk, bs)
        real = F.pad(torch.ones(170, 140, dtype=torch.bool), (0, nk * bs - 140, 0, nq * bs - 170))
        real = real.reshape(nq, bs, nk, bs)
        assert torch.equal(lay.active, mp.any(4).any(2))
        assert torch.equal(lay.full, (mp | ~real).all(4).all(2) & lay.active)
    with pytest.raises(ValueError, match="q_len"):
        pat.block_structure(100, 16)


def test_every_trainable_parameter_gets_gradient():
    q, k, v = _qkv(b=2, h=2, s=130, d=8)
    mod = AdaptiveBlockSparseAttention(16, 0.3, causal=True, head_dim=8, trainable=True,
                                       straight_through=True, backend="blockwise").double()
    out = mod(q, k, v)
    # the straight-through factor is exactly 1 in the forward pass
    plain = AdaptiveBlockSparseAttention(16, 0.3, causal=True, backend="blockwise")(q, k, v)
    torch.testing.assert_close(out, plain, rtol=1e-12, atol=1e-12)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=DT)
    grads = torch.autograd.grad((out * g).sum(), list(mod.parameters()))
    assert len(grads) == 4 and all(gr.abs().sum() > 0 for gr in grads)
    # distillation (SeerAttention-style) also reaches every parameter
    loss = distillation_loss(mod.scores(q, k), q, k, 16, causal=True)
    grads = torch.autograd.grad(loss, list(mod.parameters()))
    assert loss > 0 and all(gr.abs().sum() > 0 for gr in grads)


def test_batch_elements_are_independent():
    q, k, v = _qkv(b=3, h=2, s=200, d=16)
    mod = AdaptiveBlockSparseAttention(25, 0.2, backend="blockwise")
    out, sel = mod(q, k, v, return_selection=True)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    g = torch.Generator().manual_seed(9)
    for t in (q2, k2, v2):
        t[1] = torch.randn(t[1].shape, generator=g, dtype=DT)
    out2, sel2 = mod(q2, k2, v2, return_selection=True)
    for bi in (0, 2):
        assert torch.equal(sel.selected[bi], sel2.selected[bi])
        torch.testing.assert_close(out2[bi], out[bi], rtol=0, atol=0)
    assert not torch.equal(sel.selected[1], sel2.selected[1])
    # each element alone gives the same result as inside the batch
    for bi in range(3):
        alone = mod(q[bi : bi + 1], k[bi : bi + 1], v[bi : bi + 1])
        torch.testing.assert_close(alone[0], out[bi], rtol=1e-12, atol=1e-12)


def test_selection_finds_planted_blocks():
    # key block 7 is made to match every query block: it must be selected everywhere
    q, k, _ = _qkv(b=1, h=1, s=320, d=16)
    u = torch.randn(16, generator=torch.Generator().manual_seed(5), dtype=DT)
    q = q + 3 * u
    k[..., 7 * 32 : 8 * 32, :] += 3 * u
    sel = select_blocks(pool_blocks(q, 32) @ pool_blocks(k, 32).transpose(-1, -2), 0.2)
    assert sel[..., 7].all()


def test_fallback_and_always():
    q, k, v = _qkv(b=1, h=2, s=128, d=8)
    win = P.local_window(32)
    fixed = AdaptiveBlockSparseAttention(32, 0.25, adaptive=False, fallback=win,
                                         backend="blockwise")
    out, sel = fixed(q, k, v, return_selection=True)
    assert torch.equal(sel.selected[0], win.block_layout(128, 32).expand(2, -1, -1))
    small = AdaptiveBlockSparseAttention(32, 0.25, min_blocks=8, fallback=win)
    assert torch.equal(small.select(q, k).selected, sel.selected)
    both = AdaptiveBlockSparseAttention(32, 0.25, always=win)
    assert (both.select(q, k).selected >= sel.selected).all()
    with pytest.raises(ValueError, match="density"):
        AdaptiveBlockSparseAttention(32, 0.0)
    with pytest.raises(ValueError, match="head_dim"):
        AdaptiveBlockSparseAttention(32, 0.1, trainable=True)
