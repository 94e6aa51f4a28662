"""Per-call overhead: each public entry point (:data:`ENTRY_POINTS`) called repeatedly on the
same inputs, against the kernel it launches called alone on the same block structure (with the
multi-head module's projections around it). The block-sparse entry points run ``random10``, the
dilated ones ``dilated``."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import patterns as P
from ..attention import BlockSparseAttention, block_sparse_attention, explain_backend
from ..backends import Problem, blockwise_attention
from ..backends import flex as flex_backend
from ..backends.gather import prepare_dilated
from ..dilated import DilatedAttention, dilated_attention
from ..multihead import BlockSparseMultiheadAttention
from ..patterns import head_predicate
from ..plan import Plan, Plans
from .bench import DTYPES, family_pattern
from .records import environment, write_csv

__all__ = ["DEFAULTS", "ENTRY_POINTS", "overhead_study"]

ENTRY_POINTS = ("function", "module", "multihead", "dilated_head_groups", "dilated_paper",
                "dilated_function")
DEFAULTS = {
    "cuda": {"seq_lens": (512, 1024, 2048, 4096, 8192), "heads": 16, "head_dim": 128,
             "dtype": "bf16", "block_size": 128},
    "cpu": {"seq_lens": (256, 512, 1024), "heads": 4, "head_dim": 32, "dtype": "fp32",
            "block_size": 64},
}
"""Shapes per device type when none are given."""
Call = Callable[[], object]
Kernel = Callable[[Tensor, Tensor, Tensor], object]


def _kernel(pattern: P.Pattern, plan: Plan, q: Tensor, k: Tensor, v: Tensor) -> tuple[str, Kernel]:
    """The backend ``auto`` runs for inputs like these and its kernel alone on the plan's
    layout (for FlexAttention the very ``BlockMask`` a call through the plan uses)."""
    backend = explain_backend(q, k, v, pattern, plan.block_size).name
    scale = 1.0 / math.sqrt(q.shape[-1])  # as the entry points compute it: one compiled graph
    problem = Problem(plan.layout, head_predicate(pattern, q.device), scale, label=repr(pattern),
                      dense_form=pattern.dense_form(), pattern=pattern)
    if backend == "flex":
        mask = flex_backend.cached_block_mask(problem, q.device, backward=False)
        compiled = flex_backend._compiled()
        options = flex_backend.kernel_options(q.device)
        return backend, lambda q, k, v: compiled(q, k, v, block_mask=mask, scale=scale,
                                                 kernel_options=options)
    if backend == "blockwise":
        return backend, lambda q, k, v: blockwise_attention(q, k, v, problem)[0]
    raise ValueError(f"no kernel baseline for backend {backend!r} (flex or blockwise)")


def _multihead(mha: BlockSparseMultiheadAttention, x: Tensor, kernel: Kernel) -> Call:
    """The module's self-attention forward (batch first, no masks) with ``kernel`` called
    directly between its projections."""
    b, s, e = x.shape
    h, d = mha.num_heads, mha.head_dim

    def call() -> Tensor:
        q, k, v = F.linear(x.transpose(0, 1), mha.in_proj_weight, mha.in_proj_bias).chunk(3, -1)
        out = kernel(*(t.reshape(s, b, h, d).permute(1, 2, 0, 3) for t in (q, k, v)))
        return mha.out_proj(out.permute(2, 0, 1, 3).reshape(s, b, e)).transpose(0, 1)

    return call


def _cases(entry: str, s: int, block_size: int, q: Tensor, k: Tensor, v: Tensor
           ) -> tuple[str, str, str, Call, Call]:
    """``(family, params, backend, ours, kernel)`` of one entry point at length ``s``."""
    heads, head_dim = q.shape[1], q.shape[3]
    if entry.startswith("dilated"):
        args = P.family("dilated").arguments(s, heads)
        w, r = list(args["segment_lengths"]), list(args["dilation_rates"])
        params = f"segments={w} dilations={r}"
        if entry == "dilated_head_groups":
            attn = DilatedAttention(w, r, mode="head_groups", block_size=block_size)
            run = prepare_dilated(q, k, v, P.dilated(w, r, heads), need_lse=False,
                                  block_size=block_size)
            return "dilated", params, "gather", lambda: attn(q, k, v), lambda: run(q, k, v)
        merged = prepare_dilated(q, k, v, [P.dilated_branch(wi, ri, heads)
                                           for wi, ri in zip(w, r)], need_lse=False)
        paper = DilatedAttention(w, r, mode="paper", block_size=block_size)
        plans = Plans()
        ours = ((lambda: paper(q, k, v)) if entry == "dilated_paper" else
                (lambda: dilated_attention(q, k, v, w, r, block_size=block_size, plan=plans)))
        return "dilated", f"{params} paper", "gather", ours, lambda: merged(q, k, v)[0]
    pattern, params = family_pattern("random10", s, heads)
    plans = Plans()  # one layout, one BlockMask: the kernel's and every entry point's
    plan = plans.get(pattern, s, s, block_size, q.device)
    backend, kernel = _kernel(pattern, plan, q, k, v)
    if entry == "multihead":
        mha = BlockSparseMultiheadAttention(heads * head_dim, heads, pattern=pattern,
                                            block_size=block_size, batch_first=True,
                                            device=q.device, dtype=q.dtype, plans=plans)
        x = q.transpose(1, 2).reshape(q.shape[0], s, heads * head_dim)
        return "random10", params, backend, lambda: mha(x, x, x)[0], _multihead(mha, x, kernel)
    if entry == "module":
        module = BlockSparseAttention(pattern, block_size, plans=plans)
        return "random10", params, backend, lambda: module(q, k, v), lambda: kernel(q, k, v)
    return ("random10", params, backend,
            lambda: block_sparse_attention(q, k, v, pattern, block_size, plan=plan),
            lambda: kernel(q, k, v))


def _median_pair(ours: Call, kernel: Call, reps: int, warmup: int,
                 sync: Callable[[], None]) -> dict[str, float]:
    """Median µs of ``ours`` and ``kernel``, called in pairs, each call from a synchronized
    device: ``*_us`` until the device is done, ``*_host_us`` until the call returns,
    ``*_cpu_us`` the calling thread's CPU time until then. ``overhead_us`` and
    ``cpu_overhead_us`` compare the calls of one pair (which a slow drift of the machine's
    speed leaves out): the mean of the median difference when ours goes first and when the
    kernel does (the first call of a pair may find colder caches)."""
    for _ in range(warmup):
        ours()
        kernel()
    times: dict[str, list[float]] = {}
    for rep in range(reps):
        for name, fn in (("ours", ours), ("kernel", kernel))[::1 - 2 * (rep % 2)]:
            sync()
            t0, c0 = time.perf_counter(), time.thread_time()
            fn()
            t1, c1 = time.perf_counter(), time.thread_time()
            sync()
            for kind, t in (("host_us", t1 - t0), ("cpu_us", c1 - c0),
                            ("us", time.perf_counter() - t0)):
                times.setdefault(f"{name}_{kind}", []).append(t * 1e6)

    def paired(kind: str) -> float:
        diffs = [a - b for a, b in zip(times[f"ours_{kind}"], times[f"kernel_{kind}"])]
        halves = [statistics.median(d) for d in (diffs[0::2], diffs[1::2]) if d]
        return round(statistics.mean(halves), 1)

    return {**{key: round(statistics.median(val), 1) for key, val in times.items()},
            "overhead_us": paired("us"), "cpu_overhead_us": paired("cpu_us")}


def overhead_study(study: str, seq_lens: Iterable[int] | None = None, *,
                   entry_points: Iterable[str] = ENTRY_POINTS, device: str = "cuda",
                   heads: int | None = None, head_dim: int | None = None,
                   dtype: str | None = None, block_size: int | None = None, batch: int = 1,
                   reps: int = 200, warmup: int = 20, write: bool = True) -> list[dict]:
    """Time every entry point against its kernel at every length (forward, no grad), shapes
    left out from :data:`DEFAULTS`; with ``write`` the rows go to
    ``data/overhead_<study>.csv`` after every case (columns of :func:`_median_pair`)."""
    dev = torch.device(device)
    shape = DEFAULTS["cuda" if dev.type == "cuda" else "cpu"]
    seq_lens = tuple(seq_lens or shape["seq_lens"])
    heads, head_dim = heads or shape["heads"], head_dim or shape["head_dim"]
    dtype, block_size = dtype or shape["dtype"], block_size or shape["block_size"]
    unknown = sorted(set(entry_points) - set(ENTRY_POINTS))
    if unknown:
        raise ValueError(f"unknown entry points {unknown}; choose from {ENTRY_POINTS}")
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    env = environment(dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    rows: list[dict] = []
    for s in seq_lens:
        q, k, v = (torch.randn(batch, heads, s, head_dim, device=dev, dtype=DTYPES[dtype],
                               generator=gen) for _ in range(3))
        flex_backend.reset_compiled()  # each length's few compiles stay under Dynamo's limit
        for entry in entry_points:
            with torch.no_grad():
                family, params, backend, ours, kernel = _cases(entry, s, block_size, q, k, v)
                times = _median_pair(ours, kernel, reps, warmup, sync)
            row = {"study": study, **env, "entry_point": entry, "seq_len": s, "batch": batch,
                   "heads": heads, "head_dim": head_dim, "dtype": dtype,
                   "block_size": block_size, "family": family, "params": params,
                   "backend": backend, "threads": torch.get_num_threads(), "reps": reps,
                   **times}
            rows.append(row)
            if write:
                write_csv(rows, f"overhead_{study}", dev)
    return rows
