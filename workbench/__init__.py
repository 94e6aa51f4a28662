"""workbench: block-sparse, dilated and ring attention for research and teaching.

Every variant is softmax attention restricted to a set of (query, key) pairs, seen through four
independent choices: a **pattern** (:mod:`workbench.patterns`), an **ordering**
(:mod:`workbench.orderings`), a **schedule** (:mod:`workbench.ring`) and a **backend**
(:mod:`workbench.backends`).
"""

from . import backends, layout, orderings, patterns, records, ring, viz
from .attention import BlockSparseAttention, block_sparse_attention
from .dilated import dilated_attention
from .layout import BlockLayout, LayoutStats

__all__ = [
    "BlockLayout",
    "BlockSparseAttention",
    "LayoutStats",
    "backends",
    "block_sparse_attention",
    "dilated_attention",
    "layout",
    "orderings",
    "patterns",
    "records",
    "ring",
    "viz",
]

__version__ = "0.1.0"
