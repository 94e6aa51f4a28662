"""The block layouts attention modules keep, shared between modules of one pattern object.

A module keeps the layouts of the last few (query length, key length, device) it saw, so that a
layout is built once rather than at every call, and so that what the backends derive from it
(FlexAttention's ``BlockMask``, the triton plan; kept exactly as long as the layout) is built
once too. Modules that run the *same pattern object* at the same lengths get the same layout
object while any of them keeps it: a model whose layers share one pattern holds one layout and
one ``BlockMask`` for all of them, instead of one per layer. A module's own memo is keyed by the
pattern itself (its value where it has one, see :meth:`~workbench.patterns.Pattern.key`), so
it survives copying and pickling without confusing two patterns.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TypeVar

import torch

from .layout import BlockLayout
from .patterns import Pattern

__all__ = ["LayoutMemo", "shared", "shared_layout"]

T = TypeVar("T")
_SHARED: dict[tuple, tuple[weakref.ref, weakref.ref]] = {}


def shared(owner: object, key: Hashable, build: Callable[[], T]) -> T:
    """``build()``, or what an earlier call returned for the same ``owner`` object and ``key``
    while something else still holds it: held weakly here, this never keeps a value alive (nor
    its owner; a value may hold its owner)."""
    full = (id(owner), key)
    hit = _SHARED.get(full)
    if hit is not None and hit[0]() is owner:
        value = hit[1]()
        if value is not None:
            return value
    value = build()

    def drop(ref: weakref.ref, full: tuple = full) -> None:
        if _SHARED.get(full, (None, None))[1] is ref:  # not a later entry under a reused id
            del _SHARED[full]

    _SHARED[full] = (weakref.ref(owner), weakref.ref(value, drop))
    return value


def shared_layout(pattern: Pattern, q_len: int, k_len: int, block_size: int,
                  device: torch.device | str) -> BlockLayout:
    """``pattern.block_structure(q_len, block_size, device, k_len=k_len)``, shared while held
    (:func:`shared`)."""
    return shared(pattern, (q_len, k_len, block_size, str(torch.device(device))),
                  lambda: pattern.block_structure(q_len, block_size, device, k_len=k_len))


class LayoutMemo:
    """One module's layouts: at most ``size`` of them, the least recently used dropped first,
    each from :func:`shared_layout`."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._layouts: OrderedDict[tuple, BlockLayout] = OrderedDict()

    def __len__(self) -> int:
        return len(self._layouts)

    def __getstate__(self) -> dict[str, int]:  # a cache, not state: copies start empty
        return {"size": self.size}

    def __setstate__(self, state: dict[str, int]) -> None:
        self.__init__(state["size"])

    def get(self, pattern: Pattern, q_len: int, k_len: int, block_size: int,
            device: torch.device | str) -> BlockLayout:
        """The layout of ``pattern`` for these lengths, kept for the next call."""
        key = (pattern, q_len, k_len, block_size, str(torch.device(device)))
        if key not in self._layouts:
            self._layouts[key] = shared_layout(pattern, q_len, k_len, block_size, device)
            if len(self._layouts) > self.size:
                self._layouts.popitem(last=False)
        self._layouts.move_to_end(key)
        return self._layouts[key]
