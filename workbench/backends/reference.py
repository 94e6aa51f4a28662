"""The oracle: dense masked softmax attention in float64 over the whole ``q_len x k_len`` grid
(small problems only); every other backend is tested against it."""

from __future__ import annotations

import torch
from torch import Tensor

from ..score_mods import modded
from .merge import accumulation_dtype
from .problem import Problem
from .registry import Backend, Capabilities

__all__ = ["BACKEND", "reference_attention"]


def reference_attention(
    q: Tensor, k: Tensor, v: Tensor, problem: Problem, *, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor]:
    """Dense attention restricted to ``problem``'s allowed pairs, computed in ``dtype``.

    Returns ``(out [B, H, Sq, D] in q's dtype, lse [B, H, Sq])`` (lse in the accumulation
    dtype); a row with no allowed key (or whose scores the score mod all sets to ``-inf``) gives
    zeros and ``lse = -inf``. Dropout scales the probabilities, not the log-sum-exp. A NaN or
    infinite input reaches exactly the rows allowed to see it, with IEEE arithmetic.
    """
    mask = problem.dense_mask(q.device)  # [H or 1, Sq, Sk]
    s = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * problem.scale
    empty = ~mask.any(-1)  # rows with no allowed key
    if problem.score_mod is not None:
        s = _dense_score_mod(problem, s)
        empty = empty | (s.masked_fill(~mask, -torch.inf) == -torch.inf).all(-1)
    s = s.masked_fill(~mask, -torch.inf).masked_fill(empty[..., None], 0.0)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None]).masked_fill(empty[..., None], 0.0)
    if problem.dropout is not None:
        p = p * _dense_dropout(problem, q.shape[0], p.shape[1], q.device).to(dtype)
    out = _weighted_values(p, v.to(dtype), mask)
    lse = lse.masked_fill(empty, -torch.inf)
    return out.to(q.dtype), lse.to(accumulation_dtype(q.dtype))


def _weighted_values(p: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """``p @ v`` summed over the allowed pairs only: a non-finite value reaches exactly the
    query rows allowed to see it (a matmul would also multiply it by the zero probability of
    a disallowed pair, and ``0 * nan`` is NaN)."""
    if bool(torch.isfinite(v).all()):
        return torch.matmul(p, v)
    terms = p[..., None] * v[..., None, :, :]  # [B, H, Sq, Sk, D]
    return torch.where(mask[..., None], terms, 0.0).sum(-2)


def _dense_score_mod(problem: Problem, s: Tensor) -> Tensor:
    """``problem.score_mod`` on the whole ``[B, H, Sq, Sk]`` grid of scores ``s``."""
    b, h = (torch.arange(n, device=s.device) for n in s.shape[:2])
    return modded(problem.score_mod, s, b[:, None, None, None], h[None, :, None, None],
                  *problem.positions(s.device))


def _dense_dropout(problem: Problem, batch: int, heads: int, device: torch.device) -> Tensor:
    """The dropout keep scale on the whole ``[B, H, Sq, Sk]`` grid."""
    b, h = torch.arange(batch, device=device), torch.arange(heads, device=device)
    hi = (b[:, None] * heads + h[None, :])[..., None, None]
    return problem.dropout.scale(hi, *problem.positions(device))


BACKEND = Backend(
    "reference",
    lambda q, k, v, problem, need_lse: reference_attention(q, k, v, problem),
    Capabilities(dropout=True, score_mod=True),
    "dense masked softmax in float64: the oracle, for small problems (never chosen by auto)",
)
