"""Score modifications: functions that change each attention score before the softmax.

A score mod has FlexAttention's signature ``score_mod(score, b, h, q, k) -> score``: the scaled
score of query ``q`` and key ``k`` (absolute int64 positions) in batch element ``b`` and head
``h``. It must be elementwise (backends call it on broadcastable tiles, grids or scalars, only at
positions inside the sequence) and runs before the pattern's mask; ``-inf`` drops a pair.
Gradients reach the tensors it reads as :func:`reads` finds them (a module's parameters,
closure cells, ``partial`` arguments, a bound method's object, named globals); ``blockwise``
raises on any other tensor that requires grad, rather than give it none.
"""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from .patterns import check_positive_int

__all__ = ["RelativePositionBias", "ScoreMod", "alibi", "alibi_slopes", "check_score_mod",
           "missed_reads", "modded", "reads", "soft_cap"]

ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
"""``score_mod(score, b, h, q, k) -> score``, elementwise over broadcastable tensors."""


def check_score_mod(score_mod: object) -> ScoreMod | None:
    """``score_mod`` if it is None or callable; a ``TypeError`` naming it otherwise."""
    if score_mod is not None and not callable(score_mod):
        raise TypeError(f"score_mod must be a function score_mod(score, b, h, q_idx, kv_idx) -> "
                        f"score or None, got {type(score_mod).__name__}")
    return score_mod


def modded(score_mod: ScoreMod, s: Tensor, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
    """``score_mod(s, b, h, q, k)`` in ``s``'s shape and dtype; raises naming ``score_mod`` when
    it returns something else than a floating tensor that broadcasts to ``s``."""
    out = score_mod(s, b, h, q, k)
    if not isinstance(out, Tensor) or not out.is_floating_point():
        raise TypeError(f"score_mod must return a floating-point tensor, got "
                        f"{getattr(out, 'dtype', type(out).__name__)}")
    if out.shape != s.shape:
        try:
            out = out.expand(s.shape)
        except RuntimeError:
            raise ValueError(f"score_mod must be elementwise: scores {tuple(s.shape)} came back "
                             f"as {tuple(out.shape)}") from None
    return out.to(s.dtype)


# --------------------------------------------------------------------- what a mod reads
def _found(x: object, seen: set[int], depth: int) -> Iterator[Tensor]:
    """Tensors reachable from ``x`` through the containers a score mod keeps them in."""
    if depth > 6 or id(x) in seen or isinstance(x, (str, bytes, int, float, type(None))):
        return
    seen.add(id(x))
    if isinstance(x, Tensor):
        yield x
        return
    if isinstance(x, nn.Module):
        yield from x.parameters()
        yield from x.buffers()
        return
    if isinstance(x, functools.partial):
        inner = (x.func, *x.args, *x.keywords.values())
    elif isinstance(x, (list, tuple, dict)):
        inner = x.values() if isinstance(x, dict) else x
    elif hasattr(x, "__func__") and hasattr(x, "__self__"):  # a bound method
        inner = (x.__self__, x.__func__)
    elif hasattr(x, "__code__"):  # a Python function: its cells, defaults, named globals
        cells = [c.cell_contents for c in x.__closure__ or () if c != _EMPTY_CELL]
        names = [x.__globals__[n] for n in x.__code__.co_names if n in x.__globals__]
        inner = [y for y in (*cells, *(x.__defaults__ or ()), *names)
                 if isinstance(y, (Tensor, nn.Module, functools.partial, list, tuple, dict))
                 or callable(y) and hasattr(y, "__code__")]
    elif callable(x) and hasattr(x, "__dict__"):  # an object with __call__: its attributes
        inner = vars(x).values()
    else:
        return
    for y in inner:
        yield from _found(y, seen, depth + 1)


_EMPTY_CELL = types.CellType()  # a closure cell equals it only while unfilled


def reads(score_mod: ScoreMod) -> tuple[Tensor, ...]:
    """The tensors ``score_mod`` reads that require gradients (see the module's docs)."""
    return tuple({id(t): t for t in _found(score_mod, set(), 0) if t.requires_grad}.values())


def missed_reads(out: Tensor, known: tuple[Tensor, ...]) -> bool:
    """Whether ``out``'s autograd graph reaches a leaf that requires grad through none of
    ``known`` (leaves, or intermediate tensors whose producers are not searched)."""
    leaves = {id(t) for t in known if t.grad_fn is None}
    stops = {t.grad_fn for t in known if t.grad_fn is not None}
    todo, seen = [out.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen or node in stops:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)  # an AccumulateGrad node: a leaf
        if var is not None and id(var) not in leaves:
            return True
        todo.extend(n for n, _ in node.next_functions)
    return False


# --------------------------------------------------------------------- built-ins
def alibi_slopes(num_heads: int) -> list[float]:
    """ALiBi's head slopes: ``2 ** (-8 i / n)`` for ``i = 1..n`` when ``n`` is a power of two;
    otherwise those of the largest power of two ``p < n``, then every other slope of ``2p``
    heads (``2 ** (-4 (2 j + 1) / p)``) for the remaining heads (Press et al., 2022)."""
    check_positive_int("num_heads", num_heads)
    return _slopes(torch.arange(num_heads, dtype=torch.float64), num_heads).tolist()


def _slopes(h: Tensor, num_heads: int) -> Tensor:
    """:func:`alibi_slopes` of the heads ``h`` (computed, not looked up: any device, compiles)."""
    p = 1 << (num_heads.bit_length() - 1)
    return torch.where(h < p, torch.exp2(-8.0 * (h + 1) / p),
                       torch.exp2(-4.0 * (2 * (h - p) + 1) / p))


def alibi(num_heads: int, *, symmetric: bool = False) -> ScoreMod:
    """ALiBi: ``score + m_h * (k - q)`` with :func:`alibi_slopes` ``m_h``: a penalty linear in
    how far a key lies before its query (meant with causal patterns; keys after the query get a
    bonus). ``symmetric=True``: ``score - m_h * |k - q|`` for bidirectional attention."""
    check_positive_int("num_heads", num_heads)

    def alibi_bias(score: Tensor, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        d = k - q
        return score + _slopes(h, num_heads) * (-d.abs() if symmetric else d)

    return alibi_bias


def soft_cap(cap: float) -> ScoreMod:
    """Logit soft-capping: ``cap * tanh(score / cap)`` keeps every score inside ``(-cap, cap)``."""
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not 0 < cap < math.inf:
        raise ValueError(f"cap must be a positive finite number, got {cap!r}")
    cap = float(cap)

    def soft_capped(score: Tensor, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return cap * torch.tanh(score / cap)

    return soft_capped


class RelativePositionBias(nn.Module):
    """A learned bias per head and relative distance ``d = k - q``, added to the score.

    ``num_buckets=None``: one parameter per clipped distance ``clamp(d, -max_distance,
    max_distance)`` (``2 max_distance + 1`` per head). Otherwise ``num_buckets`` (even, >= 4)
    buckets, half per sign of ``d``: distances below ``num_buckets / 4`` get one bucket each, the
    rest share logarithmically wider buckets up to ``max_distance`` (beyond it, the last), as in
    T5's relative attention. ``bias`` ``[num_heads, buckets]`` starts at zero; use the module
    itself as the ``score_mod``, and it trains with the model.
    """

    def __init__(self, num_heads: int, max_distance: int, num_buckets: int | None = None, *,
                 device=None, dtype=None) -> None:
        super().__init__()
        check_positive_int("num_heads", num_heads)
        check_positive_int("max_distance", max_distance)
        if num_buckets is not None:
            check_positive_int("num_buckets", num_buckets)
            if num_buckets % 2 or num_buckets < 4 or max_distance <= num_buckets // 4:
                raise ValueError(f"num_buckets must be even, at least 4, and under 4 * "
                                 f"max_distance, got {num_buckets} (max_distance="
                                 f"{max_distance}); or None for clipped distances")
        self.num_heads, self.max_distance, self.num_buckets = num_heads, max_distance, num_buckets
        n = 2 * max_distance + 1 if num_buckets is None else num_buckets
        self.bias = nn.Parameter(torch.zeros(num_heads, n, device=device, dtype=dtype))

    def bucket(self, d: Tensor) -> Tensor:
        """The column of ``bias`` for relative distances ``d = k - q`` (int64)."""
        if self.num_buckets is None:
            return d.clamp(-self.max_distance, self.max_distance) + self.max_distance
        side = self.num_buckets // 2
        exact = side // 2
        n = d.abs()
        far = exact + (torch.log(n.clamp(min=exact) / exact) / math.log(self.max_distance / exact)
                       * (side - exact)).long()
        return torch.where(n < exact, n, far.clamp(max=side - 1)) + side * (d > 0)

    def forward(self, score: Tensor, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return score + self.bias[h, self.bucket(k - q)]

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, max_distance={self.max_distance}, "
                f"num_buckets={self.num_buckets}")
