"""Log-sum-exp merging of partial attention results.

If ``(o_i, l_i)`` are the outputs and log-sum-exps of softmax attention over disjoint key sets
``K_i``, then attention over their union is ``sum_i exp(l_i - L) * o_i`` with
``L = logsumexp_i(l_i)``: each part is weighted by its share of the softmax denominator. This is
how the ring schedule combines K/V chunks and how LongNet combines its (segment, dilation)
branches. Rows where every part is empty (``l_i = -inf``) give zeros and ``L = -inf``, never NaN,
and gradients flow through both outputs and log-sum-exps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["merge_partials"]


def merge_partials(outs: Sequence[Tensor], lses: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Merge partial results ``outs[i]`` ``[..., S, D]`` with log-sum-exps ``lses[i]`` ``[..., S]``.

    Returns ``(out, lse)``: ``out`` in the dtype of ``outs[0]``, ``lse`` in float32 (float64 if
    any input log-sum-exp is float64).
    """
    if len(outs) != len(lses) or not outs:
        raise ValueError("merge_partials needs one log-sum-exp per partial output (at least one)")
    acc = torch.float64 if any(x.dtype == torch.float64 for x in lses) else torch.float32
    if len(outs) == 1:
        return outs[0], lses[0].to(acc)
    lse = torch.stack([x.to(acc) for x in lses])  # [P, ..., S]
    top = lse.amax(0)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = torch.exp(lse - top)  # -inf parts get weight 0
    total = w.sum(0)
    nonempty = total > 0
    safe_total = torch.where(nonempty, total, torch.ones_like(total))
    out = sum(wi[..., None] * o.to(acc) for wi, o in zip(w, outs)) / safe_total[..., None]
    merged = torch.where(nonempty, top + torch.log(safe_total), torch.full_like(top, -torch.inf))
    return out.to(outs[0].dtype), merged
