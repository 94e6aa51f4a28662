"""The main variant: block-sparse attention over any pattern, optionally with a ring schedule.

``block_sparse_attention`` is the functional entry point (layout ``[batch, heads, seq,
head_dim]`` like ``F.scaled_dot_product_attention``); :class:`BlockSparseAttention` is the
same as an ``nn.Module`` that caches block layouts per sequence length.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .backends import (
    NO_LSE,
    AttentionDropout,
    BackendUnsupported,
    Choice,
    Problem,
    Request,
    Runner,
    accumulation_dtype,
    check_backend,
    choose,
    expand_kv_heads,
    get_backend,
    grouped_runner,
    kv_group,
)
from .distributed import distributed_ring_attention
from .layout import BlockLayout
from .orderings import check_block_order
from .patterns import Pattern, check_int, check_positive_int, head_predicate
from .plan import (
    LastCall,
    Plan,
    Plans,
    check_plans,
    plan_for,
    query_window_layout,
)
from .ring import ring_attention
from .score_mods import ScoreMod, check_score_mod
from .sharding import check_sharding

__all__ = ["BlockSparseAttention", "block_sparse_attention", "call_key", "check_dropout",
           "check_options", "check_pattern", "check_qkv", "check_scale", "check_sizes",
           "check_tensors", "checked_kv", "dropout_of", "expand_kv_heads", "explain_backend",
           "prepare"]


def check_tensors(named: dict[str, object]) -> None:
    """Raise naming the argument unless every value of ``named`` is a floating-point tensor
    with the first one's dtype (else a ``TypeError``) and device (else a ``ValueError``)."""
    for name, x in named.items():
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    (first, x0), *rest = named.items()
    for name, x in rest:
        if x.dtype != x0.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but {first} has {x0.dtype}; cast them "
                            "to one dtype")
        if x.device != x0.device:
            raise ValueError(f"{name} is on {x.device} but {first} is on {x0.device}; move them "
                             "to one device")


def check_sizes(named: dict[str, Tensor], sizes: dict[str, int], note: str = "") -> None:
    """Raise a ``ValueError`` naming the tensor and the size unless every tensor of ``named``
    has the first one's size along each dimension of ``sizes`` (``{"batch size": 0}``);
    ``note`` ends the message's parenthesis."""
    (first, x0), *rest = named.items()
    for name, x in rest:
        for label, d in sizes.items():
            if x.shape[d] != x0.shape[d]:
                raise ValueError(f"{name} has {label} {x.shape[d]} but {first} has "
                                 f"{x0.shape[d]} (dimension {d}{note})")


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    """Validate ``[B, H, S, D]`` query/key/value tensors; raise naming the argument."""
    if _plain_qkv(q, k, v):
        return
    check_tensors({"q": q, "k": k, "v": v})
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(
                f"{name} must be [batch, heads, seq, head_dim] (4-D), got shape {tuple(x.shape)}"
            )
        if x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"{name} has an empty sequence or head dimension: {tuple(x.shape)}")
    check_sizes({"q": q, "k": k, "v": v}, {"batch size": 0, "head count": 1})
    check_sizes({"k": k, "v": v}, {"length": 2})
    check_sizes({"q": q, "k": k}, {"head_dim": 3})


def _plain_qkv(q: object, k: object, v: object) -> bool:
    """Whether ``q, k, v`` pass :func:`check_qkv`, decided in one expression (the common case
    of every call; the full check then names what is wrong)."""
    try:
        (b, h, s, d), (bk, hk, sk, dk), (bv, hv, sv, dv) = q.shape, k.shape, v.shape
        return (type(q) is type(k) is type(v) is Tensor and q.dtype == k.dtype == v.dtype
                and q.is_floating_point() and q.device == k.device == v.device
                and b == bk == bv and h == hk == hv and sk == sv and d == dk
                and min(s, d, sk, dv) > 0)
    except (AttributeError, TypeError, ValueError):
        return False


