"""The unit of work every backend computes: a block layout plus the token predicate behind it."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace
from typing import TypeVar

import torch
from torch import Tensor

from ..layout import BlockLayout
from ..score_mods import ScoreMod
from .dropout import AttentionDropout

__all__ = ["MaskFn", "Problem"]

T = TypeVar("T")

MaskFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``allowed(h, q, k) -> bool``: elementwise over int64 head index and absolute positions.

Must create no tensor when called (see :meth:`workbench.patterns.Pattern.predicate`)."""


@dataclass(frozen=True)
class Problem:
    """Attention of ``q_len`` queries over ``k_len`` keys restricted to ``allowed`` pairs.

    ``layout`` says which tiles hold allowed pairs (and which are full); ``allowed`` decides
    pairs inside partial tiles. Positions are absolute: local query ``i`` is ``q_offset + i``.
    ``block_order``: the tiles' visit order, ``None`` or a curve name (only the summation order
    changes). ``dropout``: a hash every tile regenerates. ``dense_form``: ``"full"`` or
    ``"causal"`` when the allowed pairs are exactly those (``auto`` then runs PyTorch's kernels).
    ``pattern``: the pattern, where known. ``score_mod(score, b, h, q, k)``: changes each scaled
    score of a computed pair before the mask, at absolute positions.
    """

    layout: BlockLayout
    allowed: MaskFn
    scale: float
    q_offset: int = 0
    k_offset: int = 0
    label: str = ""  # what the pattern is, for messages (e.g. its repr)
    block_order: str | None = None
    dropout: AttentionDropout | None = None
    dense_form: str | None = None
    pattern: object = None  # the Pattern behind ``allowed``, for backends that read its structure
    score_mod: ScoreMod | None = None

    def positions(self, device: torch.device | str) -> tuple[Tensor, Tensor]:
        """Absolute query ``[q_len, 1]`` and key ``[1, k_len]`` positions."""
        lay = self.layout
        return (torch.arange(lay.q_len, device=device)[:, None] + self.q_offset,
                torch.arange(lay.k_len, device=device)[None, :] + self.k_offset)

    def dense_mask(self, device: torch.device | str) -> Tensor:
        """Bool ``[H, q_len, k_len]`` of allowed pairs (small problems only)."""
        lay = self.layout
        h = torch.arange(lay.num_heads, device=device)[:, None, None]
        return self.allowed(h, *self.positions(device)).expand(lay.num_heads, lay.q_len,
                                                                lay.k_len)

    def derived(self, name: Hashable, device: torch.device | str, build: Callable[[], T],
                reuse: Callable[[T], bool] | None = None) -> T:
        """What a backend derives from this problem on ``device``, kept with its layout
        (:meth:`BlockLayout.derived`) under ``name`` and what else tells problems apart."""
        key = (name, str(device), self.label, self.q_offset, self.k_offset, self.block_order)
        return self.layout.derived(key, build, reuse)

    def slice(self, q_blocks: tuple[int, int], k_blocks: tuple[int, int]) -> Problem:
        """The sub-problem of query blocks ``[q0, q1)`` against key blocks ``[k0, k1)``; the same
        slice is the same layout object at every call, so what backends derive from it is kept."""
        b = self.layout.block_size
        bounds = (tuple(q_blocks), tuple(k_blocks))
        return replace(
            self,
            layout=self.layout.derived(("slice", bounds), lambda: self.layout.slice(*bounds)),
            q_offset=self.q_offset + q_blocks[0] * b,
            k_offset=self.k_offset + k_blocks[0] * b,
        )
