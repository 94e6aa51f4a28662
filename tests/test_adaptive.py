"""Content-adaptive block selection: layout rules, exactness, gradients, batch independence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import workbench.patterns as P
from workbench.adaptive import (
    AdaptiveBlockSparseAttention,
    distillation_loss,
    fold_batch,
    pool_blocks,
    select_blocks,
    topk_budget,
)
from workbench.attention import block_sparse_attention
from workbench.patterns import BlockSelection

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


# --------------------------------------------------------------------- exact fixed patterns
S70, B16 = 70, 16


def _token_tiles(mask, block_size):
    """Bool ``[..., nq, nk]``: the tiles of ``block_size`` holding an allowed pair of ``mask``."""
    sq, sk = mask.shape[-2:]
    nq, nk = -(-sq // block_size), -(-sk // block_size)
    m = F.pad(mask, (0, nk * block_size - sk, 0, nq * block_size - sq))
    return m.unflatten(-1, (nk, block_size)).unflatten(-3, (nq, block_size)).any(-1).any(-2)


def _run_mask(sel, b, h, s):
    """Token mask ``[B, H, S, S]`` of the pattern a selection runs (batch folded as b * H + h)."""
    m = sel.pattern().token_mask(s)
    return m.expand(b * h, s, s).reshape(b, h, s, s)


def _expected_mask(mod, q, k, used_fallback):
    """The pattern a call should run, built from the fixed patterns' own token masks and the
    top-k tiles of :func:`select_blocks`: ``[B, H, S, S]``."""
    b, h, s = q.shape[:3]
    if used_fallback:
        m = mod.fallback.token_mask(s).expand(h, s, s).expand(b, h, s, s)
    else:
        chosen = select_blocks(mod.scores(q, k), mod.density, causal=mod.causal)
        blk = torch.arange(s) // mod.block_size
        m = chosen[:, :, blk][:, :, :, blk]
    if mod.always is not None:
        m = m | mod.always.token_mask(s)
    if mod.causal:
        m = m & torch.ones(s, s, dtype=torch.bool).tril()
    return m


def _dense(q, k, v, mask):
    """Softmax attention restricted to bool ``mask`` (float64; a row allowing nothing is 0)."""
    s = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    some = mask.any(-1, keepdim=True)
    s = torch.where(some, s.masked_fill(~mask, -torch.inf), torch.zeros_like(s))
    return (torch.softmax(s, -1) * mask) @ v


def _grads(out, inputs, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad((out * g).sum(), inputs)


@pytest.mark.parametrize("backend", ["blockwise", "auto"])
@pytest.mark.parametrize("how", ["adaptive=False", "min_blocks"])
def test_fallback_is_the_exact_token_pattern(backend, how):
    fb = P.local_window(8) & P.causal()
    kw = {"adaptive": False} if how == "adaptive=False" else {"min_blocks": 6}
    mod = AdaptiveBlockSparseAttention(B16, 0.3, fallback=fb, backend=backend, **kw)
    q, k, v = (t.requires_grad_() for t in _qkv(b=2, h=2, s=S70, d=8))
    out, sel = mod(q, k, v, return_selection=True)
    mask = sel.pattern().token_mask(S70)
    assert (mask.flatten(1).sum(1) == 532).all()  # sum over q of min(q + 1, 8)
    assert torch.equal(mask.expand(4, -1, -1), fb.token_mask(S70).expand(4, -1, -1))
    assert torch.equal(sel.selected, _token_tiles(fb.token_mask(S70), B16).expand(2, 2, -1, -1))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=fb.token_mask(S70))
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)
    for a, r in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v))):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-11)


def test_always_is_unioned_at_token_level():
    q, k, v = (t.requires_grad_() for t in _qkv(b=2, h=2, s=S70, d=8))
    mod = AdaptiveBlockSparseAttention(B16, 0.2, always=P.global_tokens(2), backend="blockwise")
    out, sel = mod(q, k, v, return_selection=True)
    chosen = select_blocks(mod.scores(q, k), 0.2)
    blk = torch.arange(S70) // B16
    tiles = chosen[:, :, blk][:, :, :, blk]
    run = _run_mask(sel, 2, 2, S70)
    glob = torch.zeros(S70, S70, dtype=torch.bool)
    glob[:, :2] = glob[:2, :] = True  # keys 0-1 for everyone, queries 0-1 see everything
    assert torch.equal(run, tiles | glob)
    assert torch.equal(run[:, :, 16:, 2:16], tiles[:, :, 16:, 2:16])  # no whole first tile
    assert torch.equal(sel.selected, _token_tiles(run, B16))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=tiles | glob)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)
    for a, r in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v))):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-11)


_FIXED = [
    P.local_window(8) & P.causal(),
    P.global_tokens(2),
    P.local_window(5),
    P.strided(7),
    P.causal(),
    P.random_blocks(0.3, seed=1, cell=8),
    P.dilated([8, 16], [1, 2], num_heads=2),  # one pattern per head: tiled over the batch
]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    s=st.integers(1, 80),
    block=st.sampled_from([4, 8, 16, 32]),
    density=st.sampled_from([0.1, 0.3, 0.6, 1.0]),
    causal=st.booleans(),
    role=st.sampled_from(["fallback", "short", "always", "fallback+always"]),
    first=st.integers(0, len(_FIXED) - 1),
    second=st.integers(0, len(_FIXED) - 1),
)
def test_run_pattern_is_exact_and_causal(s, block, density, causal, role, first, second):
    kw: dict = {}
    if role in ("fallback", "fallback+always"):
        kw.update(adaptive=False, fallback=_FIXED[first])
    if role == "short":
        kw.update(min_blocks=-(-s // block) + 1, fallback=_FIXED[first])
    if role in ("always", "fallback+always"):
        kw.update(always=_FIXED[second])
    mod = AdaptiveBlockSparseAttention(block, density, causal=causal, backend="blockwise", **kw)
    q, k, v = (t.requires_grad_() for t in _qkv(b=2, h=2, s=s, d=4, seed=s))
    out, sel = mod(q, k, v, return_selection=True)
    run = _run_mask(sel, 2, 2, s)
    want = _expected_mask(mod, q, k, used_fallback=role != "always")
    assert torch.equal(run, want)
    if causal:
        assert not run.triu(1).any()
    assert torch.equal(sel.selected, _token_tiles(run, block))
    ref = _dense(q, k, v, want)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)
    for a, r in zip(_grads(out, (q, k, v)), _grads(ref, (q, k, v))):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-11)


def test_straight_through_with_a_fallback_that_leaves_rows_empty():
    # rows 2.. attend nothing: their gate mass is 0, and the output must stay finite (zeros)
    fb = P.global_tokens(2) & P.local_window(1)
    kw = dict(head_dim=4, trainable=True, adaptive=False, fallback=fb, backend="blockwise")
    mod = AdaptiveBlockSparseAttention(8, 0.3, straight_through=True, **kw).double()
    q, k, v = _qkv(b=1, h=2, s=40, d=4)
    out = mod(q, k, v)
    assert torch.isfinite(out).all() and (out[:, :, 2:] == 0).all()
    grads = torch.autograd.grad((out * out.detach()).sum(), list(mod.parameters()))
    assert all(torch.isfinite(g).all() for g in grads)


def test_selection_density_on_a_rectangular_problem():
    q, _, _ = _qkv(b=1, h=2, s=40, d=8)
    _, k, _ = _qkv(b=1, h=2, s=56, d=8, seed=1)
    sel = AdaptiveBlockSparseAttention(16, 0.5).select(q, k)
    mask = sel.selected[:, :, torch.arange(40) // 16][:, :, :, torch.arange(56) // 16]
    assert sel.density() == pytest.approx(mask.double().mean().item(), abs=1e-12)


# --------------------------------------------------------------------- validation
_BAD_ARGS = [
    ({"density": True}, TypeError, "density"),
    ({"density": "0.5"}, TypeError, "density"),
    ({"density": 0.0}, ValueError, "density"),
    ({"density": 1.5}, ValueError, "density"),
    ({"density": float("nan")}, ValueError, "density"),
    ({"always": "x"}, TypeError, "always"),
    ({"fallback": "x", "adaptive": False}, TypeError, "fallback"),
    ({"ring_chunks": 0}, ValueError, "ring_chunks"),
    ({"sharding": "bogus"}, ValueError, "sharding"),
    ({"backend": "x"}, ValueError, "backend"),
    ({"block_size": 0}, ValueError, "block_size"),
    ({"min_blocks": 0}, ValueError, "min_blocks"),
    ({"min_blocks": 2.0}, ValueError, "min_blocks"),
    ({"min_blocks": True}, ValueError, "min_blocks"),
    ({"min_blocks": 4}, ValueError, "min_blocks=4 needs a fallback"),
    ({"adaptive": False}, ValueError, "fallback"),
    ({"trainable": True}, ValueError, "head_dim"),
    ({"trainable": True, "head_dim": 0}, ValueError, "head_dim"),
    ({"trainable": True, "head_dim": 8.0}, ValueError, "head_dim"),
    ({"causal": 1}, TypeError, "causal"),
    ({"causal": "yes"}, TypeError, "causal"),
    ({"adaptive": "no", "fallback": P.causal()}, TypeError, "adaptive"),
    ({"straight_through": True}, ValueError, "straight_through"),
    ({"fallback": P.random_blocks(0.5, num_heads=2), "always": P.random_blocks(0.5, num_heads=3),
      "adaptive": False}, ValueError, "always"),
]


@pytest.mark.parametrize(("kwargs", "exc", "match"), _BAD_ARGS,
                         ids=[",".join(f"{k}={v!r}" for k, v in a.items())
                              for a, _, _ in _BAD_ARGS])
def test_bad_constructor_arguments_fail_in_init(kwargs, exc, match):
    kw = {"block_size": 16, "density": 0.3, **kwargs}
    with pytest.raises(exc, match=match):
        AdaptiveBlockSparseAttention(kw.pop("block_size"), kw.pop("density"), **kw)


def _bad_calls():
    three = P.random_blocks(0.5, num_heads=3)
    q, k, v = _qkv(b=1, h=2, s=40, d=8)
    short = q[:, :, :30]
    yield "fallback heads", ValueError, "fallback", lambda: AdaptiveBlockSparseAttention(
        16, 0.3, adaptive=False, fallback=three)(q, k, v)
    yield "unused fallback heads", ValueError, "fallback", lambda: AdaptiveBlockSparseAttention(
        16, 0.3, fallback=three).select(q, k)
    yield "always heads", ValueError, "always", lambda: AdaptiveBlockSparseAttention(
        16, 0.3, always=three)(q, k, v)
    yield "gate head_dim", ValueError, "head_dim", lambda: AdaptiveBlockSparseAttention(
        16, 0.3, head_dim=4, trainable=True).double()(q, k, v)
    yield "causal lengths", ValueError, "causal", lambda: AdaptiveBlockSparseAttention(
        16, 0.3, causal=True)(short, k, v)
    yield "causal lengths (select)", ValueError, "causal", lambda: AdaptiveBlockSparseAttention(
        16, 0.3, causal=True).select(short, k)
    yield "select shapes", ValueError, "head_dim", lambda: AdaptiveBlockSparseAttention(
        16, 0.3).select(q, k[..., :4])
    yield "topk_budget bool", TypeError, "density", lambda: topk_budget(True, 4)
    yield "topk_budget str", TypeError, "density", lambda: topk_budget("0.5", 4)
    yield "topk_budget 0", ValueError, "density", lambda: topk_budget(0, 4)
    yield "select_blocks 1.5", ValueError, "density", lambda: select_blocks(
        torch.zeros(3, 3), 1.5)
    yield "select_blocks None", TypeError, "density", lambda: select_blocks(
        torch.zeros(3, 3), None)


@pytest.mark.parametrize(("name", "exc", "match", "call"), list(_bad_calls()),
                         ids=[c[0] for c in _bad_calls()])
def test_bad_calls_fail_clearly(name, exc, match, call):
    with pytest.raises(exc, match=match):
        call()


def test_cross_attention_without_causal_still_runs():
    q, _, _ = _qkv(b=1, h=2, s=30, d=8)
    _, k, v = _qkv(b=1, h=2, s=45, d=8, seed=2)
    mod = AdaptiveBlockSparseAttention(16, 0.5, always=P.global_tokens(1), backend="blockwise")
    out, sel = mod(q, k, v, return_selection=True)
    chosen = select_blocks(mod.scores(q, k), 0.5, keep_diagonal=False)
    want = chosen[:, :, torch.arange(30) // 16][:, :, :, torch.arange(45) // 16]
    want[..., 0, :] = want[..., :, 0] = True  # global token 0
    torch.testing.assert_close(out, _dense(q, k, v, want), rtol=1e-9, atol=1e-11)