def checked_kv(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``k, v`` as given, once ``q, k, v`` pass :func:`check_qkv` with ``k, v`` of q's heads
    or of a divisor of them (grouped-query attention, :func:`~workbench.backends.kv_group`;
    a backend that cannot read them so is given their heads repeated). The common call is
    decided by one expression."""
    if not _plain_qkv(q, k, v):  # grouped-query k, v, or inputs the checks refuse
        if kv_group(q, k, v) == 1:
            check_qkv(q, k, v)
        else:  # checked as the same tensors with q's heads (views, nothing copied)
            check_qkv(q, *(x[:, :1].expand(x.shape[0], q.shape[1], *x.shape[2:])
                           for x in (k, v)))
    return k, v


def check_scale(scale: object) -> None:
    """Raise a ``TypeError`` unless ``scale`` is a finite real number or None."""
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        raise TypeError(f"scale must be a finite float or None (1 / sqrt(head_dim)), got "
                        f"{scale!r}")


def check_options(*, block_size: int, backend: str, ring_chunks: int, scale: float | None,
                  block_order: str | None, sharding: str, process_group: object = None,
                  score_mod: object = None) -> str | None:
    """Validate the options every entry point shares, raising an error that names the argument;
    returns ``block_order`` normalized (``None`` for the natural order). Constructors call it so
    that a bad value fails where it is given."""
    check_positive_int("block_size", block_size)
    check_backend(backend)
    check_positive_int("ring_chunks", ring_chunks)
    check_scale(scale)
    check_sharding(sharding)
    check_score_mod(score_mod)
    if process_group is not None:
        if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
            raise TypeError(f"process_group must be a torch.distributed ProcessGroup or None, "
                            f"got {type(process_group).__name__}")
        if ring_chunks != 1:
            raise ValueError("ring_chunks simulates a ring on one device; with a process_group "
                             "the ring runs over its ranks: leave ring_chunks=1")
        if backend == "sdpa":
            raise BackendUnsupported(NO_LSE)
    return check_block_order(block_order)


def check_pattern(pattern: object, num_heads: int | None = None, name: str = "pattern") -> None:
    """Raise naming ``name`` unless ``pattern`` is a :class:`~workbench.patterns.Pattern` (of 1
    or ``num_heads`` heads, when given)."""
    if not isinstance(pattern, Pattern):
        raise TypeError(f"{name} must be a workbench Pattern (e.g. wb.patterns.local_window(128)), "
                        f"got {type(pattern).__name__}")
    if num_heads is not None and pattern.num_heads not in (1, num_heads):
        raise ValueError(f"{name} has {pattern.num_heads} heads but the attention has {num_heads}; "
                         f"build it with num_heads={num_heads} (or use a head-independent pattern)")


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
    plan: Plan | Plans | None = None,
    score_mod: ScoreMod | None = None,
    q_offset: int = 0,
) -> Tensor | tuple[Tensor, Tensor]:
    """Softmax attention restricted to ``pattern``, computed tile by tile.

    Args:
        q, k, v: ``[B, H, Sq, D]``, ``[B, H_kv, Sk, D]``, ``[B, H_kv, Sk, Dv]``; any length
            (no multiple of ``block_size`` needed: padding never changes the result).
            ``H_kv`` divides ``H`` (grouped-query attention): query head ``h`` attends with
            key/value head ``h // (H / H_kv)``; the pattern's heads are the query heads.
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
        block_order: tile visit order: ``None`` (natural), ``"hilbert"`` or ``"morton"`` (the
            *post-pattern* ordering; the same result up to summation order).
        dropout_p: attention-weight dropout as ``nn.MultiheadAttention``'s (the lse is
            unaffected); on ``blockwise`` or ``reference``.
        dropout_seed: seed of the keep decisions (a hash of batch-head, query and key);
            ``None`` draws one from torch's generator; rank 0's under a process group.
        process_group: run the ring over this ``torch.distributed`` group; ``q, k, v`` and the
            result are this rank's shard (:func:`~workbench.distributed.shard_plan`).
            Self-attention only.
        sharding: ``"contiguous"`` or ``"zigzag"`` (balances causal work) under a process group.
        plan: a :class:`~workbench.plan.Plan` of these lengths (global ones under a process
            group) that keeps the layout and what backends derive from it, or a
            :class:`~workbench.plan.Plans` that finds it. Not with ``layout``.
        score_mod: ``score_mod(score, b, h, q_idx, kv_idx) -> score`` (FlexAttention's form)
            applied to the computed scaled scores at absolute positions, before the mask; on
            ``blockwise``, ``flex`` or ``reference`` (under a process group: see
            :func:`~workbench.distributed.distributed_ring_attention`).
        q_offset: the queries are positions ``q_offset ...`` of the keys' sequence (a decoder
            with a KV cache passes ``Sk - Sq``); one device only, with a plan of the same
            ``q_offset`` rather than a ``layout``.

    Returns:
        ``out [B, H, Sq, Dv]`` in q's dtype, or ``(out, lse)``. A query with no allowed key
        outputs zeros.
    """
    k, v = checked_kv(q, k, v)
    check_pattern(pattern, q.shape[1])
    check_int("q_offset", q_offset, 0)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be True or False, got {return_lse!r}")
    block_order = check_options(block_size=block_size, backend=backend, ring_chunks=ring_chunks,
                                scale=scale, block_order=block_order, sharding=sharding,
                                process_group=process_group, score_mod=score_mod)
    if plan is not None and layout is not None:
        raise ValueError("give a layout or a plan, not both (a plan holds its layout)")
    if q_offset and (process_group is not None or layout is not None):
        raise ValueError("q_offset works on one device and with a plan, not with a "
                         "process_group or a layout: give plan=wb.Plan(..., q_offset=...)")
    if process_group is not None:  # the ring sends whole heads: grouped ones repeated first
        return distributed_ring_attention(
            q, *expand_kv_heads(q, k, v), pattern, block_size, process_group=process_group,
            sharding=sharding, backend=backend, scale=scale, return_lse=return_lse, layout=layout,
            block_order=block_order, dropout=dropout_of(dropout_p, dropout_seed), plan=plan,
            score_mod=score_mod)
    build = None  # the layout, built only if a backend needs it
    if isinstance(layout, BlockLayout):
        layout.check(pattern, q.shape[2], k.shape[2], block_size)
        build = lambda: layout  # noqa: E731
    elif layout is not None:
        raise TypeError(f"layout must be a BlockLayout from pattern.block_structure(...), "
                        f"got {type(layout).__name__}")
    elif isinstance(plan, Plans):  # looked up only when the call is not the last one again
        build = lambda: plan.get(pattern, q.shape[2], k.shape[2], block_size,  # noqa: E731
                                 q.device, q_offset).layout
    elif plan is not None:
        held = plan_for(plan, pattern, q.shape[2], k.shape[2], block_size, q.device, q_offset)
        build = lambda: held.layout  # noqa: E731
    return attend(q, k, v, pattern, block_size, backend=backend, return_lse=return_lse,
                  scale=scale, ring_chunks=ring_chunks, block_order=block_order,
                  dropout=dropout_of(dropout_p, dropout_seed), layout=build, score_mod=score_mod,
                  q_offset=q_offset, last=None if plan is None else plan.last_call)


def _request(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, block_size: int, *,
             need_lse: bool, dropout: bool, layout: Callable[[], BlockLayout] | None,
             score_mod: ScoreMod | None = None, q_offset: int = 0) -> Request:
    """The request of one call; its layout is ``layout()``, or the pattern's, built on first use."""
    def build() -> BlockLayout:
        return query_window_layout(pattern, q.shape[2], k.shape[2], block_size, q.device,
                                   q_offset)

    return Request(q, k, v, need_lse, pattern.dense_form(), dropout, pattern, q_offset=q_offset,
                   block_size=block_size, build_layout=layout or build, score_mod=score_mod)


