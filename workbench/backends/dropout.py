"""Attention-weight dropout that every tile can recompute: a hash, not a stored mask.

``nn.MultiheadAttention`` drops attention *probabilities*: ``out = (P * Z) V`` with
``Z = keep / (1 - p)``, while the softmax denominator is left alone. A block-sparse backend
never holds ``P`` whole, so the keep decision of pair (batch, head, query, key) is a
deterministic hash of those four indices and a seed: the forward and the backward pass (and the
chunks of a ring schedule, which see absolute positions) regenerate exactly the same ``Z`` tile by
tile, and no ``S x S`` mask is ever stored. Batch and head enter as one index ``b * H + h``, so
folding the batch into the heads (as the multi-head module does for per-batch masks) keeps the
same mask.

In the online softmax only the numerator changes (``num += (p * Z) v``); the backward pass uses
``dV = (P * Z)^T dO``, ``dP = (dO V^T) * Z`` and the usual ``dS = P * (dP - rowsum(dO * O))``,
which still holds because ``O = (P * Z) V``.
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
        """``Z``: ``0`` for dropped pairs, ``1 / (1 - p)`` for kept ones (float32, broadcast).

        ``head_index`` is ``batch * num_heads + head``; ``q`` and ``k`` are absolute positions.
        """
        threshold = int(round(self.p * (1 << _HASH_BITS)))
        keep = hash_cells(self.seed, head_index, q, k) >= threshold
        return keep.float() / (1.0 - self.p)
