"""Patterns seen in another token order: a permuted pattern, and grid neighbourhoods.

:class:`Permuted` is any pattern with its tokens reordered (for inspection at small lengths:
every tile is evaluated). :class:`GridNeighborhood` is local attention on a 2-D/3-D grid whose
cells are laid out along a curve; its layout is exact from per-block bounding boxes. Their
builders, which pick the orders, are :func:`workbench.orderings.permuted` and
:func:`workbench.orderings.grid_neighborhood`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..layout import num_blocks
from .base import MaskFn, Pattern, _check_int, head_predicate, refine_tiles


class Permuted(Pattern):
    """``base`` in the token order ``perm`` (``[H or 1, S]``; new position ``i`` is old position
    ``perm[h, i]``). Its layout evaluates every tile (``O(S^2)``)."""

    def __init__(self, base: Pattern, perm: Tensor) -> None:
        self.base, self.perm = base, perm
        self.num_heads = max(base.num_heads, perm.shape[0])

    def allowed(self, h, q, k):
        return self.predicate(q.device)(h, q, k)

    def predicate(self, device):
        p, base = self.perm.to(device), head_predicate(self.base, device)
        n, one = p.shape[1], p.shape[0] == 1

        def moved(h, q, k):
            row = torch.zeros_like(h) if one else h
            return base(h, p[row, torch.clamp(q, max=n - 1)], p[row, torch.clamp(k, max=n - 1)])

        return moved

    def __repr__(self) -> str:
        return f"permuted({self.base!r})"


class GridNeighborhood(Pattern):
    """Local attention on a 2-D/3-D token grid, with the tokens laid out in a curve order.

    Token position ``i`` is grid cell ``perm[i]`` (a raster index of grid ``shape``, in
    ``order``); query ``i`` may attend key ``j`` when their cells are within ``radius`` along
    every axis (Chebyshev distance ``<= radius``: a ``(2r+1)``-wide square/cube window, cut off
    at the grid border, not shifted inwards as NATTEN does). The pattern is head-independent
    and is defined for self-attention over exactly ``prod(shape)`` tokens.
    """

    def __init__(self, shape: Sequence[int], radius: int, order: str, perm: Tensor) -> None:
        self.shape = tuple(shape)
        self.radius = _check_int("radius", radius, 0)
        self.order, self.perm = order, perm
        self.coords = torch.stack(torch.unravel_index(perm, self.shape), -1)  # [N, dims]
        self.num_tokens = perm.numel()
        self._pred: dict[str, MaskFn] = {}

    def allowed(self, h, q, k):
        return self.predicate(q.device)(h, q, k)

    def predicate(self, device):
        key = str(torch.device(device))
        if key not in self._pred:
            cols = [self.coords[:, i].contiguous().to(device) for i in range(len(self.shape))]
            n, r = self.num_tokens, self.radius

            def allowed(h, q, k):
                qc, kc = torch.clamp(q, max=n - 1), torch.clamp(k, max=n - 1)
                ok = (cols[0][qc] - cols[0][kc]).abs() <= r
                for c in cols[1:]:
                    ok = ok & ((c[qc] - c[kc]).abs() <= r)
                return ok

            self._pred[key] = allowed
        return self._pred[key]

    def key(self):
        return (self.shape, self.radius, self.order)

    def _block_boxes(self, length: int, block_size: int, device) -> tuple[Tensor, Tensor]:
        """Per block, min and max cell coordinate along each axis (int64 ``[n, dims]``)."""
        c = self.coords[:length].to(device)
        n = num_blocks(length, block_size)
        pad = n * block_size - length
        if pad:  # repeat the last real token: min/max over real tokens are unchanged
            c = torch.cat([c, c[-1:].expand(pad, -1)])
        c = c.reshape(n, block_size, -1)
        return c.amin(1), c.amax(1)

    def tiles(self, q_len, k_len, block_size, device, rows):
        n = self.num_tokens
        if q_len > n or k_len > n:
            raise ValueError(
                f"grid_neighborhood over a {self.shape} grid has {n} tokens; got q_len={q_len}, "
                f"k_len={k_len} (use seq_len = {n})"
            )
        qlo, qhi = (b[rows[0]:rows[1]] for b in self._block_boxes(q_len, block_size, device))
        klo, khi = self._block_boxes(k_len, block_size, device)
        r = self.radius
        gap = torch.clamp(torch.maximum(klo[None] - qhi[:, None], qlo[:, None] - khi[None]), min=0)
        span = torch.maximum(khi[None] - qlo[:, None], qhi[:, None] - klo[None])
        maybe = (gap <= r).all(-1)[None]  # bounding boxes within reach: a necessary condition
        full = (span <= r).all(-1)[None]  # every pair within reach along every axis: exact
        r_any, r_all = refine_tiles(self, maybe & ~full, q_len, k_len, block_size, rows[0])
        return full | r_any, full | r_all

    def count_pairs(self, seq_len):
        if seq_len != self.num_tokens:
            return None
        total = 1
        for s in self.shape:  # the window is a product over axes, whatever the token order
            a = torch.arange(s)
            total *= int(((a[:, None] - a[None, :]).abs() <= self.radius).sum())
        return total

    def __repr__(self) -> str:
        return f"grid_neighborhood({self.shape}, radius={self.radius}, order={self.order!r})"
