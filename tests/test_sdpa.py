"""The dense shortcut: dense and causal patterns run on PyTorch's own SDPA kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import grads, make_qkv

import workbench as wb
from workbench import backends as B
from workbench import patterns as P
from workbench.backends import sdpa as sdpa_module


@pytest.mark.parametrize("pattern, form", [
    (P.full(), "full"),
    (P.causal(), "causal"),
    (P.full() & P.causal(), "causal"),
    (P.causal() & P.full(), "causal"),
    (P.causal() & P.causal(), "causal"),
    (P.causal() | P.full(), "full"),
    (P.local_window(5) | P.full(), "full"),
    (P.local_window(5, causal=True), None),
    (P.local_window(5, causal=True) & P.causal(), None),
    (P.causal() | P.local_window(5), None),
    (P.global_tokens(2) & P.full(), None),
    (P.random_blocks(0.5, seed=0), None),
])
def test_dense_form_follows_the_pattern_structure(pattern, form):
    assert pattern.dense_form() == form


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Counts the calls the sdpa backend makes to ``scaled_dot_product_attention``."""
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs.get("is_causal", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(sdpa_module.F, "scaled_dot_product_attention", spy)
    return calls


@pytest.mark.parametrize("pattern, causal", [(P.full(), False), (P.causal(), True),
                                             (P.full() & P.causal(), True)])
@pytest.mark.parametrize("sq, sk", [(333, 333), (130, 257), (257, 130)])
def test_auto_runs_dense_and_causal_on_sdpa_and_matches_the_reference(
        pattern, causal, sq, sk, sdpa_calls):
    q, k, v = make_qkv(b=2, h=3, s=sq, sk=sk, d=16)
    out = wb.block_sparse_attention(q, k, v, pattern, block_size=64)
    assert sdpa_calls == [causal]  # one call, with the mask it needed
    ref = wb.block_sparse_attention(q, k, v, pattern, block_size=64, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    for a, b in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_scale_reaches_sdpa(sdpa_calls):
    q, k, v = make_qkv(b=1, h=2, s=100, d=8)
    out = wb.block_sparse_attention(q, k, v, P.causal(), 32, scale=0.3)
    ref = wb.block_sparse_attention(q, k, v, P.causal(), 32, scale=0.3, backend="reference")
    assert len(sdpa_calls) == 1
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kwargs", [dict(return_lse=True), dict(ring_chunks=3),
                                    dict(dropout_p=0.1, dropout_seed=0)])
def test_auto_keeps_block_sparse_backends_where_sdpa_cannot_serve(kwargs, sdpa_calls):
    q, k, v = make_qkv(b=1, h=2, s=200, d=8, requires_grad=False)
    res = wb.block_sparse_attention(q, k, v, P.causal(), 64, **kwargs)
    assert sdpa_calls == []
    if "ring_chunks" in kwargs:  # still the right answer, by the block-sparse path
        ref = wb.block_sparse_attention(q, k, v, P.causal(), 64, backend="reference")
        torch.testing.assert_close(res, ref, atol=1e-10, rtol=1e-10)


def test_offset_causal_slices_are_sdpas_only_when_their_windows_start_or_end_together():
    lay = P.causal().block_structure(256, 64, "cpu")
    problem = B.Problem(lay, P.causal().predicate("cpu"), 0.25, dense_form="causal")
    assert B.sdpa_form(problem) == "causal"
    assert B.sdpa_form(problem.slice((2, 4), (0, 3))) is None  # offsets 128 vs 0, 64 ahead
    assert B.sdpa_form(problem.slice((2, 4), (2, 4))) == "causal"  # start together
    assert B.sdpa_form(problem.slice((2, 4), (0, 4))) == "causal"  # end together
    full = B.Problem(lay, P.full().predicate("cpu"), 0.25, dense_form="full")
    assert B.sdpa_form(full.slice((2, 4), (0, 1))) == "full"
    q = torch.zeros(1, 1, 256, 8)

    def chosen(problem, need_lse):
        return B.choose("auto", B.Request.of(q, q, q, problem, need_lse)).name

    assert chosen(problem, need_lse=False) == "sdpa"
    assert chosen(problem, need_lse=True) == "blockwise"
    ahead, kv = problem.slice((2, 4), (0, 3)), q[:, :, :192]
    assert B.choose("auto", B.Request.of(q[:, :, :128], kv, kv, ahead, False)).name == "blockwise"
    with pytest.raises(ValueError, match="dense or causal attention only"):
        B.choose("sdpa", B.Request.of(q[:, :, :128], kv, kv, ahead, False))
    ending = problem.slice((2, 4), (0, 4))  # the last 128 of 256 positions: lower right
    assert B.choose("sdpa", B.Request.of(q[:, :, :128], q, q, ending, False)).name == "sdpa"


