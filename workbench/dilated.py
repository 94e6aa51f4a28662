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

**Backends.** Both modes are :func:`~workbench.block_sparse_attention` over LongNet's patterns
(:func:`~workbench.patterns.dilated`, :func:`~workbench.patterns.dilated_branch`), so any backend
computes them; ``"gather"`` (the default, and what ``auto`` picks) is the dilation ordering:
each head's kept positions are attended densely segment by segment and put back, wasting no
tile. Block-sparse backends (``"blockwise"``, ``"flex"``, ``"triton"``, ``"reference"``) compute
the same patterns tile by tile in natural token order.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from .attention import BlockSparseAttention, block_sparse_attention, check_qkv, check_scale
from .backends import check_backend, merge_partials
from .patterns import Pattern, check_dilation_pairs, check_positive_int, dilated, dilated_branch
from .patterns import causal as causal_pattern
from .plan import LastCall

__all__ = ["DilatedAttention", "dilated_attention"]

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
        backend: ``"gather"`` (dilation ordering, dense per segment; default) or any backend
            of :mod:`workbench.backends` (block-sparse ones work in natural order).
        block_size: tile size for block-sparse backends (and for the log-sum-exp path).
        scale: score scale, default ``1 / sqrt(D)``.
        return_lse: also return the log-sum-exp ``[B, H, S]`` of the merged softmax.

    Each call builds its patterns and chooses its backend again; :class:`DilatedAttention`
    keeps both for the calls that repeat one.
    """
    check_qkv(q, k, v)
    _check_options(segment_lengths, dilation_rates, mode, backend, block_size, scale)
    _check_self_attention(q, k)
    patterns = _patterns(segment_lengths, dilation_rates, q.shape[1], mode, causal)
    lse = return_lse or len(patterns) > 1
    return _merge([block_sparse_attention(q, k, v, p, block_size, backend=backend,
                                          return_lse=lse, scale=scale) for p in patterns],
                  return_lse)


class DilatedAttention(nn.Module):
    """:func:`dilated_attention` as an ``nn.Module`` over ``q, k, v`` ``[B, H, S, D]``.

    Its patterns are built once per head count, each run by a
    :class:`~workbench.BlockSparseAttention` that keeps its plans and its last call, so a call
    that repeats the last one (same shapes, dtype, device and grad mode) launches the kernels
    straight away. The options are those of :func:`dilated_attention`, checked here.

    Example::

        attn = wb.DilatedAttention([2048, 4096], [1, 2], mode="paper", causal=True)
        out = attn(q, k, v)
    """

    def __init__(self, segment_lengths: Sequence[int], dilation_rates: Sequence[int], *,
                 mode: str = "paper", causal: bool = False, backend: str = "gather",
                 block_size: int = 64, scale: float | None = None) -> None:
        super().__init__()
        _check_options(segment_lengths, dilation_rates, mode, backend, block_size, scale)
        self.segment_lengths, self.dilation_rates = list(segment_lengths), list(dilation_rates)
        self.mode, self.causal, self.backend = mode, bool(causal), backend
        self.block_size, self.scale = block_size, scale
        self.last_call = LastCall()  # the branches of the last head count and options

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, return_lse: bool = False
                ) -> Tensor | tuple[Tensor, Tensor]:
        check_qkv(q, k, v)
        _check_self_attention(q, k)
        key = (q.shape[1], tuple(self.segment_lengths), tuple(self.dilation_rates), self.mode,
               self.causal, self.backend, self.block_size, self.scale)
        branches = self.last_call.get(key, None, lambda: [
            BlockSparseAttention(p, self.block_size, backend=self.backend, scale=self.scale)
            for p in _patterns(self.segment_lengths, self.dilation_rates, q.shape[1],
                               self.mode, self.causal)])
        lse = bool(return_lse) or len(branches) > 1
        return _merge([m(q, k, v, return_lse=lse) for m in branches], bool(return_lse))

    def extra_repr(self) -> str:
        return (f"segment_lengths={self.segment_lengths}, dilation_rates={self.dilation_rates}, "
                f"mode={self.mode!r}, causal={self.causal}, backend={self.backend!r}")


def _check_options(segment_lengths: Sequence[int], dilation_rates: Sequence[int], mode: str,
                   backend: str, block_size: int, scale: float | None) -> None:
    check_dilation_pairs(segment_lengths, dilation_rates)
    check_positive_int("block_size", block_size)
    check_scale(scale)
    check_backend(backend)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _check_self_attention(q: Tensor, k: Tensor) -> None:
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"dilated attention is self-attention: q has {q.shape[2]} positions, k {k.shape[2]}"
        )


def _patterns(segment_lengths: Sequence[int], dilation_rates: Sequence[int], num_heads: int,
              mode: str, causal: bool) -> list[Pattern]:
    """What a call attends: LongNet's head-group pattern, or one branch per pair (paper)."""
    if mode == "head_groups":
        return [dilated(segment_lengths, dilation_rates, num_heads, causal=causal)]
    branches = [dilated_branch(w, r, num_heads) for w, r in zip(segment_lengths, dilation_rates)]
    return [b & causal_pattern() for b in branches] if causal else branches


def _merge(results: list, return_lse: bool) -> Tensor | tuple[Tensor, Tensor]:
    """One branch's result as it is (asked with ``return_lse``), or the branches' ``(out,
    lse)`` merged by log-sum-exp."""
    if len(results) == 1:
        return results[0]
    out, lse = merge_partials([r[0] for r in results], [r[1] for r in results])
    return (out, lse) if return_lse else out
