"""Plans: a pattern's layout at given lengths and what the backends derive from it, held by the
caller (a module, or several modules given one ``Plans``) and nowhere else."""

from __future__ import annotations

import copy
import gc
import pickle
import weakref

import pytest
import torch
from conftest import make_qkv

import workbench as wb
from workbench.multihead import BlockSparseMultiheadAttention
from workbench.plan import plan_for

P = wb.patterns


def _count_builds(monkeypatch) -> list[int]:
    built: list[int] = []
    real = P.Pattern.block_structure

    def counted(self, *a, **k):
        built.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(P.Pattern, "block_structure", counted)
    return built


def test_a_plan_builds_its_layout_once_and_reports_what_it_holds():
    pattern = P.local_window(50) & P.causal()
    plan = wb.Plan(pattern, 200, block_size=32)
    assert not plan.built and plan.nbytes() == 0
    q, k, v = make_qkv(b=1, h=2, s=200, d=8, requires_grad=False)
    out = wb.block_sparse_attention(q, k, v, pattern, 32, plan=plan, backend="blockwise")
    lay = plan.layout
    assert plan.built and plan.layout is lay
    assert plan.nbytes() > 2 * lay.active.numel()  # the layout and the blockwise tile list
    ref = wb.block_sparse_attention(q, k, v, pattern, 32, backend="reference")
    torch.testing.assert_close(out, ref)
    wb.block_sparse_attention(q, k, v, pattern, 32, plan=plan, backend="blockwise")
    assert plan.layout is lay and "built=True" in repr(plan)


def test_a_plan_for_other_arguments_is_refused_by_name():
    q, k, v = make_qkv(b=1, h=2, s=64, d=8, requires_grad=False)
    plan = wb.Plan(P.causal(), 64, block_size=16)
    with pytest.raises(ValueError, match="plan is for"):
        wb.block_sparse_attention(q, k, v, P.local_window(8), 16, plan=plan)
    with pytest.raises(ValueError, match="block_size=16"):
        wb.block_sparse_attention(q, k, v, P.causal(), 32, plan=plan)
    with pytest.raises(ValueError, match="not both"):
        wb.block_sparse_attention(q, k, v, P.causal(), 16, plan=plan, layout=plan.layout)
    with pytest.raises(TypeError, match="Plan"):
        wb.block_sparse_attention(q, k, v, P.causal(), 16, plan="plan")
    with pytest.raises(TypeError, match="Plans"):
        wb.BlockSparseAttention(P.causal(), plans=[])


def test_layers_given_one_plans_share_one_layout(monkeypatch):
    built = _count_builds(monkeypatch)
    plans = wb.Plans()
    layers = [wb.BlockSparseAttention(P.local_window(50) & P.causal(), 32, plans=plans)
              for _ in range(6)]  # equal patterns, one Plans
    q, k, v = make_qkv(b=1, h=2, s=200, d=8, requires_grad=False)
    outs = [m(q, k, v) for m in layers for _ in range(2)]  # two steps through six layers
    assert len(built) == 1 and len(plans) == 1
    alone = wb.BlockSparseAttention(P.local_window(50) & P.causal(), 32)  # its own plans
    alone(q, k, v)
    assert len(built) == 2
    torch.testing.assert_close(outs[0], alone(q, k, v))
    lay = weakref.ref(plans.get(layers[0].pattern, 200, 200, 32, "cpu").layout)
    del layers, plans, outs
    gc.collect()
    assert lay() is None  # nothing else holds a layout


def test_plans_keep_the_last_few_and_copies_start_empty():
    plans = wb.Plans(size=2)
    pattern = P.causal()
    first = plans.get(pattern, 64, 64, 16, "cpu")
    assert plans.get(pattern, 64, 64, 16, "cpu") is first
    plans.get(pattern, 96, 96, 16, "cpu")
    plans.get(pattern, 64, 64, 16, "cpu")  # used again: the 96 one is now the oldest
    plans.get(pattern, 128, 128, 16, "cpu")
    assert len(plans) == 2 and plans.get(pattern, 64, 64, 16, "cpu") is first
    assert first.layout.q_len == 64  # built now
    assert plans.nbytes() == first.nbytes() > 0
    assert len(copy.deepcopy(plans)) == 0 and len(pickle.loads(pickle.dumps(plans))) == 0
    lay = pickle.loads(pickle.dumps(first.layout))
    assert torch.equal(lay.active, first.layout.active) and lay._derived == {}


def test_multihead_layers_given_one_plans_build_one_layout_per_form(monkeypatch):
    built = _count_builds(monkeypatch)
    torch.manual_seed(0)
    plans = wb.Plans()
    layers = [BlockSparseMultiheadAttention(32, 4, pattern=P.local_window(30), block_size=16,
                                            batch_first=True, plans=plans).double()
              for _ in range(3)]
    x = torch.randn(2, 70, 32, dtype=torch.float64)
    for causal in (False, True):
        for _ in range(2):
            y = x
            for m in layers:
                y = m(y, y, y, is_causal=causal, need_weights=False)[0]
    assert len(built) == 2 and len(plans) == 2  # one layout per is_causal, for three layers
    # a masked call builds its own pattern (the mask is content) and gives the same result as
    # the same mask spelled out
    pad = torch.zeros(2, 70, dtype=torch.bool)
    m = layers[0]
    a = m(x, x, x, need_weights=False, is_causal=True)[0]
    b = m(x, x, x, need_weights=False, is_causal=True, key_padding_mask=pad)[0]
    torch.testing.assert_close(a, b)
    assert len(built) == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_plan_on_cuda_serves_tensors_on_the_current_cuda_device():
    pattern = P.local_window(8)
    q = torch.randn(1, 2, 40, 16, device="cuda")
    plan = wb.Plan(pattern, 40, block_size=16, device="cuda")
    out = wb.block_sparse_attention(q, q, q, pattern, 16, plan=plan)
    ref = wb.block_sparse_attention(q, q, q, pattern, 16)
    torch.testing.assert_close(out, ref)
    assert plan_for(plan, pattern, 40, 40, 16, q.device) is plan
