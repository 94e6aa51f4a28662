"""Attention patterns: which (query, key) pairs may attend, per head.

A :class:`Pattern` is defined once, at token level, by a vectorized predicate
``allowed(h, q, k)`` over int64 head, query-position and key-position tensors (any
broadcastable shapes; ``True`` = may attend, the polarity of SDPA's boolean mask and of
FlexAttention's ``mask_mod``). Every pattern also has an *exact* block-level layout
(:meth:`Pattern.block_structure`) computed analytically, in memory proportional to
``(seq_len / block_size)**2`` and never ``seq_len**2``. Where an analytic answer is not
available (unions and intersections of partial tiles) only the undecided tiles are evaluated
token by token, and tiles that are shifts of one another by a period of the pattern are evaluated
once, so the cost is proportional to the number of *distinct* undecided tiles.

Patterns whose predicate depends on the offset ``k - q`` alone (bands, strides and their
combinations) have Toeplitz layouts: with uniform blocks a tile's status depends only on its
block diagonal, so the layout is built from one value per diagonal (the ragged last block row
and column are computed exactly on their own).

Patterns compose: ``a | b`` allows a pair if either does, ``a & b`` if both do.

A pattern has ``num_heads`` heads; ``num_heads == 1`` means "the same for every head" and
broadcasts against any number of heads (:func:`head_predicate`).

Patterns built from the same arguments are equal and hash alike (``local_window(8) ==
local_window(8)``); patterns defined by a tensor (key masks, selections) equal only themselves.
Token arguments are bounded by :data:`~workbench.layout.MAX_POSITION` (kernels evaluate
positions in int32); a window or a number of global tokens beyond it covers every sequence and
is taken as unbounded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence

import torch
from torch import Tensor

from .layout import (
    MAX_POSITION,
    BlockLayout,
    LayoutSource,
    LayoutStats,
    block_extents,
    cells_to_tiles,
    num_blocks,
    tile_sum,
)

MaskFn = Callable[[Tensor, Tensor, Tensor], Tensor]
OffsetFn = Callable[[Tensor], Tensor]  # allowed(k - q) for patterns that depend on it alone

__all__ = [
    "KeyMask",
    "Pattern",
    "TiledHeads",
    "causal",
    "check_density",
    "check_dilation_pairs",
    "check_positive_int",
    "describe",
    "dilated",
    "dilated_branch",
    "full",
    "global_local",
    "global_tokens",
    "hash_cells",
    "head_groups",
    "head_predicate",
    "local_window",
    "random_blocks",
    "strided",
    "tile_batch",
]

_TILE_EVAL_BUDGET = 1 << 24  # token pairs evaluated per chunk when refining tiles
_TOKEN_MASK_LIMIT = 1 << 28  # largest H*S*S element count token_mask() will build


def check_positive_int(name: str, value: object, maximum: int | None = MAX_POSITION) -> int:
    """``value`` if it is a positive int (not a bool) of at most ``maximum``; otherwise a
    ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_density(density: object, name: str = "density", meaning: str = "") -> float:
    """``density`` as a float if it is a number in ``(0, 1]``.

    Raises:
        TypeError: not an int or float (a bool or a string included).
        ValueError: outside ``(0, 1]`` (or NaN).
    """
    what = f" ({meaning})" if meaning else ""
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"{name} must be a float in (0, 1]{what}, got {density!r}")
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"{name} must be in (0, 1]{what}, got {density}")
    return float(density)


def _check_int(name: str, value: object, minimum: int,
               maximum: int | None = MAX_POSITION) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum} (positions are int32), got {value}")
    return value


