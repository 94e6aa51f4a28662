"""The multi-head module: block-sparse (ring, dilated) attention as an ``nn.MultiheadAttention``.

:class:`BlockSparseMultiheadAttention` takes ``nn.MultiheadAttention``'s constructor, parameter
names, forward signature and masks, so a state dict loads into it; with ``pattern=None`` it
computes what that module computes. Masks become patterns intersected with the module's (a
per-batch mask folds the batch into the heads, ``b * H + h``); a float mask's finite values
become a ``score_mod``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import patterns as P
from .adaptive import AdaptiveBlockSparseAttention
from .attention import (
    attend,
    block_sparse_attention,
    check_dropout,
    check_options,
    check_pattern,
    check_sizes,
    check_tensors,
    dropout_of,
)
from .layout import num_blocks
from .patterns import DenseMask, KeyMask, Pattern, check_positive_int, head_predicate, tile_batch
from .plan import LastCall, Plans, check_plans
from .score_mods import ScoreMod, modded

__all__ = ["BlockSparseMultiheadAttention", "BlockSparseWeights"]


def _ignored(mask: Tensor) -> Tensor:
    """An ``nn.MultiheadAttention`` mask as bool (True = ignore): a float mask's ``-inf``."""
    return mask if mask.dtype == torch.bool else torch.isneginf(mask)


def _bias(mask: Tensor | None) -> Tensor | None:
    """The additive part of a float mask (``-inf`` entries set to 0), or None when it adds
    nothing (a bool mask, or one of only 0 and ``-inf`` that requires no grad)."""
    if mask is None or not mask.is_floating_point():
        return None
    bias = mask.masked_fill(torch.isneginf(mask), 0.0)
    return bias if mask.requires_grad or bool((bias != 0).any()) else None


