"""The backend registry: what ``auto`` picks and why, refusals that name the way out, and a
backend added with one ``register`` call."""

from __future__ import annotations

import pytest
import torch

import workbench as wb
from workbench.backends import (
    Backend,
    BackendUnsupported,
    Capabilities,
    backend_names,
    describe_backends,
    reference_attention,
    registry,
)

P = wb.patterns


def _qkv(s=64, h=2, grad=False):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, h, s, 8, generator=g, dtype=torch.float64).requires_grad_(grad)
                 for _ in range(3))


@pytest.mark.parametrize("pattern, kw, name, why", [
    (P.causal(), {}, "sdpa", "causal attention"),
    (P.full(), {}, "sdpa", "full attention"),
    (P.causal(), {"return_lse": True}, "blockwise", "on cpu"),
    (P.dilated([16, 32], [1, 2], 2), {}, "gather", "dilation ordering"),
    (P.local_window(8), {}, "blockwise", "on cpu"),
    (P.local_window(8), {"dropout_p": 0.1}, "blockwise", "dropout"),
])
def test_auto_says_what_it_picks_and_why(pattern, kw, name, why):
    choice = wb.explain_backend(*_qkv(), pattern, 16, **kw)
    assert choice.name == name and why in choice.reason, choice


def test_a_named_backend_that_cannot_run_a_call_names_those_that_can():
    q, k, v = _qkv(grad=True)
    with pytest.raises(BackendUnsupported, match="no gradients on cpu.*'blockwise'"):
        wb.block_sparse_attention(q, k, v, P.local_window(8), 16, backend="flex")
    with pytest.raises(BackendUnsupported, match="dense or causal attention only"):
        wb.block_sparse_attention(q, k, v, P.local_window(8), 16, backend="sdpa")
    with pytest.raises(BackendUnsupported, match="LongNet dilated patterns only"):
        wb.block_sparse_attention(q, k, v, P.local_window(8), 16, backend="gather")
    with pytest.raises(ValueError, match="backend must be one of"):
        wb.block_sparse_attention(q, k, v, P.local_window(8), 16, backend="fast")


def test_a_backend_is_one_register_call(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    calls = []

    def run(q, k, v, problem, need_lse):
        calls.append(problem.layout.block_size)
        return reference_attention(q, k, v, problem, dtype=torch.float32)

    registry.register(Backend("reference32", run, Capabilities(dropout=True),
                              "the oracle in float32"))
    assert "reference32" in backend_names()
    assert describe_backends()[-1]["backend"] == "reference32"
    q, k, v = _qkv()
    pattern = P.local_window(8) | P.global_tokens(2)
    out = wb.block_sparse_attention(q, k, v, pattern, 16, backend="reference32")
    ref = wb.block_sparse_attention(q, k, v, pattern, 16, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert calls == [16]
    assert wb.explain_backend(q, k, v, pattern, 16).name == "blockwise"  # auto never picks it
    with pytest.raises(ValueError, match="already registered"):
        registry.register(Backend("reference32", run, Capabilities(), "again"))
