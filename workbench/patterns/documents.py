"""Packed sequences: documents laid end to end, each attending only to itself."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..layout import MAX_POSITION
from .bands import _extents
from .base import Pattern, check_ints


class Documents(Pattern):
    """Packed documents of ``lengths`` tokens: query ``i`` attends key ``j`` iff both lie in the
    same document (and ``j <= i`` with ``causal=True``). Positions at or past ``sum(lengths)``
    belong to no document: they attend nothing and nothing attends them.

    Raises:
        ValueError: ``lengths`` empty, not positive, or summing past ``MAX_POSITION``.
        TypeError: ``lengths`` not a sequence, or a length that is not an int.
    """

    def __init__(self, lengths: Sequence[int] | Tensor, causal: bool = False) -> None:
        lengths = check_ints("lengths", lengths, 1)
        self.lengths, self.causal = tuple(lengths), bool(causal)
        self.total = sum(lengths)
        if self.total > MAX_POSITION:
            raise ValueError(f"the documents hold {self.total} tokens, more than the "
                             f"{MAX_POSITION} positions kernels can index")
        self.cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)])
        self.doc = torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32),
                                           torch.tensor(lengths))

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: Sequence[int] | Tensor,
                        causal: bool = False) -> Documents:
        """The documents of FlashAttention's cumulative offsets ``cu_seqlens`` (document ``d``
        is ``[cu[d], cu[d + 1])``); a ``ValueError`` unless they start at 0 and increase."""
        cu = check_ints("cu_seqlens", cu_seqlens, 0)
        lengths = [b - a for a, b in itertools.pairwise(cu)]
        if len(cu) < 2 or cu[0] != 0 or any(n <= 0 for n in lengths):
            raise ValueError(f"cu_seqlens must start at 0 and increase strictly (document d is "
                             f"[cu[d], cu[d + 1]), at least one), got {cu}")
        return cls(lengths, causal)

    def predicate(self, device):
        doc, last, causal = self.doc.to(device), self.total - 1, self.causal

        def same_document(h, q, k):
            ok = doc[torch.clamp(q, max=last)] == doc[torch.clamp(k, max=last)]
            ok = ok & (q <= last) & (k <= last)  # past the documents: padding
            return ok & (k <= q) if causal else ok

        return same_document

    def tiles(self, q_len, k_len, block_size, device, rows):
        qf, ql, kf, kl = _extents(q_len, k_len, block_size, device, rows)
        doc, last, n = self.doc.to(device).long(), self.total - 1, len(self.lengths)

        def documents(first: Tensor, end: Tensor, alone: int) -> tuple[Tensor, Tensor, Tensor]:
            """Per block: documents are contiguous, so it holds documents ``a..b`` (``n`` and -1
            for none); and its one document if all of it is in one (else ``alone``)."""
            a, b = doc[torch.clamp(first, max=last)], doc[torch.clamp(end, max=last)]
            a, b = torch.where(first > last, n, a), torch.where(first > last, -1, b)
            return a, b, torch.where((a == b) & (end <= last), a, alone)

        qa, qb, q_one = documents(qf, ql, -1)
        ka, kb, k_one = documents(kf, kl, -2)
        any_ = (qa <= kb) & (ka <= qb)
        all_ = q_one == k_one
        if self.causal:
            any_ &= kf <= ql
            all_ &= kl <= qf
        return any_, all_

    def count_pairs(self, seq_len):
        cu = self.cu_seqlens
        n = torch.clamp(torch.clamp(cu[1:], max=seq_len) - cu[:-1], min=0)  # inside seq_len
        return int((n * (n + 1) // 2).sum() if self.causal else (n * n).sum())

    def grain(self):
        return 1 if self.causal else math.gcd(*self.lengths)

    def key(self):
        return (self.lengths, self.causal)

    def __repr__(self) -> str:
        n = len(self.lengths)
        text = str(list(self.lengths)) if n <= 6 else (
            f"[{', '.join(map(str, self.lengths[:4]))}, ... {n} documents, {self.total} tokens]")
        return f"documents({text}{', causal=True' if self.causal else ''})"


def documents(lengths: Sequence[int] | Tensor, causal: bool = False) -> Pattern:
    """Packed variable-length sequences: :class:`Documents` (``Documents.from_cu_seqlens(cu)``
    takes cumulative offsets instead)."""
    return Documents(lengths, causal)