def _call_score_mod(user: ScoreMod | None, attn_bias: Tensor | None, pad_bias: Tensor | None,
                    heads: int, fold: bool) -> ScoreMod | None:
    """The score mod of one call, in the indices of the problem it runs: ``user`` (the
    module's) sees the batch element and head even when the batch is folded into the heads
    (``h = b * heads + head``), then the additive masks ``attn_bias`` ``[Sq, Sk]`` or ``[B *
    heads, Sq, Sk]`` and ``pad_bias`` ``[B, Sk]`` are added."""
    if user is None and attn_bias is None and pad_bias is None:
        return None
    per_head = attn_bias is not None and attn_bias.dim() == 3

    def module_score_mod(s: Tensor, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        if fold:
            b, h = h // heads, h % heads
        if user is not None:
            s = user(s, b, h, q, k)
        if attn_bias is not None:
            s = s + (attn_bias[b * heads + h, q, k] if per_head else attn_bias[q, k])
        return s if pad_bias is None else s + pad_bias[b, k]

    return module_score_mod


# --------------------------------------------------------------------- compact weights
@dataclass(frozen=True)
class BlockSparseWeights:
    """Attention probabilities of the active tiles only (what ``need_weights=True`` returns at
    long lengths).

    Attributes:
        tiles: int64 ``[N, 3]``: (head, query block, key block) of every active tile; with
            ``batch_folded`` the head is ``b * H + h`` and ``num_heads`` is ``B * H``.
        values: ``[B', N, block, block]`` probabilities inside each tile (zero on disallowed and
            padding pairs); ``B'`` is the batch, or 1 when folded.
        average, unbatched: how ``to_dense`` returns them (head-averaged; without the batch).
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
    unbatched: bool = False

    def to_dense(self) -> Tensor:
        """Dense weights as ``nn.MultiheadAttention`` returns them (small problems only):
        ``[B, S_q, S_k]``, per head ``[B, H, S_q, S_k]``, without ``B`` when unbatched."""
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
        out = out.mean(1) if self.average else out
        return out.squeeze(0) if self.unbatched else out


# --------------------------------------------------------------------- the module
class BlockSparseMultiheadAttention(nn.Module):
    """Drop-in ``nn.MultiheadAttention`` computing block-sparse attention over a pattern.

    The positional arguments and ``device``, ``dtype`` are ``nn.MultiheadAttention``'s.

    Args:
        pattern: a :class:`~workbench.patterns.Pattern` with 1 or ``num_heads`` heads (``None``:
            dense), e.g. ``P.dilated([2048, 4096], [1, 2], num_heads)``.
        block_size, backend, ring_chunks, block_order, score_mod: as in
            :func:`~workbench.block_sparse_attention` (``score_mod`` applies before any mask).
        selector: an :class:`~workbench.adaptive.AdaptiveBlockSparseAttention` that picks the
            layout from the projected q, k at every call, instead of ``pattern``; its own
            ``backend`` and ``ring_chunks`` give way to the module's.
        process_group, sharding: inputs are this rank's shard (:mod:`workbench.distributed`);
            self-attention without masks or weights.
        sub_layer_norm: MAGNETO's Sub-LN (arXiv 2210.06423, used by LongNet): a ``LayerNorm``
            before the output projection.
        plans: where calls without masks keep their plans (default: the module's own
            :class:`~workbench.plan.Plans`; share one between layers).
        dense_weights_limit: largest ``B * H * S_q * S_k`` for which ``need_weights=True``
            returns dense weights; above it :class:`BlockSparseWeights`.

    Raises:
        ValueError, TypeError: a bad option, named.
        NotImplementedError: ``add_bias_kv``, ``add_zero_attn``, or a straight-through selector
            under a process group.

    NOTE, departures from ``nn.MultiheadAttention``: a query with no allowed key outputs zeros
    (not NaN); ``need_weights`` defaults to False; ``is_causal`` needs no ``attn_mask``; dropout
    is workbench's hashed dropout (:mod:`workbench.backends.dropout`), so a seed repeats a run
    but not ``F.dropout``'s mask.
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
        dense_weights_limit: int = 1 << 22,
        plans: Plans | None = None,
        score_mod: ScoreMod | None = None,
    ) -> None:
        super().__init__()
        check_positive_int("embed_dim", embed_dim)
        check_positive_int("num_heads", num_heads)
        for name, dim in (("kdim", kdim), ("vdim", vdim)):
            if dim is not None:
                check_positive_int(name, dim)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads "
                             f"({num_heads})")
        if add_bias_kv or add_zero_attn:
            raise NotImplementedError("add_bias_kv and add_zero_attn are not supported")
        if isinstance(dropout, Pattern):  # nn.MultiheadAttention's third argument is dropout
            raise TypeError("dropout must be a float; pass the pattern by keyword: pattern=...")
        if pattern is not None:
            check_pattern(pattern, num_heads)
        block_order = check_options(block_size=block_size, backend=backend,
                                    ring_chunks=ring_chunks, scale=None, block_order=block_order,
                                    sharding=sharding, process_group=process_group,
                                    score_mod=score_mod)
        check_positive_int("dense_weights_limit", dense_weights_limit, maximum=None)
        if selector is not None:
            if not isinstance(selector, AdaptiveBlockSparseAttention):
                raise TypeError("selector must be an AdaptiveBlockSparseAttention, got "
                                f"{type(selector).__name__}")
            if pattern is not None:
                raise ValueError("give either a fixed pattern or an adaptive selector, not both")
            if selector.block_size != block_size:
                raise ValueError(f"selector.block_size ({selector.block_size}) must equal "
                                 f"block_size ({block_size}): the selection is a block layout")
            if process_group is not None and selector.straight_through:
                raise NotImplementedError("a straight-through selector under a process_group is "
                                          "not supported; train the gate with distillation_loss")
        fk = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.kdim = embed_dim if kdim is None else kdim
        self.vdim = embed_dim if vdim is None else vdim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.head_dim = embed_dim // num_heads
        self.dropout = check_dropout(dropout, "dropout")
        self.batch_first = batch_first
        def param(*shape: int, used: bool = True) -> nn.Parameter | None:
            return nn.Parameter(torch.empty(*shape, **fk)) if used else None

        same = self._qkv_same_embed_dim  # nn.MultiheadAttention's parameters, in its order
        self.register_parameter("in_proj_weight", param(3 * embed_dim, embed_dim, used=same))
        for name, dim in (("q_proj_weight", embed_dim), ("k_proj_weight", self.kdim),
                          ("v_proj_weight", self.vdim)):
            self.register_parameter(name, param(embed_dim, dim, used=not same))
        self.register_parameter("in_proj_bias", param(3 * embed_dim, used=bias))
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        self.sub_ln = nn.LayerNorm(embed_dim, **fk) if sub_layer_norm else None
        self.pattern = pattern
        self.selector = selector
        self.process_group, self.sharding = process_group, sharding
        self.score_mod = score_mod
        self.block_size = block_size
        self.backend = backend
        self.ring_chunks = ring_chunks
        self.block_order = block_order
        self.plans = Plans() if plans is None else check_plans(plans)  # calls without masks
        self.last_call = LastCall()  # the backend prepared for the last call without masks
        self._fixed: dict[bool, tuple[Pattern | None, Pattern]] = {}
        self.dense_weights_limit = dense_weights_limit
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # The initialization nn.MultiheadAttention uses, in its order.
        for w in (self.in_proj_weight, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            if w is not None:
                nn.init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            nn.init.constant_(self.in_proj_bias, 0.0)
            nn.init.constant_(self.out_proj.bias, 0.0)

    # ------------------------------------------------------------------ helpers
    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self._qkv_same_embed_dim and query is key and key is value:  # one fused projection
            return F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        weights = (self.in_proj_weight.chunk(3) if self._qkv_same_embed_dim else
                   (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight))
        biases = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
        return tuple(F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases))

    def build_pattern(self, batch: int, q_len: int, k_len: int,
                      key_padding_mask: Tensor | None = None, attn_mask: Tensor | None = None,
                      is_causal: bool = False,
                      selected: Pattern | None = None) -> tuple[Pattern, bool]:
        """The pattern a forward call runs, and whether the batch is folded into the heads.
        Masks are shaped as ``forward`` checks them; ``selected`` (``batch * num_heads`` heads,
        an adaptive selection) replaces the module's pattern and always folds the batch."""
        parts: list[Pattern] = [P.causal()] if is_causal else []
        fold = selected is not None
        if attn_mask is not None:
            keep = ~_ignored(attn_mask).reshape(-1, q_len, k_len)
            fold = fold or (keep.shape[0] > 1 and batch > 1)
            parts.append(DenseMask(keep))
        if key_padding_mask is not None:
            keep = ~_ignored(key_padding_mask).reshape(-1, k_len)
            fold = fold or batch > 1
            parts.append(KeyMask(keep.repeat_interleave(self.num_heads, 0) if batch > 1 else keep))
        pat: Pattern = self.pattern if self.pattern is not None else P.full()
        if selected is not None:
            pat = selected
        elif fold:
            pat = tile_batch(pat, batch)
        for p in parts:
            pat = pat & p
        return pat, fold

    def _fixed_pattern(self, is_causal: bool) -> Pattern:
        """The pattern of a call without masks or selection, built once per ``is_causal`` (while
        ``self.pattern`` stays the same); its plans are kept in :attr:`plans`."""
        source, pattern = self._fixed.get(is_causal, (None, None))
        if pattern is None or source is not self.pattern:
            pattern = self.build_pattern(1, 1, 1, is_causal=is_causal)[0]
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
        """Attention of ``query`` over ``key``/``value``, as ``nn.MultiheadAttention.forward``.

        Args:
            query: ``[N, L, E]`` with ``batch_first=True``, ``[L, N, E]`` otherwise, or
                unbatched ``[L, E]``.
            key, value: ``[N, S, kdim]`` / ``[N, S, vdim]`` (laid out like query), of query's
                dtype and device, which must be the parameters' (except under autocast).
            key_padding_mask: ``[N, S]`` (unbatched ``[S]``); attn_mask: ``[L, S]`` or
                ``[N * num_heads, L, S]`` (unbatched ``[num_heads, L, S]``); each bool (True =
                ignore) or float (added to the scores).
            is_causal: also restrict query ``i`` to keys ``j <= i``.

        Returns:
            ``(output, weights)``: ``output`` like ``query`` with ``embed_dim`` features;
            ``weights`` ``None`` unless ``need_weights``, else ``[N, L, S]`` (per head
            ``[N, num_heads, L, S]``, unbatched without ``N``), or :class:`BlockSparseWeights`
            above ``dense_weights_limit``.

        Raises:
            TypeError, ValueError: a bad input, named. NotImplementedError: masks or weights
                under a ``process_group``.
        """
        batched = _check_forward_inputs(self, query, key, value, key_padding_mask, attn_mask)
        if not batched and key_padding_mask is not None:
            key_padding_mask = key_padding_mask[None]
        query, key, value = _seq_first(query, key, value, batched, self.batch_first)
        (sq, bsz, _), sk = query.shape, key.shape[0]  # [S, B, E] like nn.MultiheadAttention's
        h, d = self.num_heads, self.head_dim
        q, k, v = (x.reshape(x.shape[0], bsz, h, d).permute(1, 2, 0, 3)  # [B, H, S, d]
                   for x in self._project(query, key, value))
        if self.process_group is not None and (key_padding_mask is not None
                                               or attn_mask is not None or need_weights):
            raise NotImplementedError(
                "key_padding_mask, attn_mask and need_weights=True are not supported under a "
                "process_group (they are whole-sequence tensors); express a mask as a pattern, "
                "e.g. patterns.KeyMask or patterns.causal()")
        selection = None if self.selector is None else self.selector.select(
            q, k, self.process_group, self.sharding)
        dropout_p = self.dropout if self.training else 0.0
        if (attn_mask is None and key_padding_mask is None and selection is None
                and self.process_group is None):  # the same pattern at every such call
            pattern, fold = self._fixed_pattern(is_causal), False
            out = attend(q, k, v, pattern, self.block_size, backend=self.backend,
                         return_lse=False, scale=None, ring_chunks=self.ring_chunks,
                         block_order=self.block_order, dropout=dropout_of(dropout_p, None),
                         layout=lambda: self.plans.get(pattern, sq, sk, self.block_size,
                                                       q.device).layout,
                         score_mod=self.score_mod, last=self.last_call)
            score_mod = self.score_mod
        else:
            pattern, fold = self.build_pattern(bsz, sq, sk, key_padding_mask, attn_mask,
                                               is_causal,
                                               None if selection is None else selection.pattern())
            if fold:
                q, k, v = (x.reshape(1, bsz * h, *x.shape[2:]) for x in (q, k, v))
            score_mod = _call_score_mod(self.score_mod, _bias(attn_mask),
                                        _bias(key_padding_mask), h, fold)
            out = block_sparse_attention(q, k, v, pattern, self.block_size, backend=self.backend,
                                         ring_chunks=self.ring_chunks,
                                         block_order=self.block_order, dropout_p=dropout_p,
                                         process_group=self.process_group,
                                         sharding=self.sharding, score_mod=score_mod)
        if selection is not None:
            out = self.selector.straight_through_gradient(out.reshape(bsz, h, sq, d), selection)
        weights = None
        if need_weights:
            weights = _tile_weights(q, k, pattern, self.block_size, fold, average_attn_weights,
                                    bsz, not batched, score_mod)
            if q.shape[0] * q.shape[1] * sq * sk <= self.dense_weights_limit:
                weights = weights.to_dense()
        out = out.reshape(bsz, h, sq, d).permute(2, 0, 1, 3).reshape(sq, bsz, h * d)
        if self.sub_ln is not None:
            out = self.sub_ln(out)
        out = self.out_proj(out)
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"pattern={self.pattern!r}, selector={self.selector is not None}, "
                f"block_size={self.block_size}, backend={self.backend!r}, "
                f"ring_chunks={self.ring_chunks}, batch_first={self.batch_first}")


