"""Block layouts: which (query block, key block) tiles an attention pattern touches.

Per head and tile, ``active``: the tile holds an allowed (query, key) pair; ``full``: every real
pair of it is allowed (a kernel skips the token predicate there). The last block may be short;
positions past the length are padding and never count as allowed pairs.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = ["MAX_POSITION", "BlockLayout", "LayoutSource", "LayoutStats", "block_extents",
           "block_lengths", "cells_to_tiles", "held_bytes", "key_block_counts", "num_blocks",
           "tile_sum"]

T = TypeVar("T")

MAX_POSITION = (1 << 31) - 1
"""The largest token position (and token count) an argument may name: kernels use int32."""


def num_blocks(length: int, block_size: int) -> int:
    """Blocks of ``block_size`` tokens covering ``length`` tokens."""
    return -(-length // block_size)


def block_extents(length: int, block_size: int, device: torch.device | str = "cpu") -> Tensor:
    """Token extents of every block: int64 ``[n, 2]`` of (first, last) positions, inclusive."""
    n = num_blocks(length, block_size)
    first = torch.arange(n, device=device, dtype=torch.int64) * block_size
    last = torch.clamp(first + block_size, max=length) - 1
    return torch.stack([first, last], dim=1)


def block_lengths(length: int, block_size: int, device: torch.device | str = "cpu") -> Tensor:
    """Real token count of every block: int64 ``[n]``, ``block_size`` but for a short last."""
    first = torch.arange(num_blocks(length, block_size), device=device, dtype=torch.int64)
    return torch.clamp(length - first * block_size, max=block_size)


REDUCE_CHUNK = 1 << 24
"""Tiles reduced per step by :func:`tile_sum` and :func:`key_block_counts`."""


def _row_chunks(mask: Tensor) -> Iterator[tuple[int, Tensor]]:
    """``(first row, int64 copy of the rows)`` of bool ``[H, nq, nk]``, :data:`REDUCE_CHUNK`
    tiles at a time (PyTorch reduces a bool tensor through an int64 copy of all of it)."""
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
    """Exact (any, all) tiles of ``block_size`` from bool ``on [H, ceil(q_len / cell),
    ceil(k_len / cell)]``, a grid of ``cell x cell`` cells: active if a cell the tile overlaps
    is on, full if all are. With ``rows = (r0, r1)``, ``on`` holds only the cell rows those
    query blocks overlap."""
    r0, r1 = (0, num_blocks(q_len, block_size)) if rows is None else rows
    if block_size == cell:  # both are ``on`` itself: layouts are read-only
        return on, on
    if block_size % cell == 0:  # whole cells per tile: reduce blocks of cells
        f, nk = block_size // cell, num_blocks(k_len, block_size)
        return _reduce_cells(on, f, r1 - r0, nk, False), _reduce_cells(on, f, r1 - r0, nk, True)
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


def _reduce_cells(on: Tensor, f: int, nq: int, nk: int, every: bool) -> Tensor:
    """Over each ``f x f`` group of cells of bool ``on [H, <= nq*f, <= nk*f]``: whether every
    cell is on (``every``; a missing cell counts as on) or any is (a missing cell counts as off).
    Runs of 2, 4 or 8 bools are read as one integer."""
    h, pq, pk = on.shape[0], nq * f - on.shape[1], nk * f - on.shape[2]
    src = torch.nn.functional.pad(on, (0, pk, 0, pq), value=every) if pq or pk else on
    src = src.reshape(h, nq, f, nk * f)
    rows = src[:, :, 0].clone(memory_format=torch.contiguous_format)
    combine = torch.Tensor.bitwise_and_ if every else torch.Tensor.bitwise_or_
    for i in range(1, f):
        combine(rows, src[:, :, i])
    if f in _WORDS:
        word, ones = _WORDS[f]
        runs = rows.view(word)
        return runs == ones if every else runs != 0
    runs = rows.view(h, nq, nk, f)
    return runs.all(3) if every else runs.any(3)


@dataclass(frozen=True)
class LayoutStats:
    """What a block layout costs, averaged over heads: ``density``, the fraction of the
    ``q_len x k_len`` pairs its active tiles cover; ``block_density``, the fraction of tiles
    active; ``full_fraction``, the fraction of active tiles that are full."""

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


def _gone() -> None:  # a weak reference whose object is gone
    return None


class LayoutSource:
    """The pattern a layout was built from, held weakly, and its value key (which still
    recognizes it once collected)."""

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
        active: bool ``[H or 1, nq, nk]``: the tile holds an allowed pair.
        full: bool, the same shape: every real pair of the tile is allowed (subset of active).
        q_len, k_len, block_size: real query and key positions, tile edge in tokens.
        source: the pattern it was built from (``None`` when built by hand).
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
        """What a backend derives from this layout under ``key``, built on first use (and again
        when ``reuse`` rejects it) and kept as long as the layout; it should not hold the
        layout."""
        value = self._derived.get(key)
        if value is None or (reuse is not None and not reuse(value)):
            value = self._derived[key] = build()
        return value

    def __post_init__(self) -> None:
        if self.active.dtype != torch.bool or self.full.dtype != torch.bool:
            raise TypeError("BlockLayout.active and .full must be bool tensors")
        if self.active.shape != self.full.shape or self.active.dim() != 3:
            raise ValueError(f"BlockLayout.active {tuple(self.active.shape)} and .full "
                             f"{tuple(self.full.shape)} must both be [H, nq, nk]")
        expect = (num_blocks(self.q_len, self.block_size), num_blocks(self.k_len, self.block_size))
        if tuple(self.active.shape[1:]) != expect:
            raise ValueError(f"BlockLayout of shape {tuple(self.active.shape)} does not match "
                             f"q_len={self.q_len}, k_len={self.k_len}, block_size="
                             f"{self.block_size} (expected [H, {expect[0]}, {expect[1]}])")

    @property
    def num_heads(self) -> int:
        return self.active.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.active.shape)  # type: ignore[return-value]

    def check(self, pattern: Any, q_len: int, k_len: int, block_size: int) -> None:
        """A ``ValueError`` unless this is ``pattern``'s layout for these lengths and block size
        (one built by hand is trusted)."""
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
        dev, b = self.active.device, self.block_size
        return block_lengths(self.q_len, b, dev), block_lengths(self.k_len, b, dev)

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
        return LayoutStats(self.q_len, self.k_len, self.block_size, num_heads=h,
                           active_blocks=active, full_blocks=full, total_blocks=h * nq * nk,
                           density=pairs / (h * self.q_len * self.k_len),
                           block_density=active / (h * nq * nk),
                           full_fraction=full / active if active else 0.0)

    def slice(self, q_blocks: tuple[int, int], k_blocks: tuple[int, int]) -> BlockLayout:
        """The sub-layout of query blocks ``[q0, q1)`` and key blocks ``[k0, k1)``."""
        (q0, q1), (k0, k1) = q_blocks, k_blocks
        b = self.block_size
        return replace(self, active=self.active[:, q0:q1, k0:k1], full=self.full[:, q0:q1, k0:k1],
                       q_len=min(q1 * b, self.q_len) - q0 * b,
                       k_len=min(k1 * b, self.k_len) - k0 * b)

    def query_window(self, start: int, q_len: int) -> BlockLayout:
        """The layout of the ``q_len`` queries from local position ``start`` on, in tiles that
        begin at ``start`` (any position): a tile overlapping two query rows is active where
        either is and full where both are (active may over-cover, never under)."""
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
        return replace(self, active=act[:, :n], full=ful[:, :n], q_len=q_len)

    def coarsen(self, factor: int) -> BlockLayout:
        """The same layout with tiles ``factor`` times larger (any / all over sub-tiles)."""
        if factor == 1:
            return self
        nq, nk = num_blocks(self.shape[1], factor), num_blocks(self.shape[2], factor)
        act = _reduce_cells(self.active, factor, nq, nk, every=False)
        ful = _reduce_cells(self.full, factor, nq, nk, every=True) & act
        return replace(self, active=act, full=ful, block_size=self.block_size * factor)

    def expand_heads(self, num_heads: int) -> BlockLayout:
        """This layout with its head axis broadcast to ``num_heads`` (a view, no copy)."""
        if self.num_heads == num_heads:
            return self
        if self.num_heads != 1:
            raise ValueError(f"cannot broadcast a {self.num_heads}-head layout to {num_heads} "
                             "heads")
        shape = (num_heads, *self.active.shape[1:])
        return replace(self, active=self.active.expand(shape), full=self.full.expand(shape))

    def to(self, device: torch.device | str) -> BlockLayout:
        return replace(self, active=self.active.to(device), full=self.full.to(device))


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
