"""Content-adaptive block sparsity: per batch element and head, each query block keeps the
``max(1, round(density * nk))`` key blocks whose mean-pooled keys (optionally through a learned
linear gate) score highest against its pooled queries, always its own block and, when causal,
never a future one; attention over that :class:`~workbench.patterns.BlockSelection` is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import patterns as P
from .attention import block_sparse_attention, check_options, check_pattern, check_qkv
from .distributed import gather_block_summaries
from .layout import block_lengths, num_blocks, tile_sum
from .patterns import BlockSelection, Pattern, check_density, check_positive_int, tile_batch

__all__ = ["AdaptiveBlockSparseAttention", "Selection", "block_scores", "captured_mass",
           "distillation_loss", "fold_batch", "pool_blocks", "select_blocks", "topk_budget"]


# --------------------------------------------------------------------- selection
def fold_batch(x: Tensor) -> Tensor:
    """``[B, H, S, D] -> [1, B * H, S, D]`` (head index ``b * H + h``): per-batch layouts."""
    return x.reshape(1, x.shape[0] * x.shape[1], *x.shape[2:])


def pool_blocks(x: Tensor, block_size: int) -> Tensor:
    """Mean over blocks of ``block_size`` tokens: ``[..., S, D] -> [..., nb, D]`` (the last,
    possibly short, block averages only its real tokens)."""
    s = x.shape[-2]
    n = num_blocks(s, block_size)
    # Pad only a short last block: padding copies the whole tensor, and pooling is memory-bound.
    xp = x if s == n * block_size else F.pad(x, (0, 0, 0, n * block_size - s))
    counts = block_lengths(s, block_size, x.device).to(x.dtype)
    return xp.unflatten(-2, (n, block_size)).sum(-2) / counts[:, None]


def block_scores(q: Tensor, k: Tensor, block_size: int, scale: float | None = None) -> Tensor:
    """Block scores ``[..., nq, nk]``: pooled queries against pooled keys."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return torch.matmul(pool_blocks(q, block_size), pool_blocks(k, block_size).transpose(-1, -2)
                        ) * scale


def _check_density(density: object) -> float:
    return check_density(density, meaning="the fraction of key blocks kept")


def topk_budget(density: float, nk: int) -> int:
    """Key blocks kept per query block: ``max(1, round(density * nk))``, at most ``nk``."""
    return min(nk, max(1, round(_check_density(density) * nk)))


def _eligible(nq: int, nk: int, causal: bool, device) -> Tensor:
    """Bool ``[nq, nk]``: the keys (or key blocks) ``j`` query ``i`` may attend: ``j <= i`` when
    ``causal``, else all."""
    every = torch.ones(nq, nk, dtype=torch.bool, device=device)
    return every.tril() if causal else every


def select_blocks(scores: Tensor, density: float, *, causal: bool = False,
                  keep_diagonal: bool = True) -> Tensor:
    """Bool, the shape of ``scores [..., nq, nk]``: the :func:`topk_budget` best key blocks per
    query block, the diagonal always when ``keep_diagonal``, never ``j > i`` when ``causal``."""
    nq, nk = scores.shape[-2:]
    k = topk_budget(density, nk)
    elig = _eligible(nq, nk, causal, scores.device)
    s = scores.detach().masked_fill(~elig, -torch.inf)
    if keep_diagonal:
        diag = torch.eye(nq, nk, dtype=torch.bool, device=scores.device)
        s = s.masked_fill(diag, torch.inf)
    idx = s.topk(k, dim=-1).indices
    sel = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    sel.scatter_(-1, idx, True)
    return sel & elig


