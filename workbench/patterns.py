"""Attention patterns: which (query, key) pairs may attend, per head.

A :class:`Pattern` is defined once, at token level, by a vectorized predicate
``allowed(h, q, k)`` over int64 head, query-position and key-position tensors (any
broadcastable shapes; ``True`` = may attend, the polarity of SDPA's boolean mask and of
FlexAttention's ``mask_mod``). Every pattern also has an *exact* block-level layout
(:meth:`Pattern.block_structure`) computed analytically, in memory proportional to
``(seq_len / block_size)**2`` and never ``seq_len**2``. Where an analytic answer is not
available (unions and intersections of partial tiles) only the undecided tiles are evaluated
token by token, which costs time proportional to the number of such tiles.

Patterns compose: ``a | b`` allows a pair if either does, ``a & b`` if both do.

A pattern has ``num_heads`` heads; ``num_heads == 1`` means "the same for every head" and
broadcasts against any number of heads.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .layout import BlockLayout, LayoutStats, block_extents, cells_to_tiles, num_blocks

MaskFn = Callable[[Tensor, Tensor, Tensor], Tensor]

__all__ = [
    "Pattern",
    "causal",
    "check_dilation_pairs",
    "describe",
    "dilated",
    "dilated_branch",
    "full",
    "global_local",
    "global_tokens",
    "head_groups",
    "local_window",
    "random_blocks",
    "strided",
]

_TILE_EVAL_BUDGET = 1 << 24  # token pairs evaluated per chunk when refining tiles
_TOKEN_MASK_LIMIT = 1 << 28  # largest H*S*S element count token_mask() will build


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
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
        """Exact (any, all) bool ``[H, nq, nk]`` of this pattern. Subclasses override."""
        raise NotImplementedError

    def block_structure(
        self,
        seq_len: int,
        block_size: int,
        device: torch.device | str = "cpu",
        *,
        k_len: int | None = None,
    ) -> BlockLayout:
        """Exact :class:`BlockLayout` (active and full tiles) at ``block_size``.

        ``k_len`` defaults to ``seq_len`` (self-attention); give it for a rectangular problem.
        """
        _check_int("seq_len", seq_len, 1)
        _check_int("block_size", block_size, 1)
        k_len = seq_len if k_len is None else _check_int("k_len", k_len, 1)
        dev = torch.device(device)
        any_, all_ = self._tiles(seq_len, k_len, block_size, dev)
        return BlockLayout(any_, all_ & any_, seq_len, k_len, block_size)

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
        lq, lk = lay.block_lengths()
        area = lq[None, :, None] * lk[None, None, :]
        total = int((area * lay.full).sum())
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



def _combined_heads(a: Pattern, b: Pattern) -> int:
    if a.num_heads == b.num_heads or b.num_heads == 1:
        return a.num_heads
    if a.num_heads == 1:
        return b.num_heads
    raise ValueError(
        f"cannot combine a {a.num_heads}-head pattern with a {b.num_heads}-head pattern; "
        "heads must match or one of them must be head-independent (1 head)"
    )


def _evaluate_tiles(
    pattern: Pattern, tiles: Tensor, q_len: int, k_len: int, block_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Evaluate ``pattern`` token by token inside the tiles ``tiles`` (int64 ``[N, 3]``).

    Returns (allowed-pair count, any, all) per tile; padding positions never count, and
    "all" means every real pair of the tile is allowed.
    """
    b = block_size
    dev = tiles.device
    off = torch.arange(b, device=dev)
    per = max(1, _TILE_EVAL_BUDGET // (b * b))
    counts, anys, alls = [], [], []
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


class _Combination(Pattern):
    """Two patterns joined elementwise by ``op`` (written ``symbol``)."""

    symbol = ""

    def __init__(self, a: Pattern, b: Pattern) -> None:
        self.a, self.b = a, b
        self.num_heads = _combined_heads(a, b)

    @staticmethod
    def op(x: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def allowed(self, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return self.predicate(q.device)(h, q, k)

    def predicate(self, device):
        fa, fb, op = self.a.predicate(device), self.b.predicate(device), self.op
        return lambda h, q, k: op(fa(h, q, k), fb(h, q, k))

    def __repr__(self) -> str:
        return f"({self.a!r} {self.symbol} {self.b!r})"


class Union(_Combination):
    """Pairs allowed by either pattern (``a | b``)."""

    symbol = "|"
    op = staticmethod(operator.or_)

    def _tiles(self, q_len, k_len, block_size, device):
        a_any, a_all = self.a._tiles(q_len, k_len, block_size, device)
        b_any, b_all = self.b._tiles(q_len, k_len, block_size, device)
        any_ = a_any | b_any
        all_ = a_all | b_all
        # Two partial tiles may still cover a tile together: decide those token by token.
        undecided = (a_any & b_any & ~all_).expand(self.num_heads, *any_.shape[1:])
        _, r_all = _refine(self, undecided, q_len, k_len, block_size)
        return any_, all_ | r_all


class Intersection(_Combination):
    """Pairs allowed by both patterns (``a & b``)."""

    symbol = "&"
    op = staticmethod(operator.and_)

    def _tiles(self, q_len, k_len, block_size, device):
        a_any, a_all = self.a._tiles(q_len, k_len, block_size, device)
        b_any, b_all = self.b._tiles(q_len, k_len, block_size, device)
        all_ = a_all & b_all
        sure = (a_all & b_any) | (a_any & b_all)
        # Two partial tiles may or may not overlap: decide those token by token.
        undecided = (a_any & b_any & ~sure).expand(self.num_heads, *sure.shape[1:])
        r_any, _ = _refine(self, undecided, q_len, k_len, block_size)
        return sure | r_any, all_


# --------------------------------------------------------------------- primitives
def _extents(q_len: int, k_len: int, block_size: int, device) -> tuple[Tensor, ...]:
    """(q_first, q_last, k_first, k_last) broadcast as ``[1, nq, 1]`` and ``[1, 1, nk]``."""
    qe = block_extents(q_len, block_size, device)
    ke = block_extents(k_len, block_size, device)
    return qe[None, :, 0, None], qe[None, :, 1, None], ke[None, None, :, 0], ke[None, None, :, 1]


class Full(Pattern):
    """Every pair (dense attention)."""

    def allowed(self, h, q, k):
        return torch.ones_like(q + k, dtype=torch.bool)

    def _tiles(self, q_len, k_len, block_size, device):
        shape = (1, num_blocks(q_len, block_size), num_blocks(k_len, block_size))
        t = torch.ones(shape, dtype=torch.bool, device=device)
        return t, t.clone()

    def _count_pairs(self, seq_len):
        return seq_len * seq_len

    def __repr__(self) -> str:
        return "full()"


class Band(Pattern):
    """Pairs whose offset ``k - q`` lies in ``[lo, hi]`` (local windows, causality).

    ``lo=None`` means no lower bound. (No sentinel number stands in for infinity: kernels
    evaluate positions in int32, where a large constant would silently wrap.)
    """

    def __init__(self, lo: int | None, hi: int, name: str) -> None:
        self.lo, self.hi, self.name = lo, hi, name

    def allowed(self, h, q, k):
        d = k - q
        return d <= self.hi if self.lo is None else (d >= self.lo) & (d <= self.hi)

    def _tiles(self, q_len, k_len, block_size, device):
        qf, ql, kf, kl = _extents(q_len, k_len, block_size, device)
        dmin, dmax = kf - ql, kl - qf  # offsets k - q take every integer in [dmin, dmax]
        any_, all_ = dmin <= self.hi, dmax <= self.hi
        if self.lo is not None:
            any_, all_ = any_ & (dmax >= self.lo), all_ & (dmin >= self.lo)
        return any_, all_

    def _count_pairs(self, seq_len):
        q = torch.arange(seq_len, dtype=torch.int64)
        first = torch.zeros_like(q) if self.lo is None else torch.clamp(q + self.lo, min=0)
        last = torch.clamp(q + self.hi, max=seq_len - 1)
        return int(torch.clamp(last - first + 1, min=0).sum())

    def __repr__(self) -> str:
        return self.name


class GlobalTokens(Pattern):
    """The first ``n`` tokens attend everything and are attended by everything."""

    def __init__(self, n: int) -> None:
        self.n = n

    def allowed(self, h, q, k):
        return (q < self.n) | (k < self.n)

    def _tiles(self, q_len, k_len, block_size, device):
        qf, ql, kf, kl = _extents(q_len, k_len, block_size, device)
        return (qf < self.n) | (kf < self.n), (ql < self.n) | (kl < self.n)

    def _count_pairs(self, seq_len):
        rest = max(seq_len - self.n, 0)
        return seq_len * seq_len - rest * rest

    def __repr__(self) -> str:
        return f"global_tokens({self.n})"


class Strided(Pattern):
    """Pairs whose distance is a multiple of ``stride`` (Sparse Transformer's strided head)."""

    def __init__(self, stride: int) -> None:
        self.stride = stride

    def allowed(self, h, q, k):
        return torch.remainder(k - q, self.stride) == 0

    def _tiles(self, q_len, k_len, block_size, device):
        qf, ql, kf, kl = _extents(q_len, k_len, block_size, device)
        dmin, dmax = kf - ql, kl - qf
        s = self.stride
        any_ = torch.div(dmax, s, rounding_mode="floor") * s >= dmin
        all_ = (dmin == dmax) & (torch.remainder(dmin, s) == 0) if s > 1 else torch.ones_like(any_)
        return any_, all_

    def _count_pairs(self, seq_len):
        d = torch.arange(0, seq_len, self.stride, dtype=torch.int64)  # |k - q| multiples
        return int(2 * (seq_len - d).sum() - seq_len)

    def __repr__(self) -> str:
        return f"strided({self.stride})"


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

    def allowed(self, h, q, k):
        return self.predicate(q.device)(h, q, k)

    def predicate(self, device):
        tw, tr, ts = (torch.tensor(x, device=device) for x in (self.w, self.r, self.s))

        def kept_pair(h, q, k):
            w, r, s = tw[h], tr[h], ts[h]
            qo, ko = torch.remainder(q, w), torch.remainder(k, w)
            seg_q = torch.div(q, w, rounding_mode="floor")
            same_segment = seg_q == torch.div(k, w, rounding_mode="floor")
            return same_segment & (torch.remainder(qo, r) == s) & (torch.remainder(ko, r) == s)

        return kept_pair

    def _kept_segments(self, length: int, block_size: int, device) -> tuple[Tensor, Tensor, Tensor]:
        """Per head and block: first and last segment holding a kept position, or empty.

        Returns (lo, hi, all_seg), each int64 ``[H, n]``; ``lo > hi`` when the block holds no
        kept position; ``all_seg`` is the segment index when every position of the block is
        kept and lies in that one segment, else -1.
        """
        ext = block_extents(length, block_size, device)
        a, e = ext[None, :, 0], ext[None, :, 1]  # first and last position of each block
        w = torch.tensor(self.w, device=device)[:, None]
        r = torch.tensor(self.r, device=device)[:, None]
        s = torch.tensor(self.s, device=device)[:, None]
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
        lo = torch.where(nonempty, first // w, torch.ones_like(first))
        hi = torch.where(nonempty, last // w, torch.zeros_like(last))
        one_segment = (a // w) == (e // w)
        all_kept = (r == 1) | ((a == e) & (torch.remainder(a - m * w, r) == s))
        all_seg = torch.where(one_segment & all_kept & nonempty, m, torch.full_like(m, -1))
        return lo, hi, all_seg

    def _tiles(self, q_len, k_len, block_size, device):
        qlo, qhi, qall = self._kept_segments(q_len, block_size, device)
        klo, khi, kall = self._kept_segments(k_len, block_size, device)
        lo = torch.maximum(qlo[:, :, None], klo[:, None, :])
        hi = torch.minimum(qhi[:, :, None], khi[:, None, :])
        any_ = lo <= hi
        all_ = (qall[:, :, None] >= 0) & (qall[:, :, None] == kall[:, None, :])
        return any_, all_

    def _count_pairs(self, seq_len):
        total = 0
        for w, r, s in zip(self.w, self.r, self.s):
            starts = torch.arange(0, seq_len, w, dtype=torch.int64)
            lengths = torch.clamp(seq_len - starts, max=w)
            kept = torch.clamp(torch.div(lengths - s + r - 1, r, rounding_mode="floor"), min=0)
            total += int((kept * kept).sum())
        return total

    def __repr__(self) -> str:
        return self.name


def _hash_cells(seed: int, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
    """Deterministic 24-bit hash of (seed, head, cell row, cell column), elementwise.

    Computed in int64 whatever the index dtype (kernels pass int32), keeping the low 32 bits.
    """
    h, i, j = h.to(torch.int64), i.to(torch.int64), j.to(torch.int64)
    x = (h * 0x9E3779B1 + i * 0x85EBCA77 + j * 0xC2B2AE3D + seed * 0x27D4EB2F) & 0xFFFFFFFF
    for mul in (0x7FEB352D, 0x846CA68B):
        x = x ^ (x >> 16)
        x = (x * mul) & 0xFFFFFFFF
    x = x ^ (x >> 16)
    return x >> 8


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
        return _hash_cells(self.seed, hh, q // c, k // c) < self.threshold

    def _tiles(self, q_len, k_len, block_size, device):
        c = self.cell
        nq, nk = num_blocks(q_len, c), num_blocks(k_len, c)
        h = torch.arange(self.num_heads, device=device)[:, None, None]
        i = torch.arange(nq, device=device)[None, :, None]
        j = torch.arange(nk, device=device)[None, None, :]
        on = self.allowed(h, i * c, j * c)  # [H, nq, nk] cell grid
        return cells_to_tiles(on, c, q_len, k_len, block_size)

    def _count_pairs(self, seq_len):
        c = self.cell
        n = num_blocks(seq_len, c)
        size = torch.clamp(seq_len - torch.arange(n, dtype=torch.int64) * c, max=c)
        h = torch.arange(self.num_heads)[:, None, None]
        cells = torch.arange(n)
        on = self.allowed(h, cells[None, :, None] * c, cells[None, None, :] * c).to(torch.int64)
        return int((on * size[None, :, None] * size[None, None, :]).sum())

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
    _check_int("window", window, 1)
    name = f"local_window({window}{', causal=True' if causal else ''})"
    return Band(-(window - 1), 0 if causal else window - 1, name)


def global_tokens(num_global: int) -> Pattern:
    """The first ``num_global`` tokens attend, and are attended by, every token."""
    _check_int("num_global", num_global, 1)
    return GlobalTokens(num_global)


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
    if not isinstance(density, (int, float)) or isinstance(density, bool):
        raise TypeError(f"density must be a float in (0, 1], got {density!r}")
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    _check_int("seed", seed, 0)
    _check_int("cell", cell, 1)
    _check_int("num_heads", num_heads, 1)
    return RandomBlocks(float(density), seed, cell, num_heads)


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
