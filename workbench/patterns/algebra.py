"""The pattern algebra: ``a | b`` allows a pair if either pattern does, ``a & b`` if both do.
The operator on the parts' (any, all) decides every tile but those where both are partial (then
token by token); offset rules, periods (lcm) and grains (gcd) combine, so fast paths survive."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .base import Pattern, evaluate_tiles, head_predicate


def _materialize(x: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``x`` broadcast to ``shape`` as a tensor of its own (``x`` itself when it has it)."""
    return x if tuple(x.shape) == shape else x.expand(shape).contiguous()


class _Combination(Pattern):
    """Two patterns joined elementwise by ``op`` (written ``symbol``)."""

    symbol: str
    op: Callable[..., Tensor]  # elementwise on bool tensors, with out=

    def __init__(self, a: Pattern, b: Pattern) -> None:
        if a.num_heads != b.num_heads and 1 not in (a.num_heads, b.num_heads):
            raise ValueError(f"cannot combine a {a.num_heads}-head pattern with a {b.num_heads}-"
                             "head pattern; heads must match or one of them must be "
                             "head-independent (1 head)")
        self.a, self.b = a, b
        self.num_heads = max(a.num_heads, b.num_heads)  # a 1-head part broadcasts

    def key(self):
        a, b = self.a.key(), self.b.key()
        return None if a is None or b is None else (type(self.a), a, type(self.b), b)

    def predicate(self, device):
        fa, fb, op = head_predicate(self.a, device), head_predicate(self.b, device), self.op
        return lambda h, q, k: op(fa(h, q, k), fb(h, q, k))

    def offset_rule(self):
        fa, fb, op = self.a.offset_rule(), self.b.offset_rule(), self.op
        if fa is None or fb is None:
            return None
        return lambda d: op(fa(d), fb(d))

    def period(self):
        pa, pb = self.a.period(), self.b.period()
        return None if pa is None or pb is None else math.lcm(pa, pb)

    def grain(self):
        return math.gcd(self.a.grain(), self.b.grain())

    def tiles(self, q_len, k_len, block_size, device, rows):
        if self.offset_rule() is not None:
            return super().tiles(q_len, k_len, block_size, device, rows)
        a_any, a_all = self.a.tiles(q_len, k_len, block_size, device, rows)
        b_any, b_all = self.b.tiles(q_len, k_len, block_size, device, rows)
        shape = (self.num_heads, *torch.broadcast_shapes(a_any.shape[1:], b_any.shape[1:]))
        # "all" implies "any", so any ^ all marks the partial tiles.
        undecided = _materialize(torch.bitwise_xor(a_any, a_all), shape)
        undecided &= torch.bitwise_xor(b_any, b_all)
        idx = undecided.nonzero()
        any_ = self.op(a_any, b_any, out=undecided)  # the buffer is free once idx is taken
        all_ = _materialize(self.op(a_all, b_all), shape)
        at = idx + torch.tensor([0, rows[0], 0], device=idx.device)  # absolute block rows
        where = tuple(idx.T)
        _, any_[where], all_[where] = evaluate_tiles(self, at, q_len, k_len, block_size)
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


Pattern._union, Pattern._intersection = Union, Intersection
