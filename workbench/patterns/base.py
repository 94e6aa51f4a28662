"""The :class:`Pattern` base class (a token predicate with an exact block layout), the layouts
of its default hooks (Toeplitz for an offset rule, else tile by tile, token by token) and the
argument checks every builder uses."""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence

import torch
from torch import Tensor

from ..blockmask import block_mask_from_layout
from ..layout import (
    MAX_POSITION,
    BlockLayout,
    LayoutSource,
    LayoutStats,
    block_extents,
    num_blocks,
    tile_sum,
)

MaskFn = Callable[[Tensor, Tensor, Tensor], Tensor]
FlexMaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
"""FlexAttention's ``mask_mod(b, h, q_idx, kv_idx) -> bool``."""
OffsetFn = Callable[[Tensor], Tensor]
"""``allowed(k - q)``, elementwise over int64 offsets, for patterns that depend on it alone."""

_TILE_EVAL_BUDGET = 1 << 24  # token pairs evaluated per chunk when tiles are evaluated
_TOKEN_MASK_LIMIT = 1 << 28  # largest H*S*S element count token_mask() will build


def check_positive_int(name: str, value: object, maximum: int | None = MAX_POSITION) -> int:
    """``value`` if it is an int (not a bool) in ``[1, maximum]``, else a ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return check_int(name, value, 1, maximum)


def check_density(density: object, meaning: str = "") -> float:
    """``density`` as a float in ``(0, 1]``, else a ``TypeError`` (not a number, or a bool) or
    ``ValueError`` (outside, or NaN) naming it."""
    what = f" ({meaning})" if meaning else ""
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"density must be a float in (0, 1]{what}, got {density!r}")
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density must be in (0, 1]{what}, got {density}")
    return float(density)


def check_int(name: str, value: object, minimum: int,
              maximum: int | None = MAX_POSITION) -> int:
    """``value`` if it is an int (not a bool) in ``[minimum, maximum]``, else a ``TypeError``
    or ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum} (positions are int32), got {value}")
    return value


def check_ints(name: str, values: object, minimum: int) -> list[int]:
    """``values`` (a sequence, 1-D tensor or array) as a list of ints ``>= minimum``, else a
    ``TypeError`` or ``ValueError`` naming it (or the entry at fault)."""
    items = values.tolist() if hasattr(values, "tolist") else values
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise TypeError(f"{name} must be a sequence of ints, got {values!r}")
    if not items:
        raise ValueError(f"{name} must be a non-empty sequence of ints, got {values!r}")
    return [check_int(f"{name}[{i}]", v, minimum) for i, v in enumerate(items)]


