"""Patterns of offsets (full, causal, windows, strides: a :class:`Band`, Toeplitz layout),
global tokens and prefix LM. A window or a token count past ``MAX_POSITION`` is unbounded.
"""

from __future__ import annotations

import functools
import operator

import torch
from torch import Tensor

from ..layout import MAX_POSITION, block_extents
from .algebra import Union
from .base import Pattern, check_int


class Band(Pattern):
    """Pairs whose offset ``d = k - q`` lies in ``[lo, hi]`` (``None``: unbounded, as a large
    number would wrap in int32) and is a multiple of ``stride``."""

    def __init__(self, lo: int | None, hi: int | None, name: str, stride: int = 1) -> None:
        self.lo, self.hi, self.name, self.stride = lo, hi, name, stride

    def allowed(self, h, q, k):
        return self._allows_offset(k - q)

    def dense_form(self):
        if self.stride != 1 or self.lo is not None:
            return None
        return "full" if self.hi is None else "causal" if self.hi == 0 else None

    def _allows_offset(self, d: Tensor) -> Tensor:
        tests = [] if self.lo is None else [d >= self.lo]
        tests += [] if self.hi is None else [d <= self.hi]
        tests += [] if self.stride == 1 else [torch.remainder(d, self.stride) == 0]
        return functools.reduce(operator.and_, tests) if tests else d == d

    def offset_rule(self):
        return self._allows_offset

    def count_pairs(self, seq_len):
        lo = 1 - seq_len if self.lo is None else max(self.lo, 1 - seq_len)
        hi = seq_len - 1 if self.hi is None else min(self.hi, seq_len - 1)
        first = -(-lo // self.stride) * self.stride  # the first multiple of stride >= lo
        d = torch.arange(first, hi + 1, self.stride, dtype=torch.int64)
        return int((seq_len - d.abs()).sum())  # S - |d| pairs at offset d

    def key(self):
        return (self.lo, self.hi, self.stride)

    def __repr__(self) -> str:
        return self.name


def _extents(q_len: int, k_len: int, block_size: int, device,
             rows: tuple[int, int]) -> tuple[Tensor, ...]:
    """(q_first, q_last, k_first, k_last) of the query blocks ``rows`` and every key block,
    broadcast as ``[1, r1 - r0, 1]`` and ``[1, 1, nk]``."""
    qe = block_extents(q_len, block_size, device)[rows[0]:rows[1]]
    ke = block_extents(k_len, block_size, device)
    return qe[None, :, 0, None], qe[None, :, 1, None], ke[None, None, :, 0], ke[None, None, :, 1]


class GlobalTokens(Pattern):
    """The first ``n`` tokens attend everything and are attended by everything."""

    def __init__(self, n: int) -> None:
        self.n = n

    def allowed(self, h, q, k):
        return (q < self.n) | (k < self.n)

    def tiles(self, q_len, k_len, block_size, device, rows):
        qf, ql, kf, kl = _extents(q_len, k_len, block_size, device, rows)
        return (qf < self.n) | (kf < self.n), (ql < self.n) | (kl < self.n)

    def grain(self):
        return self.n

    def count_pairs(self, seq_len):
        rest = max(seq_len - self.n, 0)
        return seq_len * seq_len - rest * rest

    def key(self):
        return self.n

    def __repr__(self) -> str:
        return f"global_tokens({self.n})"


class PrefixLM(Pattern):
    """Causal attention whose first ``prefix`` tokens also attend each other bidirectionally:
    ``j <= i or j < prefix``."""

    def __init__(self, prefix: int) -> None:
        self.prefix = prefix

    def allowed(self, h, q, k):
        return (k <= q) | (k < self.prefix)

    def dense_form(self):
        return "causal" if self.prefix == 1 else None

    def tiles(self, q_len, k_len, block_size, device, rows):
        qf, ql, kf, kl = _extents(q_len, k_len, block_size, device, rows)
        last = self.prefix - 1  # query q sees exactly the keys k <= max(q, prefix - 1)
        return kf <= torch.clamp(ql, min=last), kl <= torch.clamp(qf, min=last)

    def count_pairs(self, seq_len):
        p = min(self.prefix, seq_len)
        return seq_len * (seq_len + 1) // 2 + p * (p - 1) // 2

    def key(self):
        return self.prefix

    def __repr__(self) -> str:
        return f"prefix_lm({self.prefix})"


# --------------------------------------------------------------------- builders
def full() -> Pattern:
    """Dense attention: every query attends every key."""
    return Band(None, None, "full()")


def causal() -> Pattern:
    """Autoregressive mask: query ``i`` attends key ``j`` iff ``j <= i``."""
    return Band(None, 0, "causal()")


def _window(call: str, window: int, stride: int, causal: bool) -> Pattern:
    """The band of a window (``call``: the builder's name and leading arguments)."""
    check_int("window", window, 1, None)
    reach = window - 1 if window <= MAX_POSITION else None  # beyond: every sequence fits
    name = f"{call}{', causal=True' if causal else ''})"
    return Band(None if reach is None else -reach, 0 if causal else reach, name, stride)


def local_window(window: int, causal: bool = False) -> Pattern:
    """Sliding window: query ``i`` attends key ``j`` iff ``|i - j| < window`` (``2 * window -
    1`` keys); with ``causal=True`` iff ``0 <= i - j < window`` (Mistral's ``window`` keys)."""
    return _window(f"local_window({window}", window, 1, causal)


def dilated_window(window: int, dilation: int, causal: bool = False) -> Pattern:
    """``local_window(window, causal)`` keeping every ``dilation``-th key: ``i`` attends ``j``
    iff also ``(i - j) % dilation == 0``."""
    check_int("dilation", dilation, 1)
    return _window(f"dilated_window({window}, {dilation}", window, dilation, causal)


def global_tokens(num_global: int) -> Pattern:
    """The first ``num_global`` tokens attend, and are attended by, every token."""
    check_int("num_global", num_global, 1, None)
    return GlobalTokens(min(num_global, MAX_POSITION))


def prefix_lm(prefix: int) -> Pattern:
    """Prefix LM (T5/UniLM-style): causal, and the first ``prefix`` tokens also attend each
    other in both directions. ``prefix_lm(1)`` is ``causal()``."""
    check_int("prefix", prefix, 1, None)
    return PrefixLM(min(prefix, MAX_POSITION))


def global_local(num_global: int, window: int) -> Pattern:
    """Longformer/BigBird-style: ``global_tokens(num_global) | local_window(window)``."""
    return Union(global_tokens(num_global), local_window(window))


def strided(stride: int) -> Pattern:
    """Sparse Transformer's strided pattern: ``i`` attends ``j`` iff ``(i - j) % stride == 0``."""
    check_int("stride", stride, 1)
    return Band(None, None, f"strided({stride})", stride)


def sparse_transformer(stride: int) -> Pattern:
    """Child et al. (2019)'s fixed pattern pair: ``strided(stride) | local_window(stride)``
    (add ``& causal()`` for their autoregressive form)."""
    return Union(strided(stride), local_window(stride))
