"""Triton backend: our own block-sparse flash-attention kernels, forward and backward.

One program per (batch x head, query tile) walks its row of the layout in two lists: *full*
tiles, read without a mask, and *partial* tiles, read through a packed bit mask of the token
predicate (``block**2 / 8`` bytes each). The backward is FlashAttention-2's split: ``dk, dv``
by key tile over the layout's columns, ``dq`` by query tile over its rows. Without CUDA the
kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set before Triton is imported).
"""

from __future__ import annotations

import importlib.util
import math
import os
import warnings
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..blockmask import sorted_block_indices
from ..layout import BlockLayout
from ..orderings import visit_rank
from ..patterns import Pattern
from .problem import Problem
from .registry import Backend, Capabilities, Request, Runner

__all__ = ["BACKEND", "BITS_BUDGET", "KERNELS", "PARTIAL_HEAVY", "BackwardConfig", "ColumnPlan",
           "KernelConfig", "SparsePlan", "build_column_plan", "build_plan", "cached_plan",
           "default_configs", "jit_kernel", "partial_share", "plan_bits_bytes", "prepare_triton",
           "suits_layout", "triton_attention", "unsupported"]

_LOG2E = 1.4426950408889634
_BITS_BUDGET = 1 << 24  # bytes of temporaries per step when the partial tiles' bit masks are built


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


KERNELS = ("forward", "dkdv", "dq")
"""The kernels: the forward, and the backward's ``dkdv`` (a program per key tile) and ``dq``."""


def jit_kernel(name: str):
    """The Triton function of kernel ``name`` (one of :data:`KERNELS`); imports triton."""
    from . import _triton_kernels as k

    return {"forward": k.sparse_forward, "dkdv": k.sparse_backward_dkdv,
            "dq": k.sparse_backward_dq}[name]


@dataclass(frozen=True)
class KernelConfig:
    """Launch parameters: query and key tile edges (each dividing the layout's block size),
    warps per program, software-pipelining depth, and TMA loads and stores (Hopper and newer,
    tensors with 16-byte aligned strides; rows past the end are zero-filled by the copy
    engine)."""

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 2
    use_tma: bool = False


def default_configs(kernel: str, block: int, device: torch.device, head_dim: int = 128,
                    capability: tuple[int, int] | None = None) -> tuple[KernelConfig, ...]:
    """Launch parameters of ``kernel`` (``"forward"``, ``"dkdv"`` or ``"dq"``) when none are
    given, in the order they are tried: the first the GPU can hold is used and remembered (tile
    edges clipped to ``block``; ``capability`` defaults to ``device``'s). TMA from compute
    capability 9.0; heads wider than 128 start at one stage. Off CUDA (the interpreter): one
    small configuration. Why these values: ``docs/reference.md``.

    Raises:
        ValueError: an unknown ``kernel`` (on CUDA).
    """
    if device.type != "cuda":  # the interpreter: small tiles are fast to interpret
        return (KernelConfig(min(block, 32), min(block, 32), 4, 1),)
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    tma = (capability or torch.cuda.get_device_capability(device)) >= (9, 0)

    def cfg(m: int, n: int, warps: int, stages: int) -> KernelConfig:
        return KernelConfig(min(block, m), min(block, n), warps, stages, use_tma=tma)

    if head_dim > 128:
        first = {"forward": cfg(64, 64, 4, 1), "dkdv": cfg(32, 64, 4, 1),
                 "dq": cfg(64, 32, 4, 1)}[kernel]
        chain = (first, cfg(32, 32, 4, 1))
    elif kernel == "forward":
        chain = (cfg(128, 128, 8, 3), cfg(128, 64, 8, 2), cfg(64, 64, 4, 2), cfg(64, 64, 4, 1),
                 cfg(32, 32, 4, 1))
    else:
        first = cfg(64, 128, 8, 2) if kernel == "dkdv" else cfg(128, 64, 8, 2)
        chain = (first, cfg(64, 64, 4, 2), cfg(64, 64, 4, 1), cfg(32, 32, 4, 1))
    return tuple(dict.fromkeys(chain))


