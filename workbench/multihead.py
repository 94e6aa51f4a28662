"""The multi-head module: block-sparse (ring, dilated) attention as an ``nn.MultiheadAttention``.

:class:`BlockSparseMultiheadAttention` has the constructor, parameter names, forward signature
and return value of :class:`torch.nn.MultiheadAttention` in its common uses, so a model can load
an existing state dict into it (``load_state_dict(mha.state_dict())``) and then be made sparse
by giving it a pattern. With ``pattern=None`` (dense) it computes what ``nn.MultiheadAttention``
computes, forward and backward (tested).

Masks keep ``nn.MultiheadAttention``'s polarity: in a **boolean** ``key_padding_mask`` or
``attn_mask``, ``True`` means *ignore this key*. They are turned into patterns and intersected
with the module's pattern:

- ``key_padding_mask [B, S_k]`` becomes a :class:`~workbench.patterns.KeyMask`. Layouts are per
  head and shared across the batch, so a per-batch mask folds the batch into the heads: the
  problem is run as ``[1, B * H, S, D]`` (index ``b * H + h``, the index
  ``nn.MultiheadAttention`` uses for 3-D masks).
- ``attn_mask [S_q, S_k]`` or ``[B * H, S_q, S_k]`` becomes a dense-mask pattern. It is an
  ``S x S`` tensor the caller already holds, so it is meant for short sequences; long sequences
  should express structure as a pattern instead.
- Float masks are supported when every entry is ``0`` or ``-inf`` (they are then exactly a boolean
  mask); any other additive float mask raises ``NotImplementedError``.
- ``is_causal=True`` intersects with :func:`workbench.patterns.causal`. Unlike
  ``nn.MultiheadAttention`` it does not need ``attn_mask`` (if one is given, both apply).

Differences from ``nn.MultiheadAttention`` (all documented, none silent):

- A query with no allowed key outputs zeros (``nn.MultiheadAttention`` gives NaN there).
- Attention-weight dropout (``dropout > 0``, training mode only, as there) drops the same
  fraction of probabilities with the same ``1 / (1 - p)`` scaling, but its keep decisions come
  from a hash of (batch-head, query, key) seeded from torch's default generator
  (:mod:`workbench.backends.dropout`), not from ``torch.nn.functional.dropout``'s random stream:
  the same ``torch.manual_seed`` gives repeatable runs, not the very same mask as
  ``nn.MultiheadAttention``. It runs on the ``blockwise`` backend (``"auto"`` picks it while
  dropout is active; FlexAttention cannot drop probabilities). ``need_weights`` returns the
  probabilities before dropout.
- ``add_bias_kv`` and ``add_zero_attn`` raise ``NotImplementedError``.
- ``need_weights=True`` returns the dense ``[B, S_q, S_k]`` (or per head ``[B, H, S_q, S_k]``)
  weights only while ``B * H * S_q * S_k <= dense_weights_limit`` (default ``2**22`` elements,
  e.g. one batch of 8 heads at 724 tokens); above it the weights come back compact as
  :class:`BlockSparseWeights` (one ``block x block`` tile of probabilities per active tile, memory
  proportional to the computed pairs), never as an ``S x S`` tensor.

**Content-adaptive sparsity.** ``selector=AdaptiveBlockSparseAttention(...)`` chooses the
block layout of every forward call from the projected queries and keys (per batch element and
head; :mod:`workbench.adaptive`), instead of a fixed ``pattern`` (give one or the other). Masks,
``is_causal``, dropout and ``need_weights`` apply to it as to a fixed pattern; the selector's own
``backend`` and ``ring_chunks`` are ignored in favour of the module's, and its trainable gate
(``trainable=True``) is a sub-module, so its parameters train with the rest (load an
``nn.MultiheadAttention`` state dict with ``strict=False`` then: the gate's keys are new).

**Sub-layer norm.** ``sub_layer_norm=True`` inserts a ``LayerNorm(embed_dim)`` between the
attention output and the output projection: the "Sub-LN" of MAGNETO (Wang et al. 2022, arXiv
2210.06423) that LongNet's layers use. It is off by default (and then absent from the state
dict, which keeps ``nn.MultiheadAttention`` checkpoints loadable).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import patterns as P
from .adaptive import AdaptiveBlockSparseAttention
from .attention import block_sparse_attention, sdpa_shortcut
from .backends import check_backend
from .layout import num_blocks
from .layout_memo import LayoutMemo, shared
from .orderings import check_block_order
from .patterns import KeyMask, Pattern, check_positive_int

__all__ = [
    "BlockSparseMultiheadAttention",
    "BlockSparseWeights",
    "DenseMask",
    "TiledHeads",
]

_NO_PATTERN = P.full()  # what shares the unmasked patterns of modules built without one

DENSE_WEIGHTS_LIMIT = 1 << 22


# --------------------------------------------------------------------- mask patterns
class DenseMask(Pattern):
    """Pairs allowed by an explicit bool tensor ``allowed [H, S_q, S_k]`` (``H`` may be 1).

    For short sequences only (the tensor itself is ``S x S``). Positions beyond the tensor are
    never allowed. The block layout is exact at any block size.
    """

    def __init__(self, allowed: Tensor) -> None:
        if allowed.dtype != torch.bool or allowed.dim() != 3:
            raise TypeError(f"allowed must be a bool [heads, q_len, k_len] tensor, got "
                            f"{allowed.dtype} {tuple(allowed.shape)}")
        self.mask = allowed
        self.num_heads = allowed.shape[0]

    def allowed(self, h, q, k):
        return self.predicate(q.device)(h, q, k)

    def predicate(self, device):
        m = self.mask.to(device)
        nq, nk, multi = m.shape[1], m.shape[2], self.num_heads > 1

        def in_mask(h, q, k):
            hh = h if multi else torch.zeros_like(h)
            qi = torch.clamp(q, min=0, max=nq - 1)
            ki = torch.clamp(k, min=0, max=nk - 1)
            return m[hh, qi, ki] & (q >= 0) & (q < nq) & (k >= 0) & (k < nk)

        return in_mask

    def _tiles(self, q_len, k_len, block_size, device):
        m = self.mask.to(device)[:, :q_len, :k_len]
        b = block_size
        nq, nk = num_blocks(q_len, b), num_blocks(k_len, b)
        pq, pk = nq * b - m.shape[1], nk * b - m.shape[2]
        real = F.pad(torch.ones_like(m[:1]), (0, pk, 0, pq))
        m = F.pad(m, (0, pk, 0, pq))
        shape = (-1, nq, b, nk, b)
        any_ = m.reshape(shape).any(4).any(2)
        all_ = (m | ~real).reshape(shape).all(4).all(2)
        return any_, all_

    def __repr__(self) -> str:
        return f"dense_mask({tuple(self.mask.shape)})"


class TiledHeads(Pattern):
    """An ``H``-head pattern repeated ``copies`` times: head ``c * H + h`` behaves as head ``h``.

    Used to fold the batch into the heads (per-batch masks, adaptive layouts).
    """

    def __init__(self, pattern: Pattern, copies: int) -> None:
        self.base, self.copies = pattern, copies
        self.num_heads = pattern.num_heads * copies

    def allowed(self, h, q, k):
        return self.predicate(q.device)(h, q, k)

    def predicate(self, device):
        f, n = self.base.predicate(device), self.base.num_heads
        return lambda h, q, k: f(torch.remainder(h, n), q, k)

    def _row_tiles(self, q_len, k_len, block_size, device, rows):
        a, f = self.base._row_tiles(q_len, k_len, block_size, device, rows)
        shape = (self.base.num_heads, *a.shape[1:])
        return a.expand(shape).repeat(self.copies, 1, 1), f.expand(shape).repeat(self.copies, 1, 1)

    def __repr__(self) -> str:
        return f"tiled({self.base!r}, copies={self.copies})"


def _bool_mask(mask: Tensor, name: str) -> Tensor:
    """``nn.MultiheadAttention`` mask -> bool "ignore" mask (True = ignore)."""
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point():
        ninf = torch.isneginf(mask)
        if bool(((mask == 0) | ninf).all()):
            return ninf
        raise NotImplementedError(
            f"{name}: additive float masks with values other than 0 and -inf are not supported "
            "by the block-sparse backends; pass a boolean mask (True = ignore) or a pattern"
        )
    raise TypeError(f"{name} must be a bool or float tensor, got {mask.dtype}")


# --------------------------------------------------------------------- compact weights
@dataclass(frozen=True)
class BlockSparseWeights:
    """Attention probabilities of the active tiles only (what ``need_weights=True`` returns at
    long lengths).

    Attributes:
        tiles: int64 ``[N, 3]``: (head, query block, key block) of every active tile; ``head``
            indexes the ``heads`` axis below (``b * H + h`` when the batch was folded in, see
            ``batch_folded``).
        values: ``[B', N, block, block]`` probabilities inside each tile (zero on disallowed and
            padding pairs). ``B'`` is the batch, or 1 when the batch was folded into the heads.
        q_len, k_len, block_size, num_heads: the problem; ``num_heads`` is ``B * H`` when folded.
        batch_folded: whether heads are ``b * H + h``.
        average: whether the caller asked for head-averaged weights (``to_dense`` then averages).
        batch: the batch size ``B`` (to unfold folded heads).
    """

    tiles: Tensor
    values: Tensor
    q_len: int
    k_len: int
    block_size: int
    num_heads: int
    batch_folded: bool
    average: bool
    batch: int = 1

    def to_dense(self) -> Tensor:
        """Dense weights as ``nn.MultiheadAttention`` returns them (small problems only)."""
        b = self.block_size
        nq, nk = num_blocks(self.q_len, b), num_blocks(self.k_len, b)
        bp = self.values.shape[0]
        out = self.values.new_zeros(bp, self.num_heads, nq, nk, b, b)
        h, i, j = self.tiles.T
        out[:, h, i, j] = self.values
        out = out.permute(0, 1, 2, 4, 3, 5).reshape(bp, self.num_heads, nq * b, nk * b)
        out = out[:, :, : self.q_len, : self.k_len]
        if self.batch_folded:
            out = out.reshape(self.batch, self.num_heads // self.batch, self.q_len, self.k_len)
        return out.mean(1) if self.average else out


# --------------------------------------------------------------------- the module
class BlockSparseMultiheadAttention(nn.Module):
    """Drop-in ``nn.MultiheadAttention`` computing block-sparse attention over a pattern.

    Args (those of ``nn.MultiheadAttention``):
        embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim,
        batch_first, device, dtype.
    Keyword-only (the main variant's choices):
        pattern: a :class:`~workbench.patterns.Pattern` with 1 or ``num_heads`` heads (``None``:
            dense), e.g. ``P.dilated([2048, 4096], [1, 2], num_heads)``.
        block_size: tile edge of the block layout.
        backend: ``"auto"``, ``"blockwise"``, ``"flex"``, ``"triton"``, ``"sdpa"`` (dense or
            causal patterns; ``auto`` picks it for them) or ``"reference"``.
        ring_chunks: ring schedule over this many K/V chunks (1 = one shot).
        block_order: post-pattern tile visit order (``None``, ``"hilbert"``, ``"morton"``); see
            :func:`~workbench.block_sparse_attention`.
        selector: an :class:`~workbench.adaptive.AdaptiveBlockSparseAttention` that picks the
            layout from content at every call (instead of ``pattern``).
        process_group, sharding: inputs are this rank's shard of a sequence sharded across the
            group's ranks (:func:`workbench.distributed.shard_plan`); attention runs as a
            distributed ring (:mod:`workbench.distributed`). Self-attention without masks.
        sub_layer_norm: MAGNETO/LongNet Sub-LN before the output projection (off by default).
        dense_weights_limit: largest ``B * H * S_q * S_k`` for which ``need_weights=True``
            returns dense weights; above it :class:`BlockSparseWeights`.

    ``forward(query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None,
    average_attn_weights=True, is_causal=False)`` returns ``(output, weights or None)``; inputs
    are ``[B, S, E]`` with ``batch_first=True``, ``[S, B, E]`` otherwise, or unbatched ``[S, E]``.
    Note that ``need_weights`` defaults to False here (True in ``nn.MultiheadAttention``):
    weights cost a second pass.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
        *,
        pattern: Pattern | None = None,
        block_size: int = 64,
        backend: str = "auto",
        ring_chunks: int = 1,
        block_order: str | None = None,
        selector: AdaptiveBlockSparseAttention | None = None,
        process_group=None,
        sharding: str = "contiguous",
        sub_layer_norm: bool = False,
        dense_weights_limit: int = DENSE_WEIGHTS_LIMIT,
    ) -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"embed_dim and num_heads must be > 0, got {embed_dim}, {num_heads}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads "
                             f"({num_heads})")
        if add_bias_kv or add_zero_attn:
            raise NotImplementedError("add_bias_kv and add_zero_attn are not supported")
        if isinstance(dropout, Pattern):  # nn.MultiheadAttention's third argument is dropout
            raise TypeError("dropout must be a float; pass the pattern by keyword: pattern=...")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) \
                or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        if pattern is not None and not isinstance(pattern, Pattern):
            raise TypeError(f"pattern must be a workbench Pattern or None, got "
                            f"{type(pattern).__name__}")
        if pattern is not None and pattern.num_heads not in (1, num_heads):
            raise ValueError(f"pattern has {pattern.num_heads} heads but num_heads={num_heads}; "
                             "build it with num_heads=num_heads or use a 1-head pattern")
        check_positive_int("block_size", block_size)
        check_backend(backend)
        if selector is not None:
            if not isinstance(selector, AdaptiveBlockSparseAttention):
                raise TypeError("selector must be an AdaptiveBlockSparseAttention, got "
                                f"{type(selector).__name__}")
            if pattern is not None:
                raise ValueError("give either a fixed pattern or an adaptive selector, not both")
            if selector.block_size != block_size:
                raise ValueError(f"selector.block_size ({selector.block_size}) must equal "
                                 f"block_size ({block_size}): the selection is a block layout")
        fk = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.head_dim = embed_dim // num_heads
        self.dropout = float(dropout)
        self.batch_first = batch_first
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **fk))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **fk))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim, **fk))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim, **fk))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **fk))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        self.sub_ln = nn.LayerNorm(embed_dim, **fk) if sub_layer_norm else None
        self.pattern = pattern
        self.selector = selector
        self.process_group, self.sharding = process_group, sharding
        if process_group is not None and selector is not None and selector.straight_through:
            raise NotImplementedError("a straight-through selector under a process_group is not "
                                      "supported; train the gate with distillation_loss")
        self.block_size = block_size
        self.backend = backend
        self.ring_chunks = ring_chunks
        self.block_order = check_block_order(block_order)
        self._layouts = LayoutMemo()  # of calls without masks: see _fixed_pattern
        self._fixed: dict[bool, tuple[Pattern | None, Pattern]] = {}
        self.dense_weights_limit = dense_weights_limit
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # The initialization nn.MultiheadAttention uses.
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            nn.init.xavier_uniform_(self.q_proj_weight)
            nn.init.xavier_uniform_(self.k_proj_weight)
            nn.init.xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)

    # ------------------------------------------------------------------ helpers
    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        e = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else (b[:e], b[e : 2 * e], b[2 * e :])
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            if query is key and key is value:  # self-attention: one fused projection
                return F.linear(query, w, b).chunk(3, dim=-1)
            return F.linear(query, w[:e], bq), F.linear(key, w[e : 2 * e], bk), F.linear(
                value, w[2 * e :], bv)
        return (F.linear(query, self.q_proj_weight, bq), F.linear(key, self.k_proj_weight, bk),
                F.linear(value, self.v_proj_weight, bv))

    def build_pattern(
        self,
        batch: int,
        q_len: int,
        k_len: int,
        key_padding_mask: Tensor | None = None,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        selected: Pattern | None = None,
    ) -> tuple[Pattern, bool]:
        """The pattern a forward call runs, and whether the batch is folded into the heads.

        ``selected``: a per-batch pattern with ``batch * num_heads`` heads (an adaptive
        selection) used instead of the module's pattern; it always folds the batch.
        """
        h = self.num_heads
        pat: Pattern = self.pattern if self.pattern is not None else P.full()
        parts: list[Pattern] = []
        fold = selected is not None
        if is_causal:
            parts.append(P.causal())
        if attn_mask is not None:
            ignore = _bool_mask(attn_mask, "attn_mask")
            if ignore.dim() == 2:
                ignore = ignore[None]
            if ignore.dim() != 3 or tuple(ignore.shape[1:]) != (q_len, k_len) or ignore.shape[
                    0] not in (1, batch * h):
                raise ValueError(
                    f"attn_mask must be [{q_len}, {k_len}] or [{batch * h}, {q_len}, {k_len}] "
                    f"(batch * num_heads first), got {tuple(attn_mask.shape)}")
            if ignore.shape[0] > 1 and batch > 1:
                fold = True
            parts.append(DenseMask(~ignore))
        if key_padding_mask is not None:
            ignore = _bool_mask(key_padding_mask, "key_padding_mask")
            if ignore.dim() == 1:
                ignore = ignore[None]
            if tuple(ignore.shape) != (batch, k_len):
                raise ValueError(f"key_padding_mask must be [{batch}, {k_len}] (batch, keys), "
                                 f"got {tuple(key_padding_mask.shape)}")
            if batch > 1:
                fold = True
                parts.append(KeyMask((~ignore).repeat_interleave(h, 0)))
            else:
                parts.append(KeyMask(~ignore))
        if selected is not None:
            pat = selected
        elif fold and pat.num_heads > 1:
            pat = TiledHeads(pat, batch)
        for p in parts:
            pat = pat & p
        return pat, fold

    def _fixed_pattern(self, is_causal: bool) -> Pattern:
        """The pattern of a call without masks or selection: one object per ``is_causal`` (while
        ``self.pattern`` stays the same), so that its layout is built once and shared with
        other modules of the same pattern (:mod:`workbench.layout_memo`)."""
        source, pattern = self._fixed.get(is_causal, (None, None))
        if pattern is None or source is not self.pattern:
            owner = _NO_PATTERN if self.pattern is None else self.pattern
            pattern = shared(owner, ("unmasked call", is_causal),
                             lambda: self.build_pattern(1, 1, 1, is_causal=is_causal)[0])
            self._fixed[is_causal] = (self.pattern, pattern)
        return pattern

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = False,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | BlockSparseWeights | None]:
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
            if key_padding_mask is not None and key_padding_mask.dim() == 1:
                key_padding_mask = key_padding_mask[None]
        elif query.dim() != 3:
            raise ValueError(f"query must be [S, E] or 3-D, got {tuple(query.shape)}")
        same = query is key and key is value
        if self.batch_first:  # [B, S, E]
            if not same:
                query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(
                    0, 1)
            else:
                query = key = value = query.transpose(0, 1)
        if query.shape[-1] != self.embed_dim:
            raise ValueError(f"query has embed dim {query.shape[-1]}, expected {self.embed_dim}")
        # Now [S, B, E] like nn.MultiheadAttention's internals.
        sq, bsz, _ = query.shape
        sk = key.shape[0]
        q, k, v = self._project(query, key, value)
        h, d = self.num_heads, self.head_dim

        def heads(x: Tensor, s: int) -> Tensor:  # [S, B, E] -> [B, H, S, d]
            return x.reshape(s, bsz, h, d).permute(1, 2, 0, 3)

        q, k, v = heads(q, sq), heads(k, sk), heads(v, sk)
        if self.process_group is not None:
            _check_sharded_call(key_padding_mask, attn_mask, need_weights)
            selection = None if self.selector is None else self.selector.select_sharded(
                q, k, self.process_group, self.sharding)
        else:
            selection = self.selector.select(q, k) if self.selector is not None else None
        layout, dropout_p = None, self.dropout if self.training else 0.0
        if (attn_mask is None and key_padding_mask is None and selection is None
                and self.process_group is None):  # the same pattern at every such call
            pattern, fold = self._fixed_pattern(is_causal), False
            if sdpa_shortcut(pattern, self.backend, ring_chunks=self.ring_chunks,
                             dropout=dropout_p > 0, k_len=sk) is None:
                layout = self._layouts.get(pattern, sq, sk, self.block_size, q.device)
        else:
            pattern, fold = self.build_pattern(bsz, sq, sk, key_padding_mask, attn_mask,
                                               is_causal,
                                               None if selection is None else selection.pattern())
        if fold:
            q, k, v = (x.reshape(1, bsz * h, *x.shape[2:]) for x in (q, k, v))
        out = block_sparse_attention(q, k, v, pattern, self.block_size, backend=self.backend,
                                     layout=layout, ring_chunks=self.ring_chunks,
                                     block_order=self.block_order,
                                     dropout_p=dropout_p,
                                     process_group=self.process_group, sharding=self.sharding)
        if selection is not None:
            out = self.selector.straight_through_gradient(out.reshape(bsz, h, sq, d), selection)
        weights = None
        if need_weights:
            weights = self._weights(q, k, pattern, fold, bsz, average_attn_weights)
        out = out.reshape(bsz, h, sq, d).permute(2, 0, 1, 3).reshape(sq, bsz, h * d)
        if self.sub_ln is not None:
            out = self.sub_ln(out)
        out = self.out_proj(out)
        if self.batch_first:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1)
            if isinstance(weights, Tensor):
                weights = weights.squeeze(0)
        return out, weights

    def _weights(self, q: Tensor, k: Tensor, pattern: Pattern, fold: bool, bsz: int,
                 average: bool) -> Tensor | BlockSparseWeights:
        """Attention probabilities: dense when small, :class:`BlockSparseWeights` otherwise."""
        hh, sq, sk = q.shape[1], q.shape[2], k.shape[2]
        scale = 1.0 / math.sqrt(q.shape[-1])
        if q.shape[0] * hh * sq * sk <= self.dense_weights_limit:
            mask = pattern.token_mask(sq, q.device)[:, :, :sk] if sq == sk else _mask_rect(
                pattern, sq, sk, q.device)
            s = torch.matmul(q, k.transpose(-1, -2)) * scale
            s = s.masked_fill(~mask, -torch.inf)
            empty = ~mask.any(-1, keepdim=True)
            p = torch.softmax(s.masked_fill(empty, 0.0), -1).masked_fill(~mask, 0.0)
            if fold:
                p = p.reshape(bsz, self.num_heads, sq, sk)
            return p.mean(1) if average else p
        return _compact_weights(q, k, pattern, self.block_size, scale, fold, average, bsz)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"pattern={self.pattern!r}, selector={self.selector is not None}, "
                f"block_size={self.block_size}, backend={self.backend!r}, "
                f"ring_chunks={self.ring_chunks}, batch_first={self.batch_first}")


