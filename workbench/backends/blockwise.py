"""Pure-PyTorch block-sparse attention: visits only active tiles, with an online softmax.

The layout's tiles (and the token masks of those that need one, up to :data:`MASK_BUDGET` bytes)
are listed once, kept with the layout, and processed in chunks: batched matmuls give a chunk's
scores, scatter and index-add update each query row's running maximum, denominator and weighted
sum. Memory is proportional to a chunk, never ``S x S``; the backward recomputes each chunk from
the saved log-sum-exp. A score mod applies to each chunk's scaled scores before the mask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..orderings import block_visit_order
from ..score_mods import missed_reads, modded, reads
from .merge import accumulation_dtype
from .problem import Problem
from .registry import Backend, Capabilities, Request, Runner

__all__ = ["BACKEND", "blockwise_attention", "prepare_blockwise"]

_SCORE_BUDGET = {"cpu": 1 << 20, "cuda": 1 << 23}
"""Score elements materialized per chunk, by device type (others use the GPU's): on a CPU a
chunk small enough to be served from memory already mapped (a larger one is mapped afresh,
page by page, every chunk); on a GPU large ones keep the launches few."""
MASK_BUDGET = 1 << 28
"""Bytes of tile token masks kept with a layout; beyond it they are evaluated at every call."""


def _score_budget(device: torch.device) -> int:
    """:data:`_SCORE_BUDGET` of ``device``'s type."""
    return _SCORE_BUDGET.get(device.type, _SCORE_BUDGET["cuda"])


@dataclass(frozen=True)
class _Tiles:
    """What a layout's tiles are, computed once per layout object (kept with it)."""

    tiles: Tensor  # int64 [P, 3]: head, query block, key block (in visit order)
    needs_mask: Tensor  # bool [P]: tile is partial or touches padding
    mask_start: Tensor  # int64 [P + 1] on the CPU: index in ``masks`` of each tile's mask
    masks: Tensor | None  # bool [needed, b, b]: the needing tiles' token masks, in visit order


@dataclass(frozen=True)
class _TilePlan:
    problem: Problem
    num_heads: int
    tiles: _Tiles
    chunk: int  # tiles per chunk

    @property
    def nq(self) -> int:
        return self.problem.layout.active.shape[1]

    @property
    def nk(self) -> int:
        return self.problem.layout.active.shape[2]

    def chunks(self):
        """Per chunk of tiles: the tiles, which need a mask, their masks (``[needed, b, b]``)
        and their query and key rows."""
        all_tiles, starts = self.tiles.tiles, self.tiles.mask_start
        for start in range(0, all_tiles.shape[0], self.chunk):
            end = min(start + self.chunk, all_tiles.shape[0])
            t, needs = all_tiles[start:end], self.tiles.needs_mask[start:end]
            if self.tiles.masks is not None:
                masks = self.tiles.masks[int(starts[start]):int(starts[end])]
            else:
                masks = _tile_masks(self.problem, t[needs])
            yield t, needs, masks, t[:, 0] * self.nq + t[:, 1], t[:, 0] * self.nk + t[:, 2]


def _layout_tiles(problem: Problem, num_heads: int, device: torch.device) -> _Tiles:
    """The tiles of ``problem``'s layout in visit order, which of them need the token mask, and
    those masks when they fit :data:`MASK_BUDGET`: built once per layout object."""
    def build() -> _Tiles:
        lay = problem.layout.expand_heads(num_heads).to(device)
        b = lay.block_size
        tiles = block_visit_order(lay.active, problem.block_order)
        needs = ~lay.full[tuple(tiles.T)]
        if lay.q_len % b:
            needs |= tiles[:, 1] == lay.active.shape[1] - 1
        if lay.k_len % b:
            needs |= tiles[:, 2] == lay.active.shape[2] - 1
        start = F.pad(torch.cumsum(needs, 0), (1, 0)).cpu()  # read a chunk at a time
        if int(start[-1]) * b * b > MASK_BUDGET:
            return _Tiles(tiles, needs, start, None)
        needing = tiles[needs]
        masks = torch.empty(needing.shape[0], b, b, dtype=torch.bool, device=device)
        step = max(1, _score_budget(device) // (b * b))  # small int64 temporaries
        for i in range(0, needing.shape[0], step):
            masks[i:i + step] = _tile_masks(problem, needing[i:i + step])
        return _Tiles(tiles, needs, start, masks)

    return problem.derived(("blockwise", num_heads), device, build)


def _tile_masks(problem: Problem, tiles: Tensor) -> Tensor:
    """Which pairs of each tile (``[n, 3]`` head, query block, key block) are allowed and real:
    bool ``[n, b, b]``."""
    qi, ki, real = _positions(problem, tiles)
    return real & problem.allowed(tiles[:, 0, None, None], qi, ki)


def _to_blocks(x: Tensor, n: int, b: int, dtype: torch.dtype) -> Tensor:
    """``[B, H, S, D]`` -> ``[B, H * n, b, D]`` (zero-padded to ``n * b`` positions)."""
    bsz, h, s, d = x.shape
    x = F.pad(x.to(dtype), (0, 0, 0, n * b - s))
    return x.reshape(bsz, h * n, b, d)


def _from_blocks(x: Tensor, h: int, s: int) -> Tensor:
    bsz, _, b, *rest = x.shape
    return x.reshape(bsz, h, -1, *rest)[:, :, :s]


def _tile_scores(qs: Tensor, kb: Tensor, needs: Tensor, masks: Tensor, rq: Tensor,
                 rk: Tensor, mod: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Masked scores ``[B, P, b, b]`` of a chunk of tiles from query blocks ``qs`` that are
    already scaled (scaling them once costs less than scaling every tile's scores), changed by
    ``mod`` before the mask; ``masks`` are the token masks of the tiles that ``needs`` marks."""
    s = torch.matmul(qs[:, rq], kb[:, rk].transpose(-1, -2))
    if mod is not None:
        s = mod(s)
    sel = needs.nonzero().squeeze(1)
    if sel.numel():
        s[:, sel] = s[:, sel].masked_fill(~masks, -torch.inf)
    return s


def _positions(problem: Problem, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Absolute query ``[P, b, 1]`` and key ``[P, 1, b]`` positions of tiles ``t``, padding
    taking the last real position, and which pairs are real (bool ``[P, b, b]``)."""
    lay = problem.layout
    off = torch.arange(lay.block_size, device=t.device)
    qi = t[:, 1, None, None] * lay.block_size + off[None, :, None]
    ki = t[:, 2, None, None] * lay.block_size + off[None, None, :]
    return (qi.clamp(max=lay.q_len - 1) + problem.q_offset,
            ki.clamp(max=lay.k_len - 1) + problem.k_offset, (qi < lay.q_len) & (ki < lay.k_len))


def _score_mod(problem: Problem, s: Tensor, t: Tensor) -> Tensor:
    """``problem.score_mod`` on the scores ``s [B, P, b, b]`` of tiles ``t``."""
    bi = torch.arange(s.shape[0], device=t.device)[:, None, None, None]
    return modded(problem.score_mod, s, bi, t[:, 0, None, None], *_positions(problem, t)[:2])


def _dropout_scale(plan: _TilePlan, t: Tensor, batch: int) -> Tensor | None:
    """Dropout keep scale ``[B, P, b, b]`` of a chunk of tiles (None without dropout)."""
    pr = plan.problem
    if pr.dropout is None:
        return None
    bi = torch.arange(batch, device=t.device)[:, None, None, None]
    return pr.dropout.scale(bi * plan.num_heads + t[None, :, 0, None, None],
                            *_positions(pr, t)[:2])


class _Values:
    """The value blocks a chunk's probabilities multiply, exact for non-finite values (a matmul
    would carry them to disallowed rows, as ``0 * nan`` is NaN): the finite part goes through
    the matmul, the rest is added pair by pair over allowed pairs."""

    def __init__(self, vb: Tensor) -> None:
        finite = torch.isfinite(vb)
        self.clean = vb
        self.bad_blocks: Tensor | None = None
        if not bool(finite.all()):  # one host read per call
            self.clean = torch.where(finite, vb, torch.zeros_like(vb))
            self.rest = torch.where(finite, torch.zeros_like(vb), vb)
            self.bad_blocks = (~finite).flatten(2).any(-1).any(0)  # [H * nk]

    def times(self, p: Tensor, rk: Tensor, needs: Tensor, masks: Tensor) -> Tensor:
        """``p [B, P, b, b] @ values`` of key blocks ``rk``, summed over allowed pairs only."""
        pv = torch.matmul(p, self.clean[:, rk])
        if self.bad_blocks is None:
            return pv
        hit = self.bad_blocks[rk].nonzero().squeeze(1)
        if not hit.numel():
            return pv
        allowed = torch.ones(p.shape[1:], dtype=torch.bool, device=p.device)
        allowed[needs.nonzero().squeeze(1)] = masks
        b, d = p.shape[-1], self.rest.shape[-1]
        step = max(1, _score_budget(p.device) // (p.shape[0] * b * b * d))
        for part in hit.split(step):
            terms = p[:, part, :, :, None] * self.rest[:, rk[part], None, :, :]
            pv[:, part] += torch.where(allowed[part, :, :, None], terms, 0.0).sum(-2)
        return pv


def _forward(q: Tensor, k: Tensor, v: Tensor, plan: _TilePlan) -> tuple[Tensor, Tensor]:
    lay = plan.problem.layout
    b, h = lay.block_size, plan.num_heads
    acc = accumulation_dtype(q.dtype)
    bsz, dv = q.shape[0], v.shape[-1]
    qb, kb, vb = (_to_blocks(x, n, b, acc) for x, n in ((q, plan.nq), (k, plan.nk), (v, plan.nk)))
    values = _Values(vb)
    qs = qb * plan.problem.scale
    rows = h * plan.nq
    m = torch.full((bsz, rows, b), -torch.inf, dtype=acc, device=q.device)
    den = torch.zeros((bsz, rows, b), dtype=acc, device=q.device)
    num = torch.zeros((bsz, rows, b, dv), dtype=acc, device=q.device)
    has_mod = plan.problem.score_mod is not None
    for t, needs, masks, rq, rk in plan.chunks():
        mod = (lambda s, t=t: _score_mod(plan.problem, s, t)) if has_mod else None
        s = _tile_scores(qs, kb, needs, masks, rq, rk, mod)
        if plan.problem.block_order is None:  # tiles by (head, query block): rows contiguous
            urows, inv = torch.unique_consecutive(rq, return_inverse=True)
        else:  # a curve visit order interleaves query rows
            urows, inv = torch.unique(rq, return_inverse=True)
        tile_max = s.amax(-1)
        chunk_max = torch.full((bsz, urows.numel(), b), -torch.inf, dtype=acc, device=q.device)
        chunk_max.scatter_reduce_(1, inv.view(1, -1, 1).expand_as(tile_max), tile_max, "amax")
        m_old = m[:, urows]
        m_new = torch.maximum(m_old, chunk_max)
        m_safe = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        p = s.sub_(m_safe[:, inv, :, None]).exp_()  # in place: the scores are not needed again
        alpha = torch.exp(m_old - m_safe)
        den_c = torch.zeros_like(m_old).index_add_(1, inv, p.sum(-1))
        z = _dropout_scale(plan, t, bsz)
        pv = values.times(p if z is None else p * z.to(acc), rk, needs, masks)
        num_c = torch.zeros_like(num[:, urows]).index_add_(1, inv, pv)
        den[:, urows] = den[:, urows] * alpha + den_c
        num[:, urows] = num[:, urows] * alpha[..., None] + num_c
        m[:, urows] = m_new
    nonempty = den != 0  # a NaN denominator (non-finite q or k) keeps its NaN, in lse too
    safe_den = torch.where(nonempty, den, torch.ones_like(den))
    out = num / safe_den[..., None]
    lse = torch.where(nonempty, m + torch.log(safe_den), torch.full_like(m, -torch.inf))
    return _from_blocks(out, h, lay.q_len).to(q.dtype), _from_blocks(lse, h, lay.q_len)


def _backward(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor, dlse: Tensor | None,
    plan: _TilePlan, read: tuple[Tensor, ...] = (),
) -> tuple[Tensor, ...]:
    """``dq, dk, dv`` and the gradients of ``read`` (the tensors the score mod reads)."""
    lay = plan.problem.layout
    b, h, scale = lay.block_size, plan.num_heads, plan.problem.scale
    acc = accumulation_dtype(q.dtype)
    qb, kb, vb, dob = (_to_blocks(x, n, b, acc) for x, n in ((q, plan.nq), (k, plan.nk),
                                                             (v, plan.nk), (dout, plan.nq)))
    delta = (dout.to(acc) * out.to(acc)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.to(acc)
    bsz = q.shape[0]
    pad = (0, plan.nq * b - lay.q_len)
    delta = F.pad(delta, pad).reshape(bsz, h * plan.nq, b)
    lse_r = F.pad(lse.to(acc), pad).reshape(bsz, h * plan.nq, b)  # padding rows: 0, like -inf
    lse_r = torch.where(torch.isfinite(lse_r), lse_r, torch.zeros_like(lse_r))
    qs = qb * scale
    dq, dk, dv = torch.zeros_like(qb), torch.zeros_like(kb), torch.zeros_like(vb)
    mod = None if plan.problem.score_mod is None else _ModGrad(plan.problem, read)
    for t, needs, masks, rq, rk in plan.chunks():
        p = _tile_scores(qs, kb, needs, masks, rq, rk, mod and mod.at(t))
        p = p.sub_(lse_r[:, rq, :, None]).exp_()
        do_t = dob[:, rq]
        z = _dropout_scale(plan, t, bsz)
        pz = p if z is None else p * z.to(acc)
        dv.index_add_(1, rk, torch.matmul(pz.transpose(-1, -2), do_t))
        dp = torch.matmul(do_t, vb[:, rk].transpose(-1, -2))
        if z is not None:
            dp = dp * z.to(acc)
        ds = p * (dp - delta[:, rq, :, None])
        if mod is not None:
            ds = mod.backward(ds)
        ds = ds * scale
        dq.index_add_(1, rq, torch.matmul(ds, kb[:, rk]))
        dk.index_add_(1, rk, torch.matmul(ds.transpose(-1, -2), qb[:, rq]))
    return (
        _from_blocks(dq, h, lay.q_len).to(q.dtype),
        _from_blocks(dk, h, lay.k_len).to(k.dtype),
        _from_blocks(dv, h, lay.k_len).to(v.dtype),
        *(() if mod is None else mod.grads),
    )


class _ModGrad:
    """A chunk's score mod evaluated again under autograd, to take its gradient with respect to
    the scores and to the tensors it reads (``grads``, summed over the chunks)."""

    def __init__(self, problem: Problem, read: tuple[Tensor, ...]) -> None:
        self.problem, self.read = problem, read
        self.grads: list[Tensor | None] = [None] * len(read)
        self.checked = False

    def at(self, t: Tensor) -> Callable[[Tensor], Tensor]:
        def mod(s: Tensor) -> Tensor:
            with torch.enable_grad():
                self.raw = s.requires_grad_()
                self.out = _score_mod(self.problem, s, t)
            if not self.checked and self.out.requires_grad:
                self.checked = True
                if missed_reads(self.out, (self.raw, *self.read)):
                    raise ValueError(
                        "score_mod reads a tensor that requires grad where workbench cannot find "
                        "it (its gradient would be lost): keep it in the function's closure, in "
                        "a global, or make the score_mod an nn.Module holding it")
            return self.out.detach().clone()  # masked in place; the graph keeps its own
        return mod

    def backward(self, ds: Tensor) -> Tensor:
        """The gradient of the raw scores from ``ds``, that of the modified ones."""
        if not self.out.requires_grad:  # a mod that ignores the score and reads nothing
            return torch.zeros_like(ds)
        got = torch.autograd.grad(self.out, (self.raw, *self.read), ds, allow_unused=True)
        for i, g in enumerate(got[1:]):
            if g is not None:
                self.grads[i] = g if self.grads[i] is None else self.grads[i] + g
        return torch.zeros_like(ds) if got[0] is None else got[0]


class _BlockwiseFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, *read):  # type: ignore[override]
        out, lse = _forward(q, k, v, plan)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.read = plan, read  # what the score mod reads: the closure holds them
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlse):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv, *dread = _backward(q, k, v, out, lse, dout, dlse, ctx.plan, ctx.read)
        return dq, dk, dv, None, *dread


def prepare_blockwise(q: Tensor, k: Tensor, v: Tensor, problem: Problem,
                      need_lse: bool = True) -> Runner:
    """:func:`blockwise_attention` with the tile plan of these inputs ready:
    ``runner(q, k, v) -> (out, lse)`` (the log-sum-exp comes whatever ``need_lse``)."""
    chunk = max(1, _score_budget(q.device) // (q.shape[0] * problem.layout.block_size ** 2))
    plan = _TilePlan(problem, q.shape[1], _layout_tiles(problem, q.shape[1], q.device), chunk)
    mod = problem.score_mod

    def run(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        read = reads(mod) if mod is not None and torch.is_grad_enabled() else ()
        return _BlockwiseFunction.apply(q, k, v, plan, *read)

    return run


def blockwise_attention(q: Tensor, k: Tensor, v: Tensor, problem: Problem) -> tuple[Tensor, Tensor]:
    """Block-sparse attention of ``q, k, v`` ``[B, H, S, D]`` over ``problem``'s active tiles,
    visited in ``problem.block_order``; any device and dtype.

    Returns ``(out [B, H, Sq, Dv], lse [B, H, Sq])``: ``out`` in ``q``'s dtype, ``lse`` in the
    accumulation dtype; differentiable in ``q, k, v`` (through ``lse`` too) and in the tensors
    the score mod reads. Raises ``ValueError`` in the backward for a score mod that reads a
    tensor requiring grad outside what :func:`workbench.score_mods.reads` finds.
    """
    return prepare_blockwise(q, k, v, problem)(q, k, v)


def _prefers(req: Request) -> str:
    if req.dropout:
        return "attention dropout is asked for, which blockwise and reference apply"
    if req.device_type != "cuda":
        return f"on {req.device_type}: pure PyTorch, with gradients and log-sum-exp"
    return "no compiled kernel takes this call"


BACKEND = Backend(
    "blockwise",
    lambda q, k, v, problem, need_lse: blockwise_attention(q, k, v, problem),
    Capabilities(dropout=True, block_order=True, score_mod=True),
    "pure PyTorch over the active tiles with an online softmax; any device, autograd",
    prefers=_prefers, prepare=prepare_blockwise,
)
