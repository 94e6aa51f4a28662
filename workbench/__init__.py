"""workbench: block-sparse, dilated and ring attention for research and teaching.

Every variant is softmax attention restricted to a set of (query, key) pairs, seen through four
independent choices: a **pattern** (:mod:`workbench.patterns`), an **ordering**
(:mod:`workbench.orderings`), a **schedule** (:mod:`workbench.ring`) and a **backend**
(:mod:`workbench.backends`).
"""

from . import (
    adaptive,
    backends,
    curves,
    layout,
    multihead,
    orderings,
    patterns,
    records,
    ring,
    viz,
)
from .adaptive import AdaptiveBlockSparseAttention, BlockSelection
from .attention import BlockSparseAttention, block_sparse_attention
from .dilated import dilated_attention
from .layout import BlockLayout, LayoutStats
from .multihead import BlockSparseMultiheadAttention, BlockSparseWeights

__all__ = [
    "AdaptiveBlockSparseAttention",
    "BlockLayout",
    "BlockSelection",
    "BlockSparseAttention",
    "BlockSparseMultiheadAttention",
    "BlockSparseWeights",
    "LayoutStats",
    "adaptive",
    "backends",
    "curves",
    "block_sparse_attention",
    "dilated_attention",
    "layout",
    "multihead",
    "orderings",
    "patterns",
    "records",
    "ring",
    "viz",
]

__version__ = "0.1.0"
