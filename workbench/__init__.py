"""workbench: block-sparse, dilated and ring attention for research and teaching.

Every variant is softmax attention restricted to a set of (query, key) pairs, seen through four
independent choices: a **pattern** (:mod:`workbench.patterns`), an **ordering**
(:mod:`workbench.orderings`), a **schedule** (:mod:`workbench.sharding`, run by
:mod:`workbench.ring` on one device or by :mod:`workbench.distributed` across ranks) and a
**backend** (:mod:`workbench.backends`). A :class:`Plan` holds what they derive from a pattern at
given lengths. ``workbench.viz`` and ``workbench.lab`` are imported on first use.
"""

import importlib

from . import (
    adaptive,
    backends,
    curves,
    distributed,
    layout,
    multihead,
    orderings,
    patterns,
    plan,
    ring,
    score_mods,
    sharding,
)
from .adaptive import AdaptiveBlockSparseAttention
from .attention import BlockSparseAttention, block_sparse_attention, explain_backend
from .dilated import DilatedAttention, dilated_attention
from .layout import BlockLayout, LayoutStats
from .multihead import BlockSparseMultiheadAttention, BlockSparseWeights
from .patterns import BlockSelection
from .plan import Plan, Plans

__all__ = ["AdaptiveBlockSparseAttention", "BlockLayout", "BlockSelection", "BlockSparseAttention",
           "BlockSparseMultiheadAttention", "BlockSparseWeights", "DilatedAttention", "LayoutStats",
           "Plan", "Plans", "adaptive", "backends", "curves", "block_sparse_attention",
           "distributed", "dilated_attention", "explain_backend", "layout", "multihead",
           "orderings", "patterns", "plan", "lab", "ring", "score_mods", "sharding", "viz"]

__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("viz", "lab"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
