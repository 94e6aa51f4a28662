"""BlockSparseMultiheadAttention against torch.nn.MultiheadAttention and SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import workbench.patterns as P
from workbench.adaptive import AdaptiveBlockSparseAttention
from workbench.attention import block_sparse_attention as wb_attention
from workbench.multihead import BlockSparseMultiheadAttention, BlockSparseWeights, DenseMask

DT = torch.float64


def _pair(e=24, h=3, batch_first=True, kdim=None, vdim=None, bias=True, seed=0, **kw):
    torch.manual_seed(seed)
    ref = nn.MultiheadAttention(e, h, bias=bias, batch_first=batch_first, kdim=kdim, vdim=vdim,
                                dtype=DT)
    with torch.no_grad():  # non-zero biases so they are tested too
        for name, p in ref.named_parameters():
            if "bias" in name:
                p.normal_()
    mine = BlockSparseMultiheadAttention(e, h, bias=bias, batch_first=batch_first, kdim=kdim,
                                         vdim=vdim, dtype=DT, backend="blockwise", **kw)
    mine.load_state_dict(ref.state_dict())
    return ref, mine


def _x(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _check_grads(ref, mine, out_r, out_m, inputs, seed=2):
    g = torch.randn(out_r.shape, generator=torch.Generator().manual_seed(seed), dtype=DT)
    pr = [p for _, p in ref.named_parameters()]
    pm = [p for _, p in mine.named_parameters()]
    gr = torch.autograd.grad((out_r * g).sum(), pr + inputs)
    gm = torch.autograd.grad((out_m * g).sum(), pm + inputs)
    for a, b in zip(gr, gm):
        torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("batch_first", [True, False])
def test_self_attention_matches_mha_forward_and_grads(batch_first):
    ref, mine = _pair(batch_first=batch_first, block_size=32)
    x = _x(2, 333, 24) if batch_first else _x(333, 2, 24)
    x.requires_grad_(True)
    out_r, _ = ref(x, x, x, need_weights=False)
    out_m, w = mine(x, x, x)
    assert w is None
    torch.testing.assert_close(out_m, out_r, rtol=1e-7, atol=1e-9)
    _check_grads(ref, mine, out_r, out_m, [x])


def test_cross_attention_kdim_vdim_and_no_bias():
    ref, mine = _pair(e=16, h=4, kdim=10, vdim=7, bias=False, block_size=16)
    q, k, v = _x(2, 37, 16, seed=3), _x(2, 50, 10, seed=4), _x(2, 50, 7, seed=5)
    for t in (q, k, v):
        t.requires_grad_(True)
    out_r, _ = ref(q, k, v, need_weights=False)
    out_m, _ = mine(q, k, v)
    torch.testing.assert_close(out_m, out_r, rtol=1e-7, atol=1e-9)
    _check_grads(ref, mine, out_r, out_m, [q, k, v])


def test_masks_match_mha():
    ref, mine = _pair(block_size=16)
    b, s = 3, 70
    x = _x(b, s, 24).requires_grad_(True)
    kpm = torch.zeros(b, s, dtype=torch.bool)
    kpm[0, 50:] = True
    kpm[2, 3:8] = True
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)  # True = ignore
    out_r, w_r = ref(x, x, x, key_padding_mask=kpm, attn_mask=causal, need_weights=True)
    out_m, w_m = mine(x, x, x, key_padding_mask=kpm, attn_mask=causal, need_weights=True)
    torch.testing.assert_close(out_m, out_r, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(w_m, w_r, rtol=1e-7, atol=1e-9)
    _check_grads(ref, mine, out_r, out_m, [x])
    # is_causal alone (no attn_mask needed here) = the causal attn_mask
    out_c, _ = mine(x, x, x, key_padding_mask=kpm, is_causal=True)
    torch.testing.assert_close(out_c, out_r, rtol=1e-7, atol=1e-9)
    # float 0/-inf masks are exact
    fmask = torch.zeros(s, s, dtype=DT).masked_fill(causal, -torch.inf)
    out_f, _ = mine(x, x, x, key_padding_mask=kpm, attn_mask=fmask)
    torch.testing.assert_close(out_f, out_r, rtol=1e-7, atol=1e-9)


def test_3d_attn_mask_and_per_head_weights():
    ref, mine = _pair(e=12, h=2, block_size=8)
    b, s, h = 2, 29, 2
    x = _x(b, s, 12)
    m = torch.rand(b * h, s, s, generator=torch.Generator().manual_seed(7)) < 0.3
    m[..., 0] = False  # every row keeps a key (nn.MultiheadAttention gives NaN otherwise)
    out_r, w_r = ref(x, x, x, attn_mask=m, average_attn_weights=False)
    out_m, w_m = mine(x, x, x, attn_mask=m, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(out_m, out_r, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(w_m, w_r, rtol=1e-7, atol=1e-9)


def test_unbatched_input():
    ref, mine = _pair(batch_first=False, block_size=8)
    x = _x(21, 24)
    out_r, w_r = ref(x, x, x)
    out_m, w_m = mine(x, x, x, need_weights=True)
    torch.testing.assert_close(out_m, out_r, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(w_m, w_r, rtol=1e-7, atol=1e-9)


def test_sparse_pattern_matches_sdpa_with_dense_mask():
    h, e = 4, 32
    pat = P.dilated([32, 64], [1, 2], num_heads=h) | P.local_window(8)
    _, mine = _pair(e=e, h=h, block_size=16, pattern=pat)
    b, s = 2, 150
    x = _x(b, s, e).requires_grad_(True)
    kpm = torch.zeros(b, s, dtype=torch.bool)
    kpm[1, 100:] = True
    out, _ = mine(x, x, x, key_padding_mask=kpm)
    # Oracle: the same projections, then SDPA with the dense mask (True = attend).
    q, k, v = F.linear(x, mine.in_proj_weight, mine.in_proj_bias).chunk(3, -1)
    q, k, v = (t.reshape(b, s, h, e // h).transpose(1, 2) for t in (q, k, v))
    allowed = pat.token_mask(s)[None] & ~kpm[:, None, None, :]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    o = torch.where(allowed.any(-1, keepdim=True), o, 0.0)
    ref_out = mine.out_proj(o.transpose(1, 2).reshape(b, s, e))
    torch.testing.assert_close(out, ref_out, rtol=1e-7, atol=1e-9)
    g1 = torch.autograd.grad(out.sum(), x)[0]
    g2 = torch.autograd.grad(ref_out.sum(), x)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-7, atol=1e-9)


def test_ring_schedule_plugs_in():
    pat = P.local_window(20, causal=True)
    _, one = _pair(block_size=16, pattern=pat)
    _, ring = _pair(block_size=16, pattern=pat, ring_chunks=3)
    x = _x(2, 100, 24)
    torch.testing.assert_close(ring(x, x, x)[0], one(x, x, x)[0], rtol=1e-7, atol=1e-9)


def test_empty_rows_are_zero_not_nan():
    _, mine = _pair(block_size=8)
    x = _x(2, 20, 24)
    kpm = torch.ones(2, 20, dtype=torch.bool)
    kpm[0] = False
    out, _ = mine(x, x, x, key_padding_mask=kpm)
    assert torch.isfinite(out).all()
    # batch 1 attends nothing: output is the out-projection bias
    torch.testing.assert_close(out[1], mine.out_proj.bias.expand(20, -1))


def test_compact_weights_above_the_limit():
    pat = P.local_window(10)
    _, mine = _pair(block_size=8, pattern=pat, dense_weights_limit=100)
    x = _x(2, 45, 24)
    kpm = torch.zeros(2, 45, dtype=torch.bool)
    kpm[1, 40:] = True
    _, w = mine(x, x, x, key_padding_mask=kpm, need_weights=True, average_attn_weights=False)
    assert isinstance(w, BlockSparseWeights)
    assert w.values.shape[-2:] == (8, 8) and w.tiles.shape[0] < w.num_heads * 6 * 6
    mine.dense_weights_limit = 1 << 22
    _, dense = mine(x, x, x, key_padding_mask=kpm, need_weights=True,
                    average_attn_weights=False)
    torch.testing.assert_close(w.to_dense(), dense, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(dense.sum(-1), torch.ones(2, 3, 45, dtype=DT))


def test_sub_layer_norm_and_errors():
    m = BlockSparseMultiheadAttention(16, 2, sub_layer_norm=True, batch_first=True)
    assert any("sub_ln" in k for k in m.state_dict())
    assert m(torch.randn(1, 9, 16), torch.randn(1, 9, 16), torch.randn(1, 9, 16))[0].shape == (
        1, 9, 16)
    with pytest.raises(ValueError, match="divisible"):
        BlockSparseMultiheadAttention(10, 3)
    with pytest.raises(NotImplementedError, match="add_bias_kv"):
        BlockSparseMultiheadAttention(8, 2, add_bias_kv=True)
    d = BlockSparseMultiheadAttention(8, 2, dropout=0.1, batch_first=True, backend="flex")
    x = torch.randn(1, 5, 8)
    with pytest.raises(NotImplementedError, match="dropout"):  # flex cannot drop probabilities
        d(x, x, x)
    with pytest.raises(ValueError, match="not both"):
        BlockSparseMultiheadAttention(8, 2, pattern=P.causal(),
                                      selector=AdaptiveBlockSparseAttention(64))
    with pytest.raises(ValueError, match="block_size"):
        BlockSparseMultiheadAttention(8, 2, block_size=32,
                                      selector=AdaptiveBlockSparseAttention(64))
    with pytest.raises(NotImplementedError, match="additive"):
        m.eval()(torch.randn(1, 9, 16), torch.randn(1, 9, 16), torch.randn(1, 9, 16),
                 attn_mask=torch.full((9, 9), 0.5))
    with pytest.raises(ValueError, match="key_padding_mask"):
        m(torch.randn(1, 9, 16), torch.randn(1, 9, 16), torch.randn(1, 9, 16),
          key_padding_mask=torch.zeros(1, 8, dtype=torch.bool))


def test_dense_mask_layout_is_exact():
    m = torch.rand(2, 37, 29, generator=torch.Generator().manual_seed(0)) < 0.05
    pat = DenseMask(m)
    for bs in (4, 8, 16):
        lay = pat.block_structure(37, bs, k_len=29)
        nq, nk = lay.active.shape[1:]
        pad = F.pad(m, (0, nk * bs - 29, 0, nq * bs - 37)).reshape(2, nq, bs, nk, bs)
        assert torch.equal(lay.active, pad.any(4).any(2))


def test_block_order_plugs_into_the_multihead_module():
    torch.manual_seed(0)
    x = torch.randn(2, 150, 32, dtype=torch.float64)
    pattern = P.local_window(40) | P.global_tokens(3)
    plain = BlockSparseMultiheadAttention(32, 4, batch_first=True, pattern=pattern,
                                             block_size=16, dtype=torch.float64)
    curve = BlockSparseMultiheadAttention(32, 4, batch_first=True, pattern=pattern,
                                             block_size=16, block_order="hilbert",
                                             dtype=torch.float64)
    curve.load_state_dict(plain.state_dict())
    torch.testing.assert_close(curve(x, x, x)[0], plain(x, x, x)[0], atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="block_order"):
        BlockSparseMultiheadAttention(32, 4, block_order="zigzag")


def test_adaptive_selector_at_full_density_matches_mha():
    sel = AdaptiveBlockSparseAttention(16, density=1.0)
    ref, mine = _pair(block_size=16, selector=sel)
    x = _x(2, 45, 24).requires_grad_(True)
    mask = torch.zeros(2, 45, dtype=torch.bool)
    mask[1, 40:] = True
    out_r, _ = ref(x, x, x, key_padding_mask=mask, need_weights=False)
    out_m, _ = mine(x, x, x, key_padding_mask=mask)
    torch.testing.assert_close(out_m, out_r, rtol=1e-7, atol=1e-9)
    _check_grads(ref, mine, out_r, out_m, [x])


def test_adaptive_selector_runs_the_selected_layout_per_batch_element():
    sel = AdaptiveBlockSparseAttention(8, density=0.25, causal=True, head_dim=4, trainable=True,
                                       straight_through=True)
    torch.manual_seed(0)  # the gate is a sub-module: an nn.MultiheadAttention state dict lacks it
    mine = BlockSparseMultiheadAttention(12, 3, batch_first=True, block_size=8, selector=sel,
                                         dtype=DT, backend="blockwise")
    sel.to(DT)
    x = _x(2, 50, 12).requires_grad_(True)
    out, _ = mine(x, x, x)
    q, k, v = (t.reshape(2, 50, 3, 4).transpose(1, 2) for t in mine._project(x, x, x))
    selection = sel.select(q, k)
    assert not torch.equal(selection.selected[0], selection.selected[1])  # content decides
    fold = lambda t: t.reshape(1, 6, 50, 4)  # noqa: E731
    want = wb_attention(fold(q), fold(k), fold(v), selection.pattern(), 8).reshape(2, 3, 50, 4)
    want = mine.out_proj(want.permute(0, 2, 1, 3).reshape(2, 50, 12))
    torch.testing.assert_close(out, want, rtol=1e-9, atol=1e-10)
    gate = [sel.gate_q.weight, sel.gate_k.weight]
    assert {n for n, _ in mine.named_parameters()} >= {"selector.gate_q.weight"}
    assert all(g.abs().sum() > 0 for g in torch.autograd.grad((out * _x(*out.shape)).sum(), gate))
