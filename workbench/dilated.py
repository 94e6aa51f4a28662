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
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import block_sparse_attention, check_qkv, check_scale
from .backends import BACKENDS, empty_partial, merge_partials
from .orderings import dilation_gather
from .patterns import (
    Dilated,
    KeyMask,
    check_dilation_pairs,
    check_positive_int,
    dilated,
    dilated_branch,
    head_groups,
)
from .patterns import causal as causal_pattern
from .patterns import full as full_pattern

__all__ = ["dilated_attention", "dilated_pattern_attention"]

MODES = ("paper", "head_groups")


#: Heads go a few at a time: one call's temporaries (its output, and gathered copies of q, k, v
#: where slots must be gathered by index or a kernel wants contiguous inputs) hold at most this
#: fraction of an input's heads (or ``GATHER_MIN_BYTES``, whichever is more).
GATHER_HEAD_FRACTION = 1 / 8
GATHER_MIN_BYTES = 64 * 2**20
#: From this many bytes per head, SDPA reads q, k, v in place through strided views (one call
#: per run of heads); below it the views are copied into one batch for one call, since launches then
#: cost more than the copies (set from trial runs on an H100 at 16K and 64K tokens, forward,
#: 16 heads of 128, bf16; those runs are not kept in data/).
IN_PLACE_MIN_BYTES = 8 * 2**20


def _head_bytes(q: Tensor) -> int:
    """Bytes of one head of ``q`` (all batches)."""
    return q[:, :1].numel() * q.element_size()


