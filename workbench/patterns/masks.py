"""Patterns defined by tensors: key padding, explicit masks, selected tiles, batch copies.
They are equal only to themselves; their layouts reduce the tensor over each tile exactly."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layout import MAX_POSITION, cells_to_tiles, num_blocks
from .base import MaskFn, Pattern


def _check_bool(name: str, t: object, axes: tuple[str, ...]) -> None:
    """A ``TypeError`` naming ``name`` unless ``t`` is a bool tensor with one dim per axis."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.bool or t.dim() != len(axes):
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{name} must be a bool [{', '.join(axes)}] tensor, got {got}")


def _lookup(table: torch.Tensor, cell: int, q_len: int, k_len: int) -> MaskFn:
    """``table[h, q // cell, k // cell]`` (``table`` bool ``[H or 1, nq, nk]``, head 0 when
    ``H`` is 1), False outside ``[0, q_len) x [0, k_len)``."""
    nq, nk, multi = table.shape[1], table.shape[2], table.shape[0] > 1

    def in_table(h, q, k):
        hh = h if multi else torch.zeros_like(h)
        qi = torch.clamp(torch.div(q, cell, rounding_mode="floor"), min=0, max=nq - 1)
        ki = torch.clamp(torch.div(k, cell, rounding_mode="floor"), min=0, max=nk - 1)
        return table[hh, qi, ki] & (q >= 0) & (q < q_len) & (k >= 0) & (k < k_len)

    return in_table


class KeyMask(Pattern):
    """Keys allowed per head by a boolean vector ``valid [H, S_k]`` (key padding); keys past
    the vector are never allowed."""

    def __init__(self, valid: torch.Tensor) -> None:
        _check_bool("valid", valid, ("heads", "keys"))
        self.valid = valid
        self.num_heads = valid.shape[0]

    def predicate(self, device):
        v = self.valid.to(device)[:, None]  # one row, for every query (positions < MAX_POSITION)
        return _lookup(v, 1, MAX_POSITION, v.shape[2])

    def tiles(self, q_len, k_len, block_size, device, rows):
        nk = num_blocks(k_len, block_size)
        v = self.valid.to(device)[:, :k_len]
        vb = F.pad(v, (0, nk * block_size - v.shape[1])).view(-1, nk, block_size)
        pad = (torch.arange(nk * block_size, device=device) >= k_len).view(nk, block_size)
        shape = (self.num_heads, rows[1] - rows[0], nk)
        return vb.any(-1)[:, None].expand(shape), (vb | pad).all(-1)[:, None].expand(shape)

    def __repr__(self) -> str:
        return f"key_mask({tuple(self.valid.shape)})"


class DenseMask(Pattern):
    """Pairs allowed by an explicit bool tensor ``allowed [H or 1, S_q, S_k]``; positions
    beyond it are never allowed."""

    def __init__(self, allowed: torch.Tensor) -> None:
        _check_bool("allowed", allowed, ("heads", "q_len", "k_len"))
        self.mask = allowed
        self.num_heads = allowed.shape[0]

    def predicate(self, device):
        return _lookup(self.mask.to(device), 1, self.mask.shape[1], self.mask.shape[2])

    def tiles(self, q_len, k_len, block_size, device, rows):
        q0, q1 = rows[0] * block_size, min(rows[1] * block_size, q_len)
        m = self.mask[:, q0:q1, :k_len].to(device)
        m = F.pad(m, (0, k_len - m.shape[2], 0, q1 - q0 - m.shape[1]))  # past it: never allowed
        return cells_to_tiles(m, 1, q_len, k_len, block_size, rows)  # cells of one token

    def __repr__(self) -> str:
        return f"dense_mask({tuple(self.mask.shape)})"


class BlockSelection(Pattern):
    """Selected tiles: ``allowed(h, q, k) = selected[h, q // b, k // b]``, ``selected`` bool
    ``[H, nq, nk]`` at block size ``b`` for a ``q_len x k_len`` problem (and only for it)."""

    def __init__(self, selected: torch.Tensor, block_size: int, q_len: int, k_len: int) -> None:
        _check_bool("selected", selected, ("heads", "nq", "nk"))
        expect = (num_blocks(q_len, block_size), num_blocks(k_len, block_size))
        if tuple(selected.shape[1:]) != expect:
            raise ValueError(f"selected has {tuple(selected.shape[1:])} blocks but q_len={q_len}"
                             f", k_len={k_len}, block_size={block_size} need {expect}")
        self.selected, self.cell, self.q_len, self.k_len = selected, block_size, q_len, k_len
        self.num_heads = selected.shape[0]

    def predicate(self, device):
        return _lookup(self.selected.to(device), self.cell, self.q_len, self.k_len)

    def tiles(self, q_len, k_len, block_size, device, rows):
        if (q_len, k_len) != (self.q_len, self.k_len):
            raise ValueError(f"this selection is for q_len={self.q_len}, k_len={self.k_len}; "
                             f"got {q_len}, {k_len}")
        c = self.cell
        cells = self.selected[:, rows[0] * block_size // c:
                              (min(rows[1] * block_size, q_len) - 1) // c + 1]
        return cells_to_tiles(cells.to(device), c, q_len, k_len, block_size, rows)

    def grain(self):
        return self.cell

    def __repr__(self) -> str:
        return f"block_selection({tuple(self.selected.shape)}, block={self.cell})"


class TiledHeads(Pattern):
    """An ``H``-head pattern repeated ``copies`` times: head ``c * H + h`` behaves as head
    ``h`` (the batch folded into the heads)."""

    def __init__(self, pattern: Pattern, copies: int) -> None:
        self.base, self.copies = pattern, copies
        self.num_heads = pattern.num_heads * copies

    def predicate(self, device):
        f, n = self.base.predicate(device), self.base.num_heads
        return lambda h, q, k: f(torch.remainder(h, n), q, k)

    def tiles(self, q_len, k_len, block_size, device, rows):
        a, f = self.base.tiles(q_len, k_len, block_size, device, rows)
        shape = (self.base.num_heads, *a.shape[1:])
        return a.expand(shape).repeat(self.copies, 1, 1), f.expand(shape).repeat(self.copies, 1, 1)

    def grain(self):
        return self.base.grain()

    def key(self):
        base = self.base.key()
        return None if base is None else (type(self.base), base, self.copies)

    def __repr__(self) -> str:
        return f"tiled({self.base!r}, copies={self.copies})"


def tile_batch(pattern: Pattern, copies: int) -> Pattern:
    """``pattern`` over ``copies`` batch elements folded into the heads: a 1-head pattern
    unchanged (it broadcasts), an ``H``-head one as :class:`TiledHeads`."""
    return pattern if pattern.num_heads == 1 or copies == 1 else TiledHeads(pattern, copies)