def test_a_module_with_a_causal_pattern_uses_sdpa(sdpa_calls):
    mha = wb.BlockSparseMultiheadAttention(32, 4, pattern=P.causal(), block_size=16,
                                           batch_first=True).double()
    x = torch.randn(2, 70, 32, dtype=torch.float64)
    out, _ = mha(x, x, x, need_weights=False)
    assert len(sdpa_calls) == 1
    assert out.shape == (2, 70, 32)


@pytest.mark.parametrize("call, match", [
    (lambda q, k, v: wb.block_sparse_attention(q, k, v, P.local_window(9), 32, backend="sdpa"),
     "dense or causal attention only"),
    (lambda q, k, v: wb.block_sparse_attention(q, k, v, P.causal(), 32, backend="sdpa",
                                               return_lse=True), "no log-sum-exp"),
    (lambda q, k, v: wb.block_sparse_attention(q, k, v, P.causal(), 32, backend="sdpa",
                                               ring_chunks=2), "no log-sum-exp"),
    (lambda q, k, v: wb.block_sparse_attention(q, k, v, P.full(), 32, backend="sdpa",
                                               dropout_p=0.5), "dropout"),
    (lambda q, k, v: wb.dilated_attention(q, k, v, [32], [2], backend="sdpa"), "gather"),
])
def test_sdpa_refuses_what_it_cannot_compute(call, match):
    q, k, v = make_qkv(b=1, h=4, s=64, d=8, requires_grad=False)
    with pytest.raises(ValueError, match=match):
        call(q, k, v)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("pattern", [P.full(), P.causal()], ids=["full", "causal"])
@pytest.mark.parametrize("sq, sk", [(1000, 1000), (384, 1000)])
def test_sdpa_on_gpu_matches_flex(pattern, sq, sk, sdpa_calls):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 4, sq, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(1, 4, sk, 64, device="cuda", dtype=torch.bfloat16, generator=g)
            for _ in range(2))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = wb.block_sparse_attention(q, k, v, pattern, 128)
    assert len(sdpa_calls) == 1
    ref = wb.block_sparse_attention(q, k, v, pattern, 128, backend="flex")
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    go = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), go),
                    torch.autograd.grad(ref, (q, k, v), go)):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)


def test_dense_and_causal_calls_build_no_block_layout(monkeypatch, sdpa_calls):
    def refuse(*args, **kwargs):
        raise AssertionError("a block layout was built")

    q, k, v = make_qkv(b=1, h=2, s=300, d=8, requires_grad=False)
    ref = wb.block_sparse_attention(q, k, v, P.causal(), 64, backend="reference")
    monkeypatch.setattr(P.Pattern, "block_structure", refuse)
    out = wb.block_sparse_attention(q, k, v, P.causal(), 64)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    wb.BlockSparseAttention(P.full(), 64)(q, k, v)
    mha = wb.BlockSparseMultiheadAttention(16, 2, pattern=P.full(), batch_first=True).double()
    x = torch.randn(1, 50, 16, dtype=torch.float64)
    mha(x, x, x, need_weights=False, is_causal=True)
    assert sdpa_calls == [True, False, True]
    with pytest.raises(AssertionError, match="block layout"):  # the lse needs the tiles
        wb.block_sparse_attention(q, k, v, P.causal(), 64, return_lse=True)
