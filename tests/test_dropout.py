"""Attention-weight dropout: hashed keep decisions, checked against a dense float64 oracle."""

from __future__ import annotations

import math

import pytest
import torch

import workbench as wb
import workbench.patterns as P
from tests.conftest import grads, make_qkv
from workbench.backends import AttentionDropout
from workbench.multihead import BlockSparseMultiheadAttention


def dropout_oracle(q, k, v, pattern, p, seed):
    """Float64 softmax over the allowed pairs, probabilities times the keep scale ``Z``."""
    bsz, h, sq, d = q.shape
    sk = k.shape[2]
    hh = torch.arange(pattern.num_heads)[:, None, None]
    allowed = pattern.allowed(hh, torch.arange(sq)[None, :, None], torch.arange(sk)[None, None, :])
    s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(d)
    s = s.masked_fill(~allowed, -torch.inf)
    prob = torch.softmax(s, -1).nan_to_num(0.0)
    head_index = (torch.arange(bsz)[:, None] * h + torch.arange(h)[None, :])[..., None, None]
    z = AttentionDropout(p, seed).scale(head_index, torch.arange(sq)[:, None],
                                        torch.arange(sk)[None, :])
    return (prob * z.double()) @ v.double()


PATTERNS = {
    "local_global": P.local_window(23) | P.global_tokens(5),
    "causal": P.causal(),
    "dilated": P.dilated([32, 64], [1, 2], num_heads=3),
}


@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("ring_chunks,block_order", [(1, None), (3, None), (1, "hilbert")])
def test_blockwise_dropout_matches_oracle_forward_and_backward(name, ring_chunks, block_order):
    pattern = PATTERNS[name]
    q, k, v = make_qkv(b=2, h=3, s=101, d=8)
    out = wb.block_sparse_attention(q, k, v, pattern, 16, backend="blockwise", dropout_p=0.3,
                                    dropout_seed=7, ring_chunks=ring_chunks,
                                    block_order=block_order)
    ref = dropout_oracle(q, k, v, pattern, 0.3, 7)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-10)
    for a, b in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


def test_reference_backend_applies_the_same_dropout():
    q, k, v = make_qkv(b=1, h=2, s=40, d=8, requires_grad=False)
    kw = dict(dropout_p=0.5, dropout_seed=3)
    a = wb.block_sparse_attention(q, k, v, P.causal(), 8, backend="reference", **kw)
    b = wb.block_sparse_attention(q, k, v, P.causal(), 8, backend="blockwise", **kw)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_drop_rate_seeds_and_lse():
    z = AttentionDropout(0.3, 11).scale(torch.arange(4)[:, None, None],
                                        torch.arange(300)[:, None], torch.arange(300)[None, :])
    assert abs(float((z == 0).float().mean()) - 0.3) < 0.01
    assert torch.all((z == 0) | torch.isclose(z, torch.tensor(1 / 0.7)))
    q, k, v = make_qkv(b=1, h=2, s=64, d=8, requires_grad=False)
    run = lambda **kw: wb.block_sparse_attention(q, k, v, P.full(), 16, return_lse=True, **kw)  # noqa: E731
    o1, l1 = run(dropout_p=0.2, dropout_seed=1)
    o2, _ = run(dropout_p=0.2, dropout_seed=1)
    o3, _ = run(dropout_p=0.2, dropout_seed=2)
    o0, l0 = run()
    assert torch.equal(o1, o2) and not torch.allclose(o1, o3)
    torch.testing.assert_close(l1, l0)  # dropout leaves the softmax denominator alone
    torch.testing.assert_close(run(dropout_p=0.0, dropout_seed=5)[0], o0)


def test_dropout_errors():
    q, k, v = make_qkv(b=1, h=1, s=16, d=8, requires_grad=False)
    with pytest.raises(ValueError, match="dropout_p"):
        wb.block_sparse_attention(q, k, v, P.full(), 8, dropout_p=1.0)
    with pytest.raises(NotImplementedError, match="dropout"):
        wb.block_sparse_attention(q.float(), k.float(), v.float(), P.full(), 8, backend="flex",
                                  dropout_p=0.1)


def test_multihead_dropout_trains_repeatably_and_is_unbiased():
    torch.manual_seed(0)
    m = BlockSparseMultiheadAttention(12, 3, dropout=0.25, batch_first=True, block_size=8,
                                      dtype=torch.float64, pattern=P.local_window(9))
    x = torch.randn(2, 21, 12, dtype=torch.float64, requires_grad=True)
    m.eval()
    expected, _ = m(x, x, x)
    m.train()
    torch.manual_seed(5)
    a, _ = m(x, x, x)
    torch.manual_seed(5)
    b, _ = m(x, x, x)
    assert torch.equal(a, b) and not torch.allclose(a, expected)
    assert all(g.abs().sum() > 0 for g in torch.autograd.grad(a.sum(), [x, m.in_proj_weight]))
    with torch.no_grad():  # E[Z] = 1: the mean over many masks approaches the eval output
        mean = torch.stack([m(x, x, x)[0] for _ in range(64)]).mean(0)
    rel = lambda y: float((y - expected).abs().mean() / expected.abs().mean())  # noqa: E731
    a, expected = a.detach(), expected.detach()
    assert rel(mean) < 0.3 * rel(a), (rel(mean), rel(a))
