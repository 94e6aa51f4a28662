"""Content-adaptive block sparsity: a pattern chosen from the queries and keys themselves.

For every batch element and head:

1. **Block summaries.** Queries and keys are mean-pooled over blocks of ``block_size`` tokens
   (the last block averages only its real tokens), optionally through a small learned
   projection (the *gate*).
2. **Block scores.** ``score[i, j] = pooled_q[i] . pooled_k[j] * scale``: one ``nq x nk``
   matrix, ``O((S / b)^2 * D)`` work per head, vectorized over batch and heads.
3. **Top-k.** Each query block keeps the ``k = max(1, round(density * nk))`` key blocks with the
   highest scores. The diagonal block (the query's own block) is always kept; with
   ``causal=True`` blocks in the future are never eligible, so early rows keep
   ``min(k, i + 1)`` blocks and the realized density is at most the target.
4. **Attention.** The selection becomes a :class:`BlockSelection` pattern with ``B * H`` heads
   (the batch folded into the heads, since workbench layouts are per head and shared across
   the batch), and :func:`workbench.block_sparse_attention` computes exact softmax attention
   restricted to it: the same machinery, backends and ring schedule as every other pattern.

**What it is closest to.** The selection rule is MoBA's (Lu et al. 2025, arXiv 2502.13189):
top-k key blocks by a dot product with mean-pooled keys, the current block always included and
causality respected. It differs in pooling the *queries* too (one decision per query block, not
per query token, as MInference's block-sparse heads and SeerAttention do), which is what makes
the result a block layout. The trainable gate follows SeerAttention (Gao et al. 2024, arXiv
2410.13276): learned linear maps of pooled Q and K, trainable by self-distillation against the
block-pooled true attention (:func:`distillation_loss`); unlike SeerAttention the untrained gate
starts as the identity, i.e. as the parameter-free MoBA-style score. It does not have NSA's
compressed and sliding-window branches or learned branch gates (Yuan et al. 2025, arXiv
2502.11089), nor Quest's min/max key bounds (Tang et al. 2024, arXiv 2406.10774), which score
pages for a single decode query.

**Training the gate.** Two ways: ``distillation_loss`` (SeerAttention's), and
``straight_through=True`` in :class:`AdaptiveBlockSparseAttention`: the forward output is
exactly the block-sparse attention, and each query block's output is multiplied by
``m / stopgrad(m)`` (equal to 1), where ``m`` is the softmax mass the gate puts on the selected
key blocks, so the gate receives the gradient ``<dL/d out, out>`` per row. The hard top-k itself
has no gradient.

**Fixed-pattern fallback.** ``fallback=pattern`` is used instead of the content when
``adaptive=False`` or the sequence has fewer than ``min_blocks`` key blocks; ``always=pattern``
is added (union) to every selection (e.g. a local window or global tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import patterns as P
from .attention import block_sparse_attention, check_qkv
from .layout import cells_to_tiles, num_blocks
from .patterns import Pattern, check_positive_int

__all__ = [
    "AdaptiveBlockSparseAttention",
    "BlockSelection",
    "Selection",
    "block_scores",
    "captured_mass",
    "distillation_loss",
    "fold_batch",
    "pool_blocks",
    "select_blocks",
    "topk_budget",
]


# --------------------------------------------------------------------- the pattern
class BlockSelection(Pattern):
    """Pattern of selected tiles: ``allowed(h, q, k) = selected[h, q // b, k // b]``.

    ``selected`` is bool ``[H, nq, nk]`` at block size ``b`` for a ``q_len x k_len`` problem
    (``H`` may be ``B * heads`` with the batch folded in). ``causal=True`` intersects with
    ``k <= q``. The block layout is exact at any kernel block size (cells are reduced over each
    kernel tile with 2-D prefix sums, as :class:`~workbench.patterns.RandomBlocks` does); it is
    defined only for the lengths the selection was made for.
    """

    def __init__(self, selected: Tensor, block_size: int, q_len: int, k_len: int) -> None:
        if selected.dtype != torch.bool or selected.dim() != 3:
            raise TypeError(f"selected must be a bool [heads, nq, nk] tensor, got "
                            f"{selected.dtype} {tuple(selected.shape)}")
        expect = (num_blocks(q_len, block_size), num_blocks(k_len, block_size))
        if tuple(selected.shape[1:]) != expect:
            raise ValueError(f"selected has {tuple(selected.shape[1:])} blocks but q_len={q_len}"
                             f", k_len={k_len}, block_size={block_size} need {expect}")
        self.selected, self.cell, self.q_len, self.k_len = selected, block_size, q_len, k_len
        self.num_heads = selected.shape[0]

    def allowed(self, h, q, k):
        return self.predicate(q.device)(h, q, k)

    def predicate(self, device):
        sel = self.selected.to(device)
        c, nq, nk, ql, kl = self.cell, sel.shape[1], sel.shape[2], self.q_len, self.k_len
        multi = self.num_heads > 1

        def in_selected(h, q, k):
            hh = h if multi else torch.zeros_like(h)
            qi = torch.clamp(torch.div(q, c, rounding_mode="floor"), min=0, max=nq - 1)
            ki = torch.clamp(torch.div(k, c, rounding_mode="floor"), min=0, max=nk - 1)
            return sel[hh, qi, ki] & (q >= 0) & (q < ql) & (k >= 0) & (k < kl)

        return in_selected

    def _tiles(self, q_len, k_len, block_size, device):
        if (q_len, k_len) != (self.q_len, self.k_len):
            raise ValueError(f"this selection is for q_len={self.q_len}, k_len={self.k_len}; "
                             f"got {q_len}, {k_len}")
        return cells_to_tiles(self.selected.to(device), self.cell, q_len, k_len, block_size)

    def __repr__(self) -> str:
        return f"block_selection({tuple(self.selected.shape)}, block={self.cell})"


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
    xp = xp.unflatten(-2, (n, block_size))
    counts = torch.clamp(s - torch.arange(n, device=x.device) * block_size, max=block_size)
    return xp.sum(-2) / counts.to(x.dtype)[:, None]


def block_scores(q: Tensor, k: Tensor, block_size: int, scale: float | None = None) -> Tensor:
    """Block scores ``[..., nq, nk]``: pooled queries against pooled keys."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return torch.matmul(pool_blocks(q, block_size), pool_blocks(k, block_size).transpose(-1, -2)
                        ) * scale


