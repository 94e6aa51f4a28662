"""Plans: a pattern at given lengths, block size and device, with everything derived from it.

A :class:`Plan` builds its :class:`~workbench.layout.BlockLayout` on first use; the layout keeps
what each backend derives from it (:meth:`BlockLayout.derived`), so a plan held across calls
builds each once. Modules hold plans in :class:`Plans`, which layers may share. Nothing is
cached anywhere else: a plan lives exactly as long as whoever holds it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

from .layout import BlockLayout, held_bytes, num_blocks
from .patterns import Pattern, check_int

__all__ = ["LastCall", "Plan", "Plans", "canonical_device", "check_plans", "plan_for",
           "query_window_layout"]


class LastCall:
    """The runner prepared for the last call made through its holder (a :class:`Plan`, a
    :class:`Plans` or a module), under the key of that call's arguments.

    :meth:`get` returns it when the key is equal, else builds and keeps a new one. The key names
    the pattern by ``id``, and the pattern is held so its id stays its own. Copies start empty.
    """

    __slots__ = ("key", "pattern", "runner")

    def __init__(self) -> None:
        self.key: Hashable = None
        self.pattern: Pattern | None = None
        self.runner: Any = None

    def __reduce__(self) -> tuple[type, tuple[()]]:
        return LastCall, ()

    def get(self, key: Hashable, pattern: Pattern, build: Callable[[], Any]) -> Any:
        """The kept runner if ``key`` equals the last call's, else ``build()`` (then kept)."""
        if key == self.key:
            return self.runner
        runner = build()
        self.key, self.pattern, self.runner = key, pattern, runner
        return runner


def canonical_device(device: torch.device | str) -> torch.device:
    """``device`` with its index, as a tensor on it reports it: ``"cuda"`` is the current CUDA
    device (when one is available)."""
    device = torch.device(device)
    if device.index is None and device.type not in ("cpu", "meta"):
        module = getattr(torch, device.type, None)
        if module is not None and hasattr(module, "current_device") and module.is_available():
            return torch.device(device.type, module.current_device())
    return device


def query_window_layout(pattern: Pattern, q_len: int, k_len: int, block_size: int,
                        device: torch.device | str = "cpu", q_offset: int = 0) -> BlockLayout:
    """``pattern``'s exact layout for ``q_len`` queries at positions ``q_offset, ...,
    q_offset + q_len - 1`` against keys ``0, ..., k_len - 1`` (what a decoder with a KV cache
    attends), built from the rows of the whole problem that hold those queries
    (:meth:`~workbench.layout.BlockLayout.query_window`)."""
    if check_int("q_offset", q_offset, 0) == 0:
        return pattern.block_structure(q_len, block_size, device, k_len=k_len)
    first, end = q_offset // block_size, num_blocks(q_offset + q_len, block_size)
    rows = pattern.block_structure(q_offset + q_len, block_size, device, k_len=k_len,
                                   rows=(first, end))
    return rows.query_window(q_offset - first * block_size, q_len)


