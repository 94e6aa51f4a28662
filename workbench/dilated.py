"""LongNet dilated attention (Ding et al. 2023, arXiv 2307.02486), in its two modes.

Both modes are :func:`~workbench.block_sparse_attention` over LongNet's patterns
(:func:`~workbench.patterns.dilated`, :func:`~workbench.patterns.dilated_branch`), so every
backend computes them. The default backend, ``"gather"``, is the dilation ordering: each head's
kept positions are attended densely, segment by segment, and put back, wasting no tile.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .attention import block_sparse_attention, check_qkv, check_scale
from .backends import check_backend, merge_partials
from .patterns import causal as causal_pattern
from .patterns import (
    check_dilation_pairs,
    check_positive_int,
    dilated,
    dilated_branch,
)

__all__ = ["dilated_attention"]

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
    """LongNet dilated self-attention of ``q, k, v`` ``[B, H, S, D]``.

    Pair ``(w, r)`` cuts the sequence into segments ``[m*w, (m+1)*w)`` from position 0 (the last
    one shorter when ``w`` does not divide ``S``). Inside a segment a head with offset ``s``
    keeps positions ``s, s + r, s + 2r, ...`` from the segment start; kept queries attend kept
    keys of the same segment (earlier ones only, when ``causal``). Head ``j`` uses offset
    ``j mod r``, on the absolute head index. A position no pair keeps outputs zeros.

    - ``mode="paper"``: every head runs every pair; branch outputs are merged by log-sum-exp
      (weights proportional to each branch's softmax denominator, with gradients through them):
      one softmax over the union of the branches' keys, a key kept by several branches counted
      once per branch.
    - ``mode="head_groups"``: heads are split into ``len(segment_lengths)`` contiguous groups
      as evenly as possible (the first ``H mod k`` get one extra head) and group ``g`` runs pair
      ``g`` only: exactly ``block_sparse_attention(q, k, v, patterns.dilated(...))``.

    Args:
        segment_lengths, dilation_rates: one dilation per segment length, ``r_i <= w_i``.
        mode: ``"paper"`` or ``"head_groups"``.
        causal: keys after the query are masked inside each segment.
        backend: ``"gather"`` (dilation ordering, dense per segment; default) or any backend
            of :mod:`workbench.backends` (block-sparse ones work in natural order).
        block_size: tile size for block-sparse backends (and for the log-sum-exp path).
        scale: score scale, default ``1 / sqrt(D)``.
        return_lse: also return the log-sum-exp ``[B, H, S]`` of the merged softmax.

    Returns:
        ``out [B, H, S, Dv]`` in ``q``'s dtype, or ``(out, lse)`` with ``return_lse``.

    Raises:
        ValueError: mismatched shapes or devices, ``q`` and ``k`` of different lengths (this is
            self-attention), an unknown ``mode`` or ``backend``, bad pairs, ``block_size`` or
            ``scale``.
        TypeError: inputs that are not floating-point tensors of one dtype.
    """
    check_qkv(q, k, v)
    check_dilation_pairs(segment_lengths, dilation_rates)
    check_positive_int("block_size", block_size)
    check_scale(scale)
    check_backend(backend)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"dilated attention is self-attention: q has {q.shape[2]} positions, k {k.shape[2]}"
        )
    h = q.shape[1]
    if mode == "head_groups":
        pattern = dilated(segment_lengths, dilation_rates, h, causal=causal)
        return block_sparse_attention(q, k, v, pattern, block_size, backend=backend,
                                      return_lse=return_lse, scale=scale)
    # paper mode: every head runs every branch; branches merge by log-sum-exp
    pairs = list(zip(segment_lengths, dilation_rates))
    need_lse = return_lse or len(pairs) > 1
    outs, lses = [], []
    for w, r in pairs:
        branch = dilated_branch(w, r, h)
        res = block_sparse_attention(q, k, v, branch & causal_pattern() if causal else branch,
                                     block_size, backend=backend, return_lse=need_lse,
                                     scale=scale)
        if not need_lse:
            return res
        outs.append(res[0])
        lses.append(res[1])
    out, lse = merge_partials(outs, lses)
    return (out, lse) if return_lse else out