def topk_budget(density: float, nk: int) -> int:
    """Key blocks kept per query block for a target density: ``max(1, round(density * nk))``."""
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return min(nk, max(1, round(density * nk)))


def _eligible(nq: int, nk: int, causal: bool, device) -> Tensor:
    """Bool ``[nq, nk]``: blocks a query block may select (block-level causality)."""
    i = torch.arange(nq, device=device)[:, None]
    j = torch.arange(nk, device=device)[None, :]
    return j <= i if causal else torch.ones(nq, nk, dtype=torch.bool, device=device)


def select_blocks(
    scores: Tensor,
    density: float,
    *,
    causal: bool = False,
    keep_diagonal: bool = True,
) -> Tensor:
    """Top-k key blocks per query block from block scores ``[..., nq, nk]`` -> bool, same shape.

    The diagonal block is always kept when ``keep_diagonal`` (self-attention); with ``causal``
    blocks ``j > i`` are never selected. Vectorized: one ``topk`` over the last axis.
    """
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
    """Fraction of the true (dense) softmax mass inside ``allowed``, per query row.

    ``allowed`` is a bool mask broadcastable to ``[..., Sq, Sk]``; returns ``[..., Sq]``.
    Dense: for measurement at small sizes only.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, -1)
    return (p * allowed).sum(-1)


def distillation_loss(gate_scores: Tensor, q: Tensor, k: Tensor, block_size: int,
                      causal: bool = False) -> Tensor:
    """SeerAttention-style self-distillation: KL(true block mass || softmax of gate scores).

    The target is the dense softmax attention summed over each tile and averaged over the
    query block's rows (computed without gradient, dense: small sizes).
    """
    with torch.no_grad():
        s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        if causal:
            sq, sk = s.shape[-2:]
            s = s.masked_fill(torch.ones(sq, sk, dtype=torch.bool, device=s.device).triu(1),
                              -torch.inf)
        p = torch.softmax(s, -1)
        nk = gate_scores.shape[-1]
        pk = F.pad(p, (0, nk * block_size - p.shape[-1])).unflatten(-1, (nk, block_size)).sum(-1)
        target = pool_blocks(pk, block_size)  # [..., nq, nk], rows sum to 1
    elig = _eligible(*gate_scores.shape[-2:], causal, gate_scores.device)
    logp = torch.log_softmax(gate_scores.masked_fill(~elig, -torch.inf), -1)
    return F.kl_div(logp.masked_fill(~elig, 0.0), target, reduction="batchmean")


@dataclass(frozen=True)
class Selection:
    """The result of a selection: bool ``selected [B, H, nq, nk]`` and the scores behind it."""

    selected: Tensor
    scores: Tensor
    block_size: int
    q_len: int
    k_len: int
    causal: bool

    def pattern(self) -> Pattern:
        """The :class:`BlockSelection` pattern with the batch folded into heads (``B * H``)."""
        b, h = self.selected.shape[:2]
        pat: Pattern = BlockSelection(self.selected.reshape(b * h, *self.selected.shape[2:]),
                                      self.block_size, self.q_len, self.k_len)
        return pat & P.causal() if self.causal else pat

    def density(self) -> float:
        """Computed density (area of selected tiles over ``Sq * Sk``), averaged over B and H."""
        return self.pattern().density(self.q_len, self.block_size)


# --------------------------------------------------------------------- the module
class AdaptiveBlockSparseAttention(nn.Module):
    """Block-sparse attention over a block layout selected from q/k content, per batch and head.

    Args:
        block_size: selection and kernel block size.
        density: target fraction of key blocks per query block (``k = round(density * nk)``).
        causal: autoregressive (block-level eligibility plus the token-level ``k <= q``).
        head_dim: needed only with ``trainable=True`` (the gate's input size).
        trainable: learn linear maps of pooled Q and K (initialized to the identity).
        straight_through: pass gradient to the gate through the output (see module docs).
        always: a fixed pattern added to every selection (e.g. ``P.local_window(64)``).
        fallback: a fixed pattern used when ``adaptive=False`` or fewer than ``min_blocks``
            key blocks.
        backend, ring_chunks: as for :func:`workbench.block_sparse_attention`.
        process_group, sharding: take this rank's shard of a sequence sharded across the
            group's ranks; the selection is made from gathered block summaries
            (:meth:`select_sharded`) and the attention runs as a distributed ring.

    ``forward(q, k, v, return_selection=False)`` takes ``[B, H, S, D]``.
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
        topk_budget(density, 1)  # validates density
        check_positive_int("block_size", block_size)
        if trainable and head_dim is None:
            raise ValueError("trainable=True needs head_dim (the gate's input size)")
        if straight_through and not trainable:
            raise ValueError("straight_through=True needs trainable=True (a gate to train)")
        if not adaptive and fallback is None:
            raise ValueError("adaptive=False needs a fallback pattern")
        self.block_size, self.density, self.causal = block_size, float(density), causal
        self.straight_through, self.always, self.fallback = straight_through, always, fallback
        self.adaptive, self.min_blocks = adaptive, min_blocks
        self.backend, self.ring_chunks = backend, ring_chunks
        self.process_group, self.sharding = process_group, sharding
        if process_group is not None and straight_through:
            raise NotImplementedError("straight_through under a process_group is not supported; "
                                      "train the gate with distillation_loss instead")
        if trainable:
            self.gate_q = nn.Linear(head_dim, head_dim)
            self.gate_k = nn.Linear(head_dim, head_dim)
            with torch.no_grad():
                for lin in (self.gate_q, self.gate_k):
                    lin.weight.copy_(torch.eye(head_dim))
                    lin.bias.zero_()
        else:
            self.gate_q = self.gate_k = None

    def scores(self, q: Tensor, k: Tensor) -> Tensor:
        """Block scores ``[B, H, nq, nk]`` (through the gate when trainable)."""
        return self.pooled_scores(pool_blocks(q, self.block_size), pool_blocks(k, self.block_size))

    def pooled_scores(self, pq: Tensor, pk: Tensor) -> Tensor:
        """Block scores from block summaries ``pq [B, H, nq, D]``, ``pk [B, H, nk, D]``."""
        if self.gate_q is not None:
            pq, pk = self.gate_q(pq), self.gate_k(pk)
        return torch.matmul(pq, pk.transpose(-1, -2)) / math.sqrt(pq.shape[-1])

    def select(self, q: Tensor, k: Tensor) -> Selection:
        """Selected blocks per batch element and head."""
        return self.select_pooled(pool_blocks(q, self.block_size), pool_blocks(k, self.block_size),
                                  q.shape[2], k.shape[2])

    def select_sharded(self, q: Tensor, k: Tensor, process_group, sharding: str = "contiguous"
                       ) -> Selection:
        """The selection of the whole sequence, from this rank's shard of a sharded sequence.

        Every rank pools its own blocks, the block summaries are gathered
        (:func:`workbench.distributed.gather_block_summaries`: ``1 / block_size`` of the
        sequence), and every rank computes the same global selection from them.
        """
        from .distributed import gather_block_summaries

        b = self.block_size
        kw = {"process_group": process_group, "sharding": sharding}
        pq, s = gather_block_summaries(pool_blocks(q, b), q.shape[2], b, **kw)
        pk, _ = gather_block_summaries(pool_blocks(k, b), k.shape[2], b, **kw)
        return self.select_pooled(pq, pk, s, s)

    def select_pooled(self, pq: Tensor, pk: Tensor, q_len: int, k_len: int) -> Selection:
        """Selected blocks from block summaries (:func:`pool_blocks` of q and k): what a
        distributed run gathers instead of the sequence."""
        b = self.block_size
        scores = self.pooled_scores(pq, pk)
        bsz, h, nq, nk = scores.shape
        if self.adaptive and nk >= self.min_blocks:
            sel = select_blocks(scores, self.density, causal=self.causal,
                                keep_diagonal=(q_len == k_len))
        else:
            lay = self.fallback.block_structure(q_len, b, pq.device, k_len=k_len).active
            sel = lay.expand(h, nq, nk)[None].expand(bsz, -1, -1, -1).clone()
        if self.always is not None:
            sel = sel | self.always.block_structure(q_len, b, pq.device, k_len=k_len).active
        return Selection(sel, scores, b, q_len, k_len, self.causal)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, return_selection: bool = False):
        check_qkv(q, k, v)
        bsz, h, sq, d = q.shape
        if self.process_group is None:
            sel = self.select(q, k)
        else:
            sel = self.select_sharded(q, k, self.process_group, self.sharding)
        out = block_sparse_attention(
            fold_batch(q), fold_batch(k), fold_batch(v), sel.pattern(), self.block_size,
            backend=self.backend, ring_chunks=self.ring_chunks, process_group=self.process_group,
            sharding=self.sharding)
        out = self.straight_through_gradient(out.reshape(bsz, h, sq, v.shape[-1]), sel)
        return (out, sel) if return_selection else out

    def straight_through_gradient(self, out: Tensor, sel: Selection) -> Tensor:
        """``out [B, H, Sq, Dv]`` times ``m / stopgrad(m)`` per query block (module docs), so
        the gate learns through the output; ``out`` unchanged unless ``straight_through``."""
        if not self.straight_through:
            return out
        elig = _eligible(*sel.scores.shape[-2:], self.causal, out.device)
        soft = torch.softmax(sel.scores.masked_fill(~elig, -torch.inf), -1)
        m = (soft * sel.selected).sum(-1)  # [B, H, nq]
        factor = (m / m.detach()).repeat_interleave(self.block_size, -1)[..., : sel.q_len]
        return out * factor[..., None].to(out.dtype)

    def extra_repr(self) -> str:
        return (f"block_size={self.block_size}, density={self.density}, causal={self.causal}, "
                f"trainable={self.gate_q is not None}, straight_through={self.straight_through}")
