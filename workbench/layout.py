"""Block layouts: which (query block, key block) tiles an attention pattern touches.

A :class:`BlockLayout` is the block-level view of a pattern on a concrete problem: for each
head, query block ``i`` and key block ``j`` it says whether the tile holds any allowed
(query, key) pair (``active``) and whether *every* real pair in the tile is allowed (``full``,
so a kernel may skip evaluating the token predicate there). Blocks are ``block_size`` tokens;
the last query/key block may be shorter than ``block_size`` when the length is not a multiple
of it. Positions beyond the length are padding: they never count as allowed pairs.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = ["MAX_POSITION", "BlockLayout", "LayoutSource", "LayoutStats", "block_extents",
           "cells_to_tiles", "held_bytes", "key_block_counts", "num_blocks", "tile_sum"]

T = TypeVar("T")

MAX_POSITION = (1 << 31) - 1
"""The largest token position (and token count) any argument may name: kernels evaluate
positions in int32."""


def num_blocks(length: int, block_size: int) -> int:
    """Number of blocks of ``block_size`` tokens needed to cover ``length`` tokens."""
    return -(-length // block_size)


def block_extents(length: int, block_size: int, device: torch.device | str = "cpu") -> Tensor:
    """Token extents of every block: int64 ``[n, 2]`` of (first, last) positions, inclusive."""
    n = num_blocks(length, block_size)
    first = torch.arange(n, device=device, dtype=torch.int64) * block_size
    last = torch.clamp(first + block_size, max=length) - 1
    return torch.stack([first, last], dim=1)


REDUCE_CHUNK = 1 << 24
"""Tiles reduced per step by :func:`tile_sum` and :func:`key_block_counts`."""


def _row_chunks(mask: Tensor) -> Iterator[tuple[int, Tensor]]:
    """``(first row, int64 copy of the rows)`` of bool ``[H, nq, nk]``, a bounded number of
    query-block rows (:data:`REDUCE_CHUNK` tiles) at a time: PyTorch reduces a bool tensor
    through an int64 copy of all of it."""
    h, nq, nk = mask.shape
    step = max(1, REDUCE_CHUNK // max(1, h * nk))
    for r0 in range(0, nq, step):
        yield r0, mask[:, r0:r0 + step].to(torch.int64)


def tile_sum(mask: Tensor, lq: Tensor | None = None, lk: Tensor | None = None) -> Tensor:
    """Per head, the sum over the tiles ``mask`` selects of ``lq[i] * lk[j]`` (each weight 1
    when not given): int64 ``[H]`` from bool ``[H, nq, nk]``, reduced in bounded chunks."""
    out = torch.zeros(mask.shape[0], dtype=torch.int64, device=mask.device)
    for r0, part in _row_chunks(mask):
        rows = (part if lk is None else part * lk).sum(-1)  # [H, rows]
        out += (rows if lq is None else rows * lq[r0:r0 + rows.shape[1]]).sum(-1)
    return out


def key_block_counts(mask: Tensor) -> Tensor:
    """How many (head, query block) tiles ``mask`` selects in each key block: int64 ``[nk]``
    from bool ``[H, nq, nk]``, reduced in bounded chunks."""
    out = torch.zeros(mask.shape[-1], dtype=torch.int64, device=mask.device)
    for _, part in _row_chunks(mask):
        out += part.sum((0, 1))
    return out


def cells_to_tiles(
    on: Tensor, cell: int, q_len: int, k_len: int, block_size: int,
    rows: tuple[int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact (any, all) tiles of ``block_size`` from a grid of ``cell x cell`` on/off cells.

    ``on`` is bool ``[H, ceil(q_len / cell), ceil(k_len / cell)]``. A tile is active if a cell
    it overlaps is on, full if every such cell is on (each overlapping cell holds real pairs of
    the tile). When one size is a multiple of the other the cells are grouped or picked;
    otherwise 2-D prefix sums count them, so any tile and cell sizes work. With
    ``rows = (r0, r1)``
    only those query blocks are returned, and ``on`` holds only the cell rows they overlap
    (from the cell of token ``r0 * block_size`` on).
    """
    r0, r1 = (0, num_blocks(q_len, block_size)) if rows is None else rows
    if block_size == cell:  # both are ``on`` itself: layouts are read-only
        return on, on
    if block_size % cell == 0:  # whole cells per tile: reduce blocks of cells
        return _merge_cells(on, block_size // cell, r1 - r0, num_blocks(k_len, block_size))
    if cell % block_size == 0:  # each tile inside one cell: pick it
        f = cell // block_size
        qi = (torch.arange(r0, r1, device=on.device) - r0 // f * f) // f
        ki = torch.arange(num_blocks(k_len, block_size), device=on.device) // f
        picked = on[:, qi][:, :, ki]
        return picked, picked
    device = on.device
    pre = torch.nn.functional.pad(on.to(torch.int64).cumsum(1).cumsum(2), (1, 0, 1, 0))
    qe = block_extents(q_len, block_size, device)[r0:r1] // cell - r0 * block_size // cell
    ke = block_extents(k_len, block_size, device) // cell
    c_r0, c_r1 = qe[:, 0][None, :, None], qe[:, 1][None, :, None] + 1
    c0, c1 = ke[:, 0][None, None, :], ke[:, 1][None, None, :] + 1
    hh = torch.arange(on.shape[0], device=device)[:, None, None]
    cnt = pre[hh, c_r1, c1] - pre[hh, c_r0, c1] - pre[hh, c_r1, c0] + pre[hh, c_r0, c0]
    return cnt > 0, cnt == (c_r1 - c_r0) * (c1 - c0)


_WORDS = {2: (torch.int16, 0x0101), 4: (torch.int32, 0x01010101),
          8: (torch.int64, 0x0101010101010101)}
"""A run of 2, 4 or 8 bools read as one integer, and its value when every one is True."""


def _merge_cells(on: Tensor, f: int, nq: int, nk: int) -> tuple[Tensor, Tensor]:
    """(any, all) over each ``f x f`` group of cells of ``on`` ``[H, <= nq*f, <= nk*f]``: cells
    past the sequence do not exist, so they count as off for "any" and on for "all".

    The ``f`` cell rows of a tile row are combined elementwise, then each run of ``f`` columns
    is read as one integer (its bytes are the bools) where ``f`` is 2, 4 or 8."""
    pq, pk = nq * f - on.shape[1], nk * f - on.shape[2]
    h = on.shape[0]
    out = []
    for fill, combine in ((False, torch.Tensor.bitwise_or_), (True, torch.Tensor.bitwise_and_)):
        src = torch.nn.functional.pad(on, (0, pk, 0, pq), value=fill) if pq or pk else on
        src = src.view(h, nq, f, nk * f)
        rows = src[:, :, 0].clone(memory_format=torch.contiguous_format)
        for i in range(1, f):
            combine(rows, src[:, :, i])
        if f in _WORDS:
            word, ones = _WORDS[f]
            runs = rows.view(word)
            out.append(runs == ones if fill else runs != 0)
        else:
            runs = rows.view(h, nq, nk, f)
            out.append(runs.all(3) if fill else runs.any(3))
    return out[0], out[1]


@dataclass(frozen=True)
class LayoutStats:
    """What a block layout costs and what it keeps, averaged over heads.

    ``density`` is the fraction of the ``q_len x k_len`` (query, key) pairs a block-sparse
    kernel computes with this layout (the area of the active tiles). ``block_density`` is the
    fraction of tiles that are active; ``full_fraction`` the fraction of active tiles that need
    no token-level mask.
    """

    q_len: int
    k_len: int
    block_size: int
    num_heads: int
    active_blocks: int
    full_blocks: int
    total_blocks: int
    density: float
    block_density: float
    full_fraction: float


def _gone() -> None:
    """A weak reference whose object is gone."""
    return None


class LayoutSource:
    """The pattern a layout was built from, held weakly (a layout never keeps its pattern
    alive), with the pattern's value key so that it is still recognized once collected."""

    def __init__(self, pattern: Any) -> None:
        self.label = repr(pattern)
        key = pattern.key()
        self.ident = None if key is None else (type(pattern), key)
        try:
            self.ref: Callable[[], Any] = weakref.ref(pattern)
        except TypeError:  # not weakly referenceable: known by its value alone
            self.ref = _gone

    def __getstate__(self) -> dict[str, Any]:  # a copy knows its pattern by value alone
        return {"label": self.label, "ident": self.ident}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.label, self.ident, self.ref = state["label"], state["ident"], _gone

    def matches(self, pattern: Any) -> bool:
        """Whether ``pattern`` is the source or equal to it."""
        live = self.ref()
        if live is not None:
            return live is pattern or live == pattern
        key = pattern.key()
        return self.ident is not None and key is not None and self.ident == (type(pattern), key)


@dataclass(frozen=True)
class BlockLayout:
    """Block-level structure of an attention pattern on a ``q_len x k_len`` problem.

    Attributes:
        active: bool ``[H, nq, nk]``; tile has at least one allowed pair. ``H`` is 1 for a
            pattern that is the same for every head (it broadcasts).
        full: bool ``[H, nq, nk]``; every real pair of the tile is allowed (subset of active).
        q_len, k_len: number of real query and key positions.
        block_size: tile edge in tokens.
        source: the :class:`LayoutSource` of the pattern this layout was built from
            (``None`` when built by hand); entry points refuse a layout whose source does
            not match the pattern they are given.

    What backends derive from a layout is kept with it (:meth:`derived`).
    """

    active: Tensor
    full: Tensor
    q_len: int
    k_len: int
    block_size: int
    source: LayoutSource | None = field(default=None, compare=False, repr=False)
    _derived: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def __getstate__(self) -> dict[str, Any]:  # derived values are a cache: copies start empty
        return {k: v for k, v in self.__dict__.items() if k != "_derived"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _derived={})

    def derived(self, key: Hashable, build: Callable[[], T],
                reuse: Callable[[T], bool] | None = None) -> T:
        """What a backend derives from this layout under ``key`` (a ``BlockMask``, a kernel
        plan, a slice): built on first use and kept with the layout, so it lives exactly as
        long as the layout. A stored value that ``reuse`` rejects is rebuilt. A value should
        not hold this layout (the cycle would wait for the garbage collector)."""
        value = self._derived.get(key)
        if value is None or (reuse is not None and not reuse(value)):
            value = self._derived[key] = build()
        return value

    def __post_init__(self) -> None:
        if self.active.dtype != torch.bool or self.full.dtype != torch.bool:
            raise TypeError("BlockLayout.active and .full must be bool tensors")
        if self.active.shape != self.full.shape or self.active.dim() != 3:
            raise ValueError(
                f"BlockLayout.active {tuple(self.active.shape)} and .full "
                f"{tuple(self.full.shape)} must both be [H, nq, nk]"
            )
        expect = (num_blocks(self.q_len, self.block_size), num_blocks(self.k_len, self.block_size))
        if tuple(self.active.shape[1:]) != expect:
            raise ValueError(
                f"BlockLayout of shape {tuple(self.active.shape)} does not match "
                f"q_len={self.q_len}, "
                f"k_len={self.k_len}, block_size={self.block_size} (expected [H, {expect[0]}, "
                f"{expect[1]}])"
            )

    @property
    def num_heads(self) -> int:
        return self.active.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.active.shape)  # type: ignore[return-value]

    def check(self, pattern: Any, q_len: int, k_len: int, block_size: int) -> None:
        """Raise a ``ValueError`` unless this is ``pattern``'s block structure for these lengths
        and block size (a layout built by hand, with no recorded source, is trusted)."""
        if (self.q_len, self.k_len, self.block_size) != (q_len, k_len, block_size):
            raise ValueError(
                f"layout is for q_len={self.q_len}, k_len={self.k_len}, block_size="
                f"{self.block_size} but the inputs need {q_len}, {k_len}, {block_size}")
        if self.source is not None and not self.source.matches(pattern):
            raise ValueError(
                f"layout was built for {self.source.label}, not for the pattern given, "
                f"{pattern!r}; build it with pattern.block_structure({q_len}, {block_size}, "
                f"k_len={k_len}) or leave layout=None")

    def block_lengths(self) -> tuple[Tensor, Tensor]:
        """Real token count of every query block and every key block (int64)."""
        dev = self.active.device
        q = block_extents(self.q_len, self.block_size, dev)
        k = block_extents(self.k_len, self.block_size, dev)
        return q[:, 1] - q[:, 0] + 1, k[:, 1] - k[:, 0] + 1

    def computed_pairs(self) -> Tensor:
        """Per head, the number of (query, key) pairs inside active tiles (int64 ``[H]``)."""
        lq, lk = self.block_lengths()
        return tile_sum(self.active, lq, lk)

    def tile_counts(self) -> tuple[int, int]:
        """(active tiles, full tiles), summed over heads."""
        return int(tile_sum(self.active).sum()), int(tile_sum(self.full).sum())

    def stats(self) -> LayoutStats:
        """Density and tile counts of this layout (see :class:`LayoutStats`)."""
        h, nq, nk = self.shape
        active, full = self.tile_counts()
        pairs = float(self.computed_pairs().to(torch.float64).sum())
        return LayoutStats(
            q_len=self.q_len,
            k_len=self.k_len,
            block_size=self.block_size,
            num_heads=h,
            active_blocks=active,
            full_blocks=full,
            total_blocks=h * nq * nk,
            density=pairs / (h * self.q_len * self.k_len),
            block_density=active / (h * nq * nk),
            full_fraction=full / active if active else 0.0,
        )

    def slice(self, q_blocks: tuple[int, int], k_blocks: tuple[int, int]) -> BlockLayout:
        """The sub-layout of query blocks ``[q0, q1)`` and key blocks ``[k0, k1)``."""
        (q0, q1), (k0, k1) = q_blocks, k_blocks
        b = self.block_size
        return BlockLayout(
            active=self.active[:, q0:q1, k0:k1],
            full=self.full[:, q0:q1, k0:k1],
            q_len=min(q1 * b, self.q_len) - q0 * b,
            k_len=min(k1 * b, self.k_len) - k0 * b,
            block_size=b,
            source=self.source,
        )

    def query_window(self, start: int, q_len: int) -> BlockLayout:
        """The layout of the ``q_len`` queries from local position ``start`` on, in tiles that
        begin at ``start`` (which need not be a multiple of the block size).

        A tile that begins inside a block overlaps two of this layout's query rows: it is
        active where either of them is and full only where both are. That may mark a tile
        active that holds no allowed pair, never the reverse, so the result stays exact: the
        partial tiles are decided by the pattern's predicate at the queries' true positions.
        """
        b, n = self.block_size, num_blocks(q_len, self.block_size)
        if not (0 <= start and 0 < q_len and start + q_len <= self.q_len):
            raise ValueError(f"the query window [{start}, {start + q_len}) must lie in the "
                             f"layout's {self.q_len} queries")
        first, shift = divmod(start, b)
        act, ful = self.active[:, first:first + n + 1], self.full[:, first:first + n + 1]
        if shift:
            pad = (0, 0, 0, n + 1 - act.shape[1])  # a row past the end: no pair, no obstacle
            act = torch.nn.functional.pad(act, pad, value=False)
            ful = torch.nn.functional.pad(ful, pad, value=True)
            act = act[:, :n] | act[:, 1:]
            ful = ful[:, :n] & ful[:, 1:] & act
        return BlockLayout(act[:, :n], ful[:, :n], q_len, self.k_len, b, self.source)

    def coarsen(self, factor: int) -> BlockLayout:
        """The same layout with tiles ``factor`` times larger (any / all over sub-tiles)."""
        if factor == 1:
            return self
        h, nq, nk = self.shape
        pq, pk = -nq % factor, -nk % factor
        # Sub-tiles past the end hold no real pair: never active, and no obstacle to "full".
        act = torch.nn.functional.pad(self.active, (0, pk, 0, pq), value=False)
        ful = torch.nn.functional.pad(self.full, (0, pk, 0, pq), value=True)
        shape = (h, (nq + pq) // factor, factor, (nk + pk) // factor, factor)
        act = act.reshape(shape).any(4).any(2)
        ful = ful.reshape(shape).all(4).all(2) & act
        return BlockLayout(act, ful, self.q_len, self.k_len, self.block_size * factor,
                           self.source)

    def expand_heads(self, num_heads: int) -> BlockLayout:
        """This layout with its head axis broadcast to ``num_heads`` (a view, no copy)."""
        if self.num_heads == num_heads:
            return self
        if self.num_heads != 1:
            raise ValueError(
                f"cannot broadcast a {self.num_heads}-head layout to {num_heads} heads"
            )
        shape = (num_heads, *self.active.shape[1:])
        return BlockLayout(
            self.active.expand(shape), self.full.expand(shape), self.q_len, self.k_len,
            self.block_size, self.source,
        )

    def to(self, device: torch.device | str) -> BlockLayout:
        return BlockLayout(
            self.active.to(device), self.full.to(device), self.q_len, self.k_len, self.block_size,
            self.source,
        )


_CODE = (types.FunctionType, types.MethodType, types.ModuleType)


def held_bytes(objects: Iterable[object]) -> int:
    """Bytes of the tensor storage reachable from ``objects`` (layouts, what they derived,
    containers and plain objects), each storage counted once."""
    seen: set[int] = set()
    storages: dict[int, int] = {}
    stack = list(objects)
    while stack:
        x = stack.pop()
        if id(x) in seen or x is None or isinstance(x, (str, bytes, int, float, bool)):
            continue
        seen.add(id(x))
        if isinstance(x, Tensor):
            st = x.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple, set, frozenset)):
            stack.extend(x)
        elif hasattr(x, "__dict__") and not isinstance(x, (type, *_CODE)):
            stack.extend(vars(x).values())
    return sum(storages.values())
