"""Log-sum-exp merging of partial attention results.

If ``(o_i, l_i)`` are the outputs and log-sum-exps of softmax attention over disjoint key sets,
attention over their union is ``sum_i exp(l_i - L) * o_i`` with ``L = logsumexp_i(l_i)``. Rows
where every part is empty (``l_i = -inf``) give zeros and ``L = -inf``; a NaN stays NaN.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["accumulation_dtype", "empty_partial", "merge_into_", "merge_partials"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where softmax statistics, merges and gradients accumulate: float64 for float64 inputs,
    float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def empty_partial(q: Tensor, dv: int, *, lse: bool = True) -> tuple[Tensor, Tensor | None]:
    """What attending nothing gives the queries of ``q`` ``[B, H, S, D]``: zeros ``[B, H, S,
    dv]`` in ``q``'s dtype and a log-sum-exp of ``-inf`` (None when ``lse`` is False)."""
    shape = q.shape[:3]
    out = q.new_zeros(*shape, dv)
    if not lse:
        return out, None
    return out, torch.full(shape, -torch.inf, dtype=accumulation_dtype(q.dtype), device=q.device)


def merge_partials(outs: Sequence[Tensor], lses: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Merge partial results ``outs[i]`` ``[..., S, D]`` with log-sum-exps ``lses[i]`` ``[..., S]``:
    ``(out in outs[0]'s dtype, lse float32)`` (float64 if any input log-sum-exp is)."""
    if len(outs) != len(lses) or not outs:
        raise ValueError("merge_partials needs one log-sum-exp per partial output (at least one)")
    if len(outs) == 1:
        return outs[0], lses[0].to(_lse_dtype(lses))
    out, merged = _weighted_sum(outs, lses)
    return out.to(outs[0].dtype), merged


def _lse_dtype(lses: Sequence[Tensor]) -> torch.dtype:
    """The accumulation dtype of the widest log-sum-exp among ``lses``."""
    return accumulation_dtype(functools.reduce(torch.promote_types, (x.dtype for x in lses)))


def _weighted_sum(outs: Sequence[Tensor], lses: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """The merge of two or more partials, its output still in the accumulation dtype."""
    acc = _lse_dtype(lses)
    lse = torch.stack([x.to(acc) for x in lses])  # [P, ..., S]
    top = lse.amax(0)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = torch.exp(lse - top)  # -inf parts get weight 0
    total = w.sum(0)
    nonempty = total != 0  # NaN stays NaN: a NaN part makes the merged row NaN
    safe_total = torch.where(nonempty, total, torch.ones_like(total))
    share = (w / safe_total)[..., None]  # each part's share of the denominator, [P, ..., S, 1]
    # One pass per part over the outputs: the products promote to the accumulation dtype inside
    # the kernel, so no full-size converted copy of any output is made.
    out = outs[0] * share[0]
    for o, sh in zip(outs[1:], share[1:]):
        out = out.addcmul_(o, sh)
    merged = torch.where(nonempty, top + torch.log(safe_total), torch.full_like(top, -torch.inf))
    return out, merged


_MERGE_CHUNK = 1 << 24  # elements of an output merged at a time by merge_into_


def merge_into_(acc_out: Tensor, acc_lse: Tensor, out: Tensor, lse: Tensor) -> None:
    """In place: ``(acc_out, acc_lse)`` becomes the merge of itself and ``(out, lse)``, a slice
    of the sequence at a time (small temporaries); ``acc_out`` keeps its dtype. No autograd."""
    rows = max(1, _MERGE_CHUNK // max(1, acc_out[..., 0, :].numel()))
    for start in range(0, acc_out.shape[-2], rows):
        sl = slice(start, start + rows)
        o, lse_m = _weighted_sum([acc_out[..., sl, :], out[..., sl, :]],
                                 [acc_lse[..., sl], lse[..., sl]])
        acc_out[..., sl, :].copy_(o)  # rounds to acc_out's dtype once
        acc_lse[..., sl].copy_(lse_m)
