"""Pattern families: the one registry of named patterns (:data:`FAMILIES`), which tests,
benchmarks, the pattern explorer and the figures all read."""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .bands import (
    causal,
    dilated_window,
    full,
    global_local,
    local_window,
    prefix_lm,
    sparse_transformer,
    strided,
)
from .base import Pattern
from .documents import documents
from .longnet import dilated
from .random_tiles import random_blocks


@dataclass(frozen=True)
class Family:
    """A named pattern builder.

    Attributes:
        name: the registry key, as command lines and CSV files name it.
        summary: the pairs it allows, in one line.
        build: the builder, e.g. :func:`~workbench.patterns.local_window`.
        parameters: the builder arguments an explorer exposes (never ``num_heads``).
        at_length: ``(seq_len, num_heads) -> arguments`` of the builder at that length.
    """

    name: str
    summary: str
    build: Callable[..., Pattern]
    parameters: tuple[str, ...]
    at_length: Callable[[int, int], dict[str, Any]]

    def arguments(self, seq_len: int, num_heads: int = 1, **overrides: Any) -> dict[str, Any]:
        """The builder's arguments: :attr:`at_length`, then ``overrides`` (a ``ValueError``
        for one the builder does not take)."""
        takes = inspect.signature(self.build).parameters
        unknown = sorted(set(overrides) - set(takes))
        if unknown:
            raise ValueError(f"family {self.name!r} has no argument {unknown}; "
                             f"{self.build.__name__} takes {list(takes)}")
        return {**self.at_length(seq_len, num_heads), **overrides}

    def pattern(self, seq_len: int, num_heads: int = 1, **overrides: Any) -> Pattern:
        """The family's pattern at ``seq_len`` with ``num_heads`` heads (see :meth:`arguments`)."""
        return self.build(**self.arguments(seq_len, num_heads, **overrides))


FAMILIES: dict[str, Family] = {}  # by name, in registration order


def register_family(entry: Family) -> Family:
    """Add ``entry`` to :data:`FAMILIES` and return it; a ``ValueError`` when the name is
    taken or a parameter is ``num_heads`` or not an argument of the builder."""
    if entry.name in FAMILIES:
        raise ValueError(f"a family named {entry.name!r} is already registered")
    takes = inspect.signature(entry.build).parameters
    bad = [p for p in entry.parameters if p not in takes or p == "num_heads"]
    if bad:
        raise ValueError(f"family {entry.name!r}: parameters {bad} are not arguments of "
                         f"{entry.build.__name__} ({list(takes)})")
    FAMILIES[entry.name] = entry
    return entry


def family(name: str) -> Family:
    """The family registered as ``name``; a ``ValueError`` lists the names otherwise."""
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r}; choose from {', '.join(FAMILIES)}")
    return FAMILIES[name]


def _window(seq_len: int) -> int:
    return max(256, seq_len // 16)


def _documents(seq_len: int) -> list[int]:
    """Document lengths covering ``seq_len``: 5, 2, 8, 1, 3, 7, 4, 2 units of S/32 (at least 1
    token), repeated, the last one cut to fit."""
    unit, lengths, units = max(1, seq_len // 32), [], itertools.cycle((5, 2, 8, 1, 3, 7, 4, 2))
    while (left := seq_len - sum(lengths)) > 0:
        lengths.append(min(next(units) * unit, left))
    return lengths


for _entry in (
    Family("full", "every pair (dense attention)", full, (), lambda s, h: {}),
    Family("causal", "j <= i", causal, (), lambda s, h: {}),
    Family("local", "causal sliding window of S/16 tokens (at least 256)", local_window,
           ("window", "causal"), lambda s, h: {"window": _window(s), "causal": True}),
    Family("global_local", "64 global tokens and a sliding window of S/16 tokens (at least 256)",
           global_local, ("num_global", "window"),
           lambda s, h: {"num_global": 64, "window": _window(s)}),
    Family("strided", "(i - j) % stride == 0, stride sqrt(S)", strided, ("stride",),
           lambda s, h: {"stride": math.isqrt(s)}),
    Family("sparse_transformer", "strided(l) | local_window(l), l = sqrt(S)", sparse_transformer,
           ("stride",), lambda s, h: {"stride": math.isqrt(s)}),
    Family("dilated", "LongNet head groups: segments S/32, S/16, S/8, S/4 (at least 64), "
           "dilations 1, 2, 4, 8", dilated, ("segment_lengths", "dilation_rates"),
           lambda s, h: {"segment_lengths": [max(64, s // d) for d in (32, 16, 8, 4)],
                         "dilation_rates": [1, 2, 4, 8], "num_heads": h}),
    Family("longnet", "LongNet head groups: segments 2048, 4096, 8192, 16384, dilations 1, 2, 4, "
           "8", dilated, (), lambda s, h: {"segment_lengths": [2048, 4096, 8192, 16384],
                                           "dilation_rates": [1, 2, 4, 8], "num_heads": h}),
    Family("random", "BigBird-style random 128-token cells at density 0.1", random_blocks,
           ("density", "seed", "cell"), lambda s, h: {"density": 0.1, "cell": 128, "seed": 0}),
    Family("dilated_window", "causal window of S/16 tokens (at least 256) keeping every 4th key",
           dilated_window, ("window", "dilation", "causal"),
           lambda s, h: {"window": _window(s), "dilation": 4, "causal": True}),
    Family("documents", "packed documents of 5, 2, 8, 1, 3, 7, 4, 2 x S/32 tokens, causal inside "
           "each", documents, ("causal",), lambda s, h: {"lengths": _documents(s), "causal": True}),
    Family("prefix_lm", "bidirectional over the first S/4 tokens, causal after", prefix_lm,
           ("prefix",), lambda s, h: {"prefix": max(1, s // 4)}),
):
    register_family(_entry)
