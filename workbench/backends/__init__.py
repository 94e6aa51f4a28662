"""Backends: what computes the tiles of a :class:`~workbench.backends.problem.Problem`.

- ``reference``: dense masked attention in float64, the oracle (small problems only).
- ``blockwise``: pure PyTorch over active tiles with an online softmax; any device, autograd.
- ``flex``: FlexAttention with a ``BlockMask`` from the exact layout (compiled; CPU: inference).
- ``triton``: our own Triton kernels over the same tile lists (CUDA, float16/bfloat16; forward,
  log-sum-exp and backward); :mod:`workbench.lab.triton_resources` compiles them offline to
  tell what a launch configuration uses.
- ``sdpa``: PyTorch's ``scaled_dot_product_attention`` for problems whose pattern is dense or
  causal attention (:mod:`~workbench.backends.sdpa`); forward and backward, no log-sum-exp.
- ``auto``: ``sdpa`` for dense or causal problems when no log-sum-exp is asked for;
  otherwise ``blockwise`` off CUDA and whenever attention dropout is on; on CUDA ``flex``, or
  ``triton`` on layouts whose tiles are mostly partial (:data:`PARTIAL_HEAVY`).
"""

from __future__ import annotations

from torch import Tensor

from ..layout import BlockLayout
from .blockwise import blockwise_attention
from .dropout import AttentionDropout
from .flex import flex_attention, flex_available
from .layout_cache import LayoutCache
from .merge import accumulation_dtype, empty_partial, merge_into_, merge_partials
from .problem import MaskFn, Problem
from .reference import reference_attention
from .sdpa import NO_LSE, dense_sdpa, sdpa_attention, sdpa_form, sdpa_serves
from .triton_sparse import triton_attention
from .triton_sparse import unsupported as triton_unsupported

__all__ = [
    "BACKENDS",
    "BITS_BUDGET",
    "AttentionDropout",
    "check_backend",
    "dense_sdpa",
    "MaskFn",
    "PARTIAL_HEAVY",
    "Problem",
    "accumulation_dtype",
    "blockwise_attention",
    "empty_partial",
    "merge_into_",
    "merge_partials",
    "partial_share",
    "plan_bits_bytes",
    "reference_attention",
    "resolve_backend",
    "run_backend",
    "sdpa_attention",
    "sdpa_form",
    "sdpa_serves",
    "triton_attention",
]

BACKENDS = ("auto", "blockwise", "flex", "reference", "sdpa", "triton")


def check_backend(name: str) -> str:
    """``name`` if it is one of :data:`BACKENDS`; otherwise a ``ValueError`` listing them."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


PARTIAL_HEAVY = 0.5
"""``auto`` picks the ``triton`` kernels on CUDA when at least this share of the layout's
active tiles are partial: there they read one bit per pair where FlexAttention evaluates the
token predicate for every pair; on layouts of few partial tiles the two are close (the
recorded comparison is in ``notebooks/results_scaling.ipynb``)."""

BITS_BUDGET = 1 << 30
"""``auto`` keeps ``flex`` when the triton plan's bit masks (``block**2 / 8`` bytes per partial
tile) would take more than this many bytes: they grow with the square of the length, where
FlexAttention's block lists hold a few integers per tile."""

_PARTIAL = LayoutCache()


def _partial_tiles(layout: BlockLayout) -> tuple[int, int]:
    """(partial tiles, active tiles) of ``layout``, counted once per layout object."""
    def count() -> tuple[int, int]:
        active, full = layout.tile_counts()  # (not the pair counts of stats(): a pass fewer)
        return active - full, active

    return _PARTIAL.get_or_build(layout, "partial", count)  # type: ignore[return-value]


def partial_share(layout: BlockLayout) -> float:
    """Share of ``layout``'s active tiles that are partial (need the token predicate)."""
    partial, active = _partial_tiles(layout)
    return partial / active if active else 0.0


def plan_bits_bytes(layout: BlockLayout) -> int:
    """Bytes of the bit masks the triton plan keeps for ``layout``'s partial tiles."""
    return _partial_tiles(layout)[0] * layout.block_size ** 2 // 8


def resolve_backend(name: str, q: Tensor, dropout: bool = False, *,
                    layout: BlockLayout | None = None, v: Tensor | None = None,
                    problem: Problem | None = None, need_lse: bool = True) -> str:
    """The concrete backend ``name`` means for inputs like ``q`` (validates the name).

    ``auto``: ``sdpa`` when ``problem`` is given, is dense or causal attention
    (:func:`~workbench.backends.sdpa.sdpa_form`) and no log-sum-exp is needed (``need_lse``
    False); otherwise ``blockwise`` off CUDA or with attention ``dropout`` (only ``blockwise``
    and ``reference`` apply it); on CUDA ``flex``, or ``triton`` when ``layout`` (default:
    ``problem``'s) is given, the kernel takes these inputs (values ``v``, default like ``q``;
    heads of at most 128, as measured), at least :data:`PARTIAL_HEAVY` of its active tiles are
    partial and their bit masks fit in :data:`BITS_BUDGET`."""
    if check_backend(name) != "auto":
        return name
    if problem is not None:
        if not need_lse and sdpa_form(problem) is not None:
            return "sdpa"
        layout = problem.layout if layout is None else layout
    if not q.is_cuda or dropout or not flex_available():
        return "blockwise"
    if (layout is not None and q.shape[-1] <= 128
            and triton_unsupported(q, q if v is None else v) is None
            and partial_share(layout) >= PARTIAL_HEAVY
            and plan_bits_bytes(layout) <= BITS_BUDGET):
        return "triton"
    return "flex"


def run_backend(
    name: str, q: Tensor, k: Tensor, v: Tensor, problem: Problem, need_lse: bool
) -> tuple[Tensor, Tensor | None]:
    """Compute ``problem`` with backend ``name``; returns ``(out, lse)`` (lse may be None
    when ``need_lse`` is False)."""
    name = resolve_backend(name, q, problem.dropout is not None, v=v, problem=problem,
                           need_lse=need_lse)
    if name == "sdpa":
        if need_lse:
            raise ValueError(NO_LSE)
        return sdpa_attention(q, k, v, problem), None
    if name == "flex":
        return flex_attention(q, k, v, problem, need_lse)
    if name == "reference":
        return reference_attention(q, k, v, problem)
    if name == "triton":
        return triton_attention(q, k, v, problem, need_lse)
    return blockwise_attention(q, k, v, problem)
