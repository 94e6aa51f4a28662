"""Shared fixtures: seeded random inputs and a dense SDPA oracle."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.nn.functional as F

# Never let a test run (or a notebook under nbval) rewrite the committed figures/ and data/.
_OUT = tempfile.mkdtemp(prefix="workbench-test-")
os.environ.setdefault("WORKBENCH_FIGURES_DIR", os.path.join(_OUT, "figures"))
os.environ.setdefault("WORKBENCH_DATA_DIR", os.path.join(_OUT, "data"))
# The project is this checkout, wherever pytest is started from.
os.environ.setdefault("WORKBENCH_ROOT", os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("MPLBACKEND", "Agg")

torch.set_num_threads(min(2, torch.get_num_threads()))


def make_qkv(b=2, h=4, s=100, d=16, dtype=torch.float64, seed=0, requires_grad=True, sk=None):
    g = torch.Generator().manual_seed(seed)
    sk = s if sk is None else sk
    q = torch.randn(b, h, s, d, generator=g, dtype=dtype)
    k = torch.randn(b, h, sk, d, generator=g, dtype=dtype)
    v = torch.randn(b, h, sk, d, generator=g, dtype=dtype)
    return tuple(x.requires_grad_(requires_grad) for x in (q, k, v))


def sdpa_oracle(q, k, v, mask):
    """PyTorch's own attention with the equivalent boolean mask ``[H or 1, Sq, Sk]``."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None])


def grads(out, inputs, seed=1):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad((out * g).sum(), inputs)


@pytest.fixture
def qkv():
    return make_qkv()
