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
gathered into contiguous segments, attended densely, and scattered back, so no tile is wasted.
Any block-sparse backend name (``"blockwise"``, ``"flex"``, ``"reference"``, ``"auto"``)
computes the same pattern in natural token order instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import block_sparse_attention, check_qkv
from .backends import BACKENDS, merge_partials
from .orderings import dilation_gather
from .patterns import (
    Dilated,
    KeyMask,
    check_dilation_pairs,
    dilated,
    dilated_branch,
    head_groups,
)
from .patterns import causal as causal_pattern

__all__ = ["dilated_attention", "dilated_pattern_attention"]

MODES = ("paper", "head_groups")


def _branch_gather(
    q: Tensor, k: Tensor, v: Tensor, segment: int, dilation: int, offsets: list[int],
    causal: bool, scale: float, need_lse: bool, block_size: int, backend: str,
) -> tuple[Tensor, Tensor | None]:
    """One (segment, dilation) branch for heads with ``offsets``, by gather -> dense -> scatter."""
    bsz, h, s, d = q.shape
    pos, valid = dilation_gather(s, segment, dilation, offsets, q.device)  # [h, nseg, L]
    _, nseg, length = pos.shape
    flat = pos.reshape(h, nseg * length)

    def gather(x: Tensor) -> Tensor:
        idx = flat[None, :, :, None].expand(bsz, h, nseg * length, x.shape[-1])
        return x.gather(2, idx).reshape(bsz, h * nseg, length, x.shape[-1])

    qg, kg, vg = gather(q), gather(k), gather(v)
    key_ok = valid.reshape(h * nseg, length)
    # A segment a head keeps nothing of (offset past a short last segment): let its padded
    # queries see one key so nothing is NaN; their outputs are dropped by the scatter.
    key_ok = key_ok | (~key_ok.any(-1, keepdim=True) & (torch.arange(length, device=q.device) == 0))
    lse_g = None
    if need_lse or backend != "sdpa":
        pat = KeyMask(key_ok)
        if causal:
            pat = pat & causal_pattern()
        # SDPA returns no log-sum-exp: FlexAttention (CUDA) or blockwise computes the same
        # dense segments with it; FlexAttention needs 128-token tiles on CUDA.
        name = backend if backend != "sdpa" else "auto"
        blk = 128 if q.is_cuda and length >= 128 else min(block_size, length)
        if name == "auto" and q.is_cuda and length < 128:
            name = "blockwise"
        og, lse_g = block_sparse_attention(
            qg, kg, vg, pat, blk, backend=name, return_lse=True, scale=scale
        )
    else:
        mask = key_ok[None, :, None, :]
        if causal:
            mask = mask & torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
        all_keys = bool(key_ok.all())
        og = F.scaled_dot_product_attention(
            qg, kg, vg, attn_mask=None if all_keys else mask, is_causal=causal and all_keys,
            scale=scale,
        )
    # Scatter back; dropped (padding) slots go to a dump position s that is cut off.
    dst = torch.where(valid, pos, torch.full_like(pos, s)).reshape(h, nseg * length)
    # (in place into fresh buffers: no second full-size copy)
    out = torch.zeros(bsz, h, s + 1, v.shape[-1], dtype=og.dtype, device=q.device)
    idx = dst[None, :, :, None].expand(bsz, h, nseg * length, v.shape[-1])
    out = out.scatter_(2, idx, og.reshape(bsz, h, nseg * length, v.shape[-1]))[:, :, :s]
    lse = None
    if lse_g is not None:
        full = torch.full((bsz, h, s + 1), -torch.inf, dtype=lse_g.dtype, device=q.device)
        full = full.scatter_(2, dst[None].expand(bsz, h, -1), lse_g.reshape(bsz, h, -1))
        lse = full[:, :, :s]
    return out, lse


def _heads_gather(
    q: Tensor, k: Tensor, v: Tensor, w: list[int], r: list[int], s: list[int], causal: bool,
    scale: float, need_lse: bool, block_size: int,
) -> tuple[Tensor, Tensor | None]:
    """Per-head (segment ``w``, dilation ``r``, offset ``s``) attention by the dilation ordering:
    each run of consecutive heads with the same (w, r) is one gather -> dense -> scatter, written
    into one preallocated output (only one run's temporaries are alive at a time)."""
    bsz, h, n, _ = q.shape
    out = torch.empty(bsz, h, n, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(bsz, h, n, dtype=torch.float32 if q.dtype != torch.float64 else q.dtype,
                      device=q.device) if need_lse else None
    start = 0
    for end in range(1, len(w) + 1):
        if end < len(w) and (w[end], r[end]) == (w[start], r[start]):
            continue
        sl = slice(start, end)
        o, lse_run = _branch_gather(q[:, sl], k[:, sl], v[:, sl], w[start], r[start], s[sl],
                                    causal, scale, need_lse, block_size, "sdpa")
        out[:, sl] = o
        if lse is not None:
            lse[:, sl] = lse_run
        start = end
    return out, lse


def dilated_pattern_attention(
    q: Tensor, k: Tensor, v: Tensor, pattern: Dilated, *, scale: float | None = None,
    block_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """``block_sparse_attention(q, k, v, pattern, return_lse=True)`` for a LongNet
    :class:`~workbench.patterns.Dilated` pattern, computed by the dilation ordering.

    Positions are local: segments start at 0, so on a window of a longer sequence this is the
    pattern's attention restricted to the window when the window starts at a multiple of every
    segment length (what the distributed ring checks before using it).
    """
    if not isinstance(pattern, Dilated):
        raise TypeError(f"pattern must be a Dilated pattern, got {type(pattern).__name__}")
    check_qkv(q, k, v)
    if q.shape[1] != pattern.num_heads or q.shape[2] != k.shape[2]:
        raise ValueError(f"need {pattern.num_heads} heads and q, k of one length, got "
                         f"{tuple(q.shape)} and {tuple(k.shape)}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _heads_gather(q, k, v, pattern.w, pattern.r, pattern.s, False, scale, True,
                         block_size)


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
            block-sparse backend (``"auto"``, ``"blockwise"``, ``"flex"``, ``"reference"``)
            working on the pattern in natural order.
        block_size: tile size for block-sparse backends (and for the log-sum-exp path).
        scale: score scale, default ``1 / sqrt(D)``.
        return_lse: also return the log-sum-exp ``[B, H, S]`` of the merged softmax.
    """
    check_qkv(q, k, v)
    check_dilation_pairs(segment_lengths, dilation_rates)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if backend != "gather" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'gather' or one of {BACKENDS}, got {backend!r}")
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
        out, lse = _heads_gather(q, k, v, w, r, [j % r[j] for j in range(h)], causal, scale,
                                 return_lse, block_size)
        return (out, lse) if return_lse else out

    # paper mode: every head runs every branch; branches merge by log-sum-exp
    need_lse = return_lse or len(pairs) > 1
    outs, lses = [], []
    for w, r in pairs:
        if backend == "gather":
            o, lse = _branch_gather(q, k, v, w, r, [j % r for j in range(h)], causal, scale,
                                    need_lse, block_size, "sdpa")
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