def _check_forward_inputs(mha: BlockSparseMultiheadAttention, query: object, key: object,
                          value: object, key_padding_mask: object, attn_mask: object) -> bool:
    """Check ``forward``'s tensors by ``nn.MultiheadAttention``'s rules (ranks, last dimensions,
    batch sizes, lengths, dtypes, devices, mask shapes); returns whether the call is batched.
    Raises ``TypeError`` (types, dtypes) or ``ValueError`` (the rest), naming the argument."""
    if key_padding_mask is None and attn_mask is None and _plain_inputs(mha, query, key, value):
        return True
    named = {"query": query, "key": key, "value": value}
    check_tensors(named)
    for name, m in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
        if m is not None and not (isinstance(m, Tensor) and (m.dtype == torch.bool
                                                             or m.is_floating_point())):
            raise TypeError(f"{name} must be a bool (True = ignore) or float (added to the "
                            f"scores) tensor or None, got {getattr(m, 'dtype', type(m).__name__)}")
    ndim, qshape, kshape = query.dim(), query.shape, key.shape
    if ndim not in (2, 3):
        seq = "[N, L, E]" if mha.batch_first else "[L, N, E]"
        raise ValueError(f"query must be 2-D (unbatched [L, E]) or 3-D (batched {seq} with "
                         f"batch_first={mha.batch_first}), got shape {tuple(qshape)}")
    batched = ndim == 3
    kind = "batched" if batched else "unbatched"
    for (name, x), arg, size in zip(named.items(), ("embed_dim", "kdim", "vdim"),
                                    (mha.embed_dim, mha.kdim, mha.vdim)):
        if x.dim() != ndim:
            raise ValueError(f"{name} must be {ndim}-D like the {kind} query (query, key and "
                             f"value are all batched or all unbatched), got shape "
                             f"{tuple(x.shape)}")
        if x.shape[-1] != size:
            raise ValueError(f"{name} has embedding size {x.shape[-1]} (last dimension) but the "
                             f"module was built with {arg}={size}")
    b_dim, s_dim = ((0, 1) if mha.batch_first else (1, 0)) if batched else (None, 0)
    if batched:
        check_sizes(named, {"batch size": b_dim}, f" with batch_first={mha.batch_first}")
    check_sizes({"key": key, "value": value}, {"length": s_dim})
    param, dtype, device = mha.out_proj.weight, query.dtype, query.device
    if device != param.device:
        raise ValueError(f"query, key and value are on {device} but the module's parameters "
                         f"are on {param.device}; move one to the other (module.to(device))")
    if dtype != param.dtype and not (torch.amp.is_autocast_available(device.type)
                                     and torch.is_autocast_enabled(device.type)):
        raise TypeError(f"query, key and value have dtype {dtype} but the module's "
                        f"parameters have {param.dtype}; cast one to the other (module.to(dtype))")
    q_len, k_len = qshape[s_dim], kshape[s_dim]
    heads = mha.num_heads * (qshape[b_dim] if batched else 1)
    if key_padding_mask is not None:
        want, text = ((qshape[b_dim], k_len), "(N, S)") if batched else ((k_len,), "(S,)")
        if tuple(key_padding_mask.shape) != want:
            raise ValueError(f"key_padding_mask must have shape {text} = {want} for {kind} "
                             f"input, got {tuple(key_padding_mask.shape)}")
    if attn_mask is not None and tuple(attn_mask.shape) not in ((q_len, k_len),
                                                              (heads, q_len, k_len)):
        text = "N * num_heads, L, S" if batched else "num_heads, L, S"
        raise ValueError(f"attn_mask must have shape (L, S) = {(q_len, k_len)} or ({text}) = "
                         f"{(heads, q_len, k_len)} for {kind} input, got "
                         f"{tuple(attn_mask.shape)}")
    return batched