def prepare(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, block_size: int, *, backend: str,
            return_lse: bool, scale: float | None, ring_chunks: int, block_order: str | None,
            dropout: AttentionDropout | None, layout: Callable[[], BlockLayout] | None = None,
            score_mod: ScoreMod | None = None, q_offset: int = 0) -> Runner:
    """The dispatch of :func:`block_sparse_attention` on one device, arguments already checked:
    the chosen backend prepared, as ``runner(q, k, v) -> (out, lse or None)`` for inputs like
    these. ``layout()`` is called only if the backend needs a layout."""
    if q.numel() == 0:  # no batch or no heads: nothing to attend
        return _empty_attention
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    req = _request(q, k, v, pattern, block_size, need_lse=return_lse or ring_chunks > 1,
                   dropout=dropout is not None, layout=layout, score_mod=score_mod,
                   q_offset=q_offset)
    chosen = get_backend(choose(backend, req).name)
    prep = chosen.prepare_pattern
    if ring_chunks == 1 and q_offset == 0 and prep is not None:  # no layout
        return grouped_runner(lambda q, k, v: prep(q, k, v, pattern, scale, return_lse,
                                                   block_size),
                              q, k, v, chosen.capabilities.grouped_kv)
    problem = Problem(req.layout, head_predicate(pattern, q.device), scale, q_offset=q_offset,
                      label=repr(pattern), block_order=block_order, dropout=dropout,
                      dense_form=pattern.dense_form(), pattern=pattern, score_mod=score_mod)
    if ring_chunks > 1:
        return lambda q, k, v: ring_attention(q, k, v, problem, ring_chunks, backend)
    return chosen.runner(q, k, v, problem, return_lse)


