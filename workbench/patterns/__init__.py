"""Attention patterns: which (query, key) pairs may attend, per head.

A :class:`Pattern` is a vectorized predicate ``allowed(h, q, k)`` over int64 head and position
tensors (``True`` = may attend, as SDPA's boolean mask and FlexAttention's ``mask_mod``) with an
*exact* block layout (:meth:`Pattern.block_structure`) in memory ``O((S / block)**2)``, never
``S**2``. ``a | b`` and ``a & b`` compose; one head broadcasts over all. Defining ``allowed``
alone makes a pattern that runs on every backend; the optional hooks of :mod:`.base` make its
layout fast. :data:`FAMILIES` is the registry of named families (:mod:`.families`).
``pattern.mask_mod()`` and ``pattern.block_mask(seq_len)`` hand a pattern to FlexAttention;
:func:`from_mask_mod` makes a pattern of any FlexAttention ``mask_mod``.
"""

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
