"""A small cache of what a backend derives from a block layout (a ``BlockMask``, a kernel plan),
kept while the same layout *object* comes back (a module's cached layout), so that it is built
once rather than at every call. Entries hold their layout weakly: an entry is dropped as soon
as its layout is (e.g. the per-call slices of a ring), so the cache never keeps GPU memory
alive on its own, and a reused ``id`` never returns another layout's entry."""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable

from ..layout import BlockLayout

__all__ = ["LayoutCache"]


class LayoutCache:
    """At most ``size`` entries, least recently used dropped first, keyed by the layout object
    and ``key`` (everything else the derived value depends on)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[tuple, tuple[weakref.ref, object]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, layout: BlockLayout, key: Hashable) -> object | None:
        """The value stored for this layout object and ``key``, or None."""
        full = (id(layout), key)
        hit = self._entries.get(full)
        if hit is None or hit[0]() is not layout:
            return None
        self._entries.move_to_end(full)
        return hit[1]

    def put(self, layout: BlockLayout, key: Hashable, value: object) -> None:
        full = (id(layout), key)
        self._entries[full] = (weakref.ref(layout, lambda _: self._entries.pop(full, None)),
                               value)
        if len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def get_or_build(self, layout: BlockLayout, key: Hashable, build: Callable[[], object],
                     reuse: Callable[[object], bool] = lambda value: True) -> object:
        """The value stored for this layout object and ``key`` when there is one and ``reuse``
        accepts it; otherwise ``build()``, stored."""
        value = self.get(layout, key)
        if value is None or not reuse(value):
            value = build()
            self.put(layout, key, value)
        return value