def call_key(q: Tensor, k: Tensor, v: Tensor, *options: object) -> tuple:
    """What a kept runner must have been prepared for to serve a call: the inputs' shapes,
    dtype, device and grad mode, and ``options`` (compared with ``==``; a pattern by ``id``)."""
    return (q.shape, k.shape, v.shape, q.dtype, q.device, torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad), *options)


def attend(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, block_size: int, *, backend: str,
           return_lse: bool, scale: float | None, ring_chunks: int, block_order: str | None,
           dropout: AttentionDropout | None, layout: Callable[[], BlockLayout] | None = None,
           score_mod: ScoreMod | None = None, q_offset: int = 0,
           last: LastCall | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`block_sparse_attention` on one device, arguments already checked: the runner of
    :func:`prepare`, taken from ``last`` when this call repeats the one it was kept for (else
    prepared and kept there)."""
    def build() -> Runner:
        return prepare(q, k, v, pattern, block_size, backend=backend, return_lse=return_lse,
                       scale=scale, ring_chunks=ring_chunks, block_order=block_order,
                       dropout=dropout, layout=layout, score_mod=score_mod, q_offset=q_offset)

    if last is None:
        run = build()
    else:
        key = call_key(q, k, v, id(pattern), block_size, backend, return_lse, scale,
                       ring_chunks, block_order, dropout, id(score_mod),
                       score_mod is not None and torch.is_grad_enabled(), q_offset)
        run = last.get(key, pattern, build)
    out, lse = run(q, k, v)
    return (out, lse) if return_lse else out


def explain_backend(q: Tensor, k: Tensor, v: Tensor, pattern: Pattern, block_size: int = 64, *,
                    backend: str = "auto", return_lse: bool = False, ring_chunks: int = 1,
                    dropout_p: float = 0.0, score_mod: ScoreMod | None = None,
                    q_offset: int = 0) -> Choice:
    """The backend :func:`block_sparse_attention` would run these arguments on, and why
    (``ring_chunks > 1``: the ring's steps choose again, each on its slice). Raises as that
    call would for a backend that cannot run them."""
    k, v = checked_kv(q, k, v)
    check_pattern(pattern, q.shape[1])
    check_options(block_size=block_size, backend=backend, ring_chunks=ring_chunks, scale=None,
                  block_order=None, sharding="contiguous", score_mod=score_mod)
    req = _request(q, k, v, pattern, block_size, need_lse=return_lse or ring_chunks > 1,
                   dropout=dropout_of(dropout_p, 0) is not None, layout=None,
                   score_mod=score_mod, q_offset=check_int("q_offset", q_offset, 0))
    return choose(backend, req)


def _empty_attention(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """The result for inputs with no batch element or no head: empty tensors of the right
    shapes, connected to the inputs' autograd graph."""
    out = torch.matmul(torch.matmul(q, k.transpose(-1, -2)), v)
    return out, q.new_empty(q.shape[:3], dtype=accumulation_dtype(q.dtype))


def check_dropout(p: object, name: str = "dropout_p") -> float:
    """``p`` as a float if it is a probability in ``[0, 1)``; a ``ValueError`` naming it else."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {p!r}")
    return float(p)


def dropout_of(p: float, seed: int | None) -> AttentionDropout | None:
    """The dropout of a call (None when ``p == 0``); draws a seed when none is given."""
    check_dropout(p)
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

    Takes ``q, k, v`` ``[B, H, S, D]`` (``k, v`` may have fewer heads: grouped-query
    attention; no projections) and the options of
    :func:`block_sparse_attention`. Keeps its plans in ``plans`` (its own, or a
    :class:`~workbench.plan.Plans` shared between layers) and the backend prepared for its last
    call, so a repeated call launches the kernel straight away. An ``nn.Module`` ``score_mod`` is
    a sub-module.
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
        plans: Plans | None = None,
        score_mod: ScoreMod | None = None,
    ) -> None:
        super().__init__()
        check_pattern(pattern)
        self.block_order = check_options(block_size=block_size, backend=backend,
                                         ring_chunks=ring_chunks, scale=scale,
                                         block_order=block_order, sharding=sharding,
                                         process_group=process_group, score_mod=score_mod)
        self.pattern, self.block_size, self.backend = pattern, block_size, backend
        self.ring_chunks, self.scale, self.score_mod = ring_chunks, scale, score_mod
        self.process_group, self.sharding = process_group, sharding
        self.plans = Plans() if plans is None else check_plans(plans)
        self.last_call = LastCall()

    def plan(self, q_len: int, k_len: int, device: torch.device | str,
             q_offset: int = 0) -> Plan:
        """The plan for these lengths (and first query position), kept in :attr:`plans` for
        the next call."""
        return self.plans.get(self.pattern, q_len, k_len, self.block_size, device, q_offset)

    def layout(self, q_len: int, k_len: int, device: torch.device | str,
               q_offset: int = 0) -> BlockLayout:
        """The block layout for these lengths (its plan's)."""
        return self.plan(q_len, k_len, device, q_offset).layout

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, *, return_lse: bool = False, q_offset: int = 0
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attention of ``q`` over ``k, v`` as :func:`block_sparse_attention` computes it with
        this module's options; ``q_offset`` is the position of the first query (a decoder
        with a KV cache passes ``Sk - Sq``)."""
        if self.process_group is not None:  # each rank builds (and keeps) its own rows
            return block_sparse_attention(
                q, k, v, self.pattern, self.block_size, backend=self.backend,
                return_lse=return_lse, scale=self.scale, block_order=self.block_order,
                process_group=self.process_group, sharding=self.sharding, plan=self.plans,
                score_mod=self.score_mod, q_offset=q_offset)
        k, v = checked_kv(q, k, v)
        check_pattern(self.pattern, q.shape[1])
        q_offset = check_int("q_offset", q_offset, 0)
        return attend(q, k, v, self.pattern, self.block_size, backend=self.backend,
                      return_lse=bool(return_lse), scale=self.scale, ring_chunks=self.ring_chunks,
                      block_order=self.block_order, dropout=None,
                      layout=lambda: self.layout(q.shape[2], k.shape[2], q.device, q_offset),
                      score_mod=self.score_mod, q_offset=q_offset, last=self.last_call)

    def extra_repr(self) -> str:
        return (f"pattern={self.pattern!r}, block_size={self.block_size}, "
                f"backend={self.backend!r}, ring_chunks={self.ring_chunks}, "
                f"block_order={self.block_order!r}")