@dataclass(frozen=True)
class BackwardConfig:
    """Launch parameters of the two backward kernels: ``dkdv`` (a program per ``block_n`` keys,
    walking ``block_m`` queries at a time) and ``dq`` (a program per ``block_m`` queries,
    walking ``block_n`` keys at a time)."""

    dkdv: KernelConfig = KernelConfig(64, 128, 8, 2)
    dq: KernelConfig = KernelConfig(128, 64, 8, 2)


def default_backward_config(block: int, device: torch.device, head_dim: int = 128,
                            capability: tuple[int, int] | None = None) -> BackwardConfig:
    """The backward kernels' first choices of :func:`default_configs`."""
    return BackwardConfig(default_configs("dkdv", block, device, head_dim, capability)[0],
                          default_configs("dq", block, device, head_dim, capability)[0])


def _tma_ok(*xs: Tensor) -> bool:
    """Every tensor can be read by a TMA descriptor: 16-byte aligned base and strides."""
    return all(x.data_ptr() % 16 == 0 and all(st * x.element_size() % 16 == 0
                                               for st in x.stride()[:-1]) for x in xs)


@dataclass(frozen=True)
class SparsePlan:
    """What the kernel reads besides q, k and v: per (layout head, query block) the count and
    the sorted key blocks of its full tiles and of its partial tiles, where each row's partial
    tiles start in the bit-mask table, and the table ``[tiles, block, block / 32]`` int32."""

    layout: BlockLayout
    full_count: Tensor  # int32 [Hl * nq]
    full_index: Tensor  # int32 [Hl * nq, nk]
    part_count: Tensor  # int32 [Hl * nq]
    part_index: Tensor  # int32 [Hl * nq, nk]
    part_start: Tensor  # int32 [Hl * nq]: first row of this query row's tiles in ``bits``
    bits: Tensor  # int32 [max(1, partial tiles), block, block // 32]


