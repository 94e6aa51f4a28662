"""Backends: what computes the tiles of a :class:`~workbench.backends.problem.Problem`.

- ``reference``: dense masked attention in float64, the oracle (small problems only).
- ``blockwise``: pure PyTorch over active tiles with an online softmax; any device, autograd.
- ``flex``: FlexAttention with a ``BlockMask`` from the exact layout (compiled; CPU: inference).
- ``triton``: our own Triton kernels over the same tile lists (CUDA, float16/bfloat16; forward,
  log-sum-exp and backward).
- ``auto``: ``flex`` on CUDA, ``blockwise`` elsewhere and whenever attention dropout is on.
"""

from __future__ import annotations

from torch import Tensor

from .blockwise import blockwise_attention
from .dropout import AttentionDropout
from .flex import flex_attention, flex_available
from .merge import accumulation_dtype, empty_partial, merge_into_, merge_partials
from .problem import MaskFn, Problem
from .reference import reference_attention
from .triton_sparse import triton_attention

__all__ = [
    "BACKENDS",
    "AttentionDropout",
    "check_backend",
    "MaskFn",
    "Problem",
    "accumulation_dtype",
    "blockwise_attention",
    "empty_partial",
    "merge_into_",
    "merge_partials",
    "reference_attention",
    "resolve_backend",
    "run_backend",
    "triton_attention",
]

BACKENDS = ("auto", "blockwise", "flex", "reference", "triton")


def check_backend(name: str) -> str:
    """``name`` if it is one of :data:`BACKENDS`; otherwise a ``ValueError`` listing them."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def resolve_backend(name: str, q: Tensor, dropout: bool = False) -> str:
    """The concrete backend ``name`` means for inputs like ``q`` (validates the name);
    ``dropout``: attention dropout is on (only ``blockwise`` and ``reference`` apply it)."""
    if check_backend(name) == "auto":
        return "flex" if q.is_cuda and flex_available() and not dropout else "blockwise"
    return name


def run_backend(
    name: str, q: Tensor, k: Tensor, v: Tensor, problem: Problem, need_lse: bool
) -> tuple[Tensor, Tensor | None]:
    """Compute ``problem`` with backend ``name``; returns ``(out, lse)`` (lse may be None
    when ``need_lse`` is False)."""
    name = resolve_backend(name, q, problem.dropout is not None)
    if name == "flex":
        return flex_attention(q, k, v, problem, need_lse)
    if name == "reference":
        return reference_attention(q, k, v, problem)
    if name == "triton":
        return triton_attention(q, k, v, problem, need_lse)
    return blockwise_attention(q, k, v, problem)
