"""The last call's runner: a call that repeats the last one made through a plan or a module goes
straight to the kernel prepared for it; any change of shape, dtype, grad mode, option or pattern
object prepares the call again, and every argument is still checked."""

from __future__ import annotations

import collections
import copy
import pickle

import pytest
import torch
from conftest import grads, make_qkv, sdpa_oracle
from torch.utils._python_dispatch import TorchDispatchMode

import workbench as wb
from workbench import attention, dilated
from workbench.plan import LastCall

P = wb.patterns
PATTERN = (P.local_window(24) | P.global_tokens(3)) & P.causal()  # full and partial tiles
B = 16  # block size


def _counts(monkeypatch) -> collections.Counter:
    """How often the full path's steps run: layouts built, backends chosen, calls prepared,
    plans looked up (a hash of the pattern), the pattern's key and repr asked for."""
    counts: collections.Counter = collections.Counter()

    def count(owner, name, label):
        real = getattr(owner, name)

        def counted(*a, **kw):
            counts[label] += 1
            return real(*a, **kw)

        monkeypatch.setattr(owner, name, counted)

    count(P.Pattern, "block_structure", "layout")
    count(attention, "choose", "choose")
    count(attention, "prepare", "prepare")
    count(dilated, "prepare", "prepare")
    count(dilated, "prepare_dilated", "prepare")
    count(wb.Plans, "get", "plans")
    for cls in {type(PATTERN), type(PATTERN.a), type(PATTERN.b)}:
        count(cls, "key", "key")
        count(cls, "__repr__", "repr")
    return counts


def _entry_points(q, k, v):
    """Each public entry point as a call with fixed arguments (returning the output)."""
    plan, plans = wb.Plan(PATTERN, q.shape[2], block_size=B), wb.Plans()
    module = wb.BlockSparseAttention(PATTERN, B)
    mha = wb.BlockSparseMultiheadAttention(32, 4, pattern=PATTERN, block_size=B,
                                           batch_first=True).double()
    x = torch.randn(2, q.shape[2], 32, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(3))
    paper = wb.DilatedAttention([32, 64], [1, 2], block_size=B)
    groups = wb.DilatedAttention([32, 64], [1, 2], mode="head_groups", causal=True, block_size=B)
    return {
        "function_plan": lambda: wb.block_sparse_attention(q, k, v, PATTERN, B, plan=plan),
        "function_plans": lambda: wb.block_sparse_attention(q, k, v, PATTERN, B, plan=plans),
        "module": lambda: module(q, k, v),
        "multihead": lambda: mha(x, x, x, need_weights=False)[0],
        "dilated_paper": lambda: paper(q, k, v),
        "dilated_head_groups": lambda: groups(q, k, v),
    }


@pytest.mark.parametrize("name", list(_entry_points(*make_qkv(s=8))))
def test_a_repeated_call_builds_no_layout_and_chooses_no_backend(name, monkeypatch):
    q, k, v = make_qkv(b=2, h=4, s=100, d=8, requires_grad=False)
    call = _entry_points(q, k, v)[name]
    counts = _counts(monkeypatch)
    first = call()
    # dilated_attention's default backend is the dilation ordering, taken by its name
    assert counts["prepare"] >= 1 and (counts["choose"] >= 1 or name.startswith("dilated_"))
    counts.clear()
    for _ in range(3):
        assert torch.equal(call(), first)
    assert not counts, dict(counts)  # no layout, no choice, no lookup by the pattern's hash


@pytest.mark.parametrize("name", ["function_plan", "function_plans", "module"])
def test_a_repeated_call_equals_the_full_path_and_the_oracle_forward_and_backward(name):
    q, k, v = make_qkv(b=2, h=4, s=100, d=8)
    call = _entry_points(q, k, v)[name]
    call()
    out = call()  # served by the kept runner
    full = wb.block_sparse_attention(q, k, v, PATTERN, B)  # nothing kept
    assert torch.equal(out, full)
    torch.testing.assert_close(out, sdpa_oracle(q, k, v, PATTERN.token_mask(100)))
    for a, b in zip(grads(out, (q, k, v)), grads(full, (q, k, v))):
        assert torch.equal(a, b)


def _reference(q, k, v, pattern, **kw):
    return wb.block_sparse_attention(q, k, v, pattern, B, backend="reference", **kw)


