"""Score modifications against PyTorch's own attention with the equivalent dense float mask.

The oracle materializes a score mod densely: ``attn_mask = mod(S) - S`` (``-inf`` where the
pattern forbids a pair), so ``softmax(S + attn_mask) = softmax(mod(S))``, gradients included
(they flow through the mask to q, k and the mod's parameters).
"""

from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import make_qkv

import workbench as wb
from workbench.backends import BackendUnsupported, get_backend, registered
from workbench.score_mods import RelativePositionBias, alibi, alibi_slopes, reads, soft_cap

P = wb.patterns
H = 4
CUDA = torch.cuda.is_available()


def _rpb(max_distance: int, buckets: int | None, seed: int = 0, heads: int = H
         ) -> RelativePositionBias:
    m = RelativePositionBias(heads, max_distance, buckets, dtype=torch.float64)
    with torch.no_grad():
        m.bias.copy_(torch.randn(m.bias.shape, generator=torch.Generator().manual_seed(seed)))
    return m


def _composed(s, b, h, q, k):  # a bias by batch element, then a cap: neither commutes
    return soft_cap(3.0)(alibi(H)(s, b, h, q, k) + 0.25 * b, b, h, q, k)


MODS = {
    "alibi": lambda: alibi(H),
    "alibi_symmetric": lambda: alibi(H, symmetric=True),
    "soft_cap": lambda: soft_cap(1.5),
    "rpb_clipped": lambda: _rpb(9, None),
    "rpb_buckets": lambda: _rpb(40, 10),
    "composed": lambda: _composed,
}
PATTERNS = {
    "local_global": lambda: P.local_window(13) | P.global_tokens(3),
    "dilated_causal": lambda: P.dilated([16, 32], [1, 2], H, causal=True),
    "full": lambda: P.full(),
}
SHAPES = {"square": (77, 77), "ragged": (45, 70)}


def dense_reference(q, k, v, pattern, mod, scale=None):
    """SDPA with the dense float mask equivalent to ``pattern`` and ``mod``."""
    sq, sk = q.shape[2], k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    ar = torch.arange
    modded = mod(s, ar(q.shape[0])[:, None, None, None], ar(q.shape[1])[None, :, None, None],
                 ar(sq)[:, None], ar(sk)[None, :])
    heads = ar(q.shape[1])[:, None, None] * (pattern.num_heads > 1)
    allowed = pattern.allowed(heads, ar(sq)[:, None], ar(sk)[None, :])
    mask = (modded - s).masked_fill(~allowed, -math.inf)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _params(mod) -> tuple[torch.Tensor, ...]:
    return tuple(mod.parameters()) if isinstance(mod, torch.nn.Module) else ()


def _check(backend, pattern, mod, sq, sk, *, tol=1e-10, **kw):
    q, k, v = make_qkv(b=2, h=H, s=sq, sk=sk, d=8, seed=sq + sk)
    out = wb.block_sparse_attention(q, k, v, pattern, 16, backend=backend, score_mod=mod, **kw)
    ref = dense_reference(q, k, v, pattern, mod)
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    inputs = (q, k, v, *_params(mod))
    mine = torch.autograd.grad((out * g).sum(), inputs)
    theirs = torch.autograd.grad((ref * g).sum(), inputs)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, atol=tol * 10, rtol=tol * 10)
    return mine


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("mod", list(MODS))
def test_blockwise_matches_sdpa_with_the_dense_mask(mod, pattern):
    _check("blockwise", PATTERNS[pattern](), MODS[mod](), *SHAPES["square"])