def captured_mass(q: Tensor, k: Tensor, allowed: Tensor, scale: float | None = None) -> Tensor:
    """Fraction of the dense softmax mass inside ``allowed`` (bool, broadcastable to
    ``[..., Sq, Sk]``) per query row: ``[..., Sq]``. Dense: small sizes only."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, -1)
    return (p * allowed).sum(-1)


def distillation_loss(gate_scores: Tensor, q: Tensor, k: Tensor, block_size: int,
                      causal: bool = False) -> Tensor:
    """SeerAttention-style self-distillation: KL(true block mass || softmax of gate scores),
    the target being dense attention summed per tile, averaged over its rows (small sizes)."""
    with torch.no_grad():
        s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        s = s.masked_fill(~_eligible(*s.shape[-2:], causal, s.device), -torch.inf)
        p = torch.softmax(s, -1)
        nk = gate_scores.shape[-1]
        pk = F.pad(p, (0, nk * block_size - p.shape[-1])).unflatten(-1, (nk, block_size)).sum(-1)
        target = pool_blocks(pk, block_size)  # [..., nq, nk], rows sum to 1
    elig = _eligible(*gate_scores.shape[-2:], causal, gate_scores.device)
    logp = torch.log_softmax(gate_scores.masked_fill(~elig, -torch.inf), -1)
    return F.kl_div(logp.masked_fill(~elig, 0.0), target, reduction="batchmean")


@dataclass(frozen=True)
class Selection:
    """The pattern one call runs (:meth:`pattern`) and the block scores behind it.

    Attributes:
        scores: block scores ``[B, H, nq, nk]`` at ``block_size``.
        chosen: bool ``[B, H, nq, nk]`` tiles chosen from the content, or ``None`` (fallback).
        fixed: a pattern of 1 or ``H`` heads (``always``, or the fallback), or ``None``.
        selected: derived, bool ``[B, H, nq, nk]``: the tiles a kernel computes.

    Raises:
        ValueError: neither ``chosen`` nor ``fixed``, or they disagree with ``scores``;
            ``causal`` with ``q_len != k_len``.
    """

    scores: Tensor
    chosen: Tensor | None
    fixed: Pattern | None
    block_size: int
    q_len: int
    k_len: int
    causal: bool
    selected: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.chosen is None and self.fixed is None:
            raise ValueError("a Selection needs chosen tiles, a fixed pattern, or both")
        if self.chosen is not None and self.chosen.shape != self.scores.shape:
            raise ValueError(f"chosen {tuple(self.chosen.shape)} must have the shape of scores "
                             f"{tuple(self.scores.shape)}")
        if self.fixed is not None:
            check_pattern(self.fixed, self.scores.shape[1], "fixed")
        if self.causal and self.q_len != self.k_len:
            raise ValueError(f"causal=True is causal self-attention: q and k must have the same "
                             f"length, got {self.q_len} and {self.k_len} (use causal=False for "
                             f"cross-attention)")
        object.__setattr__(self, "selected", self._run_tiles())

    def _run_tiles(self) -> Tensor:
        b, h, nq, nk = self.scores.shape
        if self.fixed is None:  # chosen tiles are whole; a causal diagonal tile holds (q, q)
            return self.chosen & _eligible(nq, nk, self.causal, self.chosen.device)
        if self.chosen is None:  # the fixed part alone: one copy serves every batch element
            pat = self.fixed & P.causal() if self.causal else self.fixed
            act = self._active(pat)  # [1 or H, nq, nk]
            return act.expand(b, h, nq, nk).contiguous()
        return self._active(self.pattern()).reshape(b, h, nq, nk)

    def _active(self, pattern: Pattern) -> Tensor:
        return pattern.block_structure(self.q_len, self.block_size, self.scores.device,
                                       k_len=self.k_len).active

    def pattern(self) -> Pattern:
        """The exact token-level pattern, batch folded into the heads (``b * H + h``):
        ``BlockSelection(chosen) | tile_batch(fixed)``, ``& causal()`` when ``causal``."""
        b, h, nq, nk = self.scores.shape
        parts: list[Pattern] = []
        if self.chosen is not None:
            parts.append(BlockSelection(self.chosen.reshape(b * h, nq, nk), self.block_size,
                                        self.q_len, self.k_len))
        if self.fixed is not None:
            parts.append(tile_batch(self.fixed, b))
        pat = parts[0] if len(parts) == 1 else parts[0] | parts[1]
        return pat & P.causal() if self.causal else pat

    def density(self) -> float:
        """The area of the :attr:`selected` tiles over ``q_len * k_len``, averaged."""
        sel, b = self.selected.flatten(0, 1), self.block_size
        area = tile_sum(sel, block_lengths(self.q_len, b, sel.device),
                        block_lengths(self.k_len, b, sel.device))
        return float(area.sum()) / (sel.shape[0] * self.q_len * self.k_len)


# --------------------------------------------------------------------- the module
class AdaptiveBlockSparseAttention(nn.Module):
    """Block-sparse attention over tiles selected from q/k content, per batch and head;
    ``forward(q, k, v, return_selection=False)`` takes ``[B, H, S, D]``.

    Args:
        block_size: selection and kernel block size.
        density: fraction of key blocks kept per query block, in ``(0, 1]``.
        causal: autoregressive self-attention (queries and keys of one length).
        head_dim: the gate's input size, needed only with ``trainable=True``.
        trainable: learn linear maps of pooled Q and K (initialized to the identity).
        straight_through: train the gate through the output (:meth:`straight_through_gradient`).
        always: a fixed pattern (1 or ``H`` heads) joined into every call's pattern.
        fallback: the fixed pattern run instead when ``adaptive=False`` or the keys have fewer
            than ``min_blocks`` blocks (needed then).
        backend, ring_chunks: as for :func:`workbench.block_sparse_attention`.
        process_group, sharding: inputs are this rank's shard; the selection is made from
            gathered block summaries (:meth:`select`), the attention runs as a ring.

    Raises:
        TypeError, ValueError: a bad option, named.
        NotImplementedError: ``straight_through`` under a ``process_group``.
    """

    def __init__(
        self,
        block_size: int = 64,
        density: float = 0.1,
        *,
        causal: bool = False,
        head_dim: int | None = None,
        trainable: bool = False,
        straight_through: bool = False,
        always: Pattern | None = None,
        fallback: Pattern | None = None,
        adaptive: bool = True,
        min_blocks: int = 1,
        backend: str = "auto",
        ring_chunks: int = 1,
        process_group=None,
        sharding: str = "contiguous",
    ) -> None:
        super().__init__()
        density = _check_density(density)
        check_options(block_size=block_size, backend=backend, ring_chunks=ring_chunks,
                      scale=None, block_order=None, sharding=sharding)
        for name, flag in (("causal", causal), ("trainable", trainable),
                           ("straight_through", straight_through), ("adaptive", adaptive)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        for name, pat in (("always", always), ("fallback", fallback)):
            if pat is not None:
                check_pattern(pat, name=name)
        check_positive_int("min_blocks", min_blocks)
        if fallback is None and not adaptive:
            raise ValueError("adaptive=False needs a fallback pattern (what runs instead)")
        if fallback is None and min_blocks > 1:
            raise ValueError(f"min_blocks={min_blocks} needs a fallback pattern: it runs when the "
                             f"keys have fewer than min_blocks blocks (or leave min_blocks=1)")
        if always is not None and fallback is not None and len(
                {always.num_heads, fallback.num_heads} - {1}) > 1:
            raise ValueError(f"always has {always.num_heads} heads and fallback "
                             f"{fallback.num_heads}; give them the same number of heads (or 1)")
        if trainable:
            if head_dim is None:
                raise ValueError("trainable=True needs head_dim (the gate's input size)")
            check_positive_int("head_dim", head_dim)
        if straight_through and not trainable:
            raise ValueError("straight_through=True needs trainable=True (a gate to train)")
        if process_group is not None and straight_through:
            raise NotImplementedError("straight_through under a process_group is not supported; "
                                      "train the gate with distillation_loss instead")
        self.block_size, self.density, self.causal = block_size, density, causal
        self.straight_through, self.always, self.fallback = straight_through, always, fallback
        self.adaptive, self.min_blocks = adaptive, min_blocks
        self.backend, self.ring_chunks = backend, ring_chunks
        self.process_group, self.sharding = process_group, sharding
        self.gate_q = _identity(head_dim) if trainable else None
        self.gate_k = _identity(head_dim) if trainable else None

    def scores(self, q: Tensor, k: Tensor) -> Tensor:
        """Block scores ``[B, H, nq, nk]`` (through the gate when trainable)."""
        return self.pooled_scores(pool_blocks(q, self.block_size), pool_blocks(k, self.block_size))

    def pooled_scores(self, pq: Tensor, pk: Tensor) -> Tensor:
        """Block scores ``[B, H, nq, nk]`` from summaries ``pq [B, H, nq, D]``, ``pk [B, H, nk,
        D]``; a ``ValueError`` when a trainable gate was built for another ``D``."""
        if self.gate_q is not None:
            if pq.shape[-1] != self.gate_q.in_features:
                raise ValueError(f"the gate was built with head_dim={self.gate_q.in_features} "
                                 f"but q and k have head_dim {pq.shape[-1]}; build the module "
                                 f"with head_dim={pq.shape[-1]}")
            pq, pk = self.gate_q(pq), self.gate_k(pk)
        return torch.matmul(pq, pk.transpose(-1, -2)) / math.sqrt(pq.shape[-1])

    def select(self, q: Tensor, k: Tensor, process_group=None, sharding: str = "contiguous"
               ) -> Selection:
        """The selection of this call from ``q [B, H, Sq, D]`` and ``k [B, H, Sk, D]``; under a
        ``process_group`` they are this rank's shard, and every rank gathers all block summaries
        and computes the same selection of the whole sequence."""
        check_qkv(q, k, k)
        b = self.block_size
        pq, pk = pool_blocks(q, b), pool_blocks(k, b)
        if process_group is None:
            return self.select_pooled(pq, pk, q.shape[2], k.shape[2])
        kw = {"process_group": process_group, "sharding": sharding}
        pq, s = gather_block_summaries(pq, q.shape[2], b, **kw)
        pk, _ = gather_block_summaries(pk, k.shape[2], b, **kw)
        return self.select_pooled(pq, pk, s, s)

    def select_pooled(self, pq: Tensor, pk: Tensor, q_len: int, k_len: int) -> Selection:
        """The selection from block summaries (:func:`pool_blocks` of q and k): top-k tiles
        ``| always``, or, when the content is not used, ``fallback | always``."""
        for name, pat in (("fallback", self.fallback), ("always", self.always)):
            if pat is not None:
                check_pattern(pat, pq.shape[1], name)
        scores = self.pooled_scores(pq, pk)
        if self.adaptive and scores.shape[-1] >= self.min_blocks:
            chosen = select_blocks(scores, self.density, causal=self.causal,
                                   keep_diagonal=(q_len == k_len))
            fixed = self.always
        else:
            chosen = None
            fixed = self.fallback if self.always is None else self.fallback | self.always
        return Selection(scores, chosen, fixed, self.block_size, q_len, k_len, self.causal)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, return_selection: bool = False):
        check_qkv(q, k, v)
        bsz, h, sq, d = q.shape
        sel = self.select(q, k, self.process_group, self.sharding)
        out = block_sparse_attention(
            fold_batch(q), fold_batch(k), fold_batch(v), sel.pattern(), self.block_size,
            backend=self.backend, ring_chunks=self.ring_chunks, process_group=self.process_group,
            sharding=self.sharding)
        out = self.straight_through_gradient(out.reshape(bsz, h, sq, v.shape[-1]), sel)
        return (out, sel) if return_selection else out

    def straight_through_gradient(self, out: Tensor, sel: Selection) -> Tensor:
        """``out [B, H, Sq, Dv]`` times ``m / stopgrad(m)`` per query block (1 where ``m``, the
        gate's softmax mass on ``sel.selected``, is 0); unchanged unless ``straight_through``."""
        if not self.straight_through:
            return out
        elig = _eligible(*sel.scores.shape[-2:], self.causal, out.device)
        soft = torch.softmax(sel.scores.masked_fill(~elig, -torch.inf), -1)
        m = (soft * sel.selected).sum(-1)  # [B, H, nq]
        held = m.detach()
        some = held > 0
        factor = torch.where(some, m / torch.where(some, held, torch.ones_like(held)), 1.0)
        factor = factor.repeat_interleave(self.block_size, -1)[..., : sel.q_len]
        return out * factor[..., None].to(out.dtype)

    def extra_repr(self) -> str:
        return (f"block_size={self.block_size}, density={self.density}, causal={self.causal}, "
                f"trainable={self.gate_q is not None}, straight_through={self.straight_through}, "
                f"always={self.always!r}, fallback={self.fallback!r}")


def _identity(dim: int) -> nn.Linear:
    """A ``dim x dim`` linear map that starts as the identity."""
    lin = nn.Linear(dim, dim)
    nn.init.eye_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin
