"""LongNet dilated attention: paper mode against a float64 oracle, head-group mode against
the block-sparse pattern, the dilation-ordering (gather) path against natural order."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import grads, make_qkv

import workbench as wb
from workbench import patterns as P
from workbench.backends import gather

CONFIGS = [
    ([64, 128], [1, 2]),
    ([50, 120, 300], [1, 3, 4]),  # segments that do not divide S, dilations that do not divide w
    ([100], [7]),
]


def paper_oracle(q, k, v, segments, dilations, causal, with_lse=False):
    """LongNet in float64: one softmax over every branch's keys, a key counted once per branch
    that keeps the pair (so each branch weighs by its softmax denominator); with its
    log-sum-exp when asked."""
    h, s, d = q.shape[1], q.shape[2], q.shape[3]
    mult = torch.zeros(h, s, s, dtype=torch.float64)
    for w, r in zip(segments, dilations):
        mult += P.dilated_branch(w, r, h).token_mask(s).double()
    if causal:
        mult = mult * torch.ones(s, s, dtype=torch.float64).tril()
    scores = q @ k.transpose(-1, -2) / math.sqrt(d) + torch.log(mult)
    empty = (mult == 0).all(-1)[..., None]
    p = torch.softmax(scores.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    if with_lse:
        lse = torch.logsumexp(scores.masked_fill(empty, 0.0), -1)
        return p @ v, lse.masked_fill(empty[..., 0], -torch.inf)
    return p @ v


@pytest.fixture(params=["whole_runs", "one_head_at_a_time", "read_in_place"])
def gather_chunks(request, monkeypatch):
    """The gather path as it runs at small sizes (every head of a run at once, strided views
    copied into one batch) and as it runs at long lengths (a few heads at a time, here one;
    q, k, v read in place through the views, one call per offset)."""
    if request.param != "whole_runs":
        monkeypatch.setattr(gather, "GATHER_MIN_BYTES", 0)
        monkeypatch.setattr(gather, "GATHER_HEAD_FRACTION", 0.0)
    if request.param == "read_in_place":
        monkeypatch.setattr(gather, "GATHER_HEAD_FRACTION", 0.5)
        monkeypatch.setattr(gather, "IN_PLACE_MIN_BYTES", 0)
    return request.param


# S = 333: no segment divides it (padded last segments, gathered by index);
# S = 384 with CONFIGS[0] and S = 600 with dilations that do not divide their segments: every
# slot is a real position (gathered as strided views)
STRIDED = [(*CONFIGS[0], 384), ([75, 150], [4, 8], 600)]


@pytest.mark.parametrize("heads_kv", [1, 2])
@pytest.mark.parametrize("mode", ["paper", "head_groups"])
def test_grouped_query_heads_match_repeated_heads(heads_kv, mode, gather_chunks):
    """Query head h reads key/value head h // (H / H_kv), in the function and the module,
    forward and backward, against the float64 oracle (paper) or the block-sparse pattern."""
    segments, dilations = CONFIGS[0]
    q, _, _ = make_qkv(b=2, h=4, s=333, d=8)
    _, k, v = make_qkv(b=2, h=heads_kv, s=333, d=8, seed=1)
    module = wb.DilatedAttention(segments, dilations, mode=mode)
    ks, vs = (x.repeat_interleave(4 // heads_kv, dim=1) for x in (k, v))
    ref = (paper_oracle(q, ks, vs, segments, dilations, False) if mode == "paper" else
           wb.block_sparse_attention(q, ks, vs, P.dilated(segments, dilations, 4), 32,
                                     backend="reference"))
    theirs = grads(ref, (q, k, v))
    for out in (wb.dilated_attention(q, k, v, segments, dilations, mode=mode), module(q, k, v)):
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
        for a, b in zip(grads(out, (q, k, v)), theirs):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
    _, k3, v3 = make_qkv(b=2, h=3, s=333, d=8)
    with pytest.raises(ValueError, match="grouped-query"):
        module(q, k3, v3)


@pytest.mark.parametrize("segments, dilations, s", [(*c, 333) for c in CONFIGS] + STRIDED)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", ["gather", "blockwise"])
def test_paper_mode_matches_float64_oracle(segments, dilations, s, causal, backend,
                                           gather_chunks):
    q, k, v = make_qkv(b=2, h=4, s=s, d=8)
    out = wb.dilated_attention(q, k, v, segments, dilations, mode="paper", causal=causal,
                               backend=backend, block_size=32)
    ref = paper_oracle(q, k, v, segments, dilations, causal)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    with torch.no_grad():  # inference reads strided views where every slot is real
        again = wb.dilated_attention(q, k, v, segments, dilations, mode="paper", causal=causal,
                                     backend=backend, block_size=32)
    torch.testing.assert_close(again, ref, atol=1e-10, rtol=1e-10)
    for a, b in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("segments, dilations, s", [(*c, 333) for c in CONFIGS] + STRIDED)
@pytest.mark.parametrize("causal", [False, True])
def test_head_groups_is_block_sparse_with_the_pattern(segments, dilations, s, causal,
                                                      gather_chunks):
    q, k, v = make_qkv(b=2, h=5, s=s, d=8)
    pattern = P.dilated(segments, dilations, 5, causal=causal)
    gathered = wb.dilated_attention(q, k, v, segments, dilations, mode="head_groups",
                                    causal=causal)
    sparse = wb.block_sparse_attention(q, k, v, pattern, 32)
    reference = wb.block_sparse_attention(q, k, v, pattern, 32, backend="reference")
    torch.testing.assert_close(gathered, reference, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(sparse, reference, atol=1e-10, rtol=1e-10)
    with torch.no_grad():  # inference reads strided views where every slot is real
        again = wb.dilated_attention(q, k, v, segments, dilations, mode="head_groups",
                                     causal=causal)
    torch.testing.assert_close(again, reference, atol=1e-10, rtol=1e-10)
    for a, b in zip(grads(gathered, (q, k, v)), grads(reference, (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
    # positions a head does not keep output zeros
    kept = pattern.token_mask(s).any(-1)
    assert torch.all(gathered[:, ~kept] == 0)


@pytest.mark.parametrize("s", [200, 192])  # padded last segments / strided views
def test_head_groups_lse_matches_block_sparse(s, gather_chunks):
    q, k, v = make_qkv(b=1, h=4, s=s, d=8, requires_grad=False)
    o1, l1 = wb.dilated_attention(q, k, v, [64, 96], [1, 2], mode="head_groups",
                                  return_lse=True)
    o2, l2 = wb.block_sparse_attention(q, k, v, P.dilated([64, 96], [1, 2], 4), 16,
                                       return_lse=True)
    torch.testing.assert_close(o1, o2, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(l1, l2, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("mode", ["paper", "head_groups"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("segments, dilations, s", STRIDED)
def test_fused_kernel_path_is_exact_through_out_and_lse(mode, causal, segments, dilations, s,
                                                        gather_chunks, monkeypatch):
    """Full segments run the fused kernel on strided views (checked), paper mode merged inside
    it; gradients flow through the output and the log-sum-exp."""
    calls = []
    apply = gather._DilationOrdered.apply
    monkeypatch.setattr(gather._DilationOrdered, "apply",
                        lambda *a: calls.append(1) or apply(*a))
    q, k, v = make_qkv(b=1 if causal else 2, h=4, s=s, d=8)  # batch 1: views, not copies
    out, lse = wb.dilated_attention(q, k, v, segments, dilations, mode=mode, causal=causal,
                                    return_lse=True)
    # at S = 600 head 3 of the paper's (75, 4) branch runs past its segments: gathered by index
    assert bool(calls) == (mode == "head_groups" or s == 384)
    if mode == "paper":
        want, want_lse = paper_oracle(q, k, v, segments, dilations, causal, with_lse=True)
    else:
        pattern = P.dilated(segments, dilations, 4)
        want, want_lse = wb.block_sparse_attention(
            q, k, v, pattern & P.causal() if causal else pattern, 16, backend="reference",
            return_lse=True)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)
    kept = torch.isfinite(want_lse)
    torch.testing.assert_close(lse[kept], want_lse[kept], atol=1e-10, rtol=1e-10)
    assert torch.all(lse[~kept] == -torch.inf)
    gen = torch.Generator().manual_seed(3)
    g_out, g_lse = torch.randn(out.shape, generator=gen), torch.randn(lse.shape, generator=gen)

    def loss(o, m):
        return (o * g_out).sum() + (m.masked_fill(~kept, 0.0) * g_lse).sum()

    got = torch.autograd.grad(loss(out, lse), (q, k, v))
    for a, b in zip(got, torch.autograd.grad(loss(want, want_lse), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("through", ["out", "lse"])
def test_fused_paper_mode_gradients_through_one_output(through, gather_chunks):
    """Gradients through the output alone, or the log-sum-exp alone, of the merged fused pass."""
    segments, dilations, s = STRIDED[0]
    q, k, v = make_qkv(b=1, h=4, s=s, d=8)
    got = wb.dilated_attention(q, k, v, segments, dilations, mode="paper", return_lse=True)
    want = paper_oracle(q, k, v, segments, dilations, False, with_lse=True)
    pick = 0 if through == "out" else 1
    g = torch.randn(got[pick].shape, generator=torch.Generator().manual_seed(4))
    for a, b in zip(torch.autograd.grad((got[pick] * g).sum(), (q, k, v), allow_unused=True),
                    torch.autograd.grad((want[pick] * g).sum(), (q, k, v), allow_unused=True)):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b,
                                   atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
def test_fused_kernel_path_in_low_precision(dtype, tol):
    q, k, v = make_qkv(b=1, h=4, s=384, d=16)
    low = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    for mode in ("paper", "head_groups"):
        want = wb.dilated_attention(q, k, v, [64, 128], [1, 2], mode=mode)
        out = wb.dilated_attention(*low, [64, 128], [1, 2], mode=mode)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
        g = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=want.dtype)
        got = torch.autograd.grad(out, low, g.to(dtype))
        for a, b in zip(got, torch.autograd.grad(want, (q, k, v), g)):
            torch.testing.assert_close(a.double(), b, atol=2 * tol, rtol=2 * tol)


def test_fused_kernel_path_takes_inputs_of_any_strides():
    q, k, v = make_qkv(b=1, h=4, s=384, d=8, requires_grad=False)
    want = wb.dilated_attention(q, k, v, [64, 128], [1, 2], mode="paper")
    odd = [x.transpose(-1, -2).contiguous().transpose(-1, -2) for x in (q, k, v)]
    assert odd[0].stride(-1) != 1
    torch.testing.assert_close(wb.dilated_attention(*odd, [64, 128], [1, 2], mode="paper"), want)


def test_modes_differ_and_single_pair_modes_agree():
    q, k, v = make_qkv(b=1, h=4, s=256, d=8, requires_grad=False)
    a = wb.dilated_attention(q, k, v, [64, 128], [1, 2], mode="paper")
    b = wb.dilated_attention(q, k, v, [64, 128], [1, 2], mode="head_groups")
    assert (a - b).abs().max() > 1e-2
    a = wb.dilated_attention(q, k, v, [64], [2], mode="paper")
    b = wb.dilated_attention(q, k, v, [64], [2], mode="head_groups")
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_paper_mode_is_not_the_branch_normalized_variant():
    """fkodom-style: each branch divided by its sum over the sequence, branches averaged."""
    q, k, v = make_qkv(b=1, h=2, s=128, d=8, requires_grad=False)
    segs, dils = [32, 64], [1, 2]
    ours = wb.dilated_attention(q, k, v, segs, dils, mode="paper")
    branches = [wb.dilated_attention(q, k, v, [w], [r], mode="paper") for w, r in zip(segs, dils)]
    other = sum(o / o.sum(dim=2, keepdim=True) for o in branches) / len(branches)
    assert (ours - other).abs().max() > 1e-2


@pytest.mark.parametrize("kw, a, b", [
    ("segment_lengths", [32, 64], [48, 64]),
    ("dilation_rates", [1, 2], [1, 4]),
])
@pytest.mark.parametrize("mode", ["paper", "head_groups"])
def test_knobs_change_the_output(kw, a, b, mode):
    q, k, v = make_qkv(b=1, h=4, s=256, d=8, requires_grad=False)
    base = dict(segment_lengths=[32, 64], dilation_rates=[1, 2])
    oa = wb.dilated_attention(q, k, v, **{**base, kw: a}, mode=mode)
    ob = wb.dilated_attention(q, k, v, **{**base, kw: b}, mode=mode)
    assert (oa - ob).abs().max() > 1e-3


@pytest.mark.parametrize("kw, exc, match", [
    (dict(segment_lengths=[32, 64], dilation_rates=[1]), ValueError, "same length"),
    (dict(segment_lengths=[8], dilation_rates=[16]), ValueError, "larger than its segment"),
    (dict(mode="longnet"), ValueError, "mode"),
    (dict(backend="fast"), ValueError, "backend"),
    (dict(segment_lengths=[0], dilation_rates=[1]), ValueError, "segment_lengths"),
    (dict(segments=[8]), TypeError, "segments"),
    (dict(segment_lengths=32), TypeError, "segment_lengths"),
])
@pytest.mark.parametrize("plan", [None, "plans"])
def test_bad_arguments(kw, exc, match, plan):
    q, k, v = make_qkv(b=1, h=2, s=64, d=8, requires_grad=False)
    args = dict(segment_lengths=[32], dilation_rates=[1])
    args.update(kw)
    with pytest.raises(exc, match=match):
        wb.dilated_attention(q, k, v, **args, plan=None if plan is None else wb.Plans())


def test_head_groups_needs_a_head_per_pair():
    q, k, v = make_qkv(b=1, h=2, s=64, d=8, requires_grad=False)
    with pytest.raises(ValueError, match="num_heads"):
        wb.dilated_attention(q, k, v, [8, 16, 32], [1, 2, 4], mode="head_groups")


@pytest.mark.parametrize("seq_len", [77, 1000, 1024])
def test_naive_strided_gather_baseline_computes_the_same_output(seq_len):
    from workbench.lab.bench import strided_gather_dilated

    q, k, v = make_qkv(b=2, h=5, s=seq_len, d=16, requires_grad=False)
    want = wb.dilated_attention(q, k, v, [64, 128, 256], [1, 2, 4], mode="head_groups")
    torch.testing.assert_close(strided_gather_dilated(q, k, v, [64, 128, 256], [1, 2, 4]), want)


def test_naive_strided_view_baseline_computes_the_same_output():
    from workbench.lab.bench import strided_view_dilated

    q, k, v = make_qkv(b=2, h=7, s=1024, d=16, requires_grad=False)
    want = wb.dilated_attention(q, k, v, [64, 128, 256], [1, 2, 4], mode="head_groups")
    torch.testing.assert_close(strided_view_dilated(q, k, v, [64, 128, 256], [1, 2, 4]), want)
    with pytest.raises(ValueError, match="multiple of every segment"):
        strided_view_dilated(q[:, :, :1000], k, v, [64, 128, 256], [1, 2, 4])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["paper", "head_groups"])
def test_gather_path_with_lse_on_gpu_matches_float64_cpu(mode):
    q, k, v = make_qkv(b=1, h=4, s=1000, d=64)
    want, want_lse = wb.dilated_attention(q, k, v, [128, 256], [1, 2], mode=mode, return_lse=True)
    dout = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=want.dtype)
    g = torch.autograd.grad(want, (q, k, v), dout)
    qc, kc, vc = (x.detach().float().cuda().requires_grad_() for x in (q, k, v))
    out, lse = wb.dilated_attention(qc, kc, vc, [128, 256], [1, 2], mode=mode, return_lse=True)
    torch.testing.assert_close(out.cpu().double(), want, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(lse.cpu().double(), want_lse.double(), rtol=1e-3, atol=1e-3)
    for a, b in zip(torch.autograd.grad(out, (qc, kc, vc), dout.float().cuda()), g):
        torch.testing.assert_close(a.cpu().double(), b, rtol=5e-3, atol=5e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["paper", "head_groups"])
@pytest.mark.parametrize("causal", [False, True])
def test_fused_kernel_on_gpu_matches_float64_cpu(mode, causal, monkeypatch):
    """bf16 on CUDA runs flash attention on strided views (checked), forward and backward,
    gradients through out and lse."""
    calls = []
    apply = gather._DilationOrdered.apply
    monkeypatch.setattr(gather._DilationOrdered, "apply",
                        lambda *a: calls.append(1) or apply(*a))
    q, k, v = make_qkv(b=2, h=8, s=2048, d=64)
    segs, dils = [256, 512, 1024, 2048], [1, 2, 4, 8]
    want, want_lse = wb.dilated_attention(q, k, v, segs, dils, mode=mode, causal=causal,
                                          return_lse=True)
    gen = torch.Generator().manual_seed(1)
    g_out = torch.randn(want.shape, generator=gen, dtype=want.dtype)
    g_lse = torch.randn(want_lse.shape, generator=gen, dtype=want_lse.dtype)
    kept = torch.isfinite(want_lse)

    def loss(o, m, dev):
        return (o.double() * g_out.to(dev)).sum() + (
            m.double().masked_fill(~kept.to(dev), 0.0) * g_lse.to(dev)).sum()

    ref = torch.autograd.grad(loss(want, want_lse, "cpu"), (q, k, v))
    low = [x.detach().to("cuda", torch.bfloat16).requires_grad_() for x in (q, k, v)]
    out, lse = wb.dilated_attention(*low, segs, dils, mode=mode, causal=causal, return_lse=True)
    assert calls and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.cpu().double(), want, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(lse.cpu().double()[kept], want_lse[kept], rtol=1e-2, atol=1e-2)
    for a, b in zip(torch.autograd.grad(loss(out, lse, "cuda"), low), ref):
        torch.testing.assert_close(a.cpu().double(), b, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("mode", ["paper", "head_groups"])
def test_auto_runs_the_one_pass_dilation_ordering(mode, monkeypatch):
    """``backend="auto"`` picks the dilation ordering for LongNet's patterns: the same one pass
    as ``"gather"``, bit for bit."""
    calls = []
    apply = gather._DilationOrdered.apply
    monkeypatch.setattr(gather._DilationOrdered, "apply", lambda *a: calls.append(1) or apply(*a))
    q, k, v = make_qkv(b=1, h=4, s=384, d=8)
    auto = wb.dilated_attention(q, k, v, [64, 128], [1, 2], mode=mode, backend="auto",
                                return_lse=True)
    assert calls == [1]
    want = wb.dilated_attention(q, k, v, [64, 128], [1, 2], mode=mode, return_lse=True)
    for a, b in zip(auto, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_function_with_plans_prepares_once_and_matches(monkeypatch):
    """A ``Plans`` the caller keeps: a repeated call runs the kept runner (prepared once), a
    call that differs prepares again; results equal the call without it, bit for bit."""
    prepared = []
    prepare = gather.prepare_dilated
    monkeypatch.setattr("workbench.dilated.prepare_dilated",
                        lambda *a, **kw: prepared.append(1) or prepare(*a, **kw))
    q, k, v = make_qkv(b=1, h=4, s=384, d=8, requires_grad=False)
    plans = wb.Plans()
    args = ([64, 128], [1, 2])
    want = wb.dilated_attention(q, k, v, *args)
    for _ in range(3):
        torch.testing.assert_close(wb.dilated_attention(q, k, v, *args, plan=plans), want,
                                   atol=0, rtol=0)
    assert len(prepared) == 1 + 1
    other = wb.dilated_attention(q, k, v, *args, mode="head_groups", plan=plans)
    torch.testing.assert_close(other, wb.dilated_attention(q, k, v, *args, mode="head_groups"))
    assert len(prepared) == 2 + 2
    with pytest.raises(ValueError, match="mode"):
        wb.dilated_attention(q, k, v, *args, mode="longnet", plan=plans)
    with pytest.raises(TypeError, match="plan must be a workbench Plans, got Plan"):
        wb.dilated_attention(q, k, v, *args, plan=wb.Plan(P.full(), 384))


@pytest.mark.parametrize("mode", ["paper", "head_groups"])
def test_copied_branches_of_equal_slots_share_one_kernel_call(mode, monkeypatch):
    """Copied (small) inputs: branches whose segments keep equally many slots share one kernel
    call (segments 64 and 128 at dilations 1 and 2 both keep 64), others get their own; in
    paper mode a position then repeats inside one call and is merged across calls."""
    calls = []

    def counted(kernel):
        def forward(q, *rest):
            calls.append(q.shape[-2])
            return kernel.forward(q, *rest)
        return gather.SegmentKernel(forward, kernel.backward)

    real = gather.segment_kernel
    monkeypatch.setattr(gather, "segment_kernel", lambda *a: counted(real(*a)))
    q, k, v = make_qkv(b=1, h=6, s=384, d=8)
    for segments, dilations, slots in (([64, 128], [1, 2], [64]),
                                       ([64, 128, 192], [1, 2, 2], [64, 96])):
        calls.clear()
        out, lse = wb.dilated_attention(q, k, v, segments, dilations, mode=mode,
                                        return_lse=True)
        assert sorted(calls) == slots
        if mode == "paper":
            want, want_lse = paper_oracle(q, k, v, segments, dilations, False, with_lse=True)
        else:
            want, want_lse = wb.block_sparse_attention(
                q, k, v, P.dilated(segments, dilations, 6), 16, backend="reference",
                return_lse=True)
        kept = torch.isfinite(want_lse)
        torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(lse[kept], want_lse[kept], atol=1e-10, rtol=1e-10)
        loss = (out * out).sum() + lse.masked_fill(~kept, 0.0).sum()
        ref_loss = (want * want).sum() + want_lse.masked_fill(~kept, 0.0).sum()
        for g, h in zip(torch.autograd.grad(loss, (q, k, v)),
                        torch.autograd.grad(ref_loss, (q, k, v))):
            torch.testing.assert_close(g, h, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("gather_chunks", ["whole_runs", "read_in_place"], indirect=True)
def test_paper_mode_merges_logits_far_apart(gather_chunks):
    """Logits so large that a merge shifted by any log-sum-exp but the largest overflows."""
    q, k, v = make_qkv(b=1, h=2, s=384, d=8, requires_grad=False)
    q = q * 2000.0
    out, lse = wb.dilated_attention(q, k, v, [64, 128], [1, 2], mode="paper", return_lse=True)
    want, want_lse = paper_oracle(q, k, v, [64, 128], [1, 2], False, with_lse=True)
    assert (want_lse.amax() - want_lse.amin()) > 1000
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, want_lse, atol=1e-10, rtol=1e-10)