def test_a_module_never_serves_a_runner_kept_for_other_arguments():
    module = wb.BlockSparseAttention(PATTERN, B)
    q, k, v = make_qkv(b=1, h=2, s=100, d=8, requires_grad=False)
    module(q, k, v)
    for s in (97, 100, 90):  # 97: as many blocks as 100, another padding
        x = make_qkv(b=1, h=2, s=s, d=8, requires_grad=False, seed=s)
        torch.testing.assert_close(module(*x), _reference(*x, PATTERN))
    x32 = tuple(t.float() for t in (q, k, v))
    assert module(*x32).dtype == torch.float32
    torch.testing.assert_close(module(*x32), _reference(*x32, PATTERN), atol=1e-5, rtol=1e-5)
    out, lse = module(q, k, v, return_lse=True)
    ref, ref_lse = _reference(q, k, v, PATTERN, return_lse=True)
    torch.testing.assert_close(lse, ref_lse)
    torch.testing.assert_close(module(q, k, v, return_lse=False), ref)
    module.pattern = P.local_window(4)  # an attribute changed: prepared again
    torch.testing.assert_close(module(q, k, v), _reference(q, k, v, P.local_window(4)))
    module.scale = 0.5
    torch.testing.assert_close(module(q, k, v), _reference(q, k, v, P.local_window(4),
                                                          scale=0.5))


def test_another_pattern_object_with_the_same_repr_gets_its_own_runner():
    q, k, v = make_qkv(b=1, h=2, s=64, d=8, requires_grad=False)
    a = P.KeyMask(torch.arange(64)[None] < 40)
    b = P.KeyMask(torch.arange(64)[None] % 3 == 0)
    assert repr(a) == repr(b)
    plans, module = wb.Plans(), wb.BlockSparseAttention(a, B)
    for pattern in (a, b, a):
        module.pattern = pattern
        torch.testing.assert_close(module(q, k, v), _reference(q, k, v, pattern))
        out = wb.block_sparse_attention(q, k, v, pattern, B, plan=plans)
        torch.testing.assert_close(out, _reference(q, k, v, pattern))


def test_a_change_of_grad_mode_prepares_again_and_trains(monkeypatch):
    counts = _counts(monkeypatch)
    module = wb.BlockSparseAttention(PATTERN, B)
    q, k, v = make_qkv(b=1, h=2, s=70, d=8)
    with torch.no_grad():
        module(q, k, v)
        module(q, k, v)
    assert counts["prepare"] == 1
    out = module(q, k, v)
    assert counts["prepare"] == 2 and out.requires_grad
    ref = _reference(q, k, v, PATTERN)
    for a, b in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        torch.testing.assert_close(a, b)
    before = counts["prepare"]
    module.backend = "reference"
    module(q, k, v)
    module(q, k, v)
    assert counts["prepare"] == before + 1


def test_every_argument_is_still_checked_after_a_kept_call():
    q, k, v = make_qkv(b=1, h=2, s=64, d=8, requires_grad=False)
    plan = wb.Plan(PATTERN, 64, block_size=B)
    wb.block_sparse_attention(q, k, v, PATTERN, B, plan=plan)
    with pytest.raises(ValueError, match="plan is for"):
        wb.block_sparse_attention(q, k, v, P.causal(), B, plan=plan)
    with pytest.raises(TypeError, match="return_lse"):
        wb.block_sparse_attention(q, k, v, PATTERN, B, plan=plan, return_lse="yes")
    with pytest.raises(ValueError, match="block_size"):
        wb.block_sparse_attention(q, k, v, PATTERN, 0, plan=plan)
    module = wb.BlockSparseAttention(PATTERN, B)
    module(q, k, v)
    with pytest.raises(ValueError, match="v has length 10"):
        module(q, k, v[:, :, :10])
    with pytest.raises(TypeError, match="dtype"):
        module(q, k.float(), v)
    with pytest.raises(ValueError, match="heads"):
        wb.BlockSparseAttention(P.dilated([32], [2], 2), B)(q[:, :1], k[:, :1], v[:, :1])
    plans, segments = wb.Plans(), [32, 64]
    wb.dilated_attention(q, k, v, segments, [1, 2], plan=plans)
    with pytest.raises(ValueError, match="dilation"):
        wb.dilated_attention(q, k, v, segments, [1, 128], plan=plans)
    with pytest.raises(ValueError, match="mode"):
        wb.dilated_attention(q, k, v, segments, [1, 2], mode="groups", plan=plans)
    segments[1] = 16  # the list the kept call was made with, changed: prepared again
    torch.testing.assert_close(wb.dilated_attention(q, k, v, segments, [1, 2], plan=plans),
                               wb.dilated_attention(q, k, v, [32, 16], [1, 2]))


def test_multihead_dropout_and_masks_take_the_full_path(monkeypatch):
    torch.manual_seed(0)
    mha = wb.BlockSparseMultiheadAttention(32, 4, dropout=0.3, pattern=PATTERN, block_size=B,
                                           batch_first=True).double()
    x = torch.randn(2, 50, 32, dtype=torch.float64)
    counts = _counts(monkeypatch)
    mha.eval()
    evaluated = mha(x, x, x)[0]
    mha.train()
    torch.manual_seed(1)
    first = mha(x, x, x)[0]
    torch.manual_seed(1)
    again = mha(x, x, x)[0]
    assert torch.equal(first, again) and not torch.allclose(first, evaluated)
    assert counts["prepare"] == 2  # the same seed drawn: the same dropout, the kept runner
    assert not torch.equal(mha(x, x, x)[0], first)  # another seed: prepared again
    assert counts["prepare"] == 3
    mha.eval()
    assert torch.equal(mha(x, x, x)[0], evaluated)
    pad = torch.zeros(2, 50, dtype=torch.bool)
    pad[1, 30:] = True
    masked = mha(x, x, x, key_padding_mask=pad)[0]
    assert torch.equal(masked[0], evaluated[0]) and not torch.equal(masked[1], evaluated[1])
    assert torch.equal(mha(x, x, x)[0], evaluated)


