"""Attention patterns: which (query, key) pairs may attend, per head.

A :class:`Pattern` is a vectorized predicate ``allowed(h, q, k)`` (``True`` = may attend, as in
SDPA's boolean mask) with an exact block layout built in memory ``O((S / block)**2)``, never
``S**2``. ``a | b`` and ``a & b`` compose; a 1-head pattern broadcasts over every head."""

from .bands import (
    causal,
    dilated_window,
    full,
    global_local,
    global_tokens,
    local_window,
    prefix_lm,
    sparse_transformer,
    strided,
)
from .base import (
    Pattern,
    check_density,
    check_int,
    check_positive_int,
    describe,
    head_predicate,
    refine_tiles,
)
from .documents import Documents, documents
from .families import FAMILIES, Family, family, register_family
from .grid import GridNeighborhood, Permuted, grid_neighborhood
from .longnet import Dilated, check_dilation_pairs, dilated, dilated_branch, head_groups
from .mask_mods import MaskModPattern, from_mask_mod
from .masks import BlockSelection, DenseMask, KeyMask, TiledHeads, tile_batch
from .random_tiles import hash_cells, random_blocks

__all__ = ["FAMILIES", "BlockSelection", "DenseMask", "Dilated", "Documents", "Family",
           "GridNeighborhood", "KeyMask", "MaskModPattern", "Pattern", "Permuted", "TiledHeads",
           "causal", "check_density", "check_dilation_pairs", "check_int", "check_positive_int",
           "describe", "dilated", "dilated_branch", "dilated_window", "documents", "family",
           "from_mask_mod", "full", "global_local", "global_tokens", "grid_neighborhood",
           "hash_cells", "head_groups", "head_predicate", "local_window", "prefix_lm",
           "random_blocks", "refine_tiles", "register_family", "sparse_transformer", "strided",
           "tile_batch"]
