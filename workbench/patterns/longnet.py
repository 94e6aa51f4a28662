"""LongNet dilated attention patterns: (segment, dilation) pairs on head groups
(:func:`dilated`) or one pair on every head (:func:`dilated_branch`, a branch of the paper's
mode); the layout is analytic, from the range of segments each block keeps a position of."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..layout import block_extents, block_lengths
from .bands import causal as causal_band
from .base import Pattern, check_int, check_ints


def _kept_segments(w_: Sequence[int], r_: Sequence[int], s_: Sequence[int], length: int,
                   block_size: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """(lo, hi, all_seg), int64 ``[T, n]`` per (segment ``w``, dilation ``r``, offset ``s``)
    triple and block: the first and last segment holding a kept position of it (``length`` and
    -1 for none, so two blocks share a segment iff ``lo_a <= hi_b`` and ``lo_b <= hi_a``), and
    the segment when every position of the block is kept and in that one segment, else -1."""
    ext = block_extents(length, block_size, device)
    a, e = ext[None, :, 0], ext[None, :, 1]  # first and last position of each block
    w, r, s = (torch.tensor(x, device=device)[:, None] for x in (w_, r_, s_))
    # First kept position >= a: in a's segment if one is left there, else the next.
    m = a // w
    t = a - m * w
    u = s + r * torch.div(torch.clamp(t - s, min=0) + r - 1, r, rounding_mode="floor")
    seg_len = torch.clamp(length - m * w, max=w)
    first = torch.where(u < seg_len, m * w + u, (m + 1) * w + s)
    # Last kept position <= e: in e's segment if its offset reaches s, else the previous.
    m2 = e // w
    t2 = e - m2 * w
    last_here = m2 * w + s + r * torch.div(t2 - s, r, rounding_mode="floor")
    last_prev = (m2 - 1) * w + s + r * torch.div(w - 1 - s, r, rounding_mode="floor")
    last = torch.where(t2 >= s, last_here, last_prev)
    nonempty = first <= e
    lo = torch.where(nonempty, first // w, length)
    hi = torch.where(nonempty, last // w, -1)
    one_segment = (a // w) == (e // w)
    all_kept = (r == 1) | ((a == e) & (torch.remainder(a - m * w, r) == s))
    all_seg = torch.where(one_segment & all_kept & nonempty, m, torch.full_like(m, -1))
    return lo, hi, all_seg


def _segment_tiles(q: Tensor, k: Tensor, any_out: Tensor, all_out: Tensor) -> None:
    """One head's tiles into ``any_out``, ``all_out`` from per-block (lo, hi, all_seg) rows
    ``[3, n]`` of q and k (k's all_seg -2 for "no"): active where the segment ranges overlap,
    full where both blocks are wholly kept in one segment. Equal query rows are computed once."""
    starts = torch.ones_like(q[0], dtype=torch.bool)
    starts[1:] = (q[:, 1:] != q[:, :-1]).any(0)
    inverse = starts.cumsum(0) - 1
    (qlo, qhi, qall), (klo, khi, kall) = q[:, starts, None], k[:, None, :]
    torch.index_select((qlo <= khi) & (klo <= qhi), 0, inverse, out=any_out)
    torch.index_select(qall == kall, 0, inverse, out=all_out)


class Dilated(Pattern):
    """LongNet dilated attention, one (segment ``w``, dilation ``r``) pair per head: head ``h``
    keeps the positions at offsets ``s, s + r, s + 2r, ...`` (``s = h mod r``) from the start of
    each segment ``[m*w, (m+1)*w)`` (the last one the remainder); query and key attend when both
    are kept and lie in the same segment."""

    def __init__(self, segments: Sequence[int], dilations: Sequence[int], name: str) -> None:
        self.w, self.r = list(segments), list(dilations)
        self.s = [h % r for h, r in enumerate(self.r)]
        self.num_heads = len(self.w)
        self.name = name
        self._tables: dict[str, tuple[Tensor, Tensor, Tensor]] = {}  # per device

    def predicate(self, device):
        # the per-head tables are copied to a device once: a copy from the host waits for
        # every kernel queued there, and a ring builds a predicate on every call
        key = str(torch.device(device))
        if key not in self._tables:
            self._tables[key] = tuple(torch.tensor(x, device=device)
                                      for x in (self.w, self.r, self.s))
        tw, tr, ts = self._tables[key]

        def kept_pair(h, q, k):
            w, r, s = tw[h], tr[h], ts[h]
            qo, ko = torch.remainder(q, w), torch.remainder(k, w)
            seg_q = torch.div(q, w, rounding_mode="floor")
            same_segment = seg_q == torch.div(k, w, rounding_mode="floor")
            return same_segment & (torch.remainder(qo, r) == s) & (torch.remainder(ko, r) == s)

        return kept_pair

    def period(self):
        return math.lcm(*self.w)

    def tiles(self, q_len, k_len, block_size, device, rows):
        # Heads with the same block-level view (the same triple, or offsets that no block of
        # these rows can tell apart) share one computation: done once, copied to the others.
        triples = list(zip(self.w, self.r, self.s))
        distinct = list(dict.fromkeys(triples))
        w, r, s = (list(x) for x in zip(*distinct))
        q = torch.stack(_kept_segments(w, r, s, q_len, block_size, device), 1)  # [T, 3, nq]
        q = q[:, :, rows[0]:rows[1]].contiguous()
        k = torch.stack(_kept_segments(w, r, s, k_len, block_size, device), 1)  # [T, 3, nk]
        k[:, 2] = torch.where(k[:, 2] < 0, -2, k[:, 2])  # "not all kept" never matches q's -1
        # per distinct triple: the first triple whose block tables are the same (compared
        # pairwise: a few triples, each table a row per block)
        views: list[int] = []
        for t in range(len(distinct)):
            views.append(next(u for u in range(t + 1) if u == t or (
                torch.equal(q[u], q[t]) and torch.equal(k[u], k[t]))))
        view_of = [views[distinct.index(x)] for x in triples]  # per head
        h = len(triples)
        shape = (h if len(set(views)) > 1 else 1, q.shape[2], k.shape[2])
        any_ = torch.empty(shape, dtype=torch.bool, device=device)
        all_ = torch.empty_like(any_)
        for i, v in enumerate(view_of[:shape[0]]):
            first = view_of.index(v)  # the first head with this view
            if first < i:
                any_[i].copy_(any_[first])
                all_[i].copy_(all_[first])
            else:
                _segment_tiles(q[v], k[v], any_[i], all_[i])
        return any_.expand(h, *shape[1:]), all_.expand(h, *shape[1:])

    def count_pairs(self, seq_len):
        total = 0
        for w, r, s in zip(self.w, self.r, self.s):
            lengths = block_lengths(seq_len, w)
            kept = torch.clamp(torch.div(lengths - s + r - 1, r, rounding_mode="floor"), min=0)
            total += int((kept * kept).sum())
        return total

    def key(self):
        return (tuple(self.w), tuple(self.r), tuple(self.s))

    def __repr__(self) -> str:
        return self.name


def check_dilation_pairs(segment_lengths: Sequence[int], dilation_rates: Sequence[int]
                         ) -> tuple[list[int], list[int]]:
    """LongNet (segment, dilation) lists as lists of ints; raise naming the offending
    argument."""
    segment_lengths = check_ints("segment_lengths", segment_lengths, 1)
    dilation_rates = check_ints("dilation_rates", dilation_rates, 1)
    if len(segment_lengths) != len(dilation_rates):
        raise ValueError(f"segment_lengths ({len(segment_lengths)} values) and dilation_rates "
                         f"({len(dilation_rates)} values) must have the same length: one "
                         "dilation per segment")
    for w, r in zip(segment_lengths, dilation_rates):
        if r > w:
            raise ValueError(f"dilation rate {r} is larger than its segment length {w}: a "
                             "segment would keep at most one position; use a dilation <= "
                             "segment length")
    return segment_lengths, dilation_rates


def head_groups(num_heads: int, num_groups: int) -> list[int]:
    """Group index of every head when ``num_heads`` are split into contiguous groups, the
    first ``num_heads % num_groups`` of them one head larger."""
    check_int("num_heads", num_heads, 1)
    if num_heads < num_groups:
        raise ValueError(f"num_heads={num_heads} is smaller than the number of (segment, "
                         f"dilation) pairs ({num_groups}); head-group mode needs at least one "
                         "head per pair")
    base, extra = divmod(num_heads, num_groups)
    return [g for g in range(num_groups) for _ in range(base + (g < extra))]


def dilated(segment_lengths: Sequence[int], dilation_rates: Sequence[int], num_heads: int,
            causal: bool = False) -> Pattern:
    """LongNet dilated attention in head-group mode: one (segment, dilation) pair per head group.

    Heads are split into ``len(segment_lengths)`` contiguous groups as evenly as possible (the
    first ``num_heads % k`` groups get one extra head); group ``g`` uses segment
    ``w_g = segment_lengths[g]`` and dilation ``r_g = dilation_rates[g]``. Head ``j`` keeps the
    positions at offset ``j mod r_g`` from each segment start (the paper's head-offset rule,
    applied to the absolute head index), then ``s + r_g, s + 2 r_g, ...`` inside the segment.
    Segments tile the sequence from position 0; the last is the remainder when ``w_g`` does not
    divide the length (equivalently: the sequence is padded to a multiple of ``w_g`` with keys
    nobody attends). A position a head does not keep attends nothing in that head (its output
    is zero).
    """
    check_dilation_pairs(segment_lengths, dilation_rates)
    group = head_groups(num_heads, len(segment_lengths))
    name = f"dilated({list(segment_lengths)}, {list(dilation_rates)}, num_heads={num_heads})"
    pat = Dilated([segment_lengths[g] for g in group], [dilation_rates[g] for g in group], name)
    return pat & causal_band() if causal else pat


def dilated_branch(segment_length: int, dilation_rate: int, num_heads: int) -> Pattern:
    """One LongNet (segment, dilation) branch on every head; head ``j`` takes offset ``j mod r``.
    The paper's attention merges these branches (:func:`workbench.dilated_attention`)."""
    check_dilation_pairs([segment_length], [dilation_rate])
    check_int("num_heads", num_heads, 1)
    name = f"dilated_branch({segment_length}, {dilation_rate}, num_heads={num_heads})"
    return Dilated([segment_length] * num_heads, [dilation_rate] * num_heads, name)


