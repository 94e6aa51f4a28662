"""Modules keep their layouts and share them with the modules of the same pattern object."""

from __future__ import annotations

import gc

import torch
from conftest import make_qkv

import workbench as wb
from workbench import layout_memo as M
from workbench.multihead import BlockSparseMultiheadAttention

P = wb.patterns


def _count_builds(monkeypatch) -> list[int]:
    built: list[int] = []
    real = P.Pattern.block_structure

    def counted(self, *a, **k):
        built.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(P.Pattern, "block_structure", counted)
    return built


def test_modules_of_one_pattern_object_share_one_layout_while_one_keeps_it(monkeypatch):
    built = _count_builds(monkeypatch)
    pattern = P.local_window(50) & P.causal()
    layers = [wb.BlockSparseAttention(pattern, 32) for _ in range(6)]
    q, k, v = make_qkv(b=1, h=2, s=200, d=8, requires_grad=False)
    outs = [m(q, k, v) for m in layers for _ in range(2)]  # two steps through six layers
    assert len(built) == 1
    lays = {id(m.layout(200, 200, torch.device("cpu"))) for m in layers}
    assert len(lays) == 1
    other = wb.BlockSparseAttention(P.local_window(50) & P.causal(), 32)  # equal, not the same
    other(q, k, v)
    assert len(built) == 2
    torch.testing.assert_close(outs[0], wb.block_sparse_attention(q, k, v, pattern, 32))
    before = len(M._SHARED)
    del layers, lays, outs
    gc.collect()
    assert len(M._SHARED) == before - 1  # nothing keeps the shared layout alive any more


def test_a_modules_layouts_are_the_last_few_it_used():
    memo = M.LayoutMemo(size=2)
    pattern = P.causal()
    first = memo.get(pattern, 64, 64, 16, "cpu")
    assert memo.get(pattern, 64, 64, 16, "cpu") is first
    memo.get(pattern, 96, 96, 16, "cpu")
    memo.get(pattern, 64, 64, 16, "cpu")  # used again: the 96 one is now the oldest
    memo.get(pattern, 128, 128, 16, "cpu")
    assert len(memo) == 2 and memo.get(pattern, 64, 64, 16, "cpu") is first


def test_multihead_layers_build_one_layout_for_unmasked_calls(monkeypatch):
    built = _count_builds(monkeypatch)
    torch.manual_seed(0)
    pattern = P.local_window(30)
    layers = [BlockSparseMultiheadAttention(32, 4, pattern=pattern, block_size=16,
                                            batch_first=True).double() for _ in range(3)]
    x = torch.randn(2, 70, 32, dtype=torch.float64)
    for causal in (False, True):
        for _ in range(2):
            y = x
            for m in layers:
                y = m(y, y, y, is_causal=causal, need_weights=False)[0]
    assert len(built) == 2  # one layout per is_causal, shared by the three layers
    # a masked call builds its own pattern (the mask is content) and gives the same result as
    # the same mask spelled out
    pad = torch.zeros(2, 70, dtype=torch.bool)
    m = layers[0]
    a = m(x, x, x, need_weights=False, is_causal=True)[0]
    b = m(x, x, x, need_weights=False, is_causal=True, key_padding_mask=pad)[0]
    torch.testing.assert_close(a, b)
    assert len(built) == 3