def test_dilated_attention_module_equals_the_function_at_every_head_count():
    for mode in ("paper", "head_groups"):
        attn = wb.DilatedAttention([32, 64], [1, 2], mode=mode, causal=True, block_size=B)
        for h in (4, 2, 4):
            q, k, v = make_qkv(b=1, h=h, s=100, d=8, requires_grad=False, seed=h)
            want = wb.dilated_attention(q, k, v, [32, 64], [1, 2], mode=mode, causal=True,
                                        block_size=B, return_lse=True)
            for _ in range(2):
                got = attn(q, k, v, return_lse=True)
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    q, k, v = make_qkv(b=1, h=4, s=100, d=8)  # training: index gathers kept across calls
    want = wb.dilated_attention(q, k, v, [32, 64], [1, 2], causal=True, block_size=B)
    attn = wb.DilatedAttention([32, 64], [1, 2], causal=True, block_size=B)
    attn(q, k, v)
    got = attn(q, k, v)
    assert torch.equal(got, want)
    for a, b in zip(grads(got, (q, k, v)), grads(want, (q, k, v))):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="mode"):
        wb.DilatedAttention([32], [1], mode="lognet")
    with pytest.raises(ValueError, match="self-attention"):
        attn(q, k[:, :, :50], v[:, :, :50])


class _Ops(TorchDispatchMode):
    """The ATen operators a block of code runs."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _ops(call) -> list[str]:
    with _Ops() as mode:
        call()
    return mode.ops


@pytest.mark.parametrize("pattern", [PATTERN, P.causal(), P.dilated([32, 64], [1, 2], 2)],
                         ids=["blockwise", "sdpa", "gather"])
def test_a_repeated_call_runs_the_kernels_operators_and_no_other(pattern):
    q, k, v = make_qkv(b=1, h=2, s=128, d=8, requires_grad=False)
    module = wb.BlockSparseAttention(pattern, B)
    module(q, k, v)
    assert _ops(lambda: module(q, k, v)) == _ops(lambda: module.last_call.runner(q, k, v))
    plan = wb.Plan(pattern, 128, block_size=B)
    wb.block_sparse_attention(q, k, v, pattern, B, plan=plan)
    assert (_ops(lambda: wb.block_sparse_attention(q, k, v, pattern, B, plan=plan))
            == _ops(lambda: plan.last_call.runner(q, k, v)))


def test_copies_and_pickles_start_without_a_runner():
    module = wb.BlockSparseAttention(PATTERN, B)
    q, k, v = make_qkv(b=1, h=2, s=64, d=8, requires_grad=False)
    out = module(q, k, v)
    assert module.last_call.runner is not None
    for other in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        assert other.last_call.runner is None
        assert torch.equal(other(q, k, v), out)
    assert isinstance(pickle.loads(pickle.dumps(LastCall())), LastCall)


def test_a_prepared_flex_call_compiles_within_the_limit_and_repeats_without_it(monkeypatch):
    """The first call of a FlexAttention runner may compile: it runs under RECOMPILE_LIMIT. A
    repeated one runs the compiled kernel as it is; should it compile past Dynamo's own limit
    (inputs of other strides), it is run again under RECOMPILE_LIMIT, and past that the error
    says what to do."""
    from torch._dynamo.exc import FailOnRecompileLimitHit

    from workbench.backends import Problem, flex

    limits_seen: list[int] = []
    fail = {"default": False, "raised": False}

    def fake(q, k, v, **kw):
        limit = torch._dynamo.config.recompile_limit
        limits_seen.append(limit)
        if (fail["default"] and limit != flex.RECOMPILE_LIMIT) or fail["raised"]:
            raise FailOnRecompileLimitHit("limit")
        return q

    monkeypatch.setattr(flex, "_compiled", lambda: fake)
    q, k, v = make_qkv(b=1, h=2, s=64, d=16, dtype=torch.float32, requires_grad=False)
    problem = Problem(PATTERN.block_structure(64, B), PATTERN.allowed, 0.25, label="p")
    run = flex.prepare_flex(q, k, v, problem, need_lse=False)
    assert run(q, k, v)[0] is q and run(q, k, v)[0] is q
    default = torch._dynamo.config.recompile_limit
    assert limits_seen == [flex.RECOMPILE_LIMIT, default]
    fail["default"] = True
    assert run(q, k, v)[0] is q
    assert limits_seen[2:] == [default, flex.RECOMPILE_LIMIT]
    fail["raised"] = True
    with pytest.raises(RuntimeError, match="reset_compiled"):
        run(q, k, v)
