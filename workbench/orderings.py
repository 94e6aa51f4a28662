"""Orderings: permutations of tokens that change where a pattern's pairs fall in memory.

A dilated pattern in natural token order scatters each head's kept positions over every tile
of its segment; reordering the tokens of each segment so that the kept ones are contiguous
(the *dilation ordering*) turns the pattern into dense diagonal blocks that any dense kernel
computes without waste. :func:`dilation_gather` gives the index map used by the fast dilated
path; :func:`dilation_permutation` and :func:`permuted` let one look at the reordered pattern.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .layout import num_blocks
from .patterns import Pattern, _refine

__all__ = ["dilation_gather", "dilation_permutation", "permuted"]


def dilation_gather(
    seq_len: int, segment: int, dilation: int, offsets: Sequence[int] | Tensor,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """Positions each head keeps, segment by segment, padded to a common length.

    Head ``h`` keeps, in segment ``m``, positions ``m * segment + offsets[h] + j * dilation``
    for ``j = 0, 1, ...`` while inside the segment and the sequence.

    Returns:
        ``(pos, valid)``, both ``[H, num_segments, L]`` with ``L = ceil(segment / dilation)``;
        ``pos`` is int64 and clamped into ``[0, seq_len)`` where ``valid`` is False.
    """
    off = torch.as_tensor(offsets, dtype=torch.int64, device=device)[:, None, None]
    nseg = num_blocks(seq_len, segment)
    length = num_blocks(segment, dilation)
    m = torch.arange(nseg, device=device)[None, :, None]
    j = torch.arange(length, device=device)[None, None, :]
    inner = off + j * dilation
    pos = m * segment + inner
    valid = (inner < segment) & (pos < seq_len)
    return torch.where(valid, pos, torch.zeros_like(pos)), valid


def dilation_permutation(seq_len: int, segment: int, dilation: int, offset: int = 0) -> Tensor:
    """Token order that puts, in every segment, the kept positions first (then the rest).

    ``x[perm]`` is the reordered sequence: new position ``i`` holds old position ``perm[i]``.
    """
    pos = torch.arange(seq_len)
    inner = pos % segment
    kept = (inner % dilation) == (offset % dilation)
    key = (pos // segment) * 2 + (~kept).to(torch.int64)  # segment-major, kept first
    return torch.argsort(key * seq_len + pos)


class _Permuted(Pattern):
    def __init__(self, base: Pattern, perm: Tensor) -> None:
        self.base, self.perm = base, perm
        self.num_heads = base.num_heads

    def allowed(self, h, q, k):
        return self.predicate(q.device)(h, q, k)

    def predicate(self, device):
        p, base = self.perm.to(device), self.base.predicate(device)
        n = p.numel()
        return lambda h, q, k: base(h, p[torch.clamp(q, max=n - 1)], p[torch.clamp(k, max=n - 1)])

    def _tiles(self, q_len, k_len, block_size, device):
        shape = (self.num_heads, num_blocks(q_len, block_size), num_blocks(k_len, block_size))
        return _refine(self, torch.ones(shape, dtype=torch.bool, device=device), q_len, k_len,
                       block_size)

    def __repr__(self) -> str:
        return f"permuted({self.base!r})"


def permuted(pattern: Pattern, perm: Tensor) -> Pattern:
    """``pattern`` seen in the token order ``perm`` (new position i = old position perm[i]).

    Its block layout is found by evaluating every tile (cost ``O(S^2)``): for inspection at
    small lengths, not for kernels.
    """
    perm = torch.as_tensor(perm, dtype=torch.int64)
    if perm.dim() != 1 or not torch.equal(torch.sort(perm).values, torch.arange(perm.numel())):
        raise ValueError("perm must be a permutation of range(seq_len)")
    return _Permuted(pattern, perm)