class Plan:
    """``pattern`` on ``q_len`` queries and ``k_len`` keys (default ``q_len``) in tiles of
    ``block_size`` on ``device``, the queries at positions ``q_offset, ...`` (keys from 0);
    its layout is built on first use (:attr:`layout`), or only some query rows of it
    (:meth:`rows`, what one rank of a distributed ring needs)."""

    def __init__(self, pattern: Pattern, q_len: int, k_len: int | None = None,
                 block_size: int = 64, device: torch.device | str = "cpu", *,
                 q_offset: int = 0) -> None:
        if not isinstance(pattern, Pattern):
            raise TypeError(f"pattern must be a workbench Pattern, got {type(pattern).__name__}")
        self.pattern, self.q_len = pattern, q_len
        self.k_len = q_len if k_len is None else k_len
        self.block_size, self.device = block_size, canonical_device(device)
        self.q_offset = check_int("q_offset", q_offset, 0)
        self._layout: BlockLayout | None = None
        self._rows: dict[tuple, list[BlockLayout]] = {}
        self.last_call = LastCall()

    @property
    def layout(self) -> BlockLayout:
        """The exact block layout, built on first use and kept."""
        if self._layout is None:
            self._layout = query_window_layout(self.pattern, self.q_len, self.k_len,
                                               self.block_size, self.device, self.q_offset)
        return self._layout

    @property
    def built(self) -> bool:
        """Whether the whole layout has been built."""
        return self._layout is not None

    def rows(self, runs: Sequence[tuple[int, int]]) -> list[BlockLayout]:
        """The layouts of the query-block ranges ``runs`` against every key block, built on
        first use without the other rows (the whole layout's slices, if it is built)."""
        key = tuple(map(tuple, runs))
        if key not in self._rows:
            nk = self.layout.shape[2] if self.built or self.q_offset else None
            self._rows[key] = [
                self._layout.slice(r, (0, nk)) if self._layout is not None else
                self.pattern.block_structure(self.q_len, self.block_size, self.device,
                                             k_len=self.k_len, rows=r) for r in key]
        return self._rows[key]

    def nbytes(self) -> int:
        """Bytes of device memory this plan holds: its layouts and everything derived from
        them (tensors that share storage counted once)."""
        held = [self._layout] if self._layout is not None else []
        held += [lay for lays in self._rows.values() for lay in lays]
        return held_bytes(held)

    def __repr__(self) -> str:
        offset = f", q_offset={self.q_offset}" if self.q_offset else ""
        return (f"Plan({self.pattern!r}, q_len={self.q_len}, k_len={self.k_len}{offset}, "
                f"block_size={self.block_size}, device='{self.device}', "
                f"built={self.built}, nbytes={self.nbytes()})")


class Plans:
    """The plans of the last ``size`` (pattern, lengths, block size, device) a module used, the
    least recently used dropped first. Copies and pickles start empty (a cache, not state)."""

    def __init__(self, size: int = 8) -> None:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        self.size = size
        self._plans: OrderedDict[tuple, Plan] = OrderedDict()
        self.last_call = LastCall()

    def __len__(self) -> int:
        return len(self._plans)

    def __iter__(self):
        return iter(self._plans.values())

    def __getstate__(self) -> dict[str, int]:
        return {"size": self.size}

    def __setstate__(self, state: dict[str, int]) -> None:
        self.__init__(state["size"])

    def get(self, pattern: Pattern, q_len: int, k_len: int, block_size: int,
            device: torch.device | str, q_offset: int = 0) -> Plan:
        """The plan for these arguments, kept for the next call."""
        device = canonical_device(device)
        key = (pattern, q_len, k_len, block_size, device, q_offset)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = Plan(pattern, q_len, k_len, block_size, device,
                                           q_offset=q_offset)
            if len(self._plans) > self.size:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return plan

    def nbytes(self) -> int:
        """Bytes all these plans hold (:meth:`Plan.nbytes`, shared storage counted once)."""
        return sum(p.nbytes() for p in self._plans.values())


def plan_for(plan: Plan | Plans, pattern: Pattern, q_len: int, k_len: int, block_size: int,
             device: torch.device | str, q_offset: int = 0) -> Plan:
    """The :class:`Plan` of a call: ``plan`` itself when it was made for these arguments (else a
    ``ValueError`` naming what differs), or the one ``plan`` (a :class:`Plans`) keeps for them."""
    if isinstance(plan, Plans):
        return plan.get(pattern, q_len, k_len, block_size, device, q_offset)
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a workbench Plan or Plans, got {type(plan).__name__}")
    device = canonical_device(device)
    if plan.pattern != pattern or (plan.q_len, plan.k_len, plan.block_size, plan.q_offset,
                                   plan.device) != (q_len, k_len, block_size, q_offset, device):
        raise ValueError(
            f"plan is for {plan.pattern!r} at q_len={plan.q_len}, k_len={plan.k_len}, "
            f"q_offset={plan.q_offset}, block_size={plan.block_size} on {plan.device}; this "
            f"call is {pattern!r} at q_len={q_len}, k_len={k_len}, q_offset={q_offset}, "
            f"block_size={block_size} on {device}")
    return plan


def check_plans(plans: object, name: str = "plans") -> Plans:
    """``plans`` if it is a :class:`Plans`; a ``TypeError`` naming ``name`` otherwise."""
    if not isinstance(plans, Plans):
        raise TypeError(f"{name} must be a workbench Plans, got {type(plans).__name__}")
    return plans