@pytest.mark.parametrize("backend", ["blockwise", "reference"])
@pytest.mark.parametrize("mod", ["rpb_buckets", "composed"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_ring_and_ragged_lengths_are_exact(backend, mod, shape):
    """Positions are absolute in every slice of the ring: the offsets reach the mod."""
    _check(backend, PATTERNS["local_global"](), MODS[mod](), *SHAPES[shape], ring_chunks=3)


def test_visit_order_and_auto_keep_the_result():
    _check("blockwise", PATTERNS["dilated_causal"](), MODS["rpb_clipped"](), 77, 77,
           block_order="hilbert")
    _check("auto", P.causal(), MODS["alibi"](), 77, 77)  # not sdpa, though causal


def test_parameter_gradients_are_not_zero_and_reach_a_module():
    """The check above compares gradients; this one makes sure they are not vacuous."""
    mod = _rpb(6, None)
    attn = wb.BlockSparseAttention(P.local_window(5), 16, score_mod=mod)  # |k - q| <= 4
    assert dict(attn.named_parameters())["score_mod.bias"] is mod.bias
    q, k, v = make_qkv(b=1, h=H, s=40, d=8)
    attn(q, k, v).square().sum().backward()
    grad = mod.bias.grad
    assert grad[:, 6 - 4: 6 + 4 + 1].abs().min() > 0  # every distance seen
    outside = grad[:, [0, 1, 11, 12]]  # distances -6, -5, 5, 6: outside the window
    assert torch.equal(outside, torch.zeros_like(outside))


def test_tensors_a_mod_reads_are_found_and_get_gradients():
    w = torch.randn(H, dtype=torch.float64, requires_grad=True)
    table = torch.randn(H, 8, dtype=torch.float64, requires_grad=True)
    derived = table * 2  # not a leaf: its gradient flows on to ``table``

    def closure_mod(s, b, h, q, k):
        return s * w[h].exp() + derived[h, (k - q).abs().clamp(max=7)]

    assert {id(t) for t in reads(closure_mod)} == {id(w), id(derived)}
    q, k, v = make_qkv(b=1, h=H, s=33, d=8)
    pattern = P.local_window(9)
    out = wb.block_sparse_attention(q, k, v, pattern, 16, score_mod=closure_mod)
    ref = dense_reference(q, k, v, pattern, closure_mod)
    mine = torch.autograd.grad(out.sum(), (w, table), retain_graph=True)  # derived's graph
    theirs = torch.autograd.grad(ref.sum(), (w, table))
    for a, b in zip(mine, theirs):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_a_tensor_out_of_reach_raises_instead_of_losing_its_gradient():
    holder = types.SimpleNamespace(w=torch.randn(H, dtype=torch.float64, requires_grad=True))

    def hidden(s, b, h, q, k):
        return s + holder.w[h]

    q, k, v = make_qkv(b=1, h=H, s=20, d=8)
    out = wb.block_sparse_attention(q, k, v, P.full(), 16, backend="blockwise", score_mod=hidden)
    with pytest.raises(ValueError, match="score_mod reads a tensor"):
        out.sum().backward()


def test_minus_inf_drops_pairs_and_an_emptied_row_gives_zeros():
    def drop(s, b, h, q, k):  # query 5 sees nothing; every other query drops its odd keys
        return s.masked_fill((q == 5) | ((k % 2 == 1) & (q != 5)), -math.inf)

    q, k, v = make_qkv(b=1, h=H, s=30, d=8, requires_grad=False)
    keep = (torch.arange(30)[None] % 2 == 0).expand(30, 30).clone()
    keep[5] = True  # SDPA would give NaN for an empty row: compare the others
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    for backend in ("blockwise", "reference"):
        out = wb.block_sparse_attention(q, k, v, P.full(), 8, backend=backend, score_mod=drop)
        rows = torch.arange(30) != 5
        torch.testing.assert_close(out[:, :, rows], want[:, :, rows], atol=1e-12, rtol=1e-12)
        assert torch.equal(out[:, :, 5], torch.zeros_like(out[:, :, 5]))


@pytest.mark.parametrize("backend", [b.name for b in registered()
                                     if not b.capabilities.score_mod])
def test_backends_without_score_mod_refuse_and_name_those_with(backend):
    q, k, v = make_qkv(b=1, h=H, s=64, d=16, requires_grad=False)
    pattern = P.dilated([16, 32], [1, 2], H) if backend == "gather" else P.causal()
    with pytest.raises(BackendUnsupported, match=f"backend '{backend}' cannot") as e:
        wb.block_sparse_attention(q, k, v, pattern, 32, backend=backend, score_mod=alibi(H))
    assert "applies no score_mod (backends that do: flex, blockwise, reference)" in str(e.value)
    assert not get_backend(backend).capabilities.score_mod
    assert wb.explain_backend(q, k, v, pattern, 32, score_mod=alibi(H)).name == "blockwise"


def test_bad_score_mods_raise_naming_the_argument():
    q, k, v = make_qkv(b=1, h=2, s=20, d=8, requires_grad=False)
    with pytest.raises(TypeError, match="score_mod"):
        wb.block_sparse_attention(q, k, v, P.full(), 8, score_mod=3.0)
    with pytest.raises(TypeError, match="score_mod"):
        wb.BlockSparseAttention(P.full(), score_mod="alibi")
    for backend in ("blockwise", "reference"):
        with pytest.raises(ValueError, match="elementwise"):
            wb.block_sparse_attention(q, k, v, P.full(), 8, backend=backend,
                                      score_mod=lambda s, b, h, q, k: s[..., None].expand(
                                          *s.shape, 2))
        with pytest.raises(TypeError, match="floating-point"):
            wb.block_sparse_attention(q, k, v, P.full(), 8, backend=backend,
                                      score_mod=lambda s, b, h, q, k: q - k)


# --------------------------------------------------------------------- the built-ins
def test_alibi_slopes_follow_the_paper():
    assert alibi_slopes(8) == [2.0 ** -i for i in range(1, 9)]
    assert alibi_slopes(4) == [2.0 ** (-2 * i) for i in range(1, 5)]
    # 6 heads: the 4 slopes of 4 heads, then every other slope of 8 heads (2^-1, 2^-3)
    assert alibi_slopes(6) == [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]
    assert alibi_slopes(1) == [2.0 ** -8]
    for n in (5, 12, 24):
        h = torch.arange(n)
        bias = alibi(n)(torch.zeros(n, dtype=torch.float64), h, h, torch.zeros(n, dtype=torch.long),
                        torch.full((n,), -3))
        torch.testing.assert_close(bias, -3 * torch.tensor(alibi_slopes(n), dtype=torch.float64))
    with pytest.raises(ValueError, match="num_heads"):
        alibi(0)


def test_soft_cap_bounds_scores():
    s = torch.linspace(-30, 30, 61, dtype=torch.float64)
    capped = soft_cap(5.0)(s, None, None, None, None)
    assert capped.abs().max() < 5 and torch.all(capped.diff() > 0)
    torch.testing.assert_close(capped, torch.tanh(s / 5) * 5)
    torch.testing.assert_close(capped[29:32], s[29:32], atol=0.02, rtol=0)  # ~identity near 0
    for bad in (0, -1.0, math.inf, True):
        with pytest.raises(ValueError, match="cap"):
            soft_cap(bad)


def test_relative_position_buckets():
    d = torch.arange(-60, 61)
    clipped = RelativePositionBias(2, 5).bucket(d)
    torch.testing.assert_close(clipped, d.clamp(-5, 5) + 5)
    m = RelativePositionBias(2, 40, 16)
    b = m.bucket(d)
    assert b.min() == 0 and b.max() == 15
    side, exact = 8, 4
    torch.testing.assert_close(b[60:60 + exact], side * (d[60:64] > 0) + d[60:64])  # exact
    torch.testing.assert_close(b[60 - exact + 1:61], torch.arange(exact - 1, -1, -1))
    assert torch.all(b[60:].diff() >= 0) and torch.all(b[:61].diff() <= 0)  # monotone in |d|
    assert torch.all(b[61:] >= side) and torch.all(b[:61] < side)  # one half per sign
    assert b[-1] == 15 and b[0] == side - 1  # beyond max_distance: the last bucket
    for kw in ({"num_buckets": 7}, {"num_buckets": 2}, {"num_buckets": 200}, {"max_distance": 0}):
        with pytest.raises(ValueError):
            RelativePositionBias(**{"num_heads": 2, "max_distance": 40, **kw})


# --------------------------------------------------------------------- the multi-head module
def _mha_pair(e=12, h=3, seed=0, **kw):
    torch.manual_seed(seed)
    ref = torch.nn.MultiheadAttention(e, h, batch_first=True, dtype=torch.float64)
    mine = wb.BlockSparseMultiheadAttention(e, h, batch_first=True, dtype=torch.float64,
                                            block_size=8, **kw)
    mine.load_state_dict(ref.state_dict(), strict=False)
    return ref, mine


@pytest.mark.parametrize("attn", ["2d", "3d"])
@pytest.mark.parametrize("pattern", [None, "local"])
@pytest.mark.parametrize("weights", ["dense", "compact"])
def test_multihead_float_masks_match_nn_multihead_attention(attn, pattern, weights):
    b, h, s, e = 2, 3, 21, 12
    pat = P.local_window(6) if pattern else None
    ref, mine = _mha_pair(e, h, pattern=pat)
    if weights == "compact":
        mine.dense_weights_limit = 1
    g = torch.Generator().manual_seed(3)
    x = torch.randn(b, s, e, generator=g, dtype=torch.float64, requires_grad=True)
    am = torch.randn((s, s) if attn == "2d" else (b * h, s, s), generator=g, dtype=torch.float64)
    am[..., 3, 5] = -math.inf
    am.requires_grad_(True)
    kpm = torch.randn(b, s, generator=g, dtype=torch.float64)
    kpm[:, 2] = -math.inf
    full = am if pat is None else am.masked_fill(~pat.token_mask(s)[0, :s, :s], -math.inf)
    out_r, w_r = ref(x, x, x, attn_mask=full, key_padding_mask=kpm, average_attn_weights=False)
    out_m, w_m = mine(x, x, x, attn_mask=am, key_padding_mask=kpm, need_weights=True,
                      average_attn_weights=False)
    torch.testing.assert_close(out_m, out_r, atol=1e-12, rtol=1e-12)
    w_m = w_m if weights == "dense" else w_m.to_dense()
    torch.testing.assert_close(w_m, w_r, atol=1e-12, rtol=1e-12)
    mine_g = torch.autograd.grad(out_m.square().sum(), (x, am))
    ref_g = torch.autograd.grad(out_r.square().sum(), (x, am))
    assert mine_g[1].abs().sum() > 0
    for a, c in zip(mine_g, ref_g):
        torch.testing.assert_close(a, c, atol=1e-11, rtol=1e-11)


def test_multihead_unbatched_per_head_float_mask():
    ref, mine = _mha_pair()
    x = torch.randn(17, 12, dtype=torch.float64)
    am = torch.randn(3, 17, 17, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(mine(x, x, x, attn_mask=am)[0], ref(x, x, x, attn_mask=am)[0],
                               atol=1e-12, rtol=1e-12)


def test_multihead_score_mod_sees_batch_and_head_when_the_batch_is_folded():
    """A per-batch key padding mask folds the batch into the heads; the module's score mod
    still gets (batch element, head): compared with the folded problem computed densely with
    the unfolded indices."""
    b, h, s = 2, 3, 19
    mod = _rpb(4, None, seed=5, heads=h)
    ref, mine = _mha_pair(h=h, score_mod=lambda sc, bb, hh, q, k: _composed(
        mod(sc, bb, hh, q, k), bb, hh, q, k))
    x = torch.randn(b, s, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    kpm = torch.zeros(b, s, dtype=torch.bool)
    kpm[1, -4:] = True
    out_m = mine(x, x, x, key_padding_mask=kpm)[0]
    q, k, v = (t.reshape(b, s, h, 4).transpose(1, 2) for t in mine._project(x, x, x))
    pad = P.KeyMask((~kpm).repeat_interleave(h, 0))
    want = dense_reference(q.reshape(1, b * h, s, 4), k.reshape(1, b * h, s, 4),
                           v.reshape(1, b * h, s, 4), pad,
                           lambda sc, bb, hh, qq, kk: mine.score_mod(sc, hh // h, hh % h, qq, kk))
    want = mine.out_proj(want.reshape(b, h, s, 4).transpose(1, 2).reshape(b, s, 12))
    torch.testing.assert_close(out_m, want, atol=1e-12, rtol=1e-12)


# --------------------------------------------------------------------- FlexAttention
@pytest.mark.slow
@pytest.mark.parametrize("mod", ["rpb_buckets", "composed"])
def test_flex_on_cpu_matches_sdpa_with_the_dense_mask(mod):
    q, k, v = (x.float() for x in make_qkv(b=2, h=H, s=77, d=16, requires_grad=False))
    pattern = PATTERNS["local_global"]()
    m = MODS[mod]()
    m = m.float() if isinstance(m, torch.nn.Module) else m
    if _params(m):  # they require grad: a training call, which flex refuses on the CPU
        with pytest.raises(BackendUnsupported, match="no gradients on cpu"):
            wb.block_sparse_attention(q, k, v, pattern, 16, backend="flex", score_mod=m)
    with torch.no_grad():  # FlexAttention on the CPU: inference only
        out = wb.block_sparse_attention(q, k, v, pattern, 16, backend="flex", score_mod=m)
        ref = dense_reference(q, k, v, pattern, m)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("mod", ["alibi", "rpb_buckets", "composed"])
@pytest.mark.parametrize("ring_chunks", [1, 3])
def test_flex_on_gpu_forward_backward_and_parameters(mod, ring_chunks):
    q, k, v = (x.detach().cuda().float().requires_grad_()
               for x in make_qkv(b=2, h=H, s=300, d=32))
    pattern = PATTERNS["dilated_causal"]() | P.global_tokens(5)
    m = MODS[mod]()
    m = m.cuda().float() if isinstance(m, torch.nn.Module) else m
    out, lse = wb.block_sparse_attention(q, k, v, pattern, 64, backend="flex", score_mod=m,
                                         return_lse=True, ring_chunks=ring_chunks)
    ref, ref_lse = wb.block_sparse_attention(q, k, v, pattern, 64, backend="reference",
                                             score_mod=m, return_lse=True)
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(lse, ref_lse, atol=2e-4, rtol=2e-4)
    inputs = (q, k, v, *_params(m))
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad((out * g).sum(), inputs),
                    torch.autograd.grad((ref * g).sum(), inputs)):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)
