"""LongNet dilated attention (Ding et al. 2023, arXiv 2307.02486), in its two modes: attention
over LongNet's patterns (:func:`~workbench.patterns.dilated`, ``dilated_branch``) on any backend,
by default ``"gather"``, the dilation ordering that wastes no tile."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from .attention import call_key, check_scale, checked_kv, prepare
from .backends import check_backend, expand_kv_heads, merge_partials
from .backends.gather import prepare_dilated
from .patterns import causal as causal_pattern
from .patterns import check_dilation_pairs, check_positive_int, dilated, dilated_branch
from .plan import Plans, check_plans

__all__ = ["DilatedAttention", "dilated_attention"]

MODES = ("paper", "head_groups")


def dilated_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    *,
    mode: str = "paper",
    causal: bool = False,
    backend: str = "gather",
    block_size: int = 64,
    scale: float | None = None,
    return_lse: bool = False,
    plan: Plans | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """LongNet dilated self-attention of ``q, k, v`` ``[B, H, S, D]`` (``k, v`` may have a
    divisor of ``H`` heads: grouped-query attention, query head ``h`` reading key/value head
    ``h // (H / H_kv)``).

    Pair ``(w, r)`` cuts the sequence into segments ``[m*w, (m+1)*w)`` from position 0 (the last
    one shorter when ``w`` does not divide ``S``). Inside a segment a head with offset ``s``
    keeps positions ``s, s + r, s + 2r, ...`` from the segment start; kept queries attend kept
    keys of the same segment (earlier ones only, when ``causal``). Head ``j`` uses offset
    ``j mod r``, on the absolute head index. A position no pair keeps outputs zeros.

    - ``mode="paper"``: every head runs every pair; branch outputs are merged by log-sum-exp
      (weights proportional to each branch's softmax denominator, with gradients through them):
      one softmax over the union of the branches' keys, a key kept by several branches counted
      once per branch.
    - ``mode="head_groups"``: heads are split into ``len(segment_lengths)`` contiguous groups
      as evenly as possible (the first ``H mod k`` get one extra head) and group ``g`` runs pair
      ``g`` only: exactly ``block_sparse_attention(q, k, v, patterns.dilated(...))``.

    Args:
        segment_lengths, dilation_rates: one dilation per segment length, ``r_i <= w_i``.
        causal: keys after the query are masked inside each segment.
        backend: ``"gather"`` (dilation ordering, dense per segment; default) or any backend
            of :mod:`workbench.backends` (block-sparse ones work in natural order).
        block_size: tile size for block-sparse backends (and for the log-sum-exp path).
        scale: score scale, default ``1 / sqrt(D)``.
        return_lse: also return the log-sum-exp ``[B, H, S]`` of the merged softmax.
        plan: a :class:`~workbench.plan.Plans` the caller keeps across calls: it holds what
            this call prepares, so a call that repeats the last one made through it (shapes,
            dtype, device, grad mode, options) runs the kernels at once.

    Returns:
        ``out [B, H, S, Dv]`` in ``q``'s dtype, or ``(out, lse)`` with ``return_lse``.

    Raises:
        ValueError: mismatched shapes or devices, ``q`` and ``k`` of different lengths, an
            unknown ``mode`` or ``backend``, bad pairs, ``block_size`` or ``scale``.
        TypeError: inputs that are not floating-point tensors of one dtype; a ``plan`` that is
            not a ``Plans``.
    """
    k, v = _checked_inputs(q, k, v)
    if plan is None:
        w, r = _check_options(segment_lengths, dilation_rates, mode, backend, block_size, scale)
        return _prepare(q, k, v, w, r, mode, bool(causal), backend, block_size, scale,
                        bool(return_lse), None)(q, k, v)
    pairs = tuple(map(_frozen, (segment_lengths, dilation_rates)))  # checked when prepared
    return _run(q, k, v, (*pairs, mode, bool(causal), backend, block_size, scale,
                          bool(return_lse)), check_plans(plan, "plan"))


class DilatedAttention(nn.Module):
    """:func:`dilated_attention` as an ``nn.Module`` over ``q, k, v`` ``[B, H, S, D]``, its
    options checked here. It keeps its plans and the backends prepared for its last call, so a
    call that repeats it (shapes, dtype, device, grad mode, attributes) runs the kernels at once.
    """

    def __init__(self, segment_lengths: Sequence[int], dilation_rates: Sequence[int], *,
                 mode: str = "paper", causal: bool = False, backend: str = "gather",
                 block_size: int = 64, scale: float | None = None) -> None:
        super().__init__()
        self.segment_lengths, self.dilation_rates = _check_options(
            segment_lengths, dilation_rates, mode, backend, block_size, scale)
        self.mode, self.causal, self.backend = mode, bool(causal), backend
        self.block_size, self.scale = block_size, scale
        self.plans = Plans()

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, return_lse: bool = False
                ) -> Tensor | tuple[Tensor, Tensor]:
        k, v = _checked_inputs(q, k, v)
        options = (self.segment_lengths, self.dilation_rates, self.mode, self.causal,
                   self.backend, self.block_size, self.scale, bool(return_lse))
        return _run(q, k, v, options, self.plans)

    def extra_repr(self) -> str:
        return (f"segment_lengths={list(self.segment_lengths)}, "
                f"dilation_rates={list(self.dilation_rates)}, mode={self.mode!r}, "
                f"causal={self.causal}, backend={self.backend!r}")


def _run(q: Tensor, k: Tensor, v: Tensor, options: tuple, plans: Plans
         ) -> Tensor | tuple[Tensor, Tensor]:
    """The call with ``options`` (:func:`_prepare`'s, in order) through the runner ``plans``
    keeps for the last call, prepared (options checked) when this call differs from it."""
    def build() -> Callable[[Tensor, Tensor, Tensor], Tensor | tuple[Tensor, Tensor]]:
        w, r = _check_options(*options[:3], *options[4:7])
        return _prepare(q, k, v, w, r, *options[2:], plans)

    return plans.last_call.get(call_key(q, k, v, *options), None, build)(q, k, v)


def _frozen(values: object) -> object:
    """``values`` as a tuple, when iterable (a later change to a list cannot match a kept
    call); anything else as it is, for :func:`_check_options` to refuse."""
    try:
        return tuple(values)  # type: ignore[call-overload]
    except TypeError:
        return values


def _check_options(segment_lengths: Sequence[int], dilation_rates: Sequence[int], mode: str,
                   backend: str, block_size: int, scale: float | None
                   ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The (segment, dilation) lists as tuples of ints, once every option is checked."""
    w, r = check_dilation_pairs(segment_lengths, dilation_rates)
    check_positive_int("block_size", block_size)
    check_scale(scale)
    check_backend(backend)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return tuple(w), tuple(r)


def _checked_inputs(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """``k, v`` with grouped-query heads repeated to q's, once q, k, v are checked."""
    k, v = expand_kv_heads(q, *checked_kv(q, k, v))
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"dilated attention is self-attention: q has {q.shape[2]} positions, k {k.shape[2]}"
        )
    return k, v


def _prepare(q: Tensor, k: Tensor, v: Tensor, segment_lengths: Sequence[int],
             dilation_rates: Sequence[int], mode: str, causal: bool, backend: str,
             block_size: int, scale: float | None, return_lse: bool, plans: Plans | None
             ) -> Callable[[Tensor, Tensor, Tensor], Tensor | tuple[Tensor, Tensor]]:
    """``run(q, k, v)`` for inputs like these (arguments checked): LongNet's head-group pattern,
    or one branch per pair merged by log-sum-exp (``"gather"`` and ``"auto"``: all in one pass,
    merged inside)."""
    h, s = q.shape[1], q.shape[2]
    if mode == "head_groups":
        patterns = [dilated(segment_lengths, dilation_rates, h, causal=causal)]
    else:
        patterns = [dilated_branch(w, r, h) for w, r in zip(segment_lengths, dilation_rates)]
        patterns = [p & causal_pattern() for p in patterns] if causal else patterns
    if backend in ("gather", "auto"):  # auto takes the dilation ordering for LongNet's patterns
        run = prepare_dilated(q, k, v, patterns, scale=scale, block_size=block_size,
                              need_lse=return_lse)
    else:
        runs = [prepare(q, k, v, p, block_size, backend=backend,
                        return_lse=return_lse or len(patterns) > 1, scale=scale, ring_chunks=1,
                        block_order=None, dropout=None,
                        layout=None if plans is None else
                        (lambda p=p: plans.get(p, s, s, block_size, q.device).layout))
                for p in patterns]
        run = runs[0] if len(runs) == 1 else (
            lambda q, k, v: merge_partials(*zip(*(r(q, k, v) for r in runs))))
    return run if return_lse else lambda q, k, v: run(q, k, v)[0]
