"""workbench: block-sparse, dilated and ring attention for research and teaching.

Every variant is softmax attention restricted to a set of (query, key) pairs, seen through four
independent choices: a **pattern** (:mod:`workbench.patterns`), an **ordering**
(:mod:`workbench.orderings`), a **schedule** (the ring's plan, :mod:`workbench.sharding`, run on
one device by :mod:`workbench.ring` or across ``torch.distributed`` ranks by
:mod:`workbench.distributed`) and a **backend** (:mod:`workbench.backends`, a registry). A
:class:`Plan` holds a pattern's layout at given lengths and what the backends derive from it.

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
    plan,
    ring,
    score_mods,
    sharding,
)
from .adaptive import AdaptiveBlockSparseAttention
from .attention import BlockSparseAttention, block_sparse_attention, explain_backend
from .dilated import dilated_attention
from .layout import BlockLayout, LayoutStats
from .multihead import BlockSparseMultiheadAttention, BlockSparseWeights
from .patterns import BlockSelection
from .plan import Plan, Plans

__all__ = [
    "AdaptiveBlockSparseAttention",
    "BlockLayout",
    "BlockSelection",
    "BlockSparseAttention",
    "BlockSparseMultiheadAttention",
    "BlockSparseWeights",
    "LayoutStats",
    "Plan",
    "Plans",
    "adaptive",
    "backends",
    "curves",
    "block_sparse_attention",
    "distributed",
    "dilated_attention",
    "explain_backend",
    "layout",
    "multihead",
    "orderings",
    "patterns",
    "plan",
    "lab",
    "ring",
    "score_mods",
    "sharding",
    "viz",
]

__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("viz", "lab"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
