"""Attention patterns: which (query, key) pairs may attend, per head.

A :class:`Pattern` is defined once, at token level, by a vectorized predicate
``allowed(h, q, k)`` over int64 head, query-position and key-position tensors (``True`` = may
attend, the polarity of SDPA's boolean mask and of FlexAttention's ``mask_mod``), and has an
*exact* block layout (:meth:`Pattern.block_structure`) in memory proportional to
``(seq_len / block_size)**2``, never ``seq_len**2``. Patterns compose: ``a | b`` allows a pair if
either does, ``a & b`` if both do. A pattern has ``num_heads`` heads; ``num_heads == 1`` means
"the same for every head" and broadcasts (:func:`head_predicate`). Patterns built from the same
arguments are equal (``local_window(8) == local_window(8)``); patterns holding tensors equal only
themselves.

**Writing your own pattern.** Subclass :class:`Pattern` and define ``allowed``::

    class Checker(wb.patterns.Pattern):
        def allowed(self, h, q, k):
            return ((q // 16 + k // 16) % 2) == 0

It then runs in :func:`workbench.block_sparse_attention` on every backend. Its layout is exact:
every tile is evaluated token by token, ``O(S_q * S_k)`` predicate evaluations in chunks of a
fixed number of pairs, so memory stays ``O(blocks)``. The optional hooks make it fast and
comparable: :meth:`~Pattern.tiles` (an exact rule per tile), :meth:`~Pattern.offset_rule` (a
predicate of ``k - q`` alone: a Toeplitz layout), :meth:`~Pattern.period`,
:meth:`~Pattern.key` (equality by value) and :meth:`~Pattern.count_pairs`.

**FlexAttention, both ways.** ``pattern.mask_mod()`` is FlexAttention's ``mask_mod(b, h, q_idx,
kv_idx)`` and ``pattern.block_mask(seq_len)`` its ``BlockMask`` from the exact layout;
:func:`from_mask_mod` makes a pattern of any ``mask_mod``.

Modules: ``base`` (the class and its hooks), ``algebra`` (``|``, ``&``), ``offsets``
(Toeplitz layouts), ``bands`` (full, causal, windows, strides, global tokens, prefix LM),
``documents`` (packed variable-length sequences), ``longnet`` (dilated), ``random_tiles``,
``masks`` (tensor-defined patterns), ``mask_mods`` (FlexAttention mask functions), ``grid``
(permuted patterns and grid neighbourhoods) and ``families`` (the registry, :data:`FAMILIES`).
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

__all__ = [
    "FAMILIES",
    "BlockSelection",
    "DenseMask",
    "Dilated",
    "Documents",
    "Family",
    "GridNeighborhood",
    "KeyMask",
    "MaskModPattern",
    "Pattern",
    "Permuted",
    "TiledHeads",
    "causal",
    "check_density",
    "check_dilation_pairs",
    "check_positive_int",
    "describe",
    "dilated",
    "dilated_branch",
    "dilated_window",
    "documents",
    "family",
    "from_mask_mod",
    "full",
    "global_local",
    "global_tokens",
    "grid_neighborhood",
    "hash_cells",
    "head_groups",
    "head_predicate",
    "local_window",
    "prefix_lm",
    "random_blocks",
    "refine_tiles",
    "register_family",
    "sparse_transformer",
    "strided",
    "tile_batch",
]