class Pattern:
    """A set of allowed (head, query, key) triples; subclasses define :meth:`allowed`."""

    num_heads: int = 1

    # ----------------------------------------------------------------- token level
    def allowed(self, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        """Boolean tensor, broadcast of the inputs: may query ``q`` of head ``h`` attend ``k``.

        ``h``, ``q`` and ``k`` are int64 tensors of absolute head index and token positions.
        Written with elementwise tensor ops only, so the same code builds dense masks and
        serves as a FlexAttention ``mask_mod``.
        """
        raise NotImplementedError

    def _key(self) -> Hashable | None:
        """The values that define this pattern's pairs, or None when only the object itself
        does (patterns holding tensors). Patterns of one type with equal keys are equal."""
        return None

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, Pattern) or type(self) is not type(other):
            return False
        key = self._key()
        return key is not None and key == other._key()

    def __hash__(self) -> int:
        cached = self.__dict__.get("_hash")
        if cached is None:  # a pattern never changes after construction: hash it once
            key = self._key()
            cached = object.__hash__(self) if key is None else hash((type(self).__name__, key))
            self.__dict__["_hash"] = cached
        return cached

    def dense_form(self) -> str | None:
        """``"full"`` if this pattern allows every pair, ``"causal"`` if it allows exactly the
        pairs ``k <= q``, otherwise ``None``: the two patterns PyTorch's own
        ``scaled_dot_product_attention`` computes without a mask, so ``auto`` hands them to it
        (:mod:`workbench.backends.sdpa`). Judged from the pattern's structure, not its layout:
        a pattern that happens to allow every pair at some length (a window longer than the
        sequence) answers ``None``."""
        return None

    def predicate(self, device: torch.device | str) -> MaskFn:
        """:meth:`allowed` with every tensor it needs already on ``device``.

        This is what kernels capture (FlexAttention's ``mask_mod``): it creates no tensor when
        called, so tracing it never breaks the graph.
        """
        return self.allowed

    def token_mask(self, seq_len: int, device: torch.device | str = "cpu") -> Tensor:
        """Dense bool mask ``[H, S, S]`` (``H`` = 1 for head-independent patterns).

        Only for small ``seq_len``: it materializes ``S x S``. Use :meth:`block_layout` or
        :meth:`block_structure` at long lengths.
        """
        _check_int("seq_len", seq_len, 1)
        if self.num_heads * seq_len * seq_len > _TOKEN_MASK_LIMIT:
            raise ValueError(
                f"token_mask(seq_len={seq_len}) would build {self.num_heads} x {seq_len} x "
                f"{seq_len} booleans; use block_layout(seq_len, block_size) at this length"
            )
        pos = torch.arange(seq_len, device=device)
        h = torch.arange(self.num_heads, device=device)[:, None, None]
        m = self.allowed(h, pos[None, :, None], pos[None, None, :])
        return m.expand(self.num_heads, seq_len, seq_len)

    # ----------------------------------------------------------------- block level
    def _tiles(self, q_len: int, k_len: int, block_size: int, device: torch.device) -> tuple[
        Tensor, Tensor
    ]:
        """Exact (any, all) bool ``[H, nq, nk]`` of this pattern (``H`` may be 1).

        "all" must imply "any" (every tile holds a real pair). The results may be views that
        share storage; callers treat them as read-only. A pattern overrides this or
        :meth:`_row_tiles` (which builds only some query rows, and is then used for all).
        """
        if type(self)._row_tiles is Pattern._row_tiles and self._offset_rule() is None:
            raise NotImplementedError
        return self._row_tiles(q_len, k_len, block_size, device,
                               (0, num_blocks(q_len, block_size)))

    def _row_tiles(self, q_len: int, k_len: int, block_size: int, device: torch.device,
                   rows: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """:meth:`_tiles` of the query blocks ``rows = (first, end)`` only: ``[H, end - first,
        nk]``, built without the other rows where the pattern knows how (patterns with an
        :meth:`_offset_rule`, whose Toeplitz rows are built here, and those overriding this);
        otherwise every row is built and the range is cut out."""
        rule = self._offset_rule()
        if rule is not None:
            return _offset_tiles(rule, q_len, k_len, block_size, device, rows)
        if type(self)._tiles is Pattern._tiles:
            raise NotImplementedError
        any_, all_ = self._tiles(q_len, k_len, block_size, device)
        return any_[:, rows[0]:rows[1]], all_[:, rows[0]:rows[1]]

    def _offset_rule(self) -> OffsetFn | None:
        """``allowed`` as a function of ``d = k - q`` alone, if the pattern is one (else None).

        Such a pattern is head-independent and the same along every diagonal.
        """
        return None

    def _period(self) -> int | None:
        """A shift ``P`` with ``allowed(h, q + P, k + P) == allowed(h, q, k)`` for all integer
        ``q, k`` (negative ones included), or None if there is none known.

        Tiles that are shifts of one another by a multiple of ``P`` are then evaluated once.
        """
        return None if self._offset_rule() is None else 1

    def block_structure(
        self,
        seq_len: int,
        block_size: int,
        device: torch.device | str = "cpu",
        *,
        k_len: int | None = None,
        rows: tuple[int, int] | None = None,
    ) -> BlockLayout:
        """Exact :class:`BlockLayout` (active and full tiles) at ``block_size``.

        ``k_len`` defaults to ``seq_len`` (self-attention); give it for a rectangular problem.
        ``rows = (first, end)`` builds only those query blocks, against every key block: the
        layout equals ``block_structure(seq_len, block_size).slice(rows, (0, nk))``, at the
        memory of its rows alone for the patterns a ring shards (what one rank needs).
        """
        _check_int("seq_len", seq_len, 1)
        _check_int("block_size", block_size, 1)
        k_len = seq_len if k_len is None else _check_int("k_len", k_len, 1)
        nq = num_blocks(seq_len, block_size)
        r0, r1 = (0, nq) if rows is None else rows
        if not (isinstance(r0, int) and isinstance(r1, int) and 0 <= r0 < r1 <= nq):
            raise ValueError(f"rows must be (first, end) query blocks with 0 <= first < end <= "
                             f"{nq}, got {rows!r}")
        dev = torch.device(device)
        any_, all_ = torch.broadcast_tensors(
            *self._row_tiles(seq_len, k_len, block_size, dev, (r0, r1)))
        return BlockLayout(any_, all_, min(r1 * block_size, seq_len) - r0 * block_size, k_len,
                           block_size, LayoutSource(self))

    def block_layout(
        self, seq_len: int, block_size: int, device: torch.device | str = "cpu"
    ) -> Tensor:
        """Bool ``[H, nq, nk]``: which tiles hold at least one allowed pair."""
        return self.block_structure(seq_len, block_size, device).active

    def stats(self, seq_len: int, block_size: int) -> LayoutStats:
        """Tile counts and the computed density at this length and block size."""
        return self.block_structure(seq_len, block_size).stats()

    def density(self, seq_len: int, block_size: int | None = None) -> float:
        """Fraction of the ``S x S`` (query, key) pairs that are computed, averaged over heads.

        With ``block_size`` this is what a block-sparse kernel computes: the area of the
        active tiles. With ``block_size=None`` it is the pattern's own (token-level) density:
        the fraction of pairs allowed, i.e. what a perfect kernel would compute.
        """
        if block_size is not None:
            return self.stats(seq_len, block_size).density
        return self.allowed_pairs(seq_len) / (self.num_heads * seq_len * seq_len)

    def allowed_pairs(self, seq_len: int, block_size: int = 64) -> int:
        """Exact number of allowed (head, query, key) triples, summed over heads.

        Primitive patterns count in closed form (O(S) or less). Combinations are counted from
        the block layout: full tiles by their area, partial tiles token by token, so the cost
        is proportional to the number of partial tiles.
        """
        _check_int("seq_len", seq_len, 1)
        exact = self._count_pairs(seq_len)
        if exact is not None:
            return exact
        lay = self.block_structure(seq_len, block_size)
        total = int(tile_sum(lay.full, *lay.block_lengths()).sum())
        partial = (lay.active & ~lay.full).nonzero()
        if partial.numel():
            cnt, _, _ = _evaluate_tiles(self, partial, seq_len, seq_len, block_size)
            total += int(cnt.sum())
        return total

    def _count_pairs(self, seq_len: int) -> int | None:
        """Closed-form allowed-pair count (summed over heads), or None if there is none."""
        return None

    # ----------------------------------------------------------------- algebra
    def __or__(self, other: Pattern) -> Pattern:
        return Union(self, other)

    def __and__(self, other: Pattern) -> Pattern:
        return Intersection(self, other)



def head_predicate(pattern: Pattern, device: torch.device | str) -> MaskFn:
    """``pattern.predicate(device)``, callable with any head index.

    A 1-head pattern is the same for every head: it is asked about head 0 whatever head is
    asked about, so it broadcasts against any number of heads on every backend. Patterns whose
    predicate reads only ``k - q`` are returned as they are.
    """
    f = pattern.predicate(device)
    if pattern.num_heads != 1 or pattern._offset_rule() is not None:
        return f
    return lambda h, q, k: f(h * 0, q, k)


def _combined_heads(a: Pattern, b: Pattern) -> int:
    if a.num_heads == b.num_heads or b.num_heads == 1:
        return a.num_heads
    if a.num_heads == 1:
        return b.num_heads
    raise ValueError(
        f"cannot combine a {a.num_heads}-head pattern with a {b.num_heads}-head pattern; "
        "heads must match or one of them must be head-independent (1 head)"
    )


def _canonical_tiles(
    pattern: Pattern, tiles: Tensor, q_len: int, k_len: int, block_size: int
) -> tuple[Tensor, Tensor]:
    """Distinct tiles among ``tiles`` (int64 ``[N, 3]`` of head, row, column) up to a period.

    A tile with no padding moved by ``m`` blocks along its diagonal, ``m * block_size`` a
    multiple of :meth:`Pattern._period`, holds the same pairs; each is moved back until its
    smaller block index is below ``m``. Tiles of the ragged last block row or column stay
    where they are. Returns (distinct tiles ``[U, 3]``, index into them of every input tile).
    """
    period = pattern._period()
    if period is None or tiles.shape[0] < 2:
        return tiles, torch.arange(tiles.shape[0], device=tiles.device)
    m = period // math.gcd(period, block_size)  # blocks per period
    if m * block_size >= max(q_len, k_len):
        return tiles, torch.arange(tiles.shape[0], device=tiles.device)
    h, i, j = tiles.unbind(1)
    ragged = ((i + 1) * block_size > q_len) | ((j + 1) * block_size > k_len)
    shift = torch.where(ragged, 0, torch.div(torch.minimum(i, j), m, rounding_mode="floor") * m)
    key = torch.stack([h, i - shift, j - shift, ragged.to(torch.int64)], 1)
    distinct, inverse = torch.unique(key, dim=0, return_inverse=True)
    return distinct[:, :3], inverse


def _evaluate_tiles(
    pattern: Pattern, tiles: Tensor, q_len: int, k_len: int, block_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Evaluate ``pattern`` token by token inside the tiles ``tiles`` (int64 ``[N, 3]``).

    Returns (allowed-pair count, any, all) per tile; padding positions never count, and
    "all" means every real pair of the tile is allowed. Tiles equal up to the pattern's period
    are evaluated once (see :func:`_canonical_tiles`).
    """
    distinct, inverse = _canonical_tiles(pattern, tiles, q_len, k_len, block_size)
    cnt, any_, all_ = _evaluate_distinct_tiles(pattern, distinct, q_len, k_len, block_size)
    return cnt[inverse], any_[inverse], all_[inverse]


def _evaluate_distinct_tiles(
    pattern: Pattern, tiles: Tensor, q_len: int, k_len: int, block_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_evaluate_tiles` without the deduplication: every tile token by token."""
    b = block_size
    dev = tiles.device
    off = torch.arange(b, device=dev)
    per = max(1, _TILE_EVAL_BUDGET // (b * b))
    counts, anys, alls = [torch.zeros(0, dtype=torch.int64, device=dev)], [], []
    anys.append(torch.zeros(0, dtype=torch.bool, device=dev))
    alls.append(anys[0])
    for start in range(0, tiles.shape[0], per):
        t = tiles[start : start + per]
        h = t[:, 0, None, None]
        q = t[:, 1, None, None] * b + off[None, :, None]
        k = t[:, 2, None, None] * b + off[None, None, :]
        real = (q < q_len) & (k < k_len)
        m = pattern.allowed(h, q, k) & real
        counts.append(m.sum((1, 2)))
        anys.append(m.any(2).any(1))
        alls.append((m | ~real).all(2).all(1))
    return torch.cat(counts), torch.cat(anys), torch.cat(alls)


def _refine(
    pattern: Pattern,
    undecided: Tensor,
    q_len: int,
    k_len: int,
    block_size: int,
) -> tuple[Tensor, Tensor]:
    """Token-level (any, all) of ``pattern`` on the tiles flagged by bool ``[H, nq, nk]``."""
    any_ = torch.zeros_like(undecided)
    all_ = torch.zeros_like(undecided)
    idx = undecided.nonzero()
    if idx.numel():
        _, a, f = _evaluate_tiles(pattern, idx, q_len, k_len, block_size)
        any_[tuple(idx.T)] = a
        all_[tuple(idx.T)] = f
    return any_, all_


def _materialize(x: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``x`` broadcast to ``shape`` as a tensor of its own (``x`` itself when it has it)."""
    return x if tuple(x.shape) == shape else x.expand(shape).contiguous()


class _Combination(Pattern):
    """Two patterns joined elementwise by ``op`` (written ``symbol``).

    Tile by tile, ``op`` of the parts' (any, all) is exact unless both parts are partial
    there; those tiles are evaluated token by token.
    """

    symbol = ""

    def __init__(self, a: Pattern, b: Pattern) -> None:
        self.a, self.b = a, b
        self.num_heads = _combined_heads(a, b)

    @staticmethod
    def op(x: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def _key(self):
        a, b = self.a._key(), self.b._key()
        return None if a is None or b is None else (type(self.a), a, type(self.b), b)

    def allowed(self, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return self.predicate(q.device)(h, q, k)

    def predicate(self, device):
        fa, fb, op = head_predicate(self.a, device), head_predicate(self.b, device), self.op
        return lambda h, q, k: op(fa(h, q, k), fb(h, q, k))

    def _offset_rule(self):
        fa, fb, op = self.a._offset_rule(), self.b._offset_rule(), self.op
        if fa is None or fb is None:
            return None
        return lambda d: op(fa(d), fb(d))

    def _period(self):
        pa, pb = self.a._period(), self.b._period()
        return None if pa is None or pb is None else math.lcm(pa, pb)

    def _row_tiles(self, q_len, k_len, block_size, device, rows):
        if self._offset_rule() is not None:
            return super()._row_tiles(q_len, k_len, block_size, device, rows)
        a_any, a_all = self.a._row_tiles(q_len, k_len, block_size, device, rows)
        b_any, b_all = self.b._row_tiles(q_len, k_len, block_size, device, rows)
        shape = (self.num_heads, *torch.broadcast_shapes(a_any.shape[1:], b_any.shape[1:]))
        # "all" implies "any", so any ^ all marks the partial tiles.
        undecided = _materialize(torch.bitwise_xor(a_any, a_all), shape)
        undecided &= torch.bitwise_xor(b_any, b_all)
        idx = undecided.nonzero()
        any_ = self.op(a_any, b_any, out=undecided)  # the buffer is free once idx is taken
        all_ = _materialize(self.op(a_all, b_all), shape)
        if idx.numel():
            at = idx + torch.tensor([0, rows[0], 0], device=idx.device)  # absolute block rows
            _, r_any, r_all = _evaluate_tiles(self, at, q_len, k_len, block_size)
            any_[tuple(idx.T)] = r_any
            all_[tuple(idx.T)] = r_all
        return any_, all_

    def __repr__(self) -> str:
        return f"({self.a!r} {self.symbol} {self.b!r})"


class Union(_Combination):
    """Pairs allowed by either pattern (``a | b``)."""

    symbol = "|"
    op = staticmethod(torch.bitwise_or)

    def dense_form(self):
        fa, fb = self.a.dense_form(), self.b.dense_form()
        return "full" if "full" in (fa, fb) else fa if fa == fb else None  # full | x = full


class Intersection(_Combination):
    """Pairs allowed by both patterns (``a & b``)."""

    symbol = "&"
    op = staticmethod(torch.bitwise_and)

    def dense_form(self):
        fa, fb = self.a.dense_form(), self.b.dense_form()
        return fb if fa == "full" else fa if fb in ("full", fa) else None  # full & x = x


# --------------------------------------------------------------------- primitives
def _toeplitz(diag: Tensor, nq: int, nk: int, rows: tuple[int, int]) -> Tensor:
    """Rows ``[r0, r1)`` of the ``[nq, nk]`` matrix whose entry ``(i, j)`` is
    ``diag[j - i + nq - 1]`` (one copy, of those rows)."""
    r0, r1 = rows
    diag = diag.contiguous()
    # entry (i, j) = diag[nq - r1 + i + j]: rows nq - r1 ... nq - 1 - r0, flipped
    hankel = diag.as_strided((r1 - r0, nk), (1, 1), diag.storage_offset() + nq - r1)
    return hankel.flip(0)


def _offset_tiles(
    rule: OffsetFn, q_len: int, k_len: int, block_size: int, device: torch.device,
    rows: tuple[int, int],
) -> tuple[Tensor, Tensor]:
    """Exact (any, all) ``[1, r1 - r0, nk]`` (query block rows ``rows = (r0, r1)``) of a
    pattern allowing ``(q, k)`` iff ``rule(k - q)``.

    The offsets inside a tile are every integer from ``k_first - q_last`` to ``k_last -
    q_first``, so a prefix count of ``rule`` over all offsets decides any tile in O(1). Tiles
    of uniform blocks depend only on their diagonal ``j - i``; the ragged last block row and
    column are then recomputed from their real extents.
    """
    b = block_size
    nq, nk = num_blocks(q_len, b), num_blocks(k_len, b)
    d_first = 1 - nq * b  # the smallest offset any (padded) tile reaches
    ok = rule(torch.arange(d_first, nk * b, device=device))
    count = torch.nn.functional.pad(ok.to(torch.int64).cumsum(0), (1, 0))

    def status(d_min: Tensor, d_max: Tensor) -> tuple[Tensor, Tensor]:
        n = count[d_max - d_first + 1] - count[d_min - d_first]
        return n > 0, n == d_max - d_min + 1

    diag = torch.arange(1 - nq, nk, device=device) * b
    any_d, all_d = status(diag - (b - 1), diag + (b - 1))
    any_, all_ = _toeplitz(any_d, nq, nk, rows), _toeplitz(all_d, nq, nk, rows)
    qe = block_extents(q_len, b, device)[rows[0]:rows[1]]
    ke = block_extents(k_len, b, device)
    if rows[1] == nq:  # the ragged last block row
        any_[-1], all_[-1] = status(ke[:, 0] - qe[-1, 1], ke[:, 1] - qe[-1, 0])
    any_[:, -1], all_[:, -1] = status(ke[-1, 0] - qe[:, 1], ke[-1, 1] - qe[:, 0])
    return any_[None], all_[None]


def _extents(q_len: int, k_len: int, block_size: int, device,
             rows: tuple[int, int]) -> tuple[Tensor, ...]:
    """(q_first, q_last, k_first, k_last) of the query blocks ``rows`` and every key block,
    broadcast as ``[1, r1 - r0, 1]`` and ``[1, 1, nk]``."""
    qe = block_extents(q_len, block_size, device)[rows[0]:rows[1]]
    ke = block_extents(k_len, block_size, device)
    return qe[None, :, 0, None], qe[None, :, 1, None], ke[None, None, :, 0], ke[None, None, :, 1]


class Full(Pattern):
    """Every pair (dense attention)."""

    def allowed(self, h, q, k):
        return torch.ones_like(q + k, dtype=torch.bool)

    def dense_form(self):
        return "full"

    def _offset_rule(self):
        return lambda d: torch.ones_like(d, dtype=torch.bool)

    def _row_tiles(self, q_len, k_len, block_size, device, rows):
        shape = (1, rows[1] - rows[0], num_blocks(k_len, block_size))
        t = torch.ones(shape, dtype=torch.bool, device=device)
        return t, t

    def _count_pairs(self, seq_len):
        return seq_len * seq_len

    def _key(self):
        return ()

    def __repr__(self) -> str:
        return "full()"


class Band(Pattern):
    """Pairs whose offset ``k - q`` lies in ``[lo, hi]`` (local windows, causality).

    ``None`` means no bound on that side. (No sentinel number stands in for infinity: kernels
    evaluate positions in int32, where a large constant would silently wrap.)
    """

    def __init__(self, lo: int | None, hi: int | None, name: str) -> None:
        self.lo, self.hi, self.name = lo, hi, name

    def allowed(self, h, q, k):
        return self._allows_offset(k - q)

    def dense_form(self):
        if self.lo is None and self.hi is None:
            return "full"
        return "causal" if self.lo is None and self.hi == 0 else None

    def _allows_offset(self, d: Tensor) -> Tensor:
        if self.lo is None and self.hi is None:
            return d == d
        if self.lo is None:
            return d <= self.hi
        if self.hi is None:
            return d >= self.lo
        return (d >= self.lo) & (d <= self.hi)

    def _offset_rule(self):
        return self._allows_offset

    def _count_pairs(self, seq_len):
        q = torch.arange(seq_len, dtype=torch.int64)
        first = torch.zeros_like(q) if self.lo is None else torch.clamp(q + self.lo, min=0)
        last = (torch.full_like(q, seq_len - 1) if self.hi is None
                else torch.clamp(q + self.hi, max=seq_len - 1))
        return int(torch.clamp(last - first + 1, min=0).sum())

    def _key(self):
        return (self.lo, self.hi)

    def __repr__(self) -> str:
        return self.name


class GlobalTokens(Pattern):
    """The first ``n`` tokens attend everything and are attended by everything."""

    def __init__(self, n: int) -> None:
        self.n = n

    def allowed(self, h, q, k):
        return (q < self.n) | (k < self.n)

    def _row_tiles(self, q_len, k_len, block_size, device, rows):
        qf, ql, kf, kl = _extents(q_len, k_len, block_size, device, rows)
        return (qf < self.n) | (kf < self.n), (ql < self.n) | (kl < self.n)

    def _count_pairs(self, seq_len):
        rest = max(seq_len - self.n, 0)
        return seq_len * seq_len - rest * rest

    def _key(self):
        return self.n

    def __repr__(self) -> str:
        return f"global_tokens({self.n})"


class Strided(Pattern):
    """Pairs whose distance is a multiple of ``stride`` (Sparse Transformer's strided head)."""

    def __init__(self, stride: int) -> None:
        self.stride = stride

    def allowed(self, h, q, k):
        return self._allows_offset(k - q)

    def _allows_offset(self, d: Tensor) -> Tensor:
        return torch.remainder(d, self.stride) == 0

    def _offset_rule(self):
        return self._allows_offset

    def _count_pairs(self, seq_len):
        d = torch.arange(0, seq_len, self.stride, dtype=torch.int64)  # |k - q| multiples
        return int(2 * (seq_len - d).sum() - seq_len)

    def _key(self):
        return self.stride

    def __repr__(self) -> str:
        return f"strided({self.stride})"


def _kept_segments(w_: Sequence[int], r_: Sequence[int], s_: Sequence[int], length: int,
                   block_size: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """Per (segment ``w``, dilation ``r``, offset ``s``) triple and block: first and last
    segment holding a kept position, or empty.

    Returns (lo, hi, all_seg), each int64 ``[T, n]``. A block holding no kept position has
    ``lo = length`` (above every segment index) and ``hi = -1``, so two blocks share a
    segment exactly when ``lo_a <= hi_b`` and ``lo_b <= hi_a``. ``all_seg`` is the segment
    index when every position of the block is kept and lies in that one segment, else -1.
    """
    ext = block_extents(length, block_size, device)
    a, e = ext[None, :, 0], ext[None, :, 1]  # first and last position of each block
    w = torch.tensor(w_, device=device)[:, None]
    r = torch.tensor(r_, device=device)[:, None]
    s = torch.tensor(s_, device=device)[:, None]
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
    """One head's dilated tiles from per-block (lo, hi, all_seg) rows ``[3, n]`` of q and k.

    Active: the blocks' kept-segment ranges overlap. Full: both blocks are wholly kept in one
    and the same segment (``all_seg`` of k uses -2 for "no", so it never equals q's -1).
    Query blocks with the same (lo, hi, all_seg) have the same row: each distinct row is
    computed once and the rows are gathered into the outputs.
    """
    starts = torch.ones_like(q[0], dtype=torch.bool)
    starts[1:] = (q[:, 1:] != q[:, :-1]).any(0)  # equal neighbouring rows are computed once
    inverse = starts.cumsum(0) - 1
    (qlo, qhi, qall), (klo, khi, kall) = q[:, starts, None], k[:, None, :]
    torch.index_select((qlo <= khi) & (klo <= qhi), 0, inverse, out=any_out)
    torch.index_select(qall == kall, 0, inverse, out=all_out)


class Dilated(Pattern):
    """LongNet dilated attention with one (segment, dilation, offset) triple per head.

    Head ``h`` splits the sequence into segments ``[m*w, (m+1)*w)`` (the last one is the
    remainder when ``w`` does not divide the length) and, inside each segment, keeps the
    positions whose offset from the segment start is ``s, s + r, s + 2r, ...`` (``w_h, r_h,
    s_h``). Query and key attend when both are kept and lie in the same segment.
    """

    def __init__(self, segments: Sequence[int], dilations: Sequence[int], offsets: Sequence[int],
                 name: str) -> None:
        self.w, self.r, self.s = list(segments), list(dilations), list(offsets)
        self.num_heads = len(self.w)
        self.name = name
        self._tables: dict[str, tuple[Tensor, Tensor, Tensor]] = {}  # per device

    def allowed(self, h, q, k):
        return self.predicate(q.device)(h, q, k)

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

    def _period(self):
        return math.lcm(*self.w)

    def _row_tiles(self, q_len, k_len, block_size, device, rows):
        # Heads with the same block-level view (the same triple, or offsets that no block of
        # these rows can tell apart) share one computation: done once, copied to the others.
        triples = list(zip(self.w, self.r, self.s))
        distinct = list(dict.fromkeys(triples))
        w, r, s = (list(x) for x in zip(*distinct))
        q = torch.stack(_kept_segments(w, r, s, q_len, block_size, device), 1)  # [T, 3, nq]
        q = q[:, :, rows[0]:rows[1]].contiguous()
        k = torch.stack(_kept_segments(w, r, s, k_len, block_size, device), 1)  # [T, 3, nk]
        k[:, 2] = torch.where(k[:, 2] < 0, -2, k[:, 2])  # "not all kept" never matches q's -1
        views: list[int] = []  # per distinct triple: the first triple with the same view
        for t in range(len(distinct)):
            views.append(next(u for u in range(t + 1) if u == t or (
                torch.equal(q[u], q[t]) and torch.equal(k[u], k[t]))))
        src_of = [views[distinct.index(x)] for x in triples]
        h = len(triples)
        shape = (h if len(set(views)) > 1 else 1, q.shape[2], k.shape[2])
        any_ = torch.empty(shape, dtype=torch.bool, device=device)
        all_ = torch.empty_like(any_)
        head_of: dict[int, int] = {}  # distinct view -> first head holding it
        for i in range(shape[0]):
            src = head_of.setdefault(src_of[i], i)
            if src < i:
                any_[i].copy_(any_[src])
                all_[i].copy_(all_[src])
            else:
                _segment_tiles(q[src_of[i]], k[src_of[i]], any_[i], all_[i])
        return any_.expand(h, *shape[1:]), all_.expand(h, *shape[1:])

    def _count_pairs(self, seq_len):
        total = 0
        for w, r, s in zip(self.w, self.r, self.s):
            starts = torch.arange(0, seq_len, w, dtype=torch.int64)
            lengths = torch.clamp(seq_len - starts, max=w)
            kept = torch.clamp(torch.div(lengths - s + r - 1, r, rounding_mode="floor"), min=0)
            total += int((kept * kept).sum())
        return total

    def _key(self):
        return (tuple(self.w), tuple(self.r), tuple(self.s))

    def __repr__(self) -> str:
        return self.name


_HASH_HEAD, _HASH_ROW, _HASH_COL, _HASH_SEED = 0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F
_HASH_MIX = (0x7FEB352D, 0x846CA68B)
_GRID_CHUNK = 1 << 18  # cells hashed per step on a CPU when building a cell grid (in cache)
_GRID_CHUNK_GPU = 1 << 24  # the same on a GPU, where each step is a few kernel launches


def _signed32(x: int) -> int:
    """The int32 (two's complement) value with the same low 32 bits as ``x``."""
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x >= 1 << 31 else x


def _mix32(x: Tensor) -> Tensor:
    """The hash's 32-bit finalizer, returning its top 24 bits.

    ``x`` is either int64 holding values in ``[0, 2**32)`` or int32 holding the same bits
    (two's complement, where products wrap); both give the same result.
    """
    wide = x.dtype == torch.int64
    for mul in _HASH_MIX:
        x = x ^ ((x >> 16) & 0xFFFF)
        x = x * _signed32(mul)
        x = x & 0xFFFFFFFF if wide else x
    x = x ^ ((x >> 16) & 0xFFFF)
    return (x >> 8) & 0xFFFFFF


def hash_cells(seed: int, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
    """Deterministic 24-bit hash of (seed, head, cell row, cell column), elementwise: the
    random-tile patterns keep a cell below a threshold, attention dropout keeps a (query, key)
    pair at or above one.

    Computed in int64 whatever the index dtype (kernels pass int32), keeping the low 32 bits.
    """
    h, i, j = h.to(torch.int64), i.to(torch.int64), j.to(torch.int64)
    x = (h * _HASH_HEAD + i * _HASH_ROW + j * _HASH_COL + seed * _HASH_SEED) & 0xFFFFFFFF
    return _mix32(x)


def _hash_grid(seed: int, heads: Sequence[int], rows: tuple[int, int], cols: int,
               threshold: int, device: torch.device) -> Tensor:
    """Bool ``[len(heads), r1 - r0, cols]``: ``hash_cells(seed, h, i, j) < threshold`` for the
    cell rows ``i`` in ``rows = (r0, r1)``.

    The same hash in int32 (products wrap, which keeps exactly the low 32 bits), a few rows
    at a time so that the intermediates stay small (in cache, on a CPU) and the memory is the
    output alone.
    """
    def lanes(v: Tensor) -> Tensor:  # int64 in [0, 2**32) -> int32 with the same bits
        return torch.where(v >= 1 << 31, v - (1 << 32), v).to(torch.int32)

    col = lanes(torch.arange(cols, device=device) * _HASH_COL & 0xFFFFFFFF)
    first, end = rows
    out = torch.empty(len(heads), end - first, cols, dtype=torch.bool, device=device)
    chunk = _GRID_CHUNK if torch.device(device).type == "cpu" else _GRID_CHUNK_GPU
    step = max(1, chunk // cols)
    for n, h in enumerate(heads):
        base = (h * _HASH_HEAD + seed * _HASH_SEED) & 0xFFFFFFFF
        for r0 in range(first, end, step):
            r = torch.arange(r0, min(r0 + step, end), device=device)
            row = lanes((r * _HASH_ROW + base) & 0xFFFFFFFF)
            torch.lt(_mix32(row[:, None] + col[None, :]), threshold,
                     out=out[n, r0 - first : r0 - first + step])
    return out


class RandomBlocks(Pattern):
    """BigBird-style random tiles: each ``cell x cell`` tile is on with probability ``density``.

    The choice is a deterministic hash of (seed, head, tile row, tile column), so it does not
    depend on the sequence length or on the block size a kernel later uses.
    """

    def __init__(self, density: float, seed: int, cell: int, num_heads: int) -> None:
        self.p, self.seed, self.cell, self.num_heads = density, seed, cell, num_heads
        self.threshold = int(round(density * (1 << 24)))

    def allowed(self, h, q, k):
        c = self.cell
        hh = h if self.num_heads > 1 else torch.zeros_like(h)
        return hash_cells(self.seed, hh, q // c, k // c) < self.threshold

    def _row_tiles(self, q_len, k_len, block_size, device, rows):
        c, b = self.cell, block_size
        cells = (rows[0] * b // c, (min(rows[1] * b, q_len) - 1) // c + 1)  # their cell rows
        on = _hash_grid(self.seed, range(self.num_heads), cells, num_blocks(k_len, c),
                        self.threshold, device)
        return cells_to_tiles(on, c, q_len, k_len, block_size, rows)

    def _count_pairs(self, seq_len):
        c = self.cell
        n = num_blocks(seq_len, c)
        size = torch.clamp(seq_len - torch.arange(n, dtype=torch.int64) * c, max=c)
        on = _hash_grid(self.seed, range(self.num_heads), (0, n), n, self.threshold, "cpu")
        return int(tile_sum(on, size, size).sum())  # each on cell by its real pairs

    def _key(self):
        return (self.p, self.seed, self.cell, self.num_heads)

    def __repr__(self) -> str:
        return f"random_blocks(density={self.p}, seed={self.seed}, cell={self.cell})"


# --------------------------------------------------------------------- builders
def full() -> Pattern:
    """Dense attention: every query attends every key."""
    return Full()


def causal() -> Pattern:
    """Autoregressive mask: query ``i`` attends key ``j`` iff ``j <= i``."""
    return _causal_band()


def _causal_band() -> Pattern:
    return Band(None, 0, "causal()")


def local_window(window: int, causal: bool = False) -> Pattern:
    """Sliding window: query ``i`` attends key ``j`` iff ``|i - j| < window``.

    With ``causal=True`` only ``0 <= i - j < window``: every query sees exactly ``window``
    keys (itself and the ``window - 1`` before it, fewer at the start), the convention of
    Mistral-style sliding-window attention. Non-causal windows see ``2 * window - 1`` keys.
    """
    _check_int("window", window, 1, None)
    name = f"local_window({window}{', causal=True' if causal else ''})"
    reach = window - 1 if window <= MAX_POSITION else None  # beyond: every sequence fits
    return Band(None if reach is None else -reach, 0 if causal else reach, name)


def global_tokens(num_global: int) -> Pattern:
    """The first ``num_global`` tokens attend, and are attended by, every token."""
    _check_int("num_global", num_global, 1, None)
    return GlobalTokens(min(num_global, MAX_POSITION))


def global_local(num_global: int, window: int) -> Pattern:
    """Longformer/BigBird-style: ``global_tokens(num_global) | local_window(window)``.

    ``num_global`` counts tokens (not blocks); combine with ``& causal()`` for decoders.
    """
    return global_tokens(num_global) | local_window(window)


def strided(stride: int) -> Pattern:
    """Sparse Transformer's strided pattern: ``i`` attends ``j`` iff ``(i - j) % stride == 0``.

    Child et al. (2019) pair it with a local window of ``stride`` tokens; that is
    ``strided(l) | local_window(l)`` (add ``& causal()`` for their autoregressive form).
    """
    _check_int("stride", stride, 1)
    return Strided(stride)


def random_blocks(density: float, seed: int = 0, *, cell: int = 64, num_heads: int = 1) -> Pattern:
    """BigBird-style random tiles of ``cell x cell`` tokens, each on with probability ``density``.

    ``density`` is the expected fraction of pairs (and of cells); the realized value at a given
    length is reported by :meth:`Pattern.density`. ``num_heads > 1`` draws each head apart.
    """
    density = check_density(density, meaning="the expected fraction of cells on")
    _check_int("seed", seed, 0, None)
    _check_int("cell", cell, 1)
    _check_int("num_heads", num_heads, 1)
    return RandomBlocks(density, seed, cell, num_heads)


def check_dilation_pairs(segment_lengths: Sequence[int], dilation_rates: Sequence[int]) -> None:
    """Validate LongNet (segment, dilation) lists; raise naming the offending argument."""
    for name, seq in (("segment_lengths", segment_lengths), ("dilation_rates", dilation_rates)):
        if isinstance(seq, (int, str)) or not isinstance(seq, Sequence) or len(seq) == 0:
            raise TypeError(f"{name} must be a non-empty list of ints, got {seq!r}")
        for v in seq:
            _check_int(f"{name} entries", v, 1)
    if len(segment_lengths) != len(dilation_rates):
        raise ValueError(
            f"segment_lengths ({len(segment_lengths)} values) and dilation_rates "
            f"({len(dilation_rates)} values) must have the same length: one dilation per segment"
        )
    for w, r in zip(segment_lengths, dilation_rates):
        if r > w:
            raise ValueError(
                f"dilation rate {r} is larger than its segment length {w}: a segment would keep "
                "at most one position; use a dilation <= segment length"
            )


def head_groups(num_heads: int, num_groups: int) -> list[int]:
    """Group index of every head when ``num_heads`` are split as evenly as possible.

    Groups are contiguous; the first ``num_heads % num_groups`` groups get one extra head.
    """
    _check_int("num_heads", num_heads, 1)
    if num_heads < num_groups:
        raise ValueError(
            f"num_heads={num_heads} is smaller than the number of (segment, dilation) pairs "
            f"({num_groups}); head-group mode needs at least one head per pair"
        )
    base, extra = divmod(num_heads, num_groups)
    sizes = [base + (1 if g < extra else 0) for g in range(num_groups)]
    return [g for g, n in enumerate(sizes) for _ in range(n)]


def dilated(
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    num_heads: int,
    causal: bool = False,
) -> Pattern:
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
    w = [segment_lengths[g] for g in group]
    r = [dilation_rates[g] for g in group]
    s = [j % r[j] for j in range(num_heads)]
    name = f"dilated({list(segment_lengths)}, {list(dilation_rates)}, num_heads={num_heads})"
    pat: Pattern = Dilated(w, r, s, name)
    return pat & _causal_band() if causal else pat


def dilated_branch(segment_length: int, dilation_rate: int, num_heads: int) -> Pattern:
    """One LongNet (segment, dilation) branch on every head; head ``j`` takes offset ``j mod r``.

    The paper's attention is the log-sum-exp merge of these branches (see
    :func:`workbench.dilated_attention` with ``mode="paper"``).
    """
    check_dilation_pairs([segment_length], [dilation_rate])
    _check_int("num_heads", num_heads, 1)
    r = dilation_rate
    name = f"dilated_branch({segment_length}, {r}, num_heads={num_heads})"
    return Dilated([segment_length] * num_heads, [r] * num_heads,
                   [j % r for j in range(num_heads)], name)


def describe(pattern: Pattern, seq_len: int, block_size: int) -> dict[str, float | int | str]:
    """One-line summary of a pattern at a length and block size (for tables and notebooks)."""
    st = pattern.stats(seq_len, block_size)
    useful = pattern.density(seq_len)
    return {
        "pattern": repr(pattern),
        "seq_len": seq_len,
        "block_size": block_size,
        "heads": pattern.num_heads,
        "useful_density": useful,
        "computed_density": st.density,
        "block_density": st.block_density,
        "full_tiles": st.full_fraction,
        "waste": st.density / useful if useful else math.inf,
    }


class KeyMask(Pattern):
    """Keys allowed per head by a boolean vector ``valid [H, S_k]`` (key padding)."""

    def __init__(self, valid: Tensor) -> None:
        if valid.dtype != torch.bool or valid.dim() != 2:
            raise TypeError(f"valid must be a bool [heads, keys] tensor, got {valid.dtype} "
                            f"{tuple(valid.shape)}")
        self.valid = valid
        self.num_heads = valid.shape[0]

    def allowed(self, h, q, k):
        return self.predicate(k.device)(h, q, k)

    def predicate(self, device):
        v = self.valid.to(device)
        n, multi_head = v.shape[1], self.num_heads > 1

        def valid_key(h, q, k):
            hh = h if multi_head else torch.zeros_like(h)
            return v[hh, torch.clamp(k, max=n - 1)] & (k < n) & (q >= 0)

        return valid_key

    def _tiles(self, q_len, k_len, block_size, device):
        v = self.valid.to(device)[:, :k_len]
        nk = num_blocks(k_len, block_size)
        pad = nk * block_size - v.shape[1]
        vb = torch.nn.functional.pad(v, (0, pad)).view(-1, nk, block_size)
        real = torch.nn.functional.pad(torch.ones_like(v[0]), (0, pad)).view(nk, block_size)
        any_ = vb.any(-1)
        all_ = (vb | ~real).all(-1)
        nq = num_blocks(q_len, block_size)
        shape = (self.num_heads, nq, nk)
        return any_[:, None, :].expand(shape), all_[:, None, :].expand(shape)

    def __repr__(self) -> str:
        return f"key_mask({tuple(self.valid.shape)})"


class TiledHeads(Pattern):
    """An ``H``-head pattern repeated ``copies`` times: head ``c * H + h`` behaves as head ``h``.

    Used to fold the batch into the heads (per-batch masks, adaptive layouts).
    """

    def __init__(self, pattern: Pattern, copies: int) -> None:
        self.base, self.copies = pattern, copies
        self.num_heads = pattern.num_heads * copies

    def allowed(self, h, q, k):
        return self.predicate(q.device)(h, q, k)

    def predicate(self, device):
        f, n = self.base.predicate(device), self.base.num_heads
        return lambda h, q, k: f(torch.remainder(h, n), q, k)

    def _row_tiles(self, q_len, k_len, block_size, device, rows):
        a, f = self.base._row_tiles(q_len, k_len, block_size, device, rows)
        shape = (self.base.num_heads, *a.shape[1:])
        return a.expand(shape).repeat(self.copies, 1, 1), f.expand(shape).repeat(self.copies, 1, 1)

    def _key(self):
        base = self.base._key()
        return None if base is None else (type(self.base), base, self.copies)

    def __repr__(self) -> str:
        return f"tiled({self.base!r}, copies={self.copies})"


def tile_batch(pattern: Pattern, copies: int) -> Pattern:
    """``pattern`` over ``copies`` batch elements folded into the heads (head ``c * H + h``
    behaves as head ``h``): a 1-head pattern unchanged (it broadcasts over any number of
    heads), an ``H``-head one as :class:`TiledHeads` (``copies * H`` heads)."""
    return pattern if pattern.num_heads == 1 or copies == 1 else TiledHeads(pattern, copies)