def _check_sharded_call(key_padding_mask: Tensor | None, attn_mask: Tensor | None,
                        need_weights: bool) -> None:
    """Under a process group masks and weights would need the whole sequence: refuse them."""
    if key_padding_mask is not None or attn_mask is not None:
        raise NotImplementedError(
            "key_padding_mask and attn_mask are not supported under a process_group (they are "
            "whole-sequence tensors); express the structure as a pattern, e.g. "
            "patterns.KeyMask or patterns.causal()")
    if need_weights:
        raise NotImplementedError("need_weights=True is not supported under a process_group")


def _mask_rect(pattern: Pattern, sq: int, sk: int, device) -> Tensor:
    hh = torch.arange(pattern.num_heads, device=device)[:, None, None]
    qq = torch.arange(sq, device=device)[None, :, None]
    kk = torch.arange(sk, device=device)[None, None, :]
    return pattern.allowed(hh, qq, kk).expand(pattern.num_heads, sq, sk)


def _compact_weights(q: Tensor, k: Tensor, pattern: Pattern, block_size: int, scale: float,
                     fold: bool, average: bool, batch: int) -> BlockSparseWeights:
    """Probabilities of every active tile, normalized by each row's exact log-sum-exp."""
    bsz, hh, sq, d = q.shape
    sk = k.shape[2]
    b = block_size
    lay = pattern.block_structure(sq, b, q.device, k_len=sk).expand_heads(hh)
    _, lse = block_sparse_attention(q, k, k[..., :1], pattern, b, return_lse=True,
                                    layout=lay, backend="blockwise")
    tiles = lay.active.nonzero()
    nq, nk = lay.active.shape[1:]
    qp = F.pad(q, (0, 0, 0, nq * b - sq)).reshape(bsz, hh, nq, b, d)
    kp = F.pad(k, (0, 0, 0, nk * b - sk)).reshape(bsz, hh, nk, b, d)
    lp = F.pad(lse, (0, nq * b - sq), value=-torch.inf).reshape(bsz, hh, nq, b)
    th, ti, tj = tiles.T
    s = torch.matmul(qp[:, th, ti], kp[:, th, tj].transpose(-1, -2)) * scale  # [B, N, b, b]
    qpos = ti[:, None, None] * b + torch.arange(b, device=q.device)[None, :, None]
    kpos = tj[:, None, None] * b + torch.arange(b, device=q.device)[None, None, :]
    ok = pattern.allowed(th[:, None, None], qpos, kpos) & (qpos < sq) & (kpos < sk)
    lrow = lp[:, th, ti][..., None]
    p = torch.exp(s - torch.where(torch.isfinite(lrow), lrow, torch.zeros_like(lrow)))
    p = p.masked_fill(~ok, 0.0).to(q.dtype)
    return BlockSparseWeights(tiles, p, sq, sk, b, hh, fold, average, batch)
