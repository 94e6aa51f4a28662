"""Patterns seen in another token order: any pattern permuted (every tile evaluated), and
NATTEN-style neighbourhoods on a grid laid out along a curve (layout from per-block boxes)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..curves import _check_curve, _check_shape, curve_order
from ..layout import num_blocks
from .base import MaskFn, Pattern, check_int, check_ints, head_predicate, refine_tiles

BORDERS = ("cut", "shift")


class Permuted(Pattern):
    """``base`` in the token order ``perm`` (``[H or 1, S]``; new position ``i`` is old position
    ``perm[h, i]``). Its layout evaluates every tile (``O(S^2)``)."""

    def __init__(self, base: Pattern, perm: Tensor) -> None:
        self.base, self.perm = base, perm
        self.num_heads = max(base.num_heads, perm.shape[0])

    def predicate(self, device):
        p, base = self.perm.to(device), head_predicate(self.base, device)
        n, one = p.shape[1], p.shape[0] == 1

        def moved(h, q, k):
            row = torch.zeros_like(h) if one else h
            return base(h, p[row, torch.clamp(q, max=n - 1)], p[row, torch.clamp(k, max=n - 1)])

        return moved

    def __repr__(self) -> str:
        return f"permuted({self.base!r})"


def _axis_window(n: int, radius: int, dilation: int, border: str) -> tuple[Tensor, Tensor]:
    """First and last key coordinate (int64 ``[n]`` each, in the query's residue mod
    ``dilation``) of the window of every query coordinate of one axis of ``n`` cells."""
    c, r, d = torch.arange(n), radius, dilation
    if border == "cut":
        return c - d * torch.clamp(c // d, max=r), c + d * torch.clamp((n - 1 - c) // d, max=r)
    cells = (n - 1 - c % d) // d + 1  # cells of the query's dilated sub-grid
    first = torch.minimum(torch.clamp(c // d - r, min=0), cells - (2 * r + 1))
    lo = c % d + d * first
    return lo, lo + 2 * r * d


class GridNeighborhood(Pattern):
    """Neighbourhood attention on a 2-D/3-D grid, token ``i`` at raster cell ``perm[i]``: query
    ``i`` attends key ``j`` when ``j``'s cell is in ``i``'s window along every axis
    (self-attention over exactly ``prod(shape)`` tokens, every head alike).

    Along an axis of ``n`` cells with radius ``r`` and dilation ``d``, a query at ``c`` sees the
    cells ``c' = c (mod d)`` of a window of ``k = 2r + 1`` of them (NATTEN's ``kernel_size``):
    with ``border="cut"`` ``|c' - c| <= r * d``, cut off at the grid border; with ``"shift"``
    ``k`` consecutive cells of the query's dilated sub-grid, centred where they fit and shifted
    inwards at the border, so every query sees exactly ``k`` (NATTEN's; needs ``k * d <= n``).
    """

    def __init__(self, shape: Sequence[int], radius: tuple[int, ...], dilation: tuple[int, ...],
                 border: str, order: str, perm: Tensor) -> None:
        self.shape, self.radius, self.dilation = tuple(shape), radius, dilation
        self.border, self.order, self.perm = border, order, perm
        self.coords = torch.stack(torch.unravel_index(perm, self.shape), -1)  # [N, dims]
        self.num_tokens = perm.numel()
        windows = [_axis_window(*a, border) for a in zip(self.shape, radius, dilation)]
        # per token and axis, the first and last key coordinate of its window: [N, dims] each
        self.lo, self.hi = (torch.stack([w[s][c] for w, c in zip(windows, self.coords.T)], -1)
                            for s in (0, 1))
        self._pred: dict[str, MaskFn] = {}

    def predicate(self, device):
        key = str(torch.device(device))
        if key not in self._pred:
            # per axis: every token's coordinate and window bounds (on device), the dilation
            tables = (t.T.contiguous().to(device) for t in (self.coords, self.lo, self.hi))
            axes = list(zip(*tables, self.dilation))
            n = self.num_tokens

            def allowed(h, q, k):
                qc, kc = torch.clamp(q, max=n - 1), torch.clamp(k, max=n - 1)
                ok = None
                for c, lo, hi, d in axes:
                    ck = c[kc]
                    inside = (ck >= lo[qc]) & (ck <= hi[qc])
                    if d > 1:
                        inside = inside & (torch.remainder(ck - c[qc], d) == 0)
                    ok = inside if ok is None else ok & inside
                return ok

            self._pred[key] = allowed
        return self._pred[key]

    def key(self):
        return (self.shape, self.radius, self.dilation, self.border, self.order)

    def _block_range(self, table: Tensor, length: int, block_size: int,
                     device) -> tuple[Tensor, Tensor]:
        """Per block, min and max of each column of a per-token ``table [n, columns]``."""
        c = table[:length].to(device)
        n = num_blocks(length, block_size)
        pad = n * block_size - length
        if pad:  # repeat the last real token: min/max over real tokens are unchanged
            c = torch.cat([c, c[-1:].expand(pad, -1)])
        c = c.reshape(n, block_size, -1)
        return c.amin(1), c.amax(1)

    def tiles(self, q_len, k_len, block_size, device, rows):
        n = self.num_tokens
        if q_len > n or k_len > n:
            raise ValueError(f"grid_neighborhood over a {self.shape} grid has {n} tokens; got "
                             f"q_len={q_len}, k_len={k_len} (use seq_len = {n})")
        dil = torch.tensor(self.dilation)
        # per token: coordinates, window bounds, residues mod the dilation
        table = torch.cat([self.coords, self.lo, self.hi, self.coords % dil], -1)
        qmin, qmax = (b[rows[0]:rows[1], None] for b in self._block_range(table, q_len,
                                                                          block_size, device))
        kmin, kmax = (b[None] for b in self._block_range(table, k_len, block_size, device))
        c, lo, hi, res = (slice(i * len(self.shape), (i + 1) * len(self.shape)) for i in range(4))
        # a key box inside every query's window interval (necessary for "any"), inside all of
        # them and of one residue with the queries (sufficient for "all")
        maybe = ((kmin[..., c] <= qmax[..., hi]) & (kmax[..., c] >= qmin[..., lo])).all(-1)
        full = ((kmin[..., c] >= qmax[..., lo]) & (kmax[..., c] <= qmin[..., hi])
                & (qmin[..., res] == qmax[..., res]) & (kmin[..., res] == kmax[..., res])
                & (qmin[..., res] == kmin[..., res])).all(-1)
        r_any, r_all = refine_tiles(self, (maybe & ~full)[None], q_len, k_len, block_size, rows[0])
        return full[None] | r_any, full[None] | r_all

    def count_pairs(self, seq_len):
        if seq_len != self.num_tokens:
            return None
        total = 1
        for n, r, d in zip(self.shape, self.radius, self.dilation):  # whatever the token order
            lo, hi = _axis_window(n, r, d, self.border)
            total *= int(((hi - lo) // d + 1).sum())  # pairs along this axis
        return total

    def __repr__(self) -> str:
        one = lambda t: t[0] if len(set(t)) == 1 else t  # noqa: E731
        extra = "" if set(self.dilation) == {1} else f", dilation={one(self.dilation)}"
        extra += "" if self.border == "cut" else f", border={self.border!r}"
        return (f"grid_neighborhood({self.shape}, radius={one(self.radius)}, "
                f"order={self.order!r}{extra})")


def _per_axis(name: str, value: int | Sequence[int], dims: int, minimum: int) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)):
        return (check_int(name, value, minimum),) * dims
    if len(value) != dims:
        raise ValueError(f"{name} must be an int or one int per axis ({dims}), got {value!r}")
    return tuple(check_ints(name, value, minimum))


def grid_neighborhood(
    shape: Sequence[int], radius: int | Sequence[int], order: str = "hilbert", *,
    dilation: int | Sequence[int] = 1, border: str = "cut",
) -> Pattern:
    """Neighbourhood attention on a 2-D/3-D grid of ``prod(shape)`` tokens laid out in ``order``
    (one of :data:`~workbench.curves.CURVES`): a :class:`GridNeighborhood` (its semantics
    there); ``radius`` and ``dilation`` are an int or one per axis, ``border`` is ``"cut"`` or
    ``"shift"``.

    Raises:
        ValueError: an unknown ``order`` or ``border``, a bad shape, radius or dilation, or with
            ``border="shift"`` a window ``(2 * radius + 1) * dilation`` wider than its axis.
    """
    _check_curve(order, "order")
    if border not in BORDERS:
        raise ValueError(f"border must be one of {BORDERS}, got {border!r}")
    shape = _check_shape(shape)
    radius = _per_axis("radius", radius, len(shape), 0)
    dilation = _per_axis("dilation", dilation, len(shape), 1)
    for axis, (n, r, d) in enumerate(zip(shape, radius, dilation)):
        if border == "shift" and (2 * r + 1) * d > n:
            raise ValueError(f"border='shift' needs (2 * radius + 1) * dilation <= the grid size "
                             f"along every axis; axis {axis} has {n} cells but the window spans "
                             f"{2 * r + 1} x {d} = {(2 * r + 1) * d} (use a smaller radius or "
                             "dilation, or border='cut')")
    return GridNeighborhood(shape, radius, dilation, border, order, curve_order(shape, order))
