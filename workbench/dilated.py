"""LongNet dilated attention (Ding et al. 2023, arXiv 2307.02486), in two modes.

**Segments and dilation.** A (segment ``w``, dilation ``r``) pair splits the sequence into
segments ``[m*w, (m+1)*w)`` from position 0; the last segment is the remainder when ``w`` does
not divide the length (equivalently: the sequence is padded to a multiple of ``w`` with keys
nobody attends and queries whose output is dropped). Inside a segment a head with offset ``s``
keeps the positions at ``s, s + r, s + 2r, ...`` from the segment start; kept queries attend
kept keys of the same segment (and only earlier ones when ``causal``).

**Offsets.** Head ``j`` uses offset ``j mod r`` (the paper's rule, on the absolute head index).

``mode="paper"`` — LongNet exactly: every head uses every pair ``i``; the branch outputs
``O_i`` are combined as ``sum_i a_i O_i`` with ``a_i`` proportional to branch ``i``'s softmax
denominator, i.e. a log-sum-exp merge. This equals one softmax over the union of the branches'
keys in which a key kept by several branches counts once per branch. Gradients flow through
the weights (torchscale's official code detaches them; fkodom's ``dilated-attention-pytorch``
instead divides each branch's output by its sum over the sequence and averages the branches,
which is not the paper's weighting). A position no branch keeps outputs zeros.

``mode="head_groups"`` — as common implementations do: heads are split into
``len(segment_lengths)`` contiguous, as-even-as-possible groups (the first ``H mod k`` groups
get an extra head; fkodom and torchscale require divisibility), group ``g`` uses pair ``g``
only, head ``j`` uses offset ``j mod r_g`` (fkodom uses the group index, torchscale splits each
branch's heads into ``r`` contiguous offset groups). Its result is exactly
``block_sparse_attention(q, k, v, patterns.dilated(...))``; positions a head does not keep
output zeros.

**Backends.** ``"gather"`` (default) is the dilation ordering: each head's kept positions are
attended densely segment by segment and the result is put back, so no tile is wasted. When every
segment is full, the kept positions of a run of consecutive heads whose offsets step evenly
(LongNet's ``j mod r`` inside a head group) are one strided view of q, k and v, read in place;
otherwise they are gathered by index.
Any block-sparse backend name (``"blockwise"``, ``"flex"``, ``"triton"``, ``"reference"``,
``"auto"``) computes the same pattern in natural token order instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor

from .attention import block_sparse_attention, check_qkv, check_scale
from .backends import backend_names, empty_partial, merge_partials
from .backends.gather import branch_gather, dilated_pattern_attention, heads_at_once, heads_gather
from .patterns import causal as causal_pattern
from .patterns import (
    check_dilation_pairs,
    check_positive_int,
    dilated,
    dilated_branch,
    head_groups,
)

__all__ = ["dilated_attention", "dilated_pattern_attention"]

MODES = ("paper", "head_groups")


def dilated_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    mode: str = "paper",
    causal: bool = False,
    backend: str = "gather",
    block_size: int = 64,
    scale: float | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """LongNet dilated self-attention of ``q, k, v`` ``[B, H, S, D]`` (see the module docstring).

    Args:
        segment_lengths, dilation_rates: one dilation per segment length, ``r_i <= w_i``.
        mode: ``"paper"`` (every head, every pair, log-sum-exp merge) or ``"head_groups"``.
        causal: keys after the query are masked inside each segment.
        backend: ``"gather"`` (dilation ordering, dense per segment; default) or a
            block-sparse backend (``"auto"``, ``"blockwise"``, ``"flex"``, ``"triton"``,
            ``"reference"``) working on the pattern in natural order.
        block_size: tile size for block-sparse backends (and for the log-sum-exp path).
        scale: score scale, default ``1 / sqrt(D)``.
        return_lse: also return the log-sum-exp ``[B, H, S]`` of the merged softmax.
    """
    check_qkv(q, k, v)
    check_dilation_pairs(segment_lengths, dilation_rates)
    check_positive_int("block_size", block_size)
    check_scale(scale)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    choices = tuple(b for b in backend_names() if b != "sdpa")  # sdpa: dense or causal only
    if backend not in choices:
        raise ValueError(f"backend must be one of {choices}, got {backend!r}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"dilated attention is self-attention: q has {q.shape[2]} positions, k {k.shape[2]}"
        )
    bsz, h, s, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    pairs = list(zip(segment_lengths, dilation_rates))

    if mode == "head_groups" and backend != "gather":
        pat = dilated(segment_lengths, dilation_rates, h, causal=causal)
        return block_sparse_attention(q, k, v, pat, block_size, backend=backend,
                                      return_lse=return_lse, scale=scale)
    if mode == "head_groups":
        group = head_groups(h, len(pairs))
        w, r = [pairs[g][0] for g in group], [pairs[g][1] for g in group]
        out, lse = heads_gather(q, k, v, w, r, [j % r[j] for j in range(h)], causal, scale,
                                 return_lse, block_size)
        return (out, lse) if return_lse else out

    # paper mode: every head runs every branch; branches merge by log-sum-exp
    need_lse = return_lse or len(pairs) > 1
    outs, lses = [], []
    for w, r in pairs:
        if backend == "gather":
            o, lse = empty_partial(q, v.shape[-1], lse=need_lse)
            branch_gather(q, k, v, w, r, [j % r for j in range(h)], causal, scale, o, lse,
                           block_size, heads_at_once(q))
        else:
            pat = dilated_branch(w, r, h)
            if causal:
                pat = pat & causal_pattern()
            o, lse = block_sparse_attention(q, k, v, pat, block_size, backend=backend,
                                            return_lse=True, scale=scale)
        outs.append(o)
        lses.append(lse)
    if len(pairs) == 1 and not return_lse:
        return outs[0]
    out, lse = merge_partials(outs, lses)
    return (out, lse) if return_lse else out
