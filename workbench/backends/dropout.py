"""Attention-weight dropout that every tile can recompute: a hash, not a stored mask.

As in ``nn.MultiheadAttention``, ``out = (P * Z) V`` with ``Z = keep / (1 - p)`` after the
softmax. Pair (``b * H + h``, query, key) is kept by a hash of those indices and a seed, so every
tile, the backward and a ring's chunks regenerate the same ``Z``, and no ``S x S`` mask exists.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..patterns import hash_cells

__all__ = ["AttentionDropout"]

_HASH_BITS = 24  # hash_cells returns 24-bit values


@dataclass(frozen=True)
class AttentionDropout:
    """Drop each attention probability with probability ``p``, decided by a hash of ``seed``."""

    p: float
    seed: int

    def __post_init__(self) -> None:
        if not 0.0 <= self.p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {self.p}")

    def scale(self, head_index: Tensor, q: Tensor, k: Tensor) -> Tensor:
        """``Z``: ``0`` for dropped pairs, ``1 / (1 - p)`` for kept ones (float32, broadcast);
        ``head_index`` is ``batch * num_heads + head``, ``q`` and ``k`` absolute positions."""
        threshold = int(round(self.p * (1 << _HASH_BITS)))
        keep = hash_cells(self.seed, head_index, q, k) >= threshold
        return keep.float() / (1.0 - self.p)
