"""workbench: block-sparse, dilated and ring attention for research and teaching.

Every variant is softmax attention restricted to a set of (query, key) pairs, seen through four
independent choices: a **pattern** (:mod:`workbench.patterns`), an **ordering**
(:mod:`workbench.orderings`), a **schedule** (:mod:`workbench.ring`) and a **backend**
(:mod:`workbench.backends`). :mod:`workbench.distributed` runs the ring across
``torch.distributed`` ranks.

``workbench.viz`` (matplotlib) and ``workbench.lab`` (benchmarks, records, the figures runner
and the command line) are imported on first use, so processes that only compute (the ranks of a
distributed run) start faster.
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
    ring,
    sharding,
)
from .adaptive import AdaptiveBlockSparseAttention
from .attention import BlockSparseAttention, block_sparse_attention
from .dilated import dilated_attention
from .layout import BlockLayout, LayoutStats
from .multihead import BlockSparseMultiheadAttention, BlockSparseWeights
from .patterns import BlockSelection

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
    "distributed",
    "dilated_attention",
    "layout",
    "multihead",
    "orderings",
    "patterns",
    "lab",
    "ring",
    "sharding",
    "viz",
]

__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("viz", "lab"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