def _pack_bits(allowed: Tensor) -> Tensor:
    """bool ``[t, r, c]`` -> int32 ``[t, r, c // 32]``: bit ``j % 32`` of word ``j // 32``.

    Packed a byte at a time; the bytes read as int32 words on a little-endian machine, which is
    every machine torch runs on."""
    t, r, c = allowed.shape
    x = allowed.contiguous().view(torch.uint8).reshape(t, r, c // 8, 8)
    byte = x[..., 0].clone()
    for i in range(1, 8):
        byte |= x[..., i] << i
    return byte.view(torch.int32)


def _grain(problem: Problem, block: int) -> int:
    """The side of the aligned squares of local positions on which ``problem.allowed`` is
    constant: the pattern's :meth:`~workbench.patterns.Pattern.grain`, reduced to divide
    ``block`` and both offsets (1 when no pattern is known)."""
    g = problem.pattern.grain() if isinstance(problem.pattern, Pattern) else 1
    return math.gcd(g, block, problem.q_offset, problem.k_offset)


def _partial_bits(problem: Problem, lay: BlockLayout, tiles: Tensor) -> Tensor:
    """Bit masks of the allowed pairs of ``tiles`` ``[t, 3]`` (layout head, query block, key
    block): the token predicate evaluated once per ``g x g`` square of its grain ``g``
    (:func:`_grain`), padding never allowed. From ``g >= 8`` each square's bytes are all ones
    or all zeros (padding cleared after); below, each answer is spread over its square's pairs
    before they are packed."""
    b, dev, w = lay.block_size, tiles.device, lay.block_size // 32
    alloc = torch.empty if tiles.shape[0] else torch.zeros  # every tile's rows are written
    out = alloc(max(1, tiles.shape[0]), b, w, dtype=torch.int32, device=dev)
    g = _grain(problem, b)
    n, ar = b // g, torch.arange(b, device=dev)
    # a tile's largest temporary: its pairs below a grain of 8, its squares' row bytes from 8
    step = max(1, _BITS_BUDGET // (b * b if g < 8 else n * b))
    for t0 in range(0, tiles.shape[0], step):
        t = tiles[t0:t0 + step]
        o, m = out[t0:t0 + t.shape[0]], t.shape[0]
        h, q0, k0 = t[:, 0, None, None], t[:, 1, None, None] * b, t[:, 2, None, None] * b
        # one position per square asked; a tile's real rows and columns kept as bools
        ok = problem.allowed(h, (q0 + ar[None, ::g, None]).clamp(max=lay.q_len - 1)
                             + problem.q_offset,
                             (k0 + ar[None, None, ::g]).clamp(max=lay.k_len - 1)
                             + problem.k_offset)
        q_real, k_real = ar[None, :, None] < lay.q_len - q0, ar[None, None, :] < lay.k_len - k0
        if g < 8:
            if g > 1:  # (the predicate's answer may broadcast)
                ok = ok.expand(m, n, n)[:, :, None, :, None].expand(m, n, g, n, g)
                ok = ok.reshape(m, b, b)
            o.copy_(_pack_bits(ok & q_real & k_real))
            continue
        # each square's bytes are 0xFF or 0: a square row's words, cleared past k_len bit by
        # bit, are copied to its g rows, then the rows past q_len cleared
        byte = -ok.to(torch.int8).expand(m, n, n)[..., None].expand(m, n, n, g // 8)
        words = byte.reshape(m, n, b // 8).contiguous().view(torch.int32)
        keys = _pack_bits(k_real.expand(m, 1, b))
        o.view(m, n, g, w).copy_((words & keys)[:, :, None])
        if lay.q_len % b:
            o.masked_fill_(~q_real, 0)
    return out


def _tile_classes(lay: BlockLayout) -> tuple[Tensor, Tensor]:
    """(full, partial) bool ``[Hl, nq, nk]``: tiles read without a mask and tiles read through
    their bit mask. The short last key block is always partial (its padding is off)."""
    full = lay.full
    if lay.k_len % lay.block_size:
        full = full.clone()
        full[:, :, -1] = False
    return full, lay.active & ~full


def _check_bits_fit(partial_tiles: int, block: int, device: torch.device) -> None:
    """A clear error, before allocating, when the bit masks of ``partial_tiles`` tiles would not
    fit in the GPU's free memory (the device's, and what this process's allocator holds unused:
    it releases that before it fails)."""
    if device.type != "cuda":
        return
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    need, free = partial_tiles * block * block // 8, torch.cuda.mem_get_info(device)[0] + cached
    if need > free:
        raise ValueError(
            f"the triton plan's bit masks for {partial_tiles} partial tiles need "
            f"{need / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB free on {device}; "
            "put the tokens in an order that makes the tiles full (for LongNet: "
            "wb.dilated_attention), or use backend='flex'"
        )


def build_plan(problem: Problem, device: torch.device | str) -> SparsePlan:
    """The kernel's lists for ``problem`` (see :class:`SparsePlan`); ``problem.block_order``
    orders each row's key blocks along its curve.

    Raises:
        ValueError: a block size that is not a power of two >= 32, or bit masks larger than
            the GPU's free memory.
    """
    lay = problem.layout.to(device)
    b = lay.block_size
    if b < 32 or b & (b - 1):
        raise ValueError(f"the triton backend {_block_refusal(b)}")
    full, partial = _tile_classes(lay)
    rank = visit_rank(lay, problem.block_order)
    f_n, f_i = sorted_block_indices(full, rank)
    p_n, p_i = sorted_block_indices(partial, rank)
    hl, nq, nk = lay.shape
    p_n, p_i = p_n.reshape(hl * nq), p_i.reshape(hl * nq, nk)
    _check_bits_fit(int(p_n.sum(dtype=torch.int64)), b, lay.active.device)  # before the lists
    start = torch.cumsum(p_n, 0, dtype=torch.int64) - p_n
    # every partial tile in the order the kernel reads them: row by row, the sorted list
    valid = torch.arange(nk, device=lay.active.device)[None, :] < p_n[:, None]
    row = torch.arange(hl * nq, device=lay.active.device)[:, None].expand(-1, nk)[valid]
    tiles = torch.stack([row // nq, row % nq, p_i[valid].to(torch.int64)], 1)
    bits = _partial_bits(problem, lay, tiles)
    return SparsePlan(lay, f_n.reshape(-1), f_i.reshape(hl * nq, nk), p_n, p_i,
                      start.to(torch.int32), bits)


@dataclass(frozen=True)
class ColumnPlan:
    """The backward's ``dk, dv`` kernel reads the layout by *column*: per (layout head, key
    block) the count and the increasing query blocks of its full tiles and of its partial tiles,
    and for each partial tile its row in the forward plan's bit-mask table (which it shares)."""

    full_count: Tensor  # int32 [Hl * nk]
    full_index: Tensor  # int32 [Hl * nk, nq]
    part_count: Tensor  # int32 [Hl * nk]
    part_index: Tensor  # int32 [Hl * nk, nq]
    part_tile: Tensor  # int32 [Hl * nk, nq]: row of ``SparsePlan.bits`` of each partial tile


def build_column_plan(plan: SparsePlan) -> ColumnPlan:
    """The column lists of ``plan``'s layout, one layout head at a time (the temporaries stay
    the size of one head's block grid)."""
    lay = plan.layout
    full, partial = _tile_classes(lay)
    hl, nq, nk = lay.shape
    f_n, f_i = sorted_block_indices(full.transpose(1, 2))
    p_n, p_i = sorted_block_indices(partial.transpose(1, 2))
    tile = torch.empty(hl, nk, nq, dtype=torch.int32, device=p_i.device)
    cols = torch.arange(nk, device=p_i.device, dtype=torch.int32)
    for h in range(hl):
        # the bit-table row of partial tile (i, j) is row i's start plus j's place in its list;
        # scattered along each row's whole column permutation (the places past its count land
        # on tiles that are not partial, which no column's list reads)
        slot = torch.empty(nq, nk, dtype=torch.int32, device=p_i.device)
        slot.scatter_(1, plan.part_index.view(hl, nq, nk)[h].to(torch.int64),
                      (plan.part_start.view(hl, nq)[h, :, None] + cols[None, :]))
        tile[h] = slot.T.gather(1, p_i[h].to(torch.int64))
    return ColumnPlan(f_n.reshape(-1), f_i.reshape(hl * nk, nq), p_n.reshape(-1),
                      p_i.reshape(hl * nk, nq), tile.reshape(hl * nk, nq))


def _block_refusal(block_size: int) -> str | None:
    if block_size < 32 or block_size & (block_size - 1):
        return f"needs a power-of-two block_size of at least 32, got {block_size}"
    return None


def unsupported(q: Tensor, v: Tensor, block_size: int = 64) -> str | None:
    """Why the triton kernels cannot take ``q`` (and values ``v``) in tiles of ``block_size``,
    as a phrase after "it", or None when they can."""
    if (block := _block_refusal(block_size)) is not None:
        return block
    d = q.shape[-1]
    if d < 16 or d & (d - 1) or v.shape[-1] != d:
        return (f"needs a power-of-two head_dim of at least 16 for q, k and v, got {d} and "
                f"{v.shape[-1]}")
    if q.device.type != "cuda" and not _interpreted():
        return "runs on CUDA (or under TRITON_INTERPRET=1 for testing)"
    if not _has_triton():
        return "needs the triton package (a CUDA build of torch brings it)"
    if q.dtype not in (torch.float16, torch.bfloat16) and q.device.type == "cuda":
        return f"takes float16 or bfloat16 on CUDA, not {q.dtype}"
    return None


@cache
def _has_triton() -> bool:
    """Whether the triton package is installed (looked up once)."""
    return importlib.util.find_spec("triton") is not None


PARTIAL_HEAVY = 0.5
"""``auto`` picks the triton kernels on CUDA when at least this share of the layout's active
tiles are partial."""

BITS_BUDGET = 1 << 30
"""``auto`` leaves a layout to FlexAttention when the triton plan's bit masks (``block**2 / 8``
bytes per partial tile) would take more than this many bytes."""


def _tile_counts(layout: BlockLayout) -> tuple[int, int]:
    """(active tiles, full tiles) of ``layout``, counted once per layout object."""
    return layout.derived("tile counts", layout.tile_counts)


def partial_share(layout: BlockLayout) -> float:
    """Share of ``layout``'s active tiles that are partial (need the token predicate)."""
    active, full = _tile_counts(layout)
    return (active - full) / active if active else 0.0


def plan_bits_bytes(layout: BlockLayout) -> int:
    """Bytes of the bit masks the triton plan keeps for ``layout``'s partial tiles."""
    active, full = _tile_counts(layout)
    return (active - full) * layout.block_size ** 2 // 8


def suits_layout(layout: BlockLayout) -> str | None:
    """Why ``auto`` would run the triton kernels on ``layout`` on CUDA (at least
    :data:`PARTIAL_HEAVY` of its active tiles partial, their bit masks within
    :data:`BITS_BUDGET`), or None when it leaves the layout to FlexAttention."""
    share = partial_share(layout)
    if share < PARTIAL_HEAVY or plan_bits_bytes(layout) > BITS_BUDGET:
        return None
    return (f"{share:.0%} of the active tiles are partial (at least {PARTIAL_HEAVY:.0%}): the "
            "triton kernels read one bit per pair there")


def _prefers(req: Request) -> str | None:
    lay = req.layout
    if lay is None or req.device_type != "cuda" or req.q.shape[-1] > 128:
        return None
    return suits_layout(lay)


FP_FUSION = True
"""Every launch asks for fused multiply-adds explicitly (Triton's default differs by version)."""


def cached_plan(problem: Problem, device: torch.device) -> SparsePlan:
    """:func:`build_plan`, kept with the problem's layout (:meth:`BlockLayout.derived`)."""
    return problem.derived("triton", device, lambda: build_plan(problem, device))


def _descriptors(cfg: KernelConfig, *xs: tuple[Tensor, int]) -> tuple[object, ...]:
    """Each ``(tensor, rows)`` as a TMA descriptor of ``[1, 1, rows, head_dim]`` boxes when
    ``cfg`` asks for TMA and every tensor allows it; else the tensors themselves."""
    tensors = tuple(x for x, _ in xs)
    if not (cfg.use_tma and (tensors[0].is_cuda or _interpreted()) and _tma_ok(*tensors)):
        return tensors
    from triton.tools.tensor_descriptor import TensorDescriptor

    return tuple(TensorDescriptor.from_tensor(x, [1, 1, n, x.shape[-1]]) for x, n in xs)


def _uses_tma(args: tuple[object, ...]) -> bool:
    return not isinstance(args[0], Tensor)


_CHOSEN: dict[tuple, KernelConfig] = {}  # the configuration a default chain settled on


def _launch(kernel, configs: tuple[KernelConfig, ...], launch, key: tuple) -> None:
    """``launch(cfg)`` with the first of ``configs`` the GPU can hold (remembered under ``key``
    when there was a choice, with a warning if it was not the first). When none fits, or the one
    configuration a caller gave does not, the error names it and the way out."""
    from triton.runtime.errors import OutOfResources

    chosen = _CHOSEN.get(key)
    for i, cfg in enumerate((chosen,) if chosen in configs else configs):
        try:
            launch(cfg)
        except OutOfResources as e:
            if chosen is None and i + 1 < len(configs):
                continue
            raise ValueError(
                f"{kernel.fn.__name__} with {cfg} needs more than this GPU has ({e}); pass "
                "smaller tiles, fewer stages (config= / backward_config=); "
                "workbench.lab.triton_resources.kernel_resources says what one uses"
            ) from e
        if len(configs) > 1 and chosen is None:
            _CHOSEN[key] = cfg
            if i:
                warnings.warn(f"{kernel.fn.__name__}: {configs[0]} needs more shared memory "
                              f"than this GPU has; using {cfg}", stacklevel=4)
        return


def _forward(q: Tensor, k: Tensor, v: Tensor, problem: Problem, plan: SparsePlan,
             configs: tuple[KernelConfig, ...], need_lse: bool) -> tuple[Tensor, Tensor | None]:
    """Launch the forward kernel on contiguous-last-dim ``q, k, v``."""
    lay = plan.layout
    bsz, h, s_q, d = q.shape
    hl, nq, nk = lay.shape
    b = lay.block_size
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(bsz, h, s_q, dtype=torch.float32, device=q.device) if need_lse else out
    from ._triton_kernels import sparse_forward

    def launch(cfg: KernelConfig) -> None:
        args = _descriptors(cfg, (q, cfg.block_m), (k, cfg.block_n), (v, cfg.block_n),
                            (out, cfg.block_m))
        sparse_forward[(nq * (b // cfg.block_m), bsz * h)](
            *args, lse,
            plan.full_count, plan.full_index, plan.part_count, plan.part_index,
            plan.part_start, plan.bits,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
            h, hl, nq, nk, s_q, lay.k_len, problem.scale * _LOG2E,
            HEAD_DIM=d, BLOCK=b, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            EVEN_Q=s_q % cfg.block_m == 0, STORE_LSE=need_lse, USE_TMA=_uses_tma(args),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=FP_FUSION,
        )

    _launch(sparse_forward, configs, launch, ("forward", str(q.device), d, b, q.dtype))
    return out, (lse if need_lse else None)


def _backward(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor,
              dlse: Tensor | None, problem: Problem, plan: SparsePlan,
              configs: tuple[tuple[KernelConfig, ...], tuple[KernelConfig, ...]],
              ) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the two backward kernels (``configs``: the ``dkdv`` and the ``dq`` kernel's to
    try): ``dk, dv`` by key tile over the column lists, ``dq`` by query tile over the forward's
    row lists. A gradient reaching the log-sum-exp adds ``p * dlse`` to the score gradient,
    i.e. enters as ``delta - dlse``."""
    lay = plan.layout
    bsz, h, s_q, d = q.shape
    hl, nq, nk = lay.shape
    b = lay.block_size
    dout = dout.contiguous()
    delta = _delta(out, dout, dlse)
    lse2 = torch.where(torch.isfinite(lse), lse * _LOG2E, torch.full_like(lse, torch.inf))
    dq, dk, dv = (torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))
    cols = problem.derived("triton columns", plan.bits.device,  # on the first backward
                           lambda: build_column_plan(plan))
    from ._triton_kernels import sparse_backward_dkdv, sparse_backward_dq

    scalars = (h, hl, nq, nk, s_q, lay.k_len, problem.scale * _LOG2E, problem.scale)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3])

    def operands(c: KernelConfig) -> tuple[object, ...]:
        return _descriptors(c, (q, c.block_m), (k, c.block_n), (v, c.block_n), (dout, c.block_m))

    def launch_dkdv(c: KernelConfig) -> None:
        args = operands(c)
        sparse_backward_dkdv[(nk * (b // c.block_n), bsz * h)](
            *args, dk, dv, lse2, delta,
            cols.full_count, cols.full_index, cols.part_count, cols.part_index, cols.part_tile,
            plan.bits, *strides, *dk.stride()[:3], *scalars,
            HEAD_DIM=d, BLOCK=b, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
            EVEN_Q=s_q % c.block_m == 0, EVEN_K=lay.k_len % c.block_n == 0,
            USE_TMA=_uses_tma(args), num_warps=c.num_warps, num_stages=c.num_stages,
            enable_fp_fusion=FP_FUSION,
        )

    def launch_dq(c: KernelConfig) -> None:
        args = operands(c)
        sparse_backward_dq[(nq * (b // c.block_m), bsz * h)](
            *args, dq, lse2, delta,
            plan.full_count, plan.full_index, plan.part_count, plan.part_index,
            plan.part_start, plan.bits, *strides, *dq.stride()[:3], *scalars,
            HEAD_DIM=d, BLOCK=b, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
            EVEN_Q=s_q % c.block_m == 0, USE_TMA=_uses_tma(args),
            num_warps=c.num_warps, num_stages=c.num_stages, enable_fp_fusion=FP_FUSION,
        )

    key = (str(q.device), d, b, q.dtype)
    _launch(sparse_backward_dkdv, configs[0], launch_dkdv, ("dkdv", *key))
    _launch(sparse_backward_dq, configs[1], launch_dq, ("dq", *key))
    return dq, dk, dv


def _delta(out: Tensor, dout: Tensor, dlse: Tensor | None) -> Tensor:
    """float32 ``rowsum(dout * out) - dlse`` ``[B, H, S]`` of contiguous ``out, dout``, in one
    launch that reads them in their own dtype (no float32 copies)."""
    from ._triton_kernels import row_dot

    d = out.shape[-1]
    n = out.numel() // d
    delta = torch.empty(out.shape[:-1], dtype=torch.float32, device=out.device)
    rows = max(1, 8192 // d)
    row_dot[(-(-n // rows),)](out, dout, delta, n, HEAD_DIM=d, ROWS=rows, num_warps=4,
                              enable_fp_fusion=FP_FUSION)
    return delta if dlse is None else delta - dlse.float()


class _TritonAttention(torch.autograd.Function):
    """Forward kernel, then the backward kernels; differentiable through out and lse."""

    @staticmethod
    def forward(ctx, q, k, v, problem, plan, configs, bwd_configs):  # type: ignore[override]
        out, lse = _forward(q, k, v, problem, plan, configs, True)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.problem, ctx.plan, ctx.bwd_configs = problem, plan, bwd_configs
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlse):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, out, lse, dout, dlse, ctx.problem, ctx.plan,
                               ctx.bwd_configs)
        return dq, dk, dv, None, None, None, None


def prepare_triton(
    q: Tensor, k: Tensor, v: Tensor, problem: Problem, need_lse: bool,
    config: KernelConfig | None = None, plan: SparsePlan | None = None,
    backward_config: BackwardConfig | None = None,
) -> Runner:
    """Our Triton kernels over ``problem`` with their plan and launch parameters ready:
    ``runner(q, k, v) -> (out, lse float32 or None)``, differentiable in ``q, k, v`` (through
    ``lse`` too) when these inputs require grad. ``config`` / ``backward_config`` fix the
    launch parameters (default: the first of :func:`default_configs` that the GPU can hold).

    Raises:
        NotImplementedError: inputs the kernels do not take (:func:`unsupported` says why).
        ValueError: a layout of other heads, or kernel tiles that do not divide the block.
    """
    req = Request.of(q, k, v, problem, need_lse)
    reason = BACKEND.refusal(req)
    if reason is not None:
        raise NotImplementedError(f"the triton backend {reason}; use backend='auto'")
    plan = cached_plan(problem, q.device) if plan is None else plan
    lay = plan.layout
    hl, h, d = lay.num_heads, q.shape[1], q.shape[-1]
    if hl not in (1, h):
        raise ValueError(f"layout has {hl} heads, q has {h}")
    b = lay.block_size
    configs = (config,) if config else default_configs("forward", b, q.device, d)
    bwd = None
    if req.grad:
        bwd = ((default_configs("dkdv", b, q.device, d), default_configs("dq", b, q.device, d))
               if backward_config is None else ((backward_config.dkdv,), (backward_config.dq,)))
    for c in (*configs, *(() if bwd is None else (*bwd[0], *bwd[1]))):
        if b % c.block_m or b % c.block_n:
            raise ValueError(f"kernel tiles {c.block_m}x{c.block_n} must divide block {b}")

    def run(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor | None]:
        if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        if bwd is None:
            return _forward(q, k, v, problem, plan, configs, need_lse)
        out, lse = _TritonAttention.apply(q, k, v, problem, plan, configs, bwd)
        return out, (lse if need_lse else None)

    return run


def triton_attention(
    q: Tensor, k: Tensor, v: Tensor, problem: Problem, need_lse: bool,
    config: KernelConfig | None = None, plan: SparsePlan | None = None,
    backward_config: BackwardConfig | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Our Triton kernels over ``problem``; returns ``(out, lse float32 or None)``
    (:func:`prepare_triton`, run once)."""
    return prepare_triton(q, k, v, problem, need_lse, config, plan, backward_config)(q, k, v)


BACKEND = Backend(
    "triton",
    triton_attention,
    Capabilities(),
    "our Triton kernels over the tile lists (CUDA, float16/bfloat16; forward, log-sum-exp, "
    "backward)",
    refuses=lambda req: unsupported(req.q, req.v, req.block_size), prefers=_prefers,
    prepare=prepare_triton,
)
