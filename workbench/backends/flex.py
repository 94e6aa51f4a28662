"""FlexAttention backend: a ``BlockMask`` built straight from the exact block layout (full tiles
skip the mask function; the ``S x S`` mask is never evaluated), kept with the layout.

Each new shape or pattern parameter compiles once (announced on stderr), up to
:data:`RECOMPILE_LIMIT` compiles, past which it raises rather than fall back to eager attention.
On the CPU FlexAttention supports inference only (no gradients, no log-sum-exp).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import lru_cache

import torch
from torch import Tensor

from ..blockmask import block_mask_from_layout
from ..layout import BlockLayout
from ..orderings import visit_rank
from .problem import Problem
from .registry import Backend, Capabilities, Request, Runner

__all__ = ["BACKEND", "build_block_mask", "flex_attention", "prepare_flex", "reset_compiled"]


CPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what its CPU kernel compiles for
KERNEL_TILE = 128  # FlexAttention's Triton kernels on Hopper need sparse blocks of 128k tokens
NARROW_MIN_BYTES = 1 << 30
"""On CUDA, block lists whose full width would take this many bytes each are cut to their
longest row (:func:`~workbench.blockmask.block_mask_from_layout`'s ``narrow``): where they
are this large the memory matters more than the pass that finds the row."""


def _tile_refusal(block_size: int) -> str | None:
    """Why ``block_size`` cannot be used on CUDA, where it is merged into the kernel's tiles."""
    if block_size % KERNEL_TILE and KERNEL_TILE % block_size:
        return (f"needs a block_size that divides {KERNEL_TILE} or is a multiple of it on CUDA "
                f"(its kernel's tile), got {block_size}")
    return None


def _kernel_layout(layout: BlockLayout) -> BlockLayout:
    """On CUDA, tiles smaller than the kernel's are merged into 128-token tiles."""
    b = layout.block_size
    if layout.active.device.type != "cuda" or b % KERNEL_TILE == 0:
        return layout
    reason = _tile_refusal(b)
    if reason:
        raise ValueError(f"the flex backend {reason}")
    return layout.coarsen(KERNEL_TILE // b)


def cached_block_mask(problem: Problem, device: torch.device | str, backward: bool = True):
    """:func:`build_block_mask`, kept with the problem's layout (:meth:`BlockLayout.derived`):
    a plan held across calls builds it once. A mask built for the forward only is rebuilt when
    a backward needs one."""
    return problem.derived("flex", device, lambda: build_block_mask(problem, device, backward),
                           reuse=lambda mask: not backward or mask.q_indices is not None)


def build_block_mask(problem: Problem, device: torch.device | str, backward: bool = True):
    """A FlexAttention ``BlockMask`` equivalent to ``problem``, on ``device`` (tiles merged into
    the kernel's on CUDA); ``backward=False`` leaves out the lists only a backward reads."""
    lay = _kernel_layout(problem.layout.to(device))
    q_off, k_off = _offsets(problem, device)
    # A post-pattern visit order reorders each query block's key blocks (FlexAttention's grid
    # fixes the order of query blocks itself).
    narrow = lay.active.is_cuda and lay.active.numel() * 4 >= NARROW_MIN_BYTES
    return block_mask_from_layout(lay, problem.allowed, q_offset=q_off, k_offset=k_off,
                                  rank=visit_rank(lay, problem.block_order), backward=backward,
                                  narrow=narrow)


def _offsets(problem: Problem, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """The problem's offsets as tensors: the compiled kernel takes them as inputs, so a ring's
    slices (same shape, other offsets) share one compilation. Filled on the device: copying a
    Python number to the GPU waits for every kernel already queued."""
    return tuple(torch.full((), x, dtype=torch.int64, device=device)  # type: ignore[return-value]
                 for x in (problem.q_offset, problem.k_offset))


@lru_cache(maxsize=1)
def _compiled():
    """The compiled kernel (one per process; a graph break is an error)."""
    from torch.nn.attention.flex_attention import flex_attention as fa

    return torch.compile(fa, dynamic=False, fullgraph=True)


def kernel_options(device: torch.device) -> dict[str, object] | None:
    """FlexAttention kernel options for ``device``: TMA loads on Hopper and newer."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0):
        return {"USE_TMA": True}
    return None


RECOMPILE_LIMIT = 64
_seen: set[tuple] = set()


def prepare_flex(q: Tensor, k: Tensor, v: Tensor, problem: Problem, need_lse: bool) -> Runner:
    """Compiled FlexAttention over ``problem``, its ``BlockMask`` ready: ``runner(q, k, v) ->
    (out, lse or None)`` for inputs :data:`BACKEND` accepts."""
    mod = problem.score_mod
    key = (tuple(q.shape), tuple(k.shape), q.dtype, q.device.type, problem.layout.block_size,
           problem.label, need_lse, getattr(mod, "__qualname__", type(mod).__qualname__))
    if key not in _seen:
        _seen.add(key)
        with_mod = "" if mod is None else f" with score_mod {key[-1]}"
        print(f"[workbench] compiling FlexAttention for {problem.label or 'a pattern'}"
              f"{with_mod} at q{tuple(q.shape)} {q.dtype} on {q.device.type} (once per shape "
              "and pattern)",
              file=sys.stderr)
    backward = Request(q, k, v, need_lse, score_mod=mod).grad
    mask = cached_block_mask(problem, q.device, backward)
    compiled = _compiled()
    scale, options = problem.scale, kernel_options(q.device)
    score_mod = _offset_score_mod(problem, q.device)
    gqa = k.shape[1] != q.shape[1]  # grouped-query k, v, read as they are

    def call(q: Tensor, k: Tensor, v: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        return compiled(q, k, v, score_mod=score_mod, block_mask=mask, scale=scale,
                        enable_gqa=gqa, return_lse=need_lse, kernel_options=options)

    compiled_once = False

    def run(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor | None]:
        nonlocal compiled_once
        res = None
        if compiled_once:  # Dynamo's guards pass and nothing compiles: no limit to raise
            try:
                res = call(q, k, v)
            except torch._dynamo.exc.FailOnRecompileLimitHit:
                pass  # inputs of other strides compiled past Dynamo's own limit: raise it
        if res is None:
            res, compiled_once = _within_limit(call, q, k, v), True
        return (res[0], res[1].float()) if need_lse else (res, None)

    return run


def _within_limit(call: Callable[[Tensor, Tensor, Tensor], object], q: Tensor, k: Tensor,
                  v: Tensor):
    """``call(q, k, v)``, compiling if need be, with up to :data:`RECOMPILE_LIMIT` compiles."""
    try:
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT,
                                        fail_on_recompile_limit_hit=True):
            return call(q, k, v)
    except torch._dynamo.exc.FailOnRecompileLimitHit as e:
        raise RuntimeError(
            f"FlexAttention reached its recompile limit in this process "
            f"(workbench.backends.flex.RECOMPILE_LIMIT = {RECOMPILE_LIMIT}; {len(_seen)} "
            "shape and pattern combinations were announced on stderr). Every new sequence "
            "length, batch or head count, dtype or pattern parameter compiles once. Use "
            "fewer distinct lengths (pad to a few), raise RECOMPILE_LIMIT, or call "
            "workbench.backends.flex.reset_compiled() between sweeps") from e


def flex_attention(
    q: Tensor, k: Tensor, v: Tensor, problem: Problem, need_lse: bool
) -> tuple[Tensor, Tensor | None]:
    """:func:`prepare_flex`, run once: ``(out, lse or None)``."""
    return prepare_flex(q, k, v, problem, need_lse)(q, k, v)


def _offset_score_mod(problem: Problem, device: torch.device):
    """``problem.score_mod`` at absolute positions, in FlexAttention's form (None without one);
    padding positions are clamped to the last real one, so a mod may index tensors by them."""
    user = problem.score_mod
    if user is None:
        return None
    q_last, k_last = problem.layout.q_len - 1, problem.layout.k_len - 1
    q_off, k_off = _offsets(problem, device)

    def score_mod(score, b, h, qi, ki):
        return user(score, b, h, qi.clamp(max=q_last) + q_off, ki.clamp(max=k_last) + k_off)

    return score_mod


def _refuses(req: Request) -> str | None:
    if req.device_type == "cpu" and req.q.dtype not in CPU_DTYPES:
        return f"takes float32, float16 or bfloat16 on the CPU, not {req.q.dtype}"
    if req.device_type == "cuda" and min(req.q.shape[-1], req.v.shape[-1]) < 16:
        return (f"needs a head_dim of at least 16 on CUDA, got {req.q.shape[-1]} and "
                f"{req.v.shape[-1]}")
    return _tile_refusal(req.block_size) if req.device_type == "cuda" else None


def reset_compiled() -> None:
    """Forget every compiled FlexAttention kernel (``torch._dynamo.reset()``) and the shapes
    announced so far: the way to stay under :data:`RECOMPILE_LIMIT` in long sweeps."""
    torch._dynamo.reset()
    _seen.clear()


def _prefers(req: Request) -> str | None:
    if req.device_type != "cuda":
        return None
    return "on CUDA: FlexAttention over the exact block lists (full tiles skip the predicate)"


BACKEND = Backend(
    "flex",
    flex_attention,
    Capabilities(lse_devices=("cuda",), grad_devices=("cuda",), block_order=True,
                 score_mod=True, grouped_kv=True),
    "FlexAttention with a BlockMask from the exact layout (compiled; CPU: inference only)",
    refuses=_refuses, prefers=_prefers, prepare=prepare_flex,
)
