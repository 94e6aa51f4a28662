"""Dense and causal attention on PyTorch's own ``scaled_dot_product_attention``: ``auto`` hands
it patterns that allow every pair or exactly the causal pairs, when neither the log-sum-exp nor
attention dropout is asked for."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

from ..patterns import Pattern
from .problem import Problem
from .registry import Backend, Capabilities, Request, Runner

__all__ = ["BACKEND", "NO_LSE", "dense_sdpa", "sdpa_form", "sdpa_serves"]

NO_LSE = ("backend 'sdpa' gives no log-sum-exp, which return_lse, a ring (ring_chunks > 1) "
          "and a process group need: use 'auto' or a block-sparse backend")
"""The error of asking ``sdpa`` for what needs the log-sum-exp."""


def sdpa_serves(form: str | None, *, q_len: int, k_len: int, dropout: bool,
                q_offset: int = 0, k_offset: int = 0) -> str | None:
    """``form`` (a pattern's ``dense_form``) when ``scaled_dot_product_attention`` computes it
    exactly for ``q_len`` queries over ``k_len`` keys, else ``None``: its causal masks align top
    left or bottom right, so a causal query window must start or end with the key window; no
    keys or attention ``dropout`` (ours is a hash) answer ``None``."""
    aligned = q_offset - k_offset in (0, k_len - q_len)
    if dropout or k_len == 0 or (form == "causal" and not aligned):
        return None
    return form


def sdpa_form(problem: Problem) -> str | None:
    """``"full"`` or ``"causal"`` when ``scaled_dot_product_attention`` computes ``problem``
    exactly (``is_causal`` for the latter), else ``None`` (see :func:`sdpa_serves`)."""
    return sdpa_serves(problem.dense_form, q_len=problem.layout.q_len,
                       k_len=problem.layout.k_len, dropout=problem.dropout is not None,
                       q_offset=problem.q_offset, k_offset=problem.k_offset)


def _run(q: Tensor, k: Tensor, v: Tensor, problem: Problem, need_lse: bool
         ) -> tuple[Tensor, None]:
    """``problem`` (one :func:`sdpa_form` accepts) through ``scaled_dot_product_attention``."""
    form = sdpa_form(problem)
    if form is None:
        raise ValueError(
            f"backend 'sdpa' computes dense or causal attention only, without attention "
            f"dropout; {problem.label or 'this problem'} is not that (use 'auto')")
    return dense_sdpa(q, k, v, form, problem.scale, problem.q_offset - problem.k_offset), None


def dense_sdpa(q: Tensor, k: Tensor, v: Tensor, form: str, scale: float, shift: int = 0
               ) -> Tensor:
    """Attention of all of ``q`` over all of ``k, v``: ``form`` ``"full"``, or ``"causal"``
    (local query ``i`` sees keys ``j <= i + shift``; ``shift`` is 0 or ``Sk - Sq``, as
    :func:`sdpa_serves` ensures). ``k, v`` may have a divisor of q's heads (grouped-query)."""
    gqa = k.shape[1] != q.shape[1]
    if form == "causal" and shift:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]), scale=scale,
            enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, is_causal=form == "causal", scale=scale,
                                          enable_gqa=gqa)


def _prepare_pattern(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, scale: float,
                     need_lse: bool, block_size: int) -> Runner:
    form = pattern.dense_form()
    return lambda q, k, v: (dense_sdpa(q, k, v, form, scale), None)


def _refuses(req: Request) -> str | None:
    if sdpa_serves(req.dense_form, q_len=req.q.shape[2], k_len=req.k_len, dropout=req.dropout,
                   q_offset=req.q_offset, k_offset=req.k_offset) is None:
        return ("computes dense or causal attention only (causal with query and key windows "
                "that start or end together)")
    return None


def _prefers(req: Request) -> str:
    return (f"the pattern is {req.dense_form} attention, which PyTorch's fused "
            "scaled_dot_product_attention computes without a block layout")


BACKEND = Backend(
    "sdpa",
    _run,
    Capabilities(lse_devices=(), patterns="dense or causal", grouped_kv=True),
    "PyTorch's scaled_dot_product_attention, for dense or causal patterns",
    refuses=_refuses, prefers=_prefers,
    prepare_pattern=_prepare_pattern,
)