class Pattern:
    """A set of allowed (head, query, key) triples.

    A subclass defines :meth:`allowed` (or :meth:`predicate`, when it reads tensors that must be
    on the device of the call); that alone makes it run everywhere, its layout evaluated tile by
    tile. The optional hooks :meth:`tiles`, :meth:`offset_rule`, :meth:`period`, :meth:`grain`,
    :meth:`key` and :meth:`count_pairs` make it fast and comparable.
    """

    num_heads: int = 1
    # the classes ``a | b`` and ``a & b`` build, set by .algebra (where they subclass Pattern)
    _union: type[Pattern]
    _intersection: type[Pattern]

    # ----------------------------------------------------------------- the hooks
    def allowed(self, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        """Bool, the broadcast of integer tensors ``h``, ``q``, ``k`` (head, real absolute
        positions): may query ``q`` of head ``h`` attend ``k``. Elementwise tensor ops only (it
        serves as a FlexAttention ``mask_mod``). Default: :meth:`predicate` on ``q``'s device.
        """
        if type(self).predicate is Pattern.predicate:
            raise NotImplementedError(f"{type(self).__name__} must define allowed(h, q, k)")
        return self.predicate(q.device)(h, q, k)

    def tiles(self, q_len: int, k_len: int, block_size: int, device: torch.device,
              rows: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Exact (any, all) bool ``[H or 1, r1 - r0, nk]`` of the query blocks ``rows = (r0,
        r1)`` against every key block (read-only; may be views): the tile holds an allowed pair;
        every real pair of it is allowed. Default: :meth:`offset_rule`'s, else token by token.
        """
        rule = self.offset_rule()
        if rule is not None:
            return offset_tiles(rule, q_len, k_len, block_size, device, rows)
        shape = (self.num_heads, rows[1] - rows[0], num_blocks(k_len, block_size))
        undecided = torch.ones(shape, dtype=torch.bool, device=device)
        return refine_tiles(self, undecided, q_len, k_len, block_size, rows[0])

    def offset_rule(self) -> OffsetFn | None:
        """``allowed`` as a function of ``d = k - q`` alone (head-independent), else None."""
        return None

    def period(self) -> int | None:
        """A shift ``P`` with ``allowed(h, q + P, k + P) == allowed(h, q, k)``, or None."""
        return None if self.offset_rule() is None else 1

    def grain(self) -> int:
        """A side ``g`` with ``allowed`` constant on aligned ``g x g`` squares: equal for all
        real ``q, k`` of the same ``(q // g, k // g)`` per head, so masks may be evaluated once
        per square. Default 1 (no claim); unions and intersections take their parts' gcd."""
        return 1

    def key(self) -> Hashable | None:
        """The values that define this pattern's pairs (equal keys, equal patterns), or None."""
        return None

    def count_pairs(self, seq_len: int) -> int | None:
        """Closed-form allowed-pair count at ``seq_len`` (summed over heads), or None."""
        return None

    # ----------------------------------------------------------------- identity
    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if type(self) is not type(other):
            return False
        key = self.key()
        return key is not None and key == other.key()

    def __hash__(self) -> int:
        cached = self.__dict__.get("_hash")
        if cached is None:  # a pattern never changes after construction: hash it once
            key = self.key()
            cached = object.__hash__(self) if key is None else hash((type(self).__name__, key))
            self.__dict__["_hash"] = cached
        return cached

    def __or__(self, other: Pattern) -> Pattern:
        return self._union(self, other)

    def __and__(self, other: Pattern) -> Pattern:
        return self._intersection(self, other)

    # ----------------------------------------------------------------- token level
    def dense_form(self) -> str | None:
        """``"full"`` if this pattern allows every pair, ``"causal"`` if exactly ``k <= q``, else
        ``None``, judged from its structure: what SDPA computes without a mask."""
        return None

    def predicate(self, device: torch.device | str) -> MaskFn:
        """:meth:`allowed` with every tensor it reads already on ``device`` (it creates none
        when called, so kernels can trace it)."""
        return self.allowed

    def mask_mod(self, device: torch.device | str | None = None) -> FlexMaskMod:
        """FlexAttention's ``mask_mod(b, h, q_idx, kv_idx)`` of this pattern on ``device``
        (``None``: the default), ignoring ``b`` (and ``h`` for a 1-head pattern)."""
        f = head_predicate(self, _device(device))
        return lambda b, h, q_idx, kv_idx: f(h, q_idx, kv_idx)

    def block_mask(self, seq_len: int, block_size: int = 128,
                   device: torch.device | str | None = None, k_len: int | None = None):
        """FlexAttention's ``BlockMask`` of ``seq_lengths=(seq_len, k_len or seq_len)``, batch 1
        and ``H`` (or 1) heads, from the exact layout (full tiles skip :meth:`mask_mod`)."""
        device = _device(device)
        lay = self.block_structure(seq_len, block_size, device, k_len=k_len)
        return block_mask_from_layout(lay, head_predicate(self, device))

    def token_mask(self, seq_len: int, device: torch.device | str = "cpu") -> Tensor:
        """Dense bool mask ``[H or 1, S, S]``; a ``ValueError`` past a size limit."""
        check_int("seq_len", seq_len, 1)
        if self.num_heads * seq_len * seq_len > _TOKEN_MASK_LIMIT:
            raise ValueError(f"token_mask(seq_len={seq_len}) would build {self.num_heads} x "
                             f"{seq_len} x {seq_len} booleans; use block_layout(seq_len, "
                             "block_size) at this length")
        pos = torch.arange(seq_len, device=device)
        h = torch.arange(self.num_heads, device=device)[:, None, None]
        m = self.allowed(h, pos[None, :, None], pos[None, None, :])
        return m.expand(self.num_heads, seq_len, seq_len)

    # ----------------------------------------------------------------- block level
    def block_structure(self, seq_len: int, block_size: int, device: torch.device | str = "cpu", *,
                        k_len: int | None = None,
                        rows: tuple[int, int] | None = None) -> BlockLayout:
        """Exact :class:`BlockLayout` at ``block_size`` (``k_len`` defaults to ``seq_len``);
        ``rows = (first, end)`` builds only those query blocks, in the memory of those rows."""
        check_int("seq_len", seq_len, 1)
        check_int("block_size", block_size, 1)
        k_len = seq_len if k_len is None else check_int("k_len", k_len, 1)
        nq = num_blocks(seq_len, block_size)
        r0, r1 = (0, nq) if rows is None else rows
        if not (isinstance(r0, int) and isinstance(r1, int) and 0 <= r0 < r1 <= nq):
            raise ValueError(f"rows must be (first, end) query blocks with 0 <= first < end <= "
                             f"{nq}, got {rows!r}")
        any_, all_ = self.tiles(seq_len, k_len, block_size, torch.device(device), (r0, r1))
        grid = (r1 - r0, num_blocks(k_len, block_size))
        if any(t.dtype != torch.bool or t.dim() != 3 or tuple(t.shape[1:]) != grid
               or t.shape[0] not in (1, self.num_heads) for t in (any_, all_)):
            raise ValueError(f"{type(self).__name__}.tiles must return two bool tensors "
                             f"[1 or {self.num_heads}, {grid[0]}, {grid[1]}], got "
                             f"{tuple(any_.shape)} and {tuple(all_.shape)}")
        any_, all_ = torch.broadcast_tensors(any_, all_)
        return BlockLayout(any_, all_, min(r1 * block_size, seq_len) - r0 * block_size, k_len,
                           block_size, LayoutSource(self))

    def block_layout(self, seq_len: int, block_size: int,
                     device: torch.device | str = "cpu") -> Tensor:
        """Bool ``[H, nq, nk]``: which tiles hold at least one allowed pair."""
        return self.block_structure(seq_len, block_size, device).active

    def stats(self, seq_len: int, block_size: int) -> LayoutStats:
        """Tile counts and the computed density at this length and block size."""
        return self.block_structure(seq_len, block_size).stats()

    def density(self, seq_len: int, block_size: int | None = None) -> float:
        """Fraction of the ``S x S`` pairs computed, averaged over heads: the area of the active
        tiles at ``block_size``, or with ``None`` the fraction of pairs allowed."""
        if block_size is not None:
            return self.stats(seq_len, block_size).density
        return self.allowed_pairs(seq_len) / (self.num_heads * seq_len * seq_len)

    def allowed_pairs(self, seq_len: int, block_size: int = 64) -> int:
        """Exact number of allowed (head, query, key) triples, summed over heads."""
        check_int("seq_len", seq_len, 1)
        exact = self.count_pairs(seq_len)
        if exact is not None:
            return exact
        lay = self.block_structure(seq_len, block_size)
        partial = (lay.active & ~lay.full).nonzero()
        counts, _, _ = evaluate_tiles(self, partial, seq_len, seq_len, block_size)
        return int(tile_sum(lay.full, *lay.block_lengths()).sum()) + int(counts.sum())


def head_predicate(pattern: Pattern, device: torch.device | str) -> MaskFn:
    """``pattern.predicate(device)``, callable with any head index (a 1-head pattern is asked
    about head 0, so it broadcasts over any number of heads)."""
    f = pattern.predicate(device)
    if pattern.num_heads != 1 or pattern.offset_rule() is not None:
        return f
    return lambda h, q, k: f(h * 0, q, k)


def _device(device: torch.device | str | None) -> torch.device:
    return torch.get_default_device() if device is None else torch.device(device)


# --------------------------------------------------------------------- offset rules
# A tile holds every offset from ``k_first - q_last`` to ``k_last - q_first``, so a prefix count
# of the rule decides it in O(1); uniform tiles depend only on their block diagonal (a Toeplitz
# layout), and the ragged last block row and column are computed on their own.
def _toeplitz(diag: Tensor, nq: int, nk: int, rows: tuple[int, int]) -> Tensor:
    """Rows ``[r0, r1)`` of the ``[nq, nk]`` matrix whose entry ``(i, j)`` is
    ``diag[j - i + nq - 1]`` (one copy, of those rows)."""
    r0, r1 = rows
    diag = diag.contiguous()
    # entry (i, j) = diag[nq - r1 + i + j]: rows nq - r1 ... nq - 1 - r0, flipped
    hankel = diag.as_strided((r1 - r0, nk), (1, 1), diag.storage_offset() + nq - r1)
    return hankel.flip(0)


def offset_tiles(rule: OffsetFn, q_len: int, k_len: int, block_size: int, device: torch.device,
                 rows: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Exact (any, all) ``[1, r1 - r0, nk]`` (query block rows ``rows = (r0, r1)``) of a
    pattern allowing ``(q, k)`` iff ``rule(k - q)``."""
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


# --------------------------------------------------------------------- tile evaluation
def _canonical_tiles(pattern: Pattern, tiles: Tensor, q_len: int, k_len: int,
                     block_size: int) -> tuple[Tensor, Tensor]:
    """(distinct tiles ``[U, 3]``, index of every tile in them) of ``tiles`` (int64 ``[N, 3]``
    of head, row, column) up to the pattern's period: unpadded tiles move back along their
    diagonal by multiples of a period's blocks."""
    period = pattern.period()
    m = None if period is None else period // math.gcd(period, block_size)  # blocks per period
    if m is None or tiles.shape[0] < 2 or m * block_size >= max(q_len, k_len):
        return tiles, torch.arange(tiles.shape[0], device=tiles.device)
    h, i, j = tiles.unbind(1)
    ragged = ((i + 1) * block_size > q_len) | ((j + 1) * block_size > k_len)
    shift = torch.where(ragged, 0, torch.div(torch.minimum(i, j), m, rounding_mode="floor") * m)
    key = torch.stack([h, i - shift, j - shift, ragged.to(torch.int64)], 1)
    distinct, inverse = torch.unique(key, dim=0, return_inverse=True)
    return distinct[:, :3], inverse


def evaluate_tiles(pattern: Pattern, tiles: Tensor, q_len: int, k_len: int,
                   block_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """(allowed-pair count, any, all) of every tile of ``tiles`` (int64 ``[N, 3]`` of head,
    absolute query block, key block), token by token in bounded chunks, padding never counted."""
    distinct, inverse = _canonical_tiles(pattern, tiles, q_len, k_len, block_size)
    b = block_size
    dev = tiles.device
    off = torch.arange(b, device=dev)
    per = max(1, _TILE_EVAL_BUDGET // (b * b))
    counts = [torch.zeros(0, dtype=torch.int64, device=dev)]
    anys = [torch.zeros(0, dtype=torch.bool, device=dev)]
    alls = [anys[0]]
    for start in range(0, distinct.shape[0], per):
        t = distinct[start : start + per]
        h = t[:, 0, None, None]
        q = t[:, 1, None, None] * b + off[None, :, None]
        k = t[:, 2, None, None] * b + off[None, None, :]
        real = (q < q_len) & (k < k_len)
        m = pattern.allowed(h, q.clamp(max=q_len - 1), k.clamp(max=k_len - 1)) & real
        counts.append(m.sum((1, 2)))
        anys.append(m.any(2).any(1))
        alls.append((m | ~real).all(2).all(1))
    return torch.cat(counts)[inverse], torch.cat(anys)[inverse], torch.cat(alls)[inverse]


def refine_tiles(pattern: Pattern, undecided: Tensor, q_len: int, k_len: int, block_size: int,
                 first_row: int = 0) -> tuple[Tensor, Tensor]:
    """Token-level (any, all) of ``pattern`` on the tiles flagged by bool ``undecided [H, r,
    nk]`` (query blocks ``first_row ...``), False elsewhere."""
    any_ = torch.zeros_like(undecided)
    all_ = torch.zeros_like(undecided)
    idx = undecided.nonzero()
    at = idx + torch.tensor([0, first_row, 0], device=idx.device)  # absolute block rows
    where = tuple(idx.T)
    _, any_[where], all_[where] = evaluate_tiles(pattern, at, q_len, k_len, block_size)
    return any_, all_


def describe(pattern: Pattern, seq_len: int, block_size: int) -> dict[str, float | int | str]:
    """One-line summary of a pattern at a length and block size (for tables and notebooks)."""
    st = pattern.stats(seq_len, block_size)
    useful = pattern.density(seq_len)
    return {"pattern": repr(pattern), "seq_len": seq_len, "block_size": block_size,
            "heads": pattern.num_heads, "useful_density": useful, "computed_density": st.density,
            "block_density": st.block_density, "full_tiles": st.full_fraction,
            "waste": st.density / useful if useful else math.inf}