def _heads_at_once(q: Tensor) -> int:
    """How many heads of ``q`` go at a time (see ``GATHER_HEAD_FRACTION``)."""
    h = q.shape[1]
    per_head = max(1, _head_bytes(q))
    return max(1, min(h, max(math.floor(h * GATHER_HEAD_FRACTION), GATHER_MIN_BYTES // per_head)))


class _Piece(NamedTuple):
    """Slots attended by one call: ``gather(x)`` -> ``[B', nseg', L, *rest]`` (q, k, v and the
    log-sum-exp alike), ``put(dst, src)`` writes a result back; ``key_ok`` [nseg', L] masks
    padding keys (None: every key is real)."""

    gather: Callable[[Tensor], Tensor]
    put: Callable[[Tensor, Tensor], None]
    key_ok: Tensor | None


class _Run(NamedTuple):
    """``count`` consecutive heads from ``head``, head ``head + t`` at offset
    ``offset + t * step``."""

    head: int
    count: int
    offset: int
    step: int


def _head_runs(offsets: list[int]) -> list[_Run]:
    """The heads as runs of consecutive heads whose offsets grow by a constant step (0 for
    heads sharing an offset, 1 for LongNet's ``j mod r`` within a branch of ``r`` heads)."""
    runs, j = [], 0
    while j < len(offsets):
        count, step = 1, 0
        if j + 1 < len(offsets) and offsets[j + 1] >= offsets[j]:
            step, count = offsets[j + 1] - offsets[j], 2
            while j + count < len(offsets) and offsets[j + count] - offsets[j + count - 1] == step:
                count += 1
        runs.append(_Run(j, count, offsets[j], step))
        j += count
    return runs


def _run_view(x: Tensor, run: _Run, segment: int, dilation: int) -> Tensor:
    """The kept positions of a run's heads as one strided view of ``x`` ``[B, H, S, *rest]``:
    ``[B, count, nseg, L, *rest]``, slot ``i`` of segment ``m`` of head ``head + t`` at position
    ``m * w + offset + t * step + i * r`` (every segment full). Stepping to the next head moves
    ``step`` positions further, so one view covers heads with different offsets."""
    sb, sh, ss, *rest = x.stride()
    size = (x.shape[0], run.count, x.shape[2] // segment, segment // dilation, *x.shape[3:])
    stride = (sb, sh + run.step * ss, segment * ss, dilation * ss, *rest)
    start = x.storage_offset() + run.head * sh + run.offset * ss
    return x.as_strided(size, stride, start)


def _strided_pieces(seq_len: int, segment: int, dilation: int, offsets: list[int],
                    in_place: bool) -> list[_Piece]:
    """When every slot is a real position, each run of heads (:func:`_head_runs`) keeps a
    strided view of the sequence (:func:`_run_view`): no index tensors. ``in_place``: one call
    per run reads q, k, v through that view, and only its output is copied back (no gathered
    copies at batch 1). Otherwise the views are copied into one batch and attended by one call
    (fewer launches: better for short sequences, and for kernels that want contiguous
    inputs)."""
    runs = _head_runs(offsets)

    def view(x: Tensor, run: _Run) -> Tensor:  # -> [B, c, nseg, L, *rest]
        return _run_view(x, run, segment, dilation)

    if in_place:
        def piece(run: _Run) -> _Piece:
            def gather(x: Tensor) -> Tensor:  # batch and heads as one batch dim
                return view(x, run).flatten(0, 1)

            def put(dst: Tensor, src: Tensor) -> None:
                target = view(dst, run)
                target.copy_(src.reshape(target.shape))

            return _Piece(gather, put, None)

        return [piece(run) for run in runs]

    sizes = [run.count for run in runs]
    nseg = seq_len // segment

    def gather(x: Tensor) -> Tensor:  # [B, sum(c) * nseg, L, *rest], runs in order
        return torch.cat([view(x, run) for run in runs], 1).flatten(1, 2)

    def put(dst: Tensor, src: Tensor) -> None:
        parts = src.unflatten(1, (sum(sizes), nseg)).split(sizes, 1)
        for run, part in zip(runs, parts):
            view(dst, run).copy_(part)

    return [_Piece(gather, put, None)]


def _indexed_piece(seq_len: int, segment: int, dilation: int, offsets: list[int],
                   device: torch.device, full: bool) -> _Piece:
    """Slots gathered by index: one ``index_select`` per tensor (whose backward is one
    ``index_add``). ``full``: every slot is a real position. Otherwise padding slots (a short
    last segment) read position 0, their keys are masked and they are not put back."""
    pos, valid = dilation_gather(seq_len, segment, dilation, offsets, device)
    h, nseg, length = pos.shape
    hs = h * seq_len
    # one row per slot into the [B, h * S, *rest] view of the heads
    rows = (pos + torch.arange(h, device=device)[:, None, None] * seq_len).reshape(-1)
    key_ok, kept = None, None
    if not full:
        kept = valid.reshape(-1).nonzero().squeeze(1)
        key_ok = valid.reshape(h * nseg, length)
        # a segment a head keeps nothing of (offset past a short last segment): its padded
        # queries see one key so nothing is NaN (their outputs are not put back)
        first = torch.arange(length, device=device) == 0
        key_ok = key_ok | (~key_ok.any(-1, keepdim=True) & first)

    def gather(x: Tensor) -> Tensor:
        rest = x.shape[3:]
        flat = x.reshape(x.shape[0], hs, *rest).index_select(1, rows)
        return flat.reshape(x.shape[0], -1, length, *rest)

    def put(dst: Tensor, src: Tensor) -> None:
        rest = dst.shape[3:]
        src = src.reshape(dst.shape[0], -1, *rest)
        dst_rows = rows
        if kept is not None:
            src, dst_rows = src.index_select(1, kept), rows[kept]
        dst.view(dst.shape[0], hs, *rest).index_copy_(1, dst_rows, src)

    return _Piece(gather, put, key_ok)


def _branch_gather(
    q: Tensor, k: Tensor, v: Tensor, segment: int, dilation: int, offsets: list[int],
    causal: bool, scale: float, out: Tensor, lse: Tensor | None, block_size: int, chunk: int,
) -> None:
    """One (segment, dilation) branch for heads with ``offsets``, by the dilation ordering:
    dense attention inside each head's kept positions of each segment, written into ``out``
    (zeros) and ``lse`` (-inf, or None when not needed) in place; only the positions each head
    keeps are written. ``chunk`` heads go at a time."""
    h, s = q.shape[1], q.shape[2]
    length = -(-segment // dilation)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    in_place = lse is None and _head_bytes(q) >= IN_PLACE_MIN_BYTES
    for a in range(0, h, chunk):
        sl = slice(a, min(a + chunk, h))
        offs = offsets[sl]
        full = s % segment == 0 and all(o + (length - 1) * dilation < segment for o in offs)
        # Under autograd every view would get a gradient buffer of its base's full size in the
        # backward, one per offset: the index gather costs one per tensor instead.
        pieces = (_strided_pieces(s, segment, dilation, offs, in_place) if full and not grad
                  else [_indexed_piece(s, segment, dilation, offs, q.device, full)])
        for pc in pieces:
            _attend_piece(pc, q[:, sl], k[:, sl], v[:, sl], causal, scale, out[:, sl],
                          None if lse is None else lse[:, sl], block_size)


def _attend_piece(pc: _Piece, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float,
                  out: Tensor, lse: Tensor | None, block_size: int) -> None:
    """Dense attention inside every segment of one piece, put back into ``out`` (and ``lse``)."""
    qg, kg, vg = pc.gather(q), pc.gather(k), pc.gather(v)
    length = qg.shape[2]
    if lse is not None:
        # SDPA returns no log-sum-exp: FlexAttention (CUDA) or blockwise computes the same
        # dense segments with it; FlexAttention needs 128-token tiles on CUDA.
        pat = full_pattern() if pc.key_ok is None else KeyMask(pc.key_ok)
        if causal:
            pat = pat & causal_pattern()
        name = "blockwise" if q.is_cuda and length < 128 else "auto"
        blk = 128 if q.is_cuda and length >= 128 else min(block_size, length)
        og, lse_g = block_sparse_attention(qg, kg, vg, pat, blk, backend=name,
                                           return_lse=True, scale=scale)
        pc.put(lse, lse_g.to(lse.dtype))
    else:
        mask = None
        if pc.key_ok is not None:
            mask = pc.key_ok[None, :, None, :]
            if causal:
                mask = mask & torch.ones(length, length, dtype=torch.bool,
                                         device=q.device).tril()
        og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask,
                                            is_causal=causal and mask is None, scale=scale)
    del qg, kg, vg
    pc.put(out, og.to(out.dtype))


def _heads_gather(
    q: Tensor, k: Tensor, v: Tensor, w: list[int], r: list[int], s: list[int], causal: bool,
    scale: float, need_lse: bool, block_size: int,
) -> tuple[Tensor, Tensor | None]:
    """Per-head (segment ``w``, dilation ``r``, offset ``s``) attention by the dilation ordering:
    each run of consecutive heads with the same (w, r) is gathered (a few heads at a time),
    attended densely and put straight back into one preallocated output."""
    out, lse = empty_partial(q, v.shape[-1], lse=need_lse)  # what a position nobody keeps gets
    chunk = _heads_at_once(q)
    start = 0
    for end in range(1, len(w) + 1):
        if end < len(w) and (w[end], r[end]) == (w[start], r[start]):
            continue
        sl = slice(start, end)
        _branch_gather(q[:, sl], k[:, sl], v[:, sl], w[start], r[start], s[sl], causal, scale,
                       out[:, sl], None if lse is None else lse[:, sl], block_size, chunk)
        start = end
    return out, lse


def dilated_pattern_attention(
    q: Tensor, k: Tensor, v: Tensor, pattern: Dilated, *, scale: float | None = None,
    block_size: int = 64, need_lse: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """``block_sparse_attention(q, k, v, pattern, return_lse=True)`` for a LongNet
    :class:`~workbench.patterns.Dilated` pattern, computed by the dilation ordering.
    ``need_lse=False`` returns ``(out, None)`` and lets SDPA compute the segments.

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
    return _heads_gather(q, k, v, pattern.w, pattern.r, pattern.s, False, scale, need_lse,
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
    choices = ("gather", *(b for b in BACKENDS if b != "sdpa"))  # sdpa: dense or causal only
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
        out, lse = _heads_gather(q, k, v, w, r, [j % r[j] for j in range(h)], causal, scale,
                                 return_lse, block_size)
        return (out, lse) if return_lse else out

    # paper mode: every head runs every branch; branches merge by log-sum-exp
    need_lse = return_lse or len(pairs) > 1
    outs, lses = [], []
    for w, r in pairs:
        if backend == "gather":
            o, lse = empty_partial(q, v.shape[-1], lse=need_lse)
            _branch_gather(q, k, v, w, r, [j % r for j in range(h)], causal, scale, o, lse,
                           block_size, _heads_at_once(q))
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
