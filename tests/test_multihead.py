"""BlockSparseMultiheadAttention against torch.nn.MultiheadAttention and SDPA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import workbench.patterns as P
from workbench.adaptive import AdaptiveBlockSparseAttention
from workbench.attention import block_sparse_attention as wb_attention
from workbench.multihead import BlockSparseMultiheadAttention, BlockSparseWeights
from workbench.patterns import DenseMask

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
    group = torch.distributed.ProcessGroup(0, 1)  # construction sends nothing through it
    BlockSparseMultiheadAttention(8, 2, process_group=group,
                                  selector=AdaptiveBlockSparseAttention(64))
    with pytest.raises(NotImplementedError, match="straight-through"):
        BlockSparseMultiheadAttention(8, 2, process_group=group,
                                      selector=AdaptiveBlockSparseAttention(
                                          64, head_dim=4, trainable=True, straight_through=True))
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


# --------------------------------------------------------------------- unbatched input
def _unbatched_case(batch_first: bool, cross: bool, mask_dtype: torch.dtype | None, kpm: bool,
                    attn: str | None, is_causal: bool, need_weights: bool, average: bool,
                    q_len: int = 13, k_len: int = 9, seed: int = 0) -> None:
    """Run one unbatched call on both modules and compare outputs, weights and gradients.

    ``cross``: query ``[q_len, 12]`` against key ``[k_len, 10]`` and value ``[k_len, 7]``
    (kdim, vdim); otherwise self-attention on ``[q_len, 12]``. ``mask_dtype``: bool or float64
    (0 / -inf) for both masks. ``attn``: None, ``"2d"`` (``[q_len, k_len]``) or ``"3d"``
    (``[num_heads, q_len, k_len]``).
    Every query keeps key 0, so no row is empty (``nn.MultiheadAttention`` gives NaN there).
    """
    h = 3
    kd = dict(kdim=10, vdim=7) if cross else {}
    ref, mine = _pair(e=12, h=h, batch_first=batch_first, block_size=4, seed=seed, **kd)
    if not cross:
        k_len = q_len
    x = _x(q_len, 12, seed=seed + 1).requires_grad_(True)
    if cross:
        k = _x(k_len, 10, seed=seed + 2).requires_grad_(True)
        v = _x(k_len, 7, seed=seed + 3).requires_grad_(True)
        inputs = [x, k, v]
    else:
        k = v = x
        inputs = [x]
    gen = torch.Generator().manual_seed(seed + 4)

    def as_dtype(ignore: torch.Tensor) -> torch.Tensor:
        if mask_dtype == torch.bool:
            return ignore
        return torch.zeros(ignore.shape, dtype=mask_dtype).masked_fill(ignore, -torch.inf)

    key_padding_mask = attn_mask = None
    if kpm:
        ignore = torch.rand(k_len, generator=gen) < 0.4
        ignore[0] = False
        key_padding_mask = as_dtype(ignore)
    if attn is not None:
        shape = (q_len, k_len) if attn == "2d" else (h, q_len, k_len)
        ignore = torch.rand(shape, generator=gen) < 0.4
        ignore[..., 0] = False
        attn_mask = as_dtype(ignore)
    ref_mask = attn_mask
    if is_causal:  # nn.MultiheadAttention needs the mask itself; its is_causal is only a hint
        causal = torch.ones(q_len, k_len, dtype=torch.bool).triu(1)
        if attn_mask is None:
            ref_mask = as_dtype(causal) if mask_dtype is not None else causal
        elif mask_dtype == torch.bool:
            ref_mask = attn_mask | causal
        else:
            ref_mask = attn_mask.masked_fill(causal, -torch.inf)
    out_r, w_r = ref(x, k, v, key_padding_mask=key_padding_mask, attn_mask=ref_mask,
                     need_weights=need_weights, average_attn_weights=average,
                     is_causal=is_causal and attn_mask is None)
    out_m, w_m = mine(x, k, v, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                      need_weights=need_weights, average_attn_weights=average,
                      is_causal=is_causal)
    assert out_m.shape == (q_len, 12)
    torch.testing.assert_close(out_m, out_r, rtol=0, atol=1e-10)
    if need_weights:
        assert w_m.shape == ((q_len, k_len) if average else (h, q_len, k_len))
        torch.testing.assert_close(w_m, w_r, rtol=0, atol=1e-10)
    else:
        assert w_m is None
    _check_grads(ref, mine, out_r, out_m, inputs)


B, F64 = torch.bool, torch.float64
UNBATCHED_CASES = {
    # id: (batch_first, cross, mask_dtype, kpm, attn, is_causal, need_weights, average)
    "self": (True, False, None, False, None, False, True, True),
    "self-seq-first": (False, False, None, False, None, False, True, False),
    "cross-per-head": (True, True, None, False, None, False, True, False),
    "cross-seq-first": (False, True, None, False, None, False, True, True),
    "kpm-bool": (True, False, B, True, None, False, True, True),
    "kpm-float": (False, False, F64, True, None, False, True, False),
    "cross-kpm-2d": (True, True, B, True, "2d", False, True, True),
    "cross-kpm-2d-float": (False, True, F64, True, "2d", False, True, False),
    "3d-per-head": (True, False, B, False, "3d", False, True, False),
    "cross-kpm-3d-float": (True, True, F64, True, "3d", False, True, True),
    "causal": (True, False, None, False, None, True, True, True),
    "cross-causal-masks": (False, True, B, True, "2d", True, True, False),
    "causal-3d-kpm": (False, False, B, True, "3d", True, True, False),
    "cross-no-weights": (True, True, F64, False, None, True, False, True),
}


@pytest.mark.parametrize("case", UNBATCHED_CASES.values(), ids=UNBATCHED_CASES.keys())
def test_unbatched_matches_mha(case):
    _unbatched_case(*case)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(batch_first=st.booleans(), cross=st.booleans(),
       mask_dtype=st.sampled_from([B, F64]), kpm=st.booleans(),
       attn=st.sampled_from([None, "2d", "3d"]), is_causal=st.booleans(),
       need_weights=st.booleans(), average=st.booleans(),
       q_len=st.integers(1, 11), k_len=st.integers(1, 11), seed=st.integers(0, 100))
def test_unbatched_matches_mha_sweep(batch_first, cross, mask_dtype, kpm, attn, is_causal,
                                     need_weights, average, q_len, k_len, seed):
    _unbatched_case(batch_first, cross, mask_dtype, kpm, attn, is_causal, need_weights, average,
                    q_len=q_len, k_len=k_len, seed=seed)


@pytest.mark.parametrize("batch_first", [True, False])
def test_unbatched_sparse_pattern_equals_batch_of_one(batch_first):
    h, q_len = 3, 23
    pat = P.local_window(3) | P.dilated([8], [2], num_heads=h)
    _, mine = _pair(e=12, h=h, batch_first=batch_first, block_size=4, pattern=pat)
    x = _x(q_len, 12)
    kpm = torch.zeros(q_len, dtype=torch.bool)
    kpm[15:19] = True
    attn = torch.rand(h, q_len, q_len, generator=torch.Generator().manual_seed(3)) < 0.2
    one = 0 if batch_first else 1  # where the batch axis of one element goes

    def batched(*args, **kw):
        out, w = mine(x.unsqueeze(one), x.unsqueeze(one), x.unsqueeze(one), *args, **kw)
        return out.squeeze(one), None if w is None else w[0]

    for kw in ({}, dict(is_causal=True), dict(attn_mask=attn, need_weights=True,
                                              average_attn_weights=False)):
        out_u, w_u = mine(x, x, x, key_padding_mask=kpm, **kw)
        out_b, w_b = batched(key_padding_mask=kpm[None], **kw)
        torch.testing.assert_close(out_u, out_b, rtol=0, atol=1e-12)
        if w_b is not None:
            assert w_u.shape == (h, q_len, q_len)
            torch.testing.assert_close(w_u, w_b, rtol=0, atol=1e-12)
    # without masks (the memoized-layout path) and with weights averaged over heads
    out_u, w_u = mine(x, x, x, need_weights=True)
    out_b, w_b = batched(need_weights=True)
    torch.testing.assert_close(out_u, out_b, rtol=0, atol=1e-12)
    assert w_u.shape == (q_len, q_len)
    torch.testing.assert_close(w_u, w_b, rtol=0, atol=1e-12)
    # compact weights of an unbatched call densify to the unbatched shape
    mine.dense_weights_limit = 10
    _, compact = mine(x, x, x, key_padding_mask=kpm, need_weights=True,
                      average_attn_weights=False)
    assert isinstance(compact, BlockSparseWeights)
    mine.dense_weights_limit = 1 << 22
    _, dense = mine(x, x, x, key_padding_mask=kpm, need_weights=True,
                    average_attn_weights=False)
    torch.testing.assert_close(compact.to_dense(), dense, rtol=0, atol=1e-12)


# --------------------------------------------------------------------- bad arguments
def _t(*shape, dtype=DT, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


N, L, S, E = 2, 5, 7, 12  # batch, query length, key length, embed_dim; kdim 10, vdim 7 below
_Q, _K, _V = _t(N, L, E), _t(N, S, 10), _t(N, S, 7)
BAD_CALLS = {
    # id: (arguments of the call on a batch_first module with kdim=10, vdim=7, exception, match)
    "query-list": (([[0.0] * E] * L, _K, _V), TypeError, "query must be a torch.Tensor"),
    "key-list": ((_Q, [[0.0] * 10] * S, _V), TypeError, "key must be a torch.Tensor"),
    "kpm-list": ((_Q, _K, _V, [[False] * S] * N), TypeError, "key_padding_mask must be"),
    "attn-list": ((_Q, _K, _V, None, False, [[False] * S] * L), TypeError, "attn_mask must be"),
    "query-1d": ((_t(E), _K, _V), ValueError, r"query must be 2-D .* or 3-D"),
    "query-4d": ((_t(1, N, L, E), _K, _V), ValueError, r"query must be 2-D .* or 3-D"),
    "key-2d-for-3d-query": ((_Q, _t(S, 10), _t(S, 7)), ValueError, r"key must be 3-D"),
    "value-2d-for-3d-query": ((_Q, _K, _t(S, 7)), ValueError, r"value must be 3-D"),
    "key-3d-for-2d-query": ((_t(L, E), _K, _V), ValueError, r"key must be 2-D"),
    "query-embed": ((_t(N, L, 10), _K, _V), ValueError, r"query has embedding size 10 .*"
                    r"embed_dim=12"),
    "key-embed": ((_Q, _t(N, S, 12), _V), ValueError, r"key has embedding size 12 .*kdim=10"),
    "value-embed": ((_Q, _K, _t(N, S, 10)), ValueError, r"value has embedding size 10 .*vdim=7"),
    "key-batch": ((_Q, _t(3, S, 10), _t(3, S, 7)), ValueError, r"key has batch size 3 .*query"),
    "value-batch": ((_Q, _K, _t(3, S, 7)), ValueError, r"value has batch size 3 .*query"),
    "value-length": ((_Q, _K, _t(N, S + 1, 7)), ValueError, r"value has length 8 .*key"),
    "unbatched-value-length": ((_t(L, E), _t(S, 10), _t(S + 1, 7)), ValueError,
                               r"value has length 8 .*key"),
    "key-dtype": ((_Q, _t(N, S, 10, dtype=torch.float32), _V), TypeError,
                  r"key has dtype torch.float32 but query has torch.float64"),
    "value-dtype": ((_Q, _K, _t(N, S, 7, dtype=torch.float32)), TypeError,
                    r"value has dtype torch.float32"),
    "module-dtype": ((_Q.float(), _K.float(), _V.float()), TypeError,
                     r"query.*torch.float32 but the module's parameters.*torch.float64"),
    "key-device": ((_Q, _t(N, S, 10, device="meta"), _V), ValueError,
                   r"key is on meta but query is on cpu"),
    "module-device": ((_t(N, L, E, device="meta"), _t(N, S, 10, device="meta"),
                       _t(N, S, 7, device="meta")), ValueError,
                      r"query.*on meta but the module's parameters are on cpu"),
    "kpm-shape": ((_Q, _K, _V, _t(N, S + 1, dtype=B)), ValueError,
                  r"key_padding_mask must have shape \(N, S\) = \(2, 7\)"),
    "kpm-1d-batched": ((_Q, _K, _V, _t(S, dtype=B)), ValueError,
                       r"key_padding_mask must have shape \(N, S\)"),
    "kpm-2d-unbatched": ((_t(L, E), _t(S, 10), _t(S, 7), _t(1, S, dtype=B)), ValueError,
                         r"key_padding_mask must have shape \(S,\) = \(7,\)"),
    "kpm-dtype": ((_Q, _K, _V, _t(N, S, dtype=torch.int64)), TypeError,
                  r"key_padding_mask must be a bool .* or float .*torch.int64"),
    "attn-2d-shape": ((_Q, _K, _V, None, False, _t(S, L, dtype=B)), ValueError,
                      r"attn_mask must have shape \(L, S\) = \(5, 7\) or "
                      r"\(N \* num_heads, L, S\) = \(6, 5, 7\)"),
    "attn-3d-heads-only-batched": ((_Q, _K, _V, None, False, _t(3, L, S, dtype=B)), ValueError,
                                   r"attn_mask must have shape"),
    "attn-3d-unbatched": ((_t(L, E), _t(S, 10), _t(S, 7), None, False, _t(1, L, S, dtype=B)),
                          ValueError, r"attn_mask must have shape \(L, S\) = \(5, 7\) or "
                          r"\(num_heads, L, S\) = \(3, 5, 7\)"),
    "attn-4d": ((_Q, _K, _V, None, False, _t(N, 3, L, S, dtype=B)), ValueError,
                r"attn_mask must have shape"),
    "attn-dtype": ((_Q, _K, _V, None, False, _t(L, S, dtype=torch.uint8)), TypeError,
                   r"attn_mask must be a bool .* or float .*torch.uint8"),
}


@pytest.mark.parametrize("args, exc, match", BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_inputs_raise_naming_the_argument(args, exc, match):
    mha = BlockSparseMultiheadAttention(E, 3, kdim=10, vdim=7, batch_first=True, dtype=DT)
    with pytest.raises(exc, match=match):
        mha(*args)


def test_seq_first_errors_name_the_batch_dimension():
    mha = BlockSparseMultiheadAttention(E, 3, kdim=10, vdim=7, dtype=DT)
    with pytest.raises(ValueError, match=r"key has batch size 3 .*dimension 1.*batch_first=False"):
        mha(_t(L, N, E), _t(S, 3, 10), _t(S, 3, 7))
    same = BlockSparseMultiheadAttention(E, 3, dtype=DT)
    with pytest.raises(ValueError, match=r"key has embedding size 10 .*kdim=12"):
        same(_t(L, N, E), _t(S, N, 10), _t(S, N, 12))


BAD_OPTIONS = {
    "ring_chunks": (dict(ring_chunks=0), ValueError),
    "sharding": (dict(sharding="bogus"), ValueError),
    "block_size": (dict(block_size=0), ValueError),
    "backend": (dict(backend="cuda"), ValueError),
    "block_order": (dict(block_order="zigzag"), ValueError),
    "dense_weights_limit": (dict(dense_weights_limit=0), ValueError),
    "process_group": (dict(process_group="world"), TypeError),
}


@pytest.mark.parametrize("kw, exc", BAD_OPTIONS.values(), ids=BAD_OPTIONS.keys())
def test_bad_options_fail_at_construction(kw, exc):
    with pytest.raises(exc, match=next(iter(kw))):
        BlockSparseMultiheadAttention(8, 2, **kw)


@pytest.mark.parametrize("limit", [1.5, True, -3])
def test_dense_weights_limit_must_be_a_positive_int(limit):
    with pytest.raises(ValueError, match="dense_weights_limit"):
        BlockSparseMultiheadAttention(8, 2, dense_weights_limit=limit)
