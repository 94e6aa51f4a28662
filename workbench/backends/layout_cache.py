"""A cache of what a backend derives from a block layout (a ``BlockMask``, a kernel plan, a
slice), kept exactly as long as its layout *object* lives (a module's cached layout), so that it
is built once rather than at every call. Entries hold their layout weakly and are dropped with
it: the cache never keeps GPU memory alive on its own (what it holds is bounded by the layouts
their owners keep), a model of many layers never evicts one layer's mask to make room for
another's, and a reused ``id`` never returns another layout's entry. A value must not hold its
own layout (that cycle would keep both alive)."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable

from ..layout import BlockLayout

__all__ = ["LayoutCache"]


class LayoutCache:
    """Values keyed by the layout object and ``key`` (everything else the value depends on)."""

    def __init__(self) -> None:
        self._entries: dict[tuple, tuple[weakref.ref, object]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, layout: BlockLayout, key: Hashable) -> object | None:
        """The value stored for this layout object and ``key``, or None."""
        full = (id(layout), key)
        hit = self._entries.get(full)
        if hit is None or hit[0]() is not layout:
            return None
        return hit[1]

    def put(self, layout: BlockLayout, key: Hashable, value: object) -> None:
        full = (id(layout), key)
        self._entries[full] = (weakref.ref(layout, lambda _: self._entries.pop(full, None)),
                               value)

    def get_or_build(self, layout: BlockLayout, key: Hashable, build: Callable[[], object],
                     reuse: Callable[[object], bool] = lambda value: True) -> object:
        """The value stored for this layout object and ``key`` when there is one and ``reuse``
        accepts it; otherwise ``build()``, stored."""
        value = self.get(layout, key)
        if value is None or not reuse(value):
            value = build()
            self.put(layout, key, value)
        return value
