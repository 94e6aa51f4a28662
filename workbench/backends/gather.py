"""The dilation ordering as a backend: LongNet's dilated attention computed densely per segment.

The positions a head keeps inside each segment of a (segment ``w``, dilation ``r``) pair are
attended densely and put back: no tile is wasted. When every segment is full, a run of heads whose
offsets step evenly (LongNet's ``j mod r``) is one strided view of q, k and v that a fused kernel
(:mod:`~workbench.backends.segments`) reads in place, forward and backward, with its log-sum-exp;
pairs on the same heads (paper mode) are merged in that pass. Small inputs are copied instead, to
launch less: the branches whose segments keep equally many slots by one index into one batch.
Otherwise positions are gathered by index.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..orderings import dilation_gather
from ..patterns import Dilated, KeyMask, Pattern, full, head_predicate
from ..patterns import causal as causal_band
from ..patterns.algebra import Intersection
from .merge import accumulation_dtype, empty_partial, merge_partials
from .problem import Problem
from .registry import Backend, Capabilities, Request, Runner, prepare_backend
from .segments import SegmentKernel, segment_kernel

__all__ = ["BACKEND", "dilated_parts", "dilated_pattern_attention", "heads_at_once",
           "prepare_dilated"]

#: Share of an input's heads whose temporaries one call holds (at least ``GATHER_MIN_BYTES``).
GATHER_HEAD_FRACTION = 1 / 16
#: Bytes of heads one call may always take, however small ``GATHER_HEAD_FRACTION`` makes it.
GATHER_MIN_BYTES = 64 * 2**20
#: Bytes per head from which the kernel reads q, k, v in place (one call per run of heads);
#: below it the kept slots are copied into one batch for one call.
IN_PLACE_MIN_BYTES = 8 * 2**20


def _fills(seq_len: int, segment: int, dilation: int, offsets: Sequence[int]) -> bool:
    """Whether every slot of heads at ``offsets`` is a real position: full segments, and no
    offset whose last slot runs past its segment."""
    last = (-(-segment // dilation) - 1) * dilation
    return seq_len % segment == 0 and all(o + last < segment for o in offsets)


def _head_bytes(q: Tensor) -> int:
    """Bytes of one head of ``q`` (all batches)."""
    return q[:, :1].numel() * q.element_size()


def heads_at_once(q: Tensor) -> int:
    """How many heads of ``q`` go at a time (see ``GATHER_HEAD_FRACTION``)."""
    h = q.shape[1]
    per_head = max(1, _head_bytes(q))
    return max(1, min(h, max(math.floor(h * GATHER_HEAD_FRACTION), GATHER_MIN_BYTES // per_head)))


class _Piece(NamedTuple):
    """Slots attended by one call: ``gather(x)`` -> ``[B', nseg', L, *rest]`` (q, k, v, lse),
    ``put(dst, src)`` writes a result back (strided and packed pieces also ``how="add"`` and
    ``weight=w``: put ``src * w`` or add it; packed ones also ``how="amax"``: keep the larger);
    ``key_ok`` [nseg', L] masks padding keys (None: all real)."""

    gather: Callable[[Tensor], Tensor]
    put: Callable[..., None]
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
    size = (x.shape[0], run.count, x.shape[2] // segment, -(-segment // dilation), *x.shape[3:])
    stride = (sb, sh + run.step * ss, segment * ss, dilation * ss, *rest)
    start = x.storage_offset() + run.head * sh + run.offset * ss
    return x.as_strided(size, stride, start)


def _strided_pieces(segment: int, dilation: int, offsets: list[int]) -> list[_Piece]:
    """One piece per run of heads (:func:`_head_runs`, every slot real): the kernel reads q, k,
    v in place through the run's view (:func:`_run_view`), batch and heads as one batch dim,
    ``[B * count, nseg, L, *rest]``."""
    return [_strided_piece(run, segment, dilation) for run in _head_runs(offsets)]


def _strided_piece(run: _Run, segment: int, dilation: int) -> _Piece:
    """The piece of one run of heads (:func:`_strided_pieces`)."""
    def view(x: Tensor) -> Tensor:  # -> [B, count, nseg, L, *rest]
        return _run_view(x, run, segment, dilation)

    def put(dst: Tensor, src: Tensor, how: str = "copy", weight: Tensor | None = None) -> None:
        target = view(dst)
        w = None if weight is None else weight.reshape(*target.shape[:4], 1)
        _write(target, src.reshape(target.shape), how, w)

    return _Piece(lambda x: view(x).flatten(0, 1), put, None)


def _slot_rows(seq_len: int, segment: int, dilation: int, offsets: Sequence[int],
               first_head: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(rows, valid)`` ``[h, nseg, L]``: the row of every kept slot of heads ``first_head,
    ...`` (at ``offsets``) in the ``[B, heads * S, *rest]`` view of the heads, and which slots
    are real positions (:func:`~workbench.orderings.dilation_gather`; padding reads row 0 of its
    head)."""
    pos, valid = dilation_gather(seq_len, segment, dilation, offsets, device)
    heads = torch.arange(first_head, first_head + len(offsets), device=device)
    return pos + heads[:, None, None] * seq_len, valid


def _gather_rows(x: Tensor, rows: Tensor, length: int) -> Tensor:
    """``x`` ``[B, h, S, *rest]`` at ``rows`` of its ``[B, h * S, *rest]`` view, as segments of
    ``length`` slots: ``[B, rows / length, length, *rest]`` (one ``index_select``)."""
    rest = x.shape[3:]
    flat = x.reshape(x.shape[0], -1, *rest).index_select(1, rows)
    return flat.view(x.shape[0], -1, length, *rest)


def _packed_piece(seq_len: int, spans: list[tuple[_Branch, int, int]], start: int,
                  device: torch.device) -> _Piece:
    """One piece for branches on disjoint heads whose segments keep equally many slots (every
    segment full): the kept positions of heads ``[a, b)`` of each span, counted from head
    ``start``, gathered by one index into one batch of segments and put back by one index. A
    position may repeat (heads running several branches): ``put`` then needs ``how="add"`` or
    ``"amax"``."""
    rows = [_slot_rows(seq_len, br.segment, br.dilation, br.offsets[a - br.start:b - br.start],
                       a - start, device)[0] for br, a, b in spans]
    index, length = torch.cat([r.reshape(-1) for r in rows]), rows[0].shape[-1]

    def put(dst: Tensor, src: Tensor, how: str = "copy", weight: Tensor | None = None) -> None:
        rest = dst.shape[3:]
        src = src.reshape(dst.shape[0], -1, *rest)
        if weight is not None:  # one pass: the product takes the weight's wider dtype
            src = src * weight.reshape(*src.shape[:2], *(1,) * len(rest))
        src = src.to(dst.dtype)
        flat = dst.view(dst.shape[0], -1, *rest)  # our own buffers: heads of a contiguous one
        if how == "amax":
            flat.scatter_reduce_(1, index.view(1, -1, *(1,) * len(rest)).expand_as(src), src,
                                 "amax")
        else:
            (flat.index_add_ if how == "add" else flat.index_copy_)(1, index, src)

    return _Piece(lambda x: _gather_rows(x, index, length), put, None)


def _write(target: Tensor, src: Tensor, how: str, weight: Tensor | None) -> None:
    """``target`` becomes ``src`` (times ``weight``), or with ``how="add"`` adds it."""
    if weight is None:
        target.add_(src) if how == "add" else target.copy_(src)
    elif how == "add":
        target.addcmul_(src, weight)
    else:
        torch.mul(src, weight, out=target)


def _indexed_piece(seq_len: int, segment: int, dilation: int, offsets: list[int],
                   device: torch.device, full: bool) -> _Piece:
    """Slots gathered by index: one ``index_select`` per tensor (whose backward is one
    ``index_add``). ``full``: every slot is a real position. Otherwise padding slots (a short
    last segment) read position 0, their keys are masked and they are not put back."""
    rows, valid = _slot_rows(seq_len, segment, dilation, offsets, 0, device)
    h, nseg, length = rows.shape
    rows = rows.reshape(-1)
    key_ok, kept, put_rows = None, None, rows
    if not full:
        kept = valid.reshape(-1).nonzero().squeeze(1)
        put_rows = rows[kept]
        key_ok = valid.reshape(h * nseg, length)
        # a segment a head keeps nothing of (offset past a short last segment): its padded
        # queries see one key so nothing is NaN (their outputs are not put back)
        first = torch.arange(length, device=device) == 0
        key_ok = key_ok | (~key_ok.any(-1, keepdim=True) & first)

    def put(dst: Tensor, src: Tensor) -> None:
        rest = dst.shape[3:]
        src = src.reshape(dst.shape[0], -1, *rest)
        if kept is not None:
            src = src.index_select(1, kept)
        dst.view(dst.shape[0], -1, *rest).index_copy_(1, put_rows, src)

    return _Piece(lambda x: _gather_rows(x, rows, length), put, key_ok)


def _attend_piece(pc: _Piece, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float,
                  out: Tensor, lse: Tensor | None, block_size: int, kept: dict) -> None:
    """Dense attention inside every segment of one piece, put back into ``out`` (and ``lse``).
    What it derives from the piece's shapes and key mask is kept in ``kept``; the log-sum-exp
    comes from FlexAttention (CUDA, 128-token tiles) or blockwise."""
    qg, kg, vg = pc.gather(q), pc.gather(k), pc.gather(v)
    length = qg.shape[2]
    mask_id = None if pc.key_ok is None else id(pc.key_ok)  # kept alive by its piece in kept
    if lse is not None:
        key = ("lse", mask_id, causal, qg.shape, kg.shape, vg.shape)
        if key not in kept:
            pat = full() if pc.key_ok is None else KeyMask(pc.key_ok)
            pat = pat & causal_band() if causal else pat
            name = "blockwise" if q.is_cuda and length < 128 else "auto"
            blk = 128 if q.is_cuda and length >= 128 else min(block_size, length)
            layout = pat.block_structure(length, blk, q.device, k_len=kg.shape[2])
            problem = Problem(layout, head_predicate(pat, q.device), scale, label=repr(pat),
                              dense_form=pat.dense_form(), pattern=pat)
            kept[key] = prepare_backend(name, qg, kg, vg, problem, need_lse=True)
        og, lse_g = kept[key](qg, kg, vg)
        pc.put(lse, lse_g.to(lse.dtype))
    else:
        key = ("mask", mask_id, causal)
        if key not in kept:
            mask = None if pc.key_ok is None else pc.key_ok[None, :, None, :]
            if mask is not None and causal:
                mask = mask & torch.ones(length, length, dtype=torch.bool,
                                         device=q.device).tril()
            kept[key] = mask
        og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=kept[key],
                                            is_causal=causal and kept[key] is None, scale=scale)
    del qg, kg, vg
    pc.put(out, og.to(out.dtype))


class _Branch(NamedTuple):
    """Heads ``[start, stop)`` attend pair (``segment``, ``dilation``), head ``start + j`` at
    offset ``offsets[j]``."""

    start: int
    stop: int
    segment: int
    dilation: int
    offsets: tuple[int, ...]


def _branches(dil: Dilated) -> list[_Branch]:
    """A LongNet pattern's runs of consecutive heads that share a (segment, dilation) pair."""
    w, r, s = dil.w, dil.r, dil.s
    runs, start = [], 0
    for end in range(1, len(w) + 1):
        if end == len(w) or (w[end], r[end]) != (w[start], r[start]):
            runs.append(_Branch(start, end, w[start], r[start], tuple(s[start:end])))
            start = end
    return runs


def _generic(
    q: Tensor, k: Tensor, v: Tensor, branches: list[_Branch], causal: bool, scale: float,
    need_lse: bool, block_size: int, kept: dict,
) -> tuple[Tensor, Tensor | None]:
    """Branches over disjoint heads, a few heads at a time: the kept positions gathered, attended
    by SDPA (or a block-sparse backend for the log-sum-exp) under autograd and put back into one
    output; for padded segments and inputs no fused kernel takes. ``kept`` keeps the index
    tensors, masks and prepared backends of these inputs' shapes, dtype, device and grad mode."""
    out, lse = empty_partial(q, v.shape[-1], lse=need_lse)  # what a position nobody keeps gets
    s, chunk = q.shape[2], heads_at_once(q)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    in_place = not need_lse and _head_bytes(q) >= IN_PLACE_MIN_BYTES
    for br in branches:
        for a in range(br.start, br.stop, chunk):
            sl = slice(a, min(a + chunk, br.stop))
            offs = br.offsets[a - br.start:sl.stop - br.start]
            # Under autograd every view would get a gradient buffer of its base's full size in
            # the backward, one per offset: the index gather costs one per tensor instead.
            key = ("pieces", s, br.segment, br.dilation, offs, grad, in_place)
            if key not in kept:
                full = _fills(s, br.segment, br.dilation, offs)
                kept[key] = (
                    _strided_pieces(br.segment, br.dilation, list(offs))
                    if full and in_place and not grad
                    else [_indexed_piece(s, br.segment, br.dilation, list(offs), q.device, full)])
            for pc in kept[key]:
                _attend_piece(pc, q[:, sl], k[:, sl], v[:, sl], causal, scale, out[:, sl],
                              None if lse is None else lse[:, sl], block_size, kept)
    return out, lse


def _fused_pieces(q: Tensor, branches: list[_Branch], in_place: bool, kept: dict
                  ) -> Iterator[tuple[slice, list[tuple[slice, _Piece]], int]]:
    """Every branch's pieces a few heads at a time: ``(heads, [(piece_heads, piece), ...],
    covering)``, ``piece_heads`` relative to ``heads``, in one fixed order (the backward walks
    the forward's pieces again); pieces are kept in ``kept``. Copied (not ``in_place``), the
    branches whose segments keep equally many slots share one packed piece. Otherwise a branch
    that keeps every position of these heads (dilation 1) goes first: its ``covering`` pieces
    write every position once."""
    s, h, chunk = q.shape[2], q.shape[1], heads_at_once(q)
    for start in range(0, h, chunk):
        stop = min(start + chunk, h)
        spans = [(br, max(start, br.start), min(stop, br.stop)) for br in branches]
        spans = [(br, a, b) for br, a, b in spans if a < b]
        if not in_place:
            key = ("packed", s, start, stop)
            if key not in kept:
                by_slots: dict[int, list] = {}
                for span in spans:
                    by_slots.setdefault(-(-span[0].segment // span[0].dilation), []).append(span)
                kept[key] = [_packed_piece(s, group, start, q.device)
                             for group in by_slots.values()]
            yield slice(start, stop), [(slice(0, stop - start), pc) for pc in kept[key]], 0
            continue
        spans.sort(key=lambda span: (span[0].dilation, span[1], span[2]) != (1, start, stop))
        group, covering = [], 0
        for n, (br, a, b) in enumerate(spans):
            offs = br.offsets[a - br.start:b - br.start]
            key = ("strided", s, br.segment, br.dilation, offs)
            if key not in kept:
                kept[key] = _strided_pieces(br.segment, br.dilation, list(offs))
            group += [(slice(a - start, b - start), pc) for pc in kept[key]]
            if n == 0 and (br.dilation, a, b) == (1, start, stop):
                covering = len(group)
        yield slice(start, stop), group, covering


class _Fused(NamedTuple):
    """What :class:`_DilationOrdered` runs; ``kept`` holds the strided pieces across calls,
    ``merged``: some head runs several branches (their results are merged)."""

    branches: list[_Branch]
    causal: bool
    scale: float
    kernel: SegmentKernel
    kept: dict
    merged: bool


class _DilationOrdered(torch.autograd.Function):
    """Every branch's segments on the fused kernel through strided views, merged by
    log-sum-exp where branches share heads; differentiable through out and lse.

    Merging goes a few heads at a time: the pieces' log-sum-exps are combined first, then each
    piece's output is added once with its share of the softmax, in the accumulation dtype."""

    @staticmethod
    def forward(ctx, q, k, v, spec):  # type: ignore[override]
        in_place, acc = _head_bytes(q) >= IN_PLACE_MIN_BYTES, accumulation_dtype(q.dtype)
        out = q.new_zeros(*q.shape[:3], v.shape[-1])
        lse = torch.full(q.shape[:3], -torch.inf, dtype=acc, device=q.device)
        states = []
        for heads, group, covering in _fused_pieces(q, spec.branches, in_place, spec.kept):
            qh, kh, vh, oh, lh = q[:, heads], k[:, heads], v[:, heads], out[:, heads], lse[:, heads]
            parts = []
            for sl, pc in group:
                o, m, state = spec.kernel.forward(pc.gather(qh[:, sl]), pc.gather(kh[:, sl]),
                                                  pc.gather(vh[:, sl]), spec.causal, spec.scale)
                states.append(state)
                if spec.merged:
                    parts.append((sl, pc, o, m))
                else:
                    pc.put(oh[:, sl], o)
                    pc.put(lh[:, sl], m)
            if parts:
                _merge_lse(parts, lh, repeats=not in_place)
                total = _sums(oh.shape, acc, q.device, covering)
                for n, (sl, pc, o, m) in enumerate(parts):
                    share = torch.exp(m - pc.gather(lh[:, sl])).unsqueeze(-1)
                    pc.put(total[:, sl], o, "add" if n >= covering else "copy", share)
                oh.copy_(total)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spec, ctx.states, ctx.in_place = spec, states, in_place
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlse):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        spec, states = ctx.spec, iter(ctx.states)
        # every head chunk's sums are copied in when merged; otherwise unkept positions get 0
        grads = [(torch.empty_like if spec.merged else torch.zeros_like)(x) for x in (q, k, v)]
        if dout is not None and dout.stride(-1) != 1:
            dout = dout.contiguous()
        acc = accumulation_dtype(q.dtype)
        pieces = _fused_pieces(q, spec.branches, ctx.in_place, spec.kept)
        for heads, group, covering in pieces:
            covering = covering if dout is not None else 0  # lse gradients leave v's unset
            qh, kh, vh, oh, lh = q[:, heads], k[:, heads], v[:, heads], out[:, heads], lse[:, heads]
            # merged branches add several gradients per position: summed in the accumulation dtype
            sums = [_sums(g[:, heads].shape, acc, g.device, covering)
                    for g in grads] if spec.merged else [g[:, heads] for g in grads]
            for n, (sl, pc) in enumerate(group):
                state = next(states)
                qg, kg, vg = pc.gather(qh[:, sl]), pc.gather(kh[:, sl]), pc.gather(vh[:, sl])
                og, mg = pc.gather(oh[:, sl]), pc.gather(lh[:, sl]).contiguous()
                parts = []
                if dout is not None:
                    parts.append(spec.kernel.backward(pc.gather(dout[:, heads][:, sl]), qg, kg,
                                                      vg, og, mg, state, spec.causal, spec.scale))
                if dlse is not None:
                    parts.append(_lse_grads(spec, pc.gather(dlse[:, heads][:, sl]), qg, kg, vg,
                                            og, mg, state))
                for first, part in zip((n < covering, False), parts):  # dout's part first
                    for g, d in zip(sums, part):
                        if d is not None:
                            pc.put(g[:, sl], d, "copy" if first else "add")
            if spec.merged:
                for g, total in zip(grads, sums):
                    g[:, heads].copy_(total)
        return (*grads, None)


def _merge_lse(parts: list[tuple[slice, _Piece, Tensor, Tensor]], lse: Tensor,
               repeats: bool) -> None:
    """``lse`` (``-inf`` on entry) becomes, at every slot of the ``(heads, piece, out, m)``
    parts, the log-sum-exp of the ``m`` the parts give it: one part after another, or, where a
    piece ``repeats`` a position (a packed piece of several branches), the largest first, then
    the sum of the exponentials above it."""
    if not repeats:
        for sl, pc, _, m in parts:
            pc.put(lse[:, sl], torch.logaddexp(pc.gather(lse[:, sl]), m))
        return
    for sl, pc, _, m in parts:
        pc.put(lse[:, sl], m, "amax")
    sums = torch.zeros_like(lse)
    for sl, pc, _, m in parts:
        pc.put(sums[:, sl], torch.exp(m - pc.gather(lse[:, sl])), "add")
    lse.add_(sums.log_())  # -inf where no part writes


def _sums(shape: torch.Size, dtype: torch.dtype, device: torch.device, covering: int) -> Tensor:
    """Where a head chunk's merged results are summed: zeros, or left unset when ``covering``
    pieces write every position first."""
    return (torch.empty if covering else torch.zeros)(shape, dtype=dtype, device=device)


def _lse_grads(spec: _Fused, dlse: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
               lse: Tensor, state: object) -> tuple[Tensor, Tensor, None]:
    """The gradients a log-sum-exp gradient ``dlse`` sends into one piece's q and k:
    ``scale * dlse * (P k)`` for q (the kernel's forward with k as the values, reweighted from
    its own log-sum-exp to ``lse``) and ``scale * P^T (dlse * q)`` for k (the backward's value
    gradient for that upstream gradient)."""
    pk, own, _ = spec.kernel.forward(q, k, k, spec.causal, spec.scale)
    weight = (dlse.to(own.dtype) * torch.exp(own - lse)).unsqueeze(-1) * spec.scale
    dq = pk * weight
    upstream = (dlse.unsqueeze(-1) * q).to(q.dtype)
    *_, pq = spec.kernel.backward(upstream, q, k, v, out, lse, state, spec.causal, spec.scale)
    return dq, pq * spec.scale, None


def dilated_parts(pattern: object) -> tuple[Dilated, bool] | None:
    """``(dilated, causal)`` when ``pattern`` is a LongNet :class:`~workbench.patterns.Dilated`
    pattern, or one intersected with causal attention; else None."""
    if isinstance(pattern, Dilated):
        return pattern, False
    if isinstance(pattern, Intersection):
        for a, b in ((pattern.a, pattern.b), (pattern.b, pattern.a)):
            if isinstance(a, Dilated) and b.dense_form() == "causal":
                return a, True
    return None


def prepare_dilated(
    q: Tensor, k: Tensor, v: Tensor, patterns: Pattern | Sequence[Pattern], *,
    scale: float | None = None, block_size: int = 64, need_lse: bool = True,
) -> Runner:
    """:func:`dilated_pattern_attention` of these inputs, prepared: ``runner(q, k, v) -> (out,
    lse or None)``, differentiable through both. Several LongNet patterns (all causal or none)
    give one softmax over the union of their keys, a key kept by several patterns counted once
    per pattern (LongNet's paper mode).

    Raises:
        TypeError: a pattern that is not LongNet's.
        ValueError: inputs that are not ``[B, H, S, D]`` of one shape, or heads other than the
            patterns'; patterns that are causal and not causal.
    """
    patterns = [patterns] if isinstance(patterns, Pattern) else list(patterns)
    parts = [dilated_parts(p) for p in patterns]
    bad = [p for p, part in zip(patterns, parts) if part is None]
    if bad or not patterns:
        raise TypeError(f"patterns must be LongNet dilated patterns, got {bad or patterns!r}")
    if q.dim() != 4 or q.shape != k.shape or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"q, k, v must be [B, H, S, D] of one shape (v: any Dv), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if any(dil.num_heads != q.shape[1] for dil, _ in parts):
        raise ValueError(f"need {parts[0][0].num_heads} heads, got {tuple(q.shape)}")
    if len({causal for _, causal in parts}) > 1:
        raise ValueError("the patterns must all be causal or all not")
    causal = parts[0][1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    branches = [br for dil, _ in parts for br in _branches(dil)]
    heads = [h for br in branches for h in range(br.start, br.stop)]
    kernel, kept, merged = segment_kernel(q, k, v), {}, len(heads) != len(set(heads))
    fills = all(_fills(q.shape[2], br.segment, br.dilation, br.offsets) for br in branches)
    if kernel is not None and fills:
        spec = _Fused(branches, causal, scale, kernel, kept, merged)

        def fused(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor | None]:
            # the kernels read rows of D contiguous elements through the strided views
            q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
            out, lse = _DilationOrdered.apply(q, k, v, spec)
            return out, lse if need_lse else None

        return fused
    if not merged:
        return lambda q, k, v: _generic(q, k, v, branches, causal, scale, need_lse, block_size,
                                        kept)

    def merged_generic(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor | None]:
        # branches that share heads, one at a time, merged by log-sum-exp
        parts = [_generic(q, k, v, [br], causal, scale, True, block_size, kept)
                 for br in branches]
        out, lse = merge_partials(*zip(*parts))
        return out, lse if need_lse else None

    return merged_generic


def dilated_pattern_attention(
    q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, *, scale: float | None = None,
    block_size: int = 64, need_lse: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """``block_sparse_attention(q, k, v, pattern, return_lse=True)`` for a LongNet pattern
    (:func:`dilated_parts`) by the dilation ordering (``need_lse=False``: ``(out, None)``).
    Segments start at local position 0: on a window of a longer sequence this is the pattern's
    attention when the window starts at a multiple of every segment length."""
    return prepare_dilated(q, k, v, pattern, scale=scale, block_size=block_size,
                           need_lse=need_lse)(q, k, v)


def _refuses(req: Request) -> str | None:
    parts = dilated_parts(req.pattern)
    if parts is None:
        return "computes LongNet dilated patterns only (patterns.dilated)"
    if parts[0].num_heads != req.q.shape[1] or req.q.shape[2] != req.k_len:
        return "needs self-attention with one pattern head per head"
    if req.q_offset != req.k_offset or req.q_offset % math.lcm(*parts[0].w):
        return "needs a window on the diagonal that starts at a multiple of every segment"
    return None


BACKEND = Backend(
    "gather",
    lambda q, k, v, problem, need_lse: dilated_pattern_attention(
        q, k, v, problem.pattern, scale=problem.scale, block_size=problem.layout.block_size,
        need_lse=need_lse),
    Capabilities(patterns="LongNet dilated (head groups), optionally causal"),
    "LongNet's dilation ordering: each segment's kept positions attended densely by SDPA",
    refuses=_refuses,
    prefers=lambda req: ("a LongNet dilated pattern: the dilation ordering attends each "
                         "segment's kept positions densely, wasting no tile"),
    prepare_pattern=lambda q, k, v, pattern, scale, need_lse, block_size: prepare_dilated(
        q, k, v, pattern, scale=scale, block_size=block_size, need_lse=need_lse),
)
