"""The main variant: block-sparse attention over any pattern, optionally with a ring schedule.

``block_sparse_attention`` is the functional entry point (layout ``[batch, heads, seq,
head_dim]`` like ``F.scaled_dot_product_attention``); :class:`BlockSparseAttention` is the
same as an ``nn.Module`` that caches block layouts per sequence length.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .backends import (
    NO_LSE,
    AttentionDropout,
    Problem,
    accumulation_dtype,
    check_backend,
    dense_sdpa,
    resolve_backend,
    run_backend,
    sdpa_serves,
)
from .distributed import distributed_ring_attention
from .layout import BlockLayout
from .layout_memo import LayoutMemo
from .orderings import check_block_order
from .patterns import Pattern, check_positive_int, head_predicate
from .ring import ring_attention
from .sharding import check_sharding

__all__ = [
    "BlockSparseAttention",
    "block_sparse_attention",
    "check_options",
    "check_qkv",
    "check_scale",
]


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Validate ``[B, H, S, D]`` query/key/value tensors; raise naming the argument."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(
                f"{name} must be [batch, heads, seq, head_dim] (4-D), got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"{name} has an empty sequence or head dimension: {tuple(x.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.shape[0] == k.shape[0] == v.shape[0]) or not (q.shape[1] == k.shape[1] == v.shape[1]):
        raise ValueError(
            "q, k, v must share batch and heads: got q "
            f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same length, got {k.shape[2]} and {v.shape[2]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must share head_dim, got {q.shape[3]} and {k.shape[3]}")


def check_scale(scale: object) -> None:
    """Raise a ``TypeError`` unless ``scale`` is a finite real number or None."""
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise TypeError(f"scale must be a finite float or None (1 / sqrt(head_dim)), got "
                        f"{scale!r}")


def check_options(*, block_size: int, backend: str, ring_chunks: int, scale: float | None,
                  block_order: str | None, sharding: str) -> str | None:
    """Validate the options every entry point shares, raising a ``ValueError`` or
    ``TypeError`` that names the argument; returns ``block_order`` normalized (``None`` for the
    natural order). Constructors call it so that a bad value fails where it is given."""
    check_positive_int("block_size", block_size)
    check_backend(backend)
    check_positive_int("ring_chunks", ring_chunks)
    check_scale(scale)
    check_sharding(sharding)
    return check_block_order(block_order)


def _check_pattern(pattern: Pattern, num_heads: int) -> None:
    if not isinstance(pattern, Pattern):
        raise TypeError(
            f"pattern must be a workbench Pattern (e.g. wb.patterns.local_window(128)), "
            f"got {type(pattern).__name__}"
        )
    if pattern.num_heads not in (1, num_heads):
        raise ValueError(
            f"pattern has {pattern.num_heads} heads but q has {num_heads}; build the pattern with "
            f"num_heads={num_heads} (or use a head-independent pattern)"
        )


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    pattern: Pattern,
    block_size: int = 64,
    *,
    backend: str = "auto",
    return_lse: bool = False,
    scale: float | None = None,
    ring_chunks: int = 1,
    layout: BlockLayout | Callable[[int], BlockLayout] | None = None,
    block_order: str | None = None,
    dropout_p: float = 0.0,
    dropout_seed: int | None = None,
    process_group=None,
    sharding: str = "contiguous",
) -> Tensor | tuple[Tensor, Tensor]:
    """Softmax attention restricted to ``pattern``, computed tile by tile.

    Args:
        q, k, v: ``[B, H, Sq, D]``, ``[B, H, Sk, D]``, ``[B, H, Sk, Dv]``; any length (no
            multiple of ``block_size`` needed: padding never changes the result).
        pattern: which (query, key) pairs may attend (:mod:`workbench.patterns`); 1 head or H.
        block_size: tile edge in tokens.
        backend: ``"auto"``, ``"blockwise"``, ``"flex"``, ``"triton"``, ``"sdpa"`` (dense or
            causal patterns only; what ``auto`` picks for them when no log-sum-exp is asked
            for) or ``"reference"`` (:mod:`workbench.backends`).
        return_lse: also return the log-sum-exp of each query's scores ``[B, H, Sq]`` (float32,
            ``-inf`` for a query that attends nothing).
        scale: score scale, default ``1 / sqrt(D)``.
        ring_chunks: run the ring schedule over this many K/V chunks (1 = one shot).
        layout: a precomputed ``pattern.block_structure(Sq, block_size, k_len=Sk)`` to reuse
            (under a ``process_group``: the global one, or a function of the global length).
        block_order: order in which the active tiles are visited: ``None`` (natural: by head,
            query block, key block), ``"hilbert"`` or ``"morton"`` (along that curve over the
            block grid: the *post-pattern* ordering). The pattern and the result do not change;
            outputs equal the natural order's up to floating-point summation order (not
            bitwise). ``blockwise`` follows it; ``flex`` sorts each query block's key blocks
            along it (its kernel fixes the order of query blocks); ``reference`` has no tiles.
        dropout_p: attention-weight dropout probability (as ``nn.MultiheadAttention``'s): each
            probability is zeroed with this probability and the rest scaled by
            ``1 / (1 - p)``; the log-sum-exp is unaffected. Applied whenever ``> 0`` (the
            caller decides training vs eval). Needs ``blockwise`` or ``reference``
            (``"auto"`` picks ``blockwise``).
        dropout_seed: seed of the keep decisions (a hash of batch-head, query and key
            positions: the same seed gives the same mask); ``None`` draws one from torch's
            default generator, so ``torch.manual_seed`` makes runs repeatable. Under a
            ``process_group`` every rank uses rank 0's seed.
        process_group: run the ring across the ranks of this ``torch.distributed`` group (e.g.
            ``torch.distributed.group.WORLD``): ``q, k, v`` are then this rank's shard of the
            sequence, cut by ``workbench.distributed.shard_plan(S, world, block_size,
            sharding).shard(x, rank)``, and the result is this rank's output shard
            (:mod:`workbench.distributed`). Self-attention only; ``layout`` is the global one.
        sharding: ``"contiguous"`` or ``"zigzag"`` (balances causal work) under a process group.

    Returns:
        ``out [B, H, Sq, Dv]`` in q's dtype, or ``(out, lse)``. A query with no allowed key
        outputs zeros.
    """
    check_qkv(q, k, v)
    _check_pattern(pattern, q.shape[1])
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be True or False, got {return_lse!r}")
    block_order = check_options(block_size=block_size, backend=backend, ring_chunks=ring_chunks,
                                scale=scale, block_order=block_order, sharding=sharding)
    if backend == "sdpa" and (return_lse or ring_chunks > 1 or process_group is not None):
        raise ValueError(NO_LSE)
    if process_group is not None:
        if ring_chunks != 1:
            raise ValueError("ring_chunks simulates a ring on one device; with a process_group "
                             "the ring runs over its ranks: leave ring_chunks=1")
        return distributed_ring_attention(
            q, k, v, pattern, block_size, process_group=process_group, sharding=sharding,
            backend=backend, scale=scale, return_lse=return_lse, layout=layout,
            block_order=block_order, dropout=_dropout(dropout_p, dropout_seed))
    sq, sk = q.shape[2], k.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    dropout = _dropout(dropout_p, dropout_seed)
    form = sdpa_shortcut(pattern, backend, return_lse=return_lse, ring_chunks=ring_chunks,
                         dropout=dropout is not None, k_len=sk)
    if layout is not None:
        if not isinstance(layout, BlockLayout):
            raise TypeError(f"layout must be a BlockLayout from pattern.block_structure(...), "
                            f"got {type(layout).__name__}")
        layout.check(pattern, sq, sk, block_size)
    if q.numel() == 0:  # no batch or no heads: nothing to attend
        return _empty_attention(q, k, v, return_lse)
    if layout is None and form is not None:  # no block layout needed (it is O(S^2 / b^2))
        return dense_sdpa(q, k, v, form, scale)
    if layout is None:
        layout = pattern.block_structure(sq, block_size, q.device, k_len=sk)
    problem = Problem(layout, head_predicate(pattern, q.device), scale, label=repr(pattern),
                      block_order=block_order, dropout=dropout,
                      dense_form=pattern.dense_form())
    name = resolve_backend(backend, q, problem.dropout is not None, v=v, problem=problem,
                           need_lse=return_lse or ring_chunks > 1)
    if ring_chunks > 1:
        out, lse = ring_attention(q, k, v, problem, ring_chunks, name, return_lse)
    else:
        out, lse = run_backend(name, q, k, v, problem, need_lse=return_lse)
    return (out, lse) if return_lse else out


def _empty_attention(q: Tensor, k: Tensor, v: Tensor, return_lse: bool
                     ) -> Tensor | tuple[Tensor, Tensor]:
    """The result for inputs with no batch element or no head: empty tensors of the right
    shapes, connected to the inputs' autograd graph."""
    out = torch.matmul(torch.matmul(q, k.transpose(-1, -2)), v)
    if not return_lse:
        return out
    return out, q.new_empty(q.shape[:3], dtype=accumulation_dtype(q.dtype))


def sdpa_shortcut(pattern: Pattern, backend: str, *, return_lse: bool = False,
                  ring_chunks: int = 1, dropout: bool = False, k_len: int = 1) -> str | None:
    """``"full"`` or ``"causal"`` when a call of :func:`block_sparse_attention` with these
    arguments runs on PyTorch's SDPA without building a block layout (``backend`` ``auto`` or
    ``sdpa``, a dense or causal ``pattern``, no log-sum-exp, ring or attention dropout, at least
    one key); otherwise ``None``."""
    if backend not in ("auto", "sdpa") or return_lse or ring_chunks > 1:
        return None
    return sdpa_serves(pattern.dense_form(), k_len=k_len, dropout=dropout)


def _dropout(p: float, seed: int | None) -> AttentionDropout | None:
    """The dropout of a call (None when ``p == 0``); draws a seed when none is given."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not 0 <= seed < 2**63):
        raise ValueError(f"dropout_seed must be None or an int in [0, 2**63), got {seed!r}")
    if p == 0.0:
        return None
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    return AttentionDropout(float(p), int(seed))


class BlockSparseAttention(nn.Module):
    """Block-sparse (ring) attention over a fixed pattern, as an ``nn.Module``.

    Takes ``q, k, v`` ``[B, H, S, D]`` (no projections: see the multi-head module for those) and
    caches the block layout per (query length, key length, device), shared by modules of one
    pattern object (:mod:`workbench.layout_memo`). ``block_order="hilbert"``
    visits the tiles along a Hilbert curve (see :func:`block_sparse_attention`). With a
    ``process_group`` it takes this rank's shard and runs the ring across the group's ranks
    (``sharding``: ``"contiguous"`` or ``"zigzag"``), each rank caching its own rows of the layout.

    Example::

        attn = wb.BlockSparseAttention(wb.patterns.local_window(256, causal=True), block_size=64)
        out = attn(q, k, v)
    """

    def __init__(
        self,
        pattern: Pattern,
        block_size: int = 64,
        *,
        backend: str = "auto",
        ring_chunks: int = 1,
        scale: float | None = None,
        block_order: str | None = None,
        process_group=None,
        sharding: str = "contiguous",
    ) -> None:
        super().__init__()
        _check_pattern(pattern, getattr(pattern, "num_heads", 1))
        self.block_order = check_options(block_size=block_size, backend=backend,
                                         ring_chunks=ring_chunks, scale=scale,
                                         block_order=block_order, sharding=sharding)
        self.pattern = pattern
        self.block_size = block_size
        self.backend = backend
        self.ring_chunks = ring_chunks
        self.scale = scale
        self.process_group, self.sharding = process_group, sharding
        self._layouts = LayoutMemo()

    def layout(self, q_len: int, k_len: int, device: torch.device) -> BlockLayout:
        """The block layout for these lengths, kept for the next call (the last 8 kept) and
        shared with every module of the same pattern object (:mod:`workbench.layout_memo`)."""
        return self._layouts.get(self.pattern, q_len, k_len, self.block_size, device)

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, return_lse: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        check_qkv(q, k, v)
        # under a process group each rank builds (and caches) only its own rows of the layout
        layout = None  # under a process group, and on SDPA for dense or causal patterns
        if self.process_group is None and sdpa_shortcut(
                self.pattern, self.backend, return_lse=return_lse,
                ring_chunks=self.ring_chunks, k_len=k.shape[2]) is None:
            layout = self.layout(q.shape[2], k.shape[2], q.device)
        return block_sparse_attention(
            q, k, v, self.pattern, self.block_size, backend=self.backend, return_lse=return_lse,
            scale=self.scale, ring_chunks=self.ring_chunks, block_order=self.block_order,
            layout=layout, process_group=self.process_group, sharding=self.sharding,
        )

    def extra_repr(self) -> str:
        return (f"pattern={self.pattern!r}, block_size={self.block_size}, "
                f"backend={self.backend!r}, ring_chunks={self.ring_chunks}, "
                f"block_order={self.block_order!r}")