def _plain_inputs(mha: BlockSparseMultiheadAttention, query: object, key: object,
                  value: object) -> bool:
    """Whether batched inputs of the parameters' dtype and device pass
    :func:`_check_forward_inputs` (the common case, decided in one expression; the full check
    names what is wrong)."""
    try:
        (q, k, v), param = (query.shape, key.shape, value.shape), mha.out_proj.weight
        n = 0 if mha.batch_first else 1
        return (type(query) is type(key) is type(value) is Tensor and len(q) == len(k) == len(v)
                == 3 and query.dtype == key.dtype == value.dtype == param.dtype
                and query.is_floating_point()
                and query.device == key.device == value.device == param.device
                and (q[2], k[2], v[2]) == (mha.embed_dim, mha.kdim, mha.vdim)
                and q[n] == k[n] == v[n] and k[1 - n] == v[1 - n])
    except AttributeError:
        return False


def _seq_first(query: Tensor, key: Tensor, value: Tensor, batched: bool,
               batch_first: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The inputs as ``[S, B, E]`` views (unbatched ones with ``B = 1``), keeping which of them
    are the same tensor (self-attention then projects once)."""
    if batched and not batch_first:
        return query, key, value

    def view(x: Tensor) -> Tensor:
        return x.transpose(0, 1) if batched else x.unsqueeze(1)

    q = view(query)
    k = q if key is query else view(key)
    return q, k, q if value is query else k if value is key else view(value)


def _tile_weights(q: Tensor, k: Tensor, pattern: Pattern, block_size: int, fold: bool,
                  average: bool, batch: int, unbatched: bool,
                  score_mod: ScoreMod | None) -> BlockSparseWeights:
    """Probabilities of every active tile, normalized by each row's exact log-sum-exp."""
    bsz, hh, sq, d = q.shape
    sk, b, scale = k.shape[2], block_size, 1.0 / math.sqrt(d)
    lay = pattern.block_structure(sq, b, q.device, k_len=sk).expand_heads(hh)
    _, lse = block_sparse_attention(q, k, k[..., :1], pattern, b, return_lse=True,
                                    layout=lay, backend="blockwise", score_mod=score_mod)
    tiles = lay.active.nonzero()
    nq, nk = lay.active.shape[1:]
    qp = F.pad(q, (0, 0, 0, nq * b - sq)).reshape(bsz, hh, nq, b, d)
    kp = F.pad(k, (0, 0, 0, nk * b - sk)).reshape(bsz, hh, nk, b, d)
    lp = F.pad(lse, (0, nq * b - sq), value=-torch.inf).reshape(bsz, hh, nq, b)
    th, ti, tj = tiles.T
    s = torch.matmul(qp[:, th, ti], kp[:, th, tj].transpose(-1, -2)) * scale  # [B, N, b, b]
    qpos = ti[:, None, None] * b + torch.arange(b, device=q.device)[None, :, None]
    kpos = tj[:, None, None] * b + torch.arange(b, device=q.device)[None, None, :]
    qi, ki = qpos.clamp(max=sq - 1), kpos.clamp(max=sk - 1)  # padding asks about real positions
    if score_mod is not None:
        s = modded(score_mod, s, torch.arange(bsz, device=q.device)[:, None, None, None],
                   th[:, None, None], qi, ki)
    ok = head_predicate(pattern, q.device)(th[:, None, None], qi, ki) & (qpos < sq) & (kpos < sk)
    lrow = lp[:, th, ti][..., None]
    p = torch.exp(s - torch.where(torch.isfinite(lrow), lrow, torch.zeros_like(lrow)))
    p = p.masked_fill(~ok, 0.0).to(q.dtype)
    return BlockSparseWeights(tiles, p, sq, sk, b, hh, fold, average, batch, unbatched)
