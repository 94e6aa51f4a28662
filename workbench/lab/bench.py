"""Benchmarks: variants against baselines on the same inputs, in one process, as tidy CSV rows.

A time is the median of ``reps`` calls after ``warmup`` (:func:`time_fn`); peak memory is the
CUDA allocator's. Families are the registry's and the fixed-argument names of :data:`RECORDED`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import inspect
import math
import os
import re
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from itertools import product
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import patterns as P
from ..attention import BlockSparseAttention
from ..dilated import DilatedAttention
from ..layout import BlockLayout, num_blocks
from ..plan import canonical_device
from .records import environment, write_csv

__all__ = ["BenchConfig", "DEFAULT_FAMILIES", "DTYPES", "LAYOUT_TARGET_MS", "RECORDED",
           "VARIANTS", "auto_structure", "bench_families", "family_pattern", "layout_build_time",
           "longnet_families", "run_bench", "time_and_peak", "time_fn"]

RECORDED: dict[str, tuple[str, dict]] = {
    "dense": ("full", {}),
    "random10": ("random", {"density": 0.1, "cell": 128, "seed": 0}),
}
"""Bench names of registry families at fixed arguments: ``dense`` and ``random10``."""
DEFAULT_FAMILIES = ("dense", "causal", "random10", "local", "dilated", "longnet")
VARIANTS = ("ours", "flex_natural", "triton", "strided_view", "strided_gather", "paper",
            "blockwise", "sdpa_dense", "sdpa_masked")
"""Ways to compute a family's attention: ``ours`` (``backend="auto"``) and the baselines."""
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_BACKEND = {"ours": "auto", "flex_natural": "flex", "blockwise": "blockwise", "triton": "triton"}
_MASKED_SDPA_LIMIT = 1 << 30  # largest H*S*S the dense-mask baseline may build
_SPOT_CHUNK = 1 << 20  # keys converted to float32 at a time by spot_check


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One benchmark sweep."""

    study: str
    seq_lens: tuple[int, ...]
    families: tuple[str, ...] = DEFAULT_FAMILIES
    variants: tuple[str, ...] = ("ours", "sdpa_dense")
    batch: int = 1
    heads: int = 16
    head_dim: int = 128
    dtype: str = "bf16"
    block_size: int = 128
    reps: int = 20
    warmup: int = 3
    backward: bool = False
    grad_forward: bool = False
    device: str = "cuda" if torch.cuda.is_available() else "cpu"

    def __post_init__(self) -> None:
        for name, known in (("families", bench_families()), ("variants", VARIANTS)):
            bad = [x for x in getattr(self, name) if x not in known]
            if bad:
                raise ValueError(f"unknown {name} {bad}; choose from {known}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if not self.seq_lens or min(self.seq_lens) < 1:
            raise ValueError(f"seq_lens must be positive lengths, got {self.seq_lens}")
        if self.reps < 1 or self.warmup < 0:
            raise ValueError("reps must be >= 1 and warmup >= 0")
        if self.backward and self.grad_forward:
            raise ValueError("backward and grad_forward exclude each other")

    @property
    def pass_name(self) -> str:
        """``fwd``, ``fwd (grad)`` (forward of inputs that require grad) or ``fwd+bwd``."""
        return "fwd+bwd" if self.backward else "fwd (grad)" if self.grad_forward else "fwd"


def bench_families() -> tuple[str, ...]:
    """Every family name the bench takes: the :data:`RECORDED` names and the registry's."""
    return (*RECORDED, *P.FAMILIES)


def _case(family: str, seq_len: int, heads: int, **overrides: object) -> tuple[P.Family, dict]:
    """The registry family behind a bench ``family`` name and its arguments at ``seq_len``
    (``overrides`` over a :data:`RECORDED` name's fixed ones)."""
    if family not in bench_families():
        raise ValueError(f"unknown family {family!r}; choose from {bench_families()}")
    name, fixed = RECORDED.get(family, (family, {}))
    fam = P.family(name)
    return fam, fam.arguments(seq_len, heads, **{**fixed, **overrides})


def longnet_families() -> tuple[str, ...]:
    """The families built by :func:`~workbench.patterns.dilated`, which ``ours`` runs with
    :func:`~workbench.dilated_attention` and which alone have the strided baselines."""
    return tuple(f for f in bench_families()
                 if P.family(RECORDED.get(f, (f, {}))[0]).build is P.dilated)


def _params(fam: P.Family, args: dict) -> str:
    """The ``params`` column: the arguments as words (a true flag by its name)."""
    if fam.build is P.dilated:
        return (f"segments={list(args['segment_lengths'])} "
                f"dilations={list(args['dilation_rates'])} head_groups")
    words = [k if v is True else f"{k}={v}" for k, v in args.items()
             if v is not False and k != "num_heads"]
    return " ".join(words) or fam.name


def family_pattern(family: str, seq_len: int, heads: int) -> tuple[P.Pattern, str]:
    """The pattern of ``family`` at ``seq_len`` and a short description of its parameters."""
    fam, args = _case(family, seq_len, heads)
    return fam.build(**args), _params(fam, args)


def time_fn(fn: Callable[[], object], reps: int, warmup: int, device: torch.device) -> float:
    """Median milliseconds of ``reps`` calls of ``fn`` after ``warmup`` (CUDA events on a GPU,
    ``time.perf_counter`` on the CPU)."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        return statistics.median(_timed_ms(fn, device)[1] for _ in range(reps))
    torch.cuda.synchronize(device)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _timed_ms(fn: Callable[[], object], dev: torch.device) -> tuple[object, float]:
    """``fn()`` and the wall milliseconds it took (synchronized on CUDA)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    out = fn()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return out, (time.perf_counter() - t0) * 1e3


def time_and_peak(fn: Callable[[], object], reps: int, warmup: int,
                  device: torch.device) -> tuple[float, int, int]:
    """:func:`time_fn` of ``fn``, the bytes allocated before its calls and the allocator's peak
    during them (both 0 off CUDA)."""
    if device.type != "cuda":
        return time_fn(fn, reps, warmup, device), 0, 0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    return time_fn(fn, reps, warmup, device), base, torch.cuda.max_memory_allocated(device)


def _group_offset_heads(num_heads: int, segments: list[int],
                        dilations: list[int]) -> Iterator[tuple[int, int, int, list[int]]]:
    """``(w, r, offset, heads)`` for each head group and offset of LongNet's head-group mode:
    the heads of pair ``(w, r)``'s group whose offset ``j mod r`` is ``offset``."""
    group = P.head_groups(num_heads, len(segments))
    for g, (w, r) in enumerate(zip(segments, dilations)):
        heads = [j for j in range(num_heads) if group[j] == g]
        for off in sorted({j % r for j in heads}):
            yield w, r, off, [j for j in heads if j % r == off]


def strided_view_dilated(q: Tensor, k: Tensor, v: Tensor, segments: list[int],
                         dilations: list[int]) -> Tensor:
    """Naive LongNet (head-group mode): per (head group, offset), a strided 5-D view
    ``[B, h, n, w/r, D]`` of q, k and v straight into SDPA (its math kernel), written back
    through the same view. Needs ``S`` a multiple of every segment."""
    bsz, h, s, d = q.shape
    if any(s % w for w in segments):
        raise ValueError(f"strided_view needs the length {s} to be a multiple of every segment "
                         f"length {segments}")
    out = torch.zeros_like(q)
    for w, r, off, hs in _group_offset_heads(h, segments, dilations):
        sl = slice(hs[0], hs[-1] + 1, hs[1] - hs[0] if len(hs) > 1 else 1)

        def view(x: Tensor, sl=sl, w=w, r=r, off=off) -> Tensor:
            return x[:, sl].unflatten(2, (s // w, w // r, r))[..., off, :]

        view(out).copy_(F.scaled_dot_product_attention(view(q), view(k), view(v)))
    return out


def strided_gather_dilated(q: Tensor, k: Tensor, v: Tensor, segments: list[int],
                           dilations: list[int]) -> Tensor:
    """LongNet head-group mode as ``dilated_attention(..., mode="head_groups")``: per (head
    group, offset), a strided slice of every segment copied into one contiguous batch, one SDPA
    call, the result copied back. Lengths are padded to each segment."""
    bsz, h, s, d = q.shape
    out = torch.zeros_like(q)
    for w, r, off, hs in _group_offset_heads(h, segments, dilations):
        n = -(-s // w)

        def strided(x: Tensor, hs=hs, w=w, r=r, off=off, n=n) -> Tensor:
            x = F.pad(x[:, hs], (0, 0, 0, n * w - s)).unflatten(2, (n, w))
            return x[:, :, :, off::r].transpose(1, 2).flatten(0, 1)  # [B*n, h, w/r, D]
        pad_keys = torch.arange(n * w, device=q.device).unflatten(0, (n, w))[:, off::r] < s
        mask = pad_keys[:, None, None, :].repeat(bsz, 1, 1, 1)  # padded keys never count
        o = F.scaled_dot_product_attention(strided(q), strided(k), strided(v), attn_mask=mask)
        o = o.unflatten(0, (bsz, n)).transpose(1, 2)  # [B, h, n, w/r, D]
        full = torch.zeros(bsz, len(hs), n, w, d, dtype=q.dtype, device=q.device)
        full[:, :, :, off::r] = o
        out[:, hs] = full.flatten(2, 3)[:, :, :s]
    return out


def _variant_fn(variant: str, family: str, pattern: P.Pattern, cfg: BenchConfig, q: Tensor,
                k: Tensor, v: Tensor) -> Callable[[], Tensor] | None:
    """A closure computing the forward output, or None if the variant does not apply."""
    seq_len = q.shape[2]
    fam, args = _case(family, seq_len, cfg.heads)
    longnet = fam.build is P.dilated
    segs, dils = args.get("segment_lengths"), args.get("dilation_rates")
    if variant in ("ours", "paper") and longnet:
        # the module, as a model holds it (its plans kept across calls)
        dil = DilatedAttention(segs, dils, mode="head_groups" if variant == "ours" else "paper")
        return lambda: dil(q, k, v)
    if variant in ("strided_gather", "strided_view", "paper"):
        if not longnet:
            return None
        naive = strided_gather_dilated if variant == "strided_gather" else strided_view_dilated
        return lambda: naive(q, k, v, segs, dils)
    if variant in _BACKEND:
        backend = _BACKEND[variant]
        if backend == "flex" and q.device.type == "cpu" and cfg.backward:
            return None  # FlexAttention has no CPU backward
        if backend == "triton" and q.device.type != "cuda":
            return None  # compiled on CUDA only (the interpreter is for tests)
        module = BlockSparseAttention(pattern, cfg.block_size, backend=backend)
        return lambda: module(q, k, v)  # its layout is built in the warm-up calls
    if variant == "sdpa_dense":
        causal = family == "causal"
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    if variant == "sdpa_masked":
        if pattern.num_heads * seq_len * seq_len > _MASKED_SDPA_LIMIT:
            return None
        mask = pattern.token_mask(seq_len, q.device)[None]
        return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    raise ValueError(variant)


def _useful_flops(shape: Sequence[int], density: float, backward: bool) -> float:
    """Matmul FLOPs of attention over ``density`` of the pairs of inputs of ``shape``
    ``[B, H, S, D]``; a backward does 2.5 times a forward's."""
    bsz, heads, s, d = shape
    return 4.0 * bsz * heads * s * s * d * density * (3.5 if backward else 1.0)


def _required_bytes(q: Tensor, backward: bool) -> int:
    """Bytes of the tensors a pass over inputs like ``q`` must hold: q, k, v and out; with the
    backward also their gradients and the upstream gradient."""
    return (8 if backward else 4) * q.numel() * q.element_size()


def _fwd_bwd_step(fn: Callable[[], Tensor], inputs: tuple[Tensor, ...],
                  grad: Tensor) -> Callable[[], Tensor]:
    """A closure running ``fn`` and its backward into ``inputs`` with output gradient ``grad``;
    returns the first input's gradient."""
    return lambda: torch.autograd.grad(fn(), inputs, grad)[0]


def _measure(fn: Callable[[], Tensor], cfg: BenchConfig, inputs: tuple[Tensor, ...],
             device: torch.device) -> dict:
    """``ms``, ``peak_mib`` (above what stays allocated between calls), and the allocator's
    whole peak over the timed calls and over the first call (``peak_total_mib``,
    ``first_peak_total_mib``) of ``fn``'s pass: forward, forward of inputs that require grad,
    or forward+backward."""
    step = _fwd_bwd_step(fn, inputs, torch.randn_like(inputs[0])) if cfg.backward else fn
    with torch.set_grad_enabled(cfg.backward or cfg.grad_forward):
        # the first call (compilation, first-call costs) stays out of the timing and the peak
        first = time_and_peak(step, 1, 0, device)[2]
        ms, base, peak = time_and_peak(step, cfg.reps, cfg.warmup, device)
    return {"ms": ms, "peak_mib": (peak - base) / 2**20, "peak_total_mib": peak / 2**20,
            "first_peak_total_mib": first / 2**20}


def run_bench(cfg: BenchConfig, *, progress: bool = True, write: bool = True) -> list[dict]:
    """Run the sweep; returns the rows (and writes ``data/bench_<study>.csv``)."""
    from tqdm.auto import tqdm

    device = torch.device(cfg.device)
    env = environment(device)
    jobs = [(s, f, v) for s in cfg.seq_lens for f in cfg.families for v in cfg.variants]
    rows: list[dict] = []
    gen = torch.Generator(device=device).manual_seed(0)
    for seq_len, family, variant in tqdm(jobs, desc=f"bench {cfg.study}", disable=not progress):
        shape = (cfg.batch, cfg.heads, seq_len, cfg.head_dim)
        q, k, v = (torch.randn(shape, device=device, dtype=DTYPES[cfg.dtype], generator=gen)
                   .requires_grad_(cfg.backward or cfg.grad_forward) for _ in range(3))
        pattern, params = family_pattern(family, seq_len, cfg.heads)
        fn = _variant_fn(variant, family, pattern, cfg, q, k, v)
        if fn is None:
            continue
        useful = pattern.density(seq_len)
        row = {"study": cfg.study, **env, "dtype": cfg.dtype, "batch": cfg.batch,
               "heads": cfg.heads, "head_dim": cfg.head_dim, "seq_len": seq_len,
               "family": family, "params": params, "variant": variant,
               "pass": cfg.pass_name, "block_size": cfg.block_size,
               "useful_density": round(useful, 6),
               "computed_density": round(pattern.density(seq_len, cfg.block_size), 6),
               "reps": cfg.reps}
        try:
            measured, row["status"] = _measure(fn, cfg, (q, k, v), device), "ok"
        except torch.OutOfMemoryError:
            measured, row["status"] = {"ms": math.nan, "peak_mib": math.nan}, "oom"
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rate = row["status"] == "ok" and variant != "paper"  # paper runs every pair on every head
        flops = _useful_flops(q.shape, useful, cfg.backward)
        rows.append({**row, **{k: round(x, 4 if k == "ms" else 1) for k, x in measured.items()},
                     "required_mib": round(_required_bytes(q, cfg.backward) / 2**20, 1),
                     "useful_tflops": round(flops / measured["ms"] / 1e9, 2) if rate else ""})
        if write:  # after every case: a sweep cut short keeps every finished case
            write_csv(rows, f"bench_{cfg.study}", device)
    return rows


def longest_sequence(families: Iterable[str], *, start: int = 262144, limit: int = 1 << 24,
                     heads: int = 16, head_dim: int = 128, block_size: int = 128,
                     device: str = "cuda", study: str | None = None,
                     max_seconds: float = math.inf, repeat_below_s: float = 10.0,
                     memory_gib: float | None = None, backward: bool = False) -> list[dict]:
    """Per family, double ``S`` from ``start`` until ``ours`` (bf16, forward or
    forward+backward) fails or passes ``limit``; one row per length, ``status`` ``ok``, ``oom``
    or ``too_slow`` (predicted at 4x the last call to exceed ``max_seconds``: not run).

    The first call is timed, or the second when the first took under ``repeat_below_s``.
    ``memory_gib``: as on a card of that memory (:func:`emulated_memory`). With ``study`` the
    rows go to ``data/bench_<study>_longest.csv`` after every length.
    """
    dev = torch.device(device)
    cfg = BenchConfig("longest", (start,), tuple(families), ("ours",), heads=heads,
                      head_dim=head_dim, block_size=block_size, device=device, backward=backward)
    env = environment(dev)
    if dev.type == "cuda":  # the allocator's settings decide what fits as much as the card
        env["alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    rows: list[dict] = []
    with emulated_memory(dev, memory_gib) as cap:
        for family in cfg.families:
            s, predicted_s = start, 0.0
            while s <= limit:
                row = {**env, **cap, "family": family, "seq_len": s, "heads": heads,
                       "head_dim": head_dim, "dtype": "bf16", "block_size": block_size,
                       "pass": cfg.pass_name}
                if predicted_s > max_seconds:
                    row.update(status="too_slow", predicted_s=round(predicted_s),
                               inputs_fit=_inputs_fit(4, heads, s, head_dim, dev))
                else:
                    row.update(_longest_attempt(family, s, cfg, dev, repeat_below_s))
                    predicted_s = 4 * row.get("ms", 0.0) / 1e3  # twice the length: 4x the pairs
                rows.append(row)
                print(row, flush=True)
                if study is not None:
                    write_csv(rows, f"bench_{study}_longest", dev)
                if row["status"] != "ok":
                    break
                s *= 2
    return rows


def _longest_attempt(family: str, s: int, cfg: BenchConfig, dev: torch.device,
                     repeat_below_s: float) -> dict:
    fn = None
    try:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)  # allocated and reserved
        q, k, v = (torch.randn(1, cfg.heads, s, cfg.head_dim, device=dev, dtype=torch.bfloat16)
                   .requires_grad_(cfg.backward) for _ in range(3))
        pattern, params = family_pattern(family, s, cfg.heads)
        attend = _variant_fn("ours", family, pattern, cfg, q, k, v)
        last: list[Tensor] = []
        upstream = torch.randn_like(q) if cfg.backward else None  # the gradient of out

        def fn() -> None:  # keeps the output of the last call only (the peak stays one call's)
            last.clear()
            out = attend()
            if upstream is not None:
                torch.autograd.grad(out, (q, k, v), upstream)
            last.append(out.detach())

        with torch.set_grad_enabled(cfg.backward):
            ms, timed = time_fn(fn, 1, 0, dev), "first"
            if ms < repeat_below_s * 1e3:
                ms, timed = time_fn(fn, 1, 0, dev), "second"
        err = spot_check(pattern, q.detach(), k.detach(), v.detach(), last.pop())
        return dict(params=params, status="ok", ms=round(ms, 2), timed_call=timed,
                    **_peaks_gib(dev), outside_gib=_gib(_outside_allocator(dev)),
                    required_gib=_gib(_required_bytes(q, cfg.backward)),
                    max_abs_err_rows=err)
    except torch.OutOfMemoryError as err:  # its traceback still holds the failing call's tensors
        return dict(status="oom", failed_alloc_gib=_failed_alloc_gib(str(err)),
                    allocated_at_oom_gib=_gib(torch.cuda.memory_allocated(dev)),
                    reserved_at_oom_gib=_gib(torch.cuda.memory_reserved(dev)), **_peaks_gib(dev))
    finally:
        q = k = v = fn = upstream = None
        torch.cuda.empty_cache()


def _gib(nbytes: int) -> float:
    return round(nbytes / 2**30, 2)


def _peaks_gib(dev: torch.device) -> dict:
    """The allocator's peaks since the last reset: allocated (``peak_gib``) and reserved."""
    return dict(peak_gib=_gib(torch.cuda.max_memory_allocated(dev)),
                peak_reserved_gib=_gib(torch.cuda.max_memory_reserved(dev)))


def spot_check(pattern: P.Pattern, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
               rows: int = 8) -> float:
    """Largest absolute error of ``out`` on ``rows`` query rows (first to last, of the first
    and the last head, batch 0) against float32 attention over every key masked by
    ``pattern`` (scale ``1 / sqrt(D)``; a row with no key is zeros): affordable at any length."""
    s, heads = q.shape[2], q.shape[1]
    idx = torch.linspace(0, s - 1, rows, device=q.device).round().long()
    keys = torch.arange(k.shape[2], device=q.device)
    err = 0.0
    for h in sorted({0, heads - 1}):
        allowed = pattern.allowed(torch.tensor(h, device=q.device), idx[:, None], keys[None, :])
        qr = q[0, h, idx].float() / math.sqrt(q.shape[-1])
        scores = torch.cat([qr @ kc.float().T for kc in k[0, h].split(_SPOT_CHUNK)], -1)
        p = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
        ref = sum(pc @ vc.float() for pc, vc in zip(p.split(_SPOT_CHUNK, -1),
                                                    v[0, h].split(_SPOT_CHUNK)))
        err = max(err, float((out[0, h, idx].float() - ref).abs().max()))
    return round(err, 5)


def _failed_alloc_gib(message: str) -> float | None:
    """The size (GiB) of the allocation an out-of-memory error reports, if it says."""
    found = re.search(r"Tried to allocate ([\d.]+) (GiB|MiB|KiB|bytes)", message)
    if found is None:
        return None
    scale = {"GiB": 1, "MiB": 2**-10, "KiB": 2**-20, "bytes": 2**-30}[found.group(2)]
    return round(float(found.group(1)) * scale, 3)


def allocator_fraction(memory_bytes: float, total_bytes: int, outside_bytes: int) -> float:
    """The share of a ``total_bytes`` device its caching allocator may reserve so that it and
    ``outside_bytes`` (held outside the allocator) fit in ``memory_bytes``; raises ValueError
    when none can."""
    if not 0 < memory_bytes <= total_bytes:
        raise ValueError(f"cannot emulate {memory_bytes / 2**30:.2f} GiB on a device of "
                         f"{total_bytes / 2**30:.2f} GiB: it must be positive and at most that")
    if memory_bytes <= outside_bytes:
        raise ValueError(f"{memory_bytes / 2**30:.2f} GiB leaves nothing for tensors: "
                         f"{outside_bytes / 2**30:.2f} GiB are already held outside the allocator")
    return (memory_bytes - outside_bytes) / total_bytes


def _outside_allocator(dev: torch.device) -> int:
    """Bytes of the device in use but not reserved by this process's caching allocator."""
    free, total = torch.cuda.mem_get_info(dev)
    return total - free - torch.cuda.memory_reserved(dev)


@contextlib.contextmanager
def emulated_memory(dev: torch.device, memory_gib: float | None) -> Iterator[dict]:
    """Within the block, cap this process's caching allocator on ``dev`` so that it and what
    the device holds outside it fit in ``memory_gib`` GiB. Yields the columns ``memory_gib``
    and ``allocator_cap_gib``; ``None`` changes nothing and yields ``{}``."""
    if memory_gib is None:
        yield {}
        return
    if dev.type != "cuda":
        raise ValueError(f"memory_gib emulates a smaller GPU; {dev} has no memory cap")
    torch.cuda.init()
    torch.cuda.empty_cache()
    dev = canonical_device(dev)
    total = torch.cuda.get_device_properties(dev).total_memory
    fraction = allocator_fraction(memory_gib * 2**30, total, _outside_allocator(dev))
    torch.cuda.set_per_process_memory_fraction(fraction, dev)
    try:
        yield {"memory_gib": memory_gib, "allocator_cap_gib": round(fraction * total / 2**30, 2)}
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, dev)


def _inputs_fit(tensors: int, heads: int, s: int, head_dim: int, dev: torch.device) -> bool:
    """Whether ``tensors`` bf16 tensors of ``[1, heads, s, head_dim]`` can be allocated."""
    try:
        held = [torch.empty(1, heads, s, head_dim, device=dev, dtype=torch.bfloat16)
                for _ in range(tensors)]
        del held  # freed before the cache is emptied
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        torch.cuda.empty_cache()


def hilbert_study(grids: Iterable[int], radii: Iterable[int], *, heads: int = 16,
                  head_dim: int = 128, block_size: int = 128, reps: int = 20,
                  device: str = "cuda") -> list[dict]:
    """FlexAttention forward (bf16 on CUDA, else fp32) of 2-D neighbourhood attention on
    ``g x g`` grids, per token order (raster, Morton, Hilbert) and tile visit order."""
    from ..attention import block_sparse_attention
    from ..orderings import grid_neighborhood

    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    env = environment(dev)
    rows = []
    for g in grids:
        q, k, v = (torch.randn(1, heads, g * g, head_dim, device=dev, dtype=dtype)
                   for _ in range(3))
        for r, token_order in product(radii, ("raster", "morton", "hilbert")):
            pattern = grid_neighborhood((g, g), r, token_order)
            lay = pattern.block_structure(g * g, block_size, dev)
            for block_order in (None, "hilbert"):
                fn = partial(block_sparse_attention, q, k, v, pattern, block_size,
                             backend="flex", layout=lay, block_order=block_order)
                rows.append({**env, "grid": f"{g}x{g}", "radius": r, "block_size": block_size,
                             "token_order": token_order, "block_order": block_order or "natural",
                             "backend": "flex", "computed_density": round(lay.stats().density, 5),
                             "ms": round(time_fn(fn, reps, 3, dev), 4)})
    return rows


def adaptive_cost_study(seq_lens: Iterable[int], *, heads: int = 16, head_dim: int = 128,
                        block_size: int = 128, density: float = 0.1, reps: int = 20,
                        device: str = "cuda") -> list[dict]:
    """Time of the adaptive block selection against the attention it selects for."""
    from ..adaptive import AdaptiveBlockSparseAttention, fold_batch
    from ..attention import block_sparse_attention

    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    env = environment(dev)
    rows = []
    for s in seq_lens:
        q, k, v = (torch.randn(1, heads, s, head_dim, device=dev, dtype=dtype) for _ in range(3))
        attn = AdaptiveBlockSparseAttention(block_size, density).to(dev)
        with torch.no_grad():
            sel = attn.select(q, k)
            pattern = sel.pattern()
            lay = pattern.block_structure(s, block_size, dev)
            qf, kf, vf = fold_batch(q), fold_batch(k), fold_batch(v)
            select_ms, attend_ms, total_ms = (time_fn(f, reps, 3, dev) for f in (
                partial(attn.select, q, k),
                partial(block_sparse_attention, qf, kf, vf, pattern, block_size, layout=lay),
                partial(attn, q, k, v)))
        rows.append({**env, "seq_len": s, "heads": heads, "head_dim": head_dim,
                     "block_size": block_size, "density": density,
                     "selected_density": round(float(sel.selected.float().mean()), 5),
                     "select_ms": round(select_ms, 4), "attention_ms": round(attend_ms, 4),
                     "end_to_end_ms": round(total_ms, 4),
                     "select_fraction": round(select_ms / attend_ms, 4)})
    return rows


LAYOUT_TARGET_MS = {"cpu": 2000.0, "cuda": 100.0}
"""Milliseconds :func:`layout_build_time` allows a layout and its structures, by device type."""


def _layout_cases(seq_len: int, families: Iterable[str], heads: Sequence[int],
                  cells: Sequence[int]) -> list[tuple[str, P.Pattern, str, int | None]]:
    """(family, pattern, params, cell) of every case :func:`layout_build_time` times, cheapest
    first within a family; head counts a builder refuses are left out."""
    cases = []
    for family in dict.fromkeys(families):
        fam, _ = _case(family, seq_len, 1)
        takes = inspect.signature(fam.build).parameters
        counts = sorted(set(heads)) if "num_heads" in takes else [1]
        sizes = sorted(set(cells), reverse=True) if cells and "cell" in takes else [None]
        for cell, h in product(sizes, counts):
            try:
                _, args = _case(family, seq_len, h, **({} if cell is None else {"cell": cell}))
                if "num_heads" in takes:  # random tiles draw each head apart
                    args["num_heads"] = h
                pattern = fam.build(**args)
            except ValueError:  # e.g. fewer heads than LongNet's head groups
                continue
            cases.append((family, pattern, _params(fam, args), cell))
    return cases


def auto_structure(layout: BlockLayout, device_type: str) -> str:
    """``"triton plan"`` or ``"BlockMask"``: the structure that the kernel ``backend="auto"``
    runs on ``layout`` reads on this device type (the triton kernels on CUDA where
    :func:`~workbench.backends.triton_sparse.suits_layout`; else FlexAttention)."""
    from ..backends.triton_sparse import suits_layout

    suits = device_type == "cuda" and suits_layout(layout) is not None
    return "triton plan" if suits else "BlockMask"


def _time_layout(pattern: P.Pattern, structures: bool, seq_len: int, block_size: int,
                 dev: torch.device, reps: int, max_gib: float,
                 plan_skip: str | None = None) -> tuple[dict, dict]:
    """One case of :func:`layout_build_time`: its median times and the columns ``layout_mib``,
    ``partial_tiles``, ``auto_reads`` and ``status`` (``plan_skip``: why the triton plan is not
    built; never skipped where ``auto`` reads it)."""
    from ..backends import Problem
    from ..backends.flex import build_block_mask
    from ..backends.triton_sparse import build_plan

    small = pattern.block_structure(min(seq_len, 4096), block_size, dev)  # first-call costs
    times: dict[str, list[float]] = {"build_ms": []}
    for _ in range(reps):  # every build is the same layout: the last one is kept
        lay = None  # each build starts without the last one's memory
        gc.collect()
        lay, ms = _timed_ms(lambda: pattern.block_structure(seq_len, block_size, dev), dev)
        times["build_ms"].append(ms)
    extra: dict = {"partial_tiles": None, "auto_reads": None, "status": "ok",
                   "layout_mib": round(lay.active.numel() * 2 / 2**20, 1)}
    if structures:
        extra["auto_reads"] = auto_structure(lay, dev.type)
        plan_skip = None if extra["auto_reads"] == "triton plan" else plan_skip
        predicate = pattern.predicate(dev)
        prob = Problem(lay, predicate, 1.0, pattern=pattern)
        warm = Problem(small, predicate, 1.0, pattern=pattern)  # compiles what the timed calls run
        build_block_mask(warm, dev, backward=False)
        times["flex_mask_ms"] = [_timed_ms(lambda: build_block_mask(prob, dev, False), dev)[1]
                                 for _ in range(reps)]
        extra["partial_tiles"] = partial = int((lay.active & ~lay.full).sum())
        bits = partial * block_size**2 / 8 / 2**30
        if plan_skip or bits > max_gib:
            extra["status"] = f"no triton plan: {plan_skip or f'its bit masks need {bits:.0f} GiB'}"
        else:
            try:
                if dev.type == "cuda":  # the plan's memory check: free memory, none cached
                    torch.cuda.empty_cache()
                build_plan(warm, dev)
                times["triton_plan_ms"] = [_timed_ms(lambda: build_plan(prob, dev), dev)[1]
                                           for _ in range(reps)]
            except (ValueError, torch.OutOfMemoryError) as err:
                extra["status"] = f"no triton plan: {str(err).split(';')[0]}"
    return {k: round(statistics.median(v), 2) for k, v in times.items()}, extra


def layout_build_time(seq_len: int, block_size: int, families: Iterable[str],
                      heads: int | Iterable[int], device: str, *, cells: Iterable[int] = (),
                      reps: int = 1, max_seconds: float = math.inf,
                      max_gib: float = math.inf, progress: bool = False,
                      on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Median milliseconds of ``reps`` builds of each family's block layout at ``seq_len``
    (``build_ms``) and of the structures kernels read from it: the forward ``BlockMask``
    (``flex_mask_ms``) and the triton plan (``triton_plan_ms``); dilated families get none.

    One row per family, head count in ``heads`` (1 for a builder without ``num_heads``) and
    size in ``cells`` (for a builder with ``cell``). ``auto_reads``: the structure of the
    kernel ``backend="auto"`` runs on the layout there (on CUDA the triton plan where
    :func:`~workbench.backends.triton_sparse.suits_layout`, else the ``BlockMask``; on the CPU
    the ``BlockMask`` of its one compiled kernel). ``total_ms``: the layout plus that structure
    (None when it could not be built); ``meets_target``: against :data:`LAYOUT_TARGET_MS`.
    A case whose layout and ``BlockMask`` are predicted (from its family's last) to exceed
    ``max_seconds``, or whose layout and lists would exceed ``max_gib``, is not run, and a
    triton plan predicted so is not built; ``status`` says why. ``on_row`` is given each row
    as soon as it is measured (a caller that records them loses none to an interruption).
    """
    from tqdm.auto import tqdm

    dev = torch.device(device)
    target = LAYOUT_TARGET_MS["cuda" if dev.type == "cuda" else "cpu"]
    counts = [heads] if isinstance(heads, int) else list(heads)
    cases = _layout_cases(seq_len, families, counts, list(cells))
    tiles = num_blocks(seq_len, block_size) ** 2
    last: dict[str, tuple[dict, int, float]] = {}  # its last case run, per family
    plan_ms: dict[str, float] = {}  # its last triton plan's ms per head, per family
    longnet = set(longnet_families())
    rows = []
    for family, pattern, params, cell in tqdm(cases, desc="layouts", unit="case",
                                              disable=not progress):
        row = {"family": family, "params": params, "heads": pattern.num_heads, "cell": cell,
               "seq_len": seq_len, "block_size": block_size}
        h, cell_count = pattern.num_heads, 1.0 if cell is None else (seq_len / cell) ** 2
        per_tile = 2 if family in longnet else 10  # bools, then int32 lists
        gib = h * tiles * per_tile / 2**30
        # a layout scales with heads x cells, its structures with heads (seconds)
        predicted = {"layout": 0.0, "plan": plan_ms.get(family, 0.0) * h / 1e3}
        if family in last:
            med, h0, c0 = last[family]
            predicted["layout"] = (med["build_ms"] * h * cell_count / (h0 * c0)
                                   + med.get("flex_mask_ms", 0.0) * h / h0) / 1e3
        skip = (f"too_slow: predicted {predicted['layout']:.0f} s a build"
                if predicted["layout"] > max_seconds
                else f"too_large: needs {gib:.1f} GiB" if gib > max_gib else None)
        if skip:
            rows.append({**row, "status": skip})
            if on_row:
                on_row(rows[-1])
            continue
        plan_skip = (f"predicted {predicted['plan']:.2g} s a build"
                     if predicted["plan"] > max_seconds else None)
        med, extra = _time_layout(pattern, family not in longnet, seq_len,
                                  block_size, dev, reps, max_gib, plan_skip)
        # no structure for a dilated family; none timed (its build failed): no total
        read = {"BlockMask": "flex_mask_ms", "triton plan": "triton_plan_ms"}.get(
            extra["auto_reads"])
        structure = 0.0 if read is None else med.get(read)
        total = None if structure is None else med["build_ms"] + structure
        last[family] = (med, h, cell_count)
        if "triton_plan_ms" in med:
            plan_ms[family] = med["triton_plan_ms"] / h
        rows.append({**row, **med, "total_ms": None if total is None else round(total, 2),
                     "meets_target": total is not None and total <= target, **extra})
        if on_row:
            on_row(rows[-1])
    return rows


def copy_bandwidth(device: str = "cuda", mib: int = 1024, reps: int = 20) -> list[dict]:
    """Median time of ``dst.copy_(src)`` of ``mib`` MiB on ``device``; ``gb_s`` counts the
    bytes read and written (2 x ``mib``): the memory side of the roofline."""
    dev = torch.device(device)
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=dev).random_(0, 255)
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), reps, 3, dev)
    return [{"mib": mib, "reps": reps, "ms": round(ms, 6),
             "gb_s": round(2 * src.numel() / ms / 1e6, 1)}]


def kernel_source_sha() -> str:
    """The first 12 hex digits of the SHA-256 of the Triton kernels' source."""
    src = Path(__file__).resolve().parents[1] / "backends" / "_triton_kernels.py"
    return hashlib.sha256(src.read_bytes()).hexdigest()[:12]


def kernel_configs(space: str) -> list[object]:
    """Triton launch configurations to sweep: ``"launch"`` (forward tile edges, warps, stages),
    ``"features"`` (four forward shapes with and without TMA) or ``"backward"``
    (``BackwardConfig`` s that fit a Hopper program's shared memory)."""
    from ..backends.triton_sparse import BackwardConfig, KernelConfig

    if space == "launch":
        return [KernelConfig(m, n, w, st) for m, n, w, st in
                product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)) if not (m == 64 and w == 8)]
    if space == "features":
        return [KernelConfig(m, n, 8, st, tma) for (m, n, st), tma in
                product(((128, 64, 2), (128, 64, 3), (128, 128, 3), (128, 128, 4)),
                        (False, True))]
    if space == "backward":  # each fits a Hopper program's shared memory at head_dim 128
        dkdv = (KernelConfig(64, 128, 8, 2, True), KernelConfig(64, 128, 8, 2),
                KernelConfig(32, 128, 4, 2, True), KernelConfig(64, 64, 4, 2, True),
                KernelConfig(64, 64, 4, 3, True))
        dq = (KernelConfig(128, 64, 8, 2, True), KernelConfig(128, 64, 8, 2),
              KernelConfig(128, 32, 8, 2, True), KernelConfig(64, 64, 4, 2, True))
        return [BackwardConfig(a, b) for a, b in product(dkdv, dq)]
    raise ValueError(f"space must be 'launch', 'features' or 'backward', got {space!r}")


def triton_config_study(seq_len: int, families: Iterable[str], *, heads: int = 16,
                        head_dim: int = 128, block_size: int = 128, reps: int = 20,
                        device: str = "cuda", configs: Iterable[object] | None = None,
                        backward: bool = False, progress: bool = True,
                        csv_name: str | None = None) -> list[dict]:
    """Our Triton kernels (forward, or with ``backward`` the backward kernels) under each of
    ``configs`` (default :func:`kernel_configs`) against FlexAttention and dense SDPA, bf16.

    One row per (family, variant, configuration): ``ms``, ``useful_tflops`` (a backward counts
    2.5 forwards), ``vs_dense`` and, for ours, ``max_abs_diff_vs_flex`` (output, or query
    gradient). With ``csv_name`` the rows go to ``data/<csv_name>.csv`` after every case.
    """
    from tqdm.auto import tqdm

    from ..backends import Problem
    from ..backends.triton_sparse import build_plan, triton_attention

    dev = torch.device(device)
    env = {**environment(dev), "kernel_sha": kernel_source_sha(),
           "pass": "fwd+bwd" if backward else "fwd"}
    configs = list(kernel_configs("backward" if backward else "launch") if configs is None
                   else configs)
    gen = torch.Generator(device=dev).manual_seed(0)
    shape = (1, heads, seq_len, head_dim)
    q, k, v = (torch.randn(shape, device=dev, dtype=torch.bfloat16, generator=gen)
               .requires_grad_(backward) for _ in range(3))
    grad = torch.randn(shape, device=dev, dtype=torch.bfloat16, generator=gen)
    dense_flops = _useful_flops(shape, 1.0, backward)

    def timed(fn: Callable[[], Tensor]) -> tuple[Tensor, float]:
        """The output (or the query gradient) of ``fn``'s pass and its median time."""
        step = _fwd_bwd_step(fn, (q, k, v), grad) if backward else fn
        with torch.set_grad_enabled(backward):
            ms = time_fn(step, reps, 3, dev)
            return step().detach(), ms

    sdpa_ms = timed(lambda: F.scaled_dot_product_attention(q, k, v))[1]
    dense_rate = dense_flops / sdpa_ms / 1e9
    rows = [{**env, "seq_len": seq_len, "family": "dense", "variant": "sdpa_dense",
             "ms": round(sdpa_ms, 4), "useful_tflops": round(dense_rate, 1), "vs_dense": 1.0}]
    jobs = [(f, c) for f in families for c in [None, *configs]]
    for family, cfg in tqdm(jobs, desc="triton configs", disable=not progress):
        if cfg is None:  # a family's first job: its plan, and FlexAttention's output as reference
            pattern, params = family_pattern(family, seq_len, heads)
            prob = Problem(pattern.block_structure(seq_len, block_size, dev),
                           pattern.predicate(dev), head_dim ** -0.5, pattern=pattern)
            plan, useful = build_plan(prob, dev), pattern.density(seq_len)
            case = {**env, "seq_len": seq_len, "family": family, "params": params,
                    "useful_density": round(useful, 6), "block_size": block_size}
            module = BlockSparseAttention(pattern, block_size, backend="flex")
            module.layout(seq_len, seq_len, dev)
            ref, ms = timed(lambda m=module: m(q, k, v))
            row = {**case, "variant": "flex_natural"}
        else:
            fwd, bwd = (None, cfg) if backward else (cfg, None)

            def fn(fwd=fwd, bwd=bwd, prob=prob, plan=plan) -> Tensor:
                return triton_attention(q, k, v, prob, False, config=fwd, plan=plan,
                                        backward_config=bwd)[0]
            settings = dataclasses.asdict(cfg)
            if backward:  # one column per field of each kernel's configuration
                settings = {f"{kernel}_{key}": value for kernel, fields in settings.items()
                            for key, value in fields.items()}
            row = {**case, "variant": "triton", **settings}
            try:
                out, ms = timed(fn)
                diff = (out.float() - ref.float()).abs().max().item()
                row["max_abs_diff_vs_flex"] = round(diff, 5)
            except Exception as e:  # a launch configuration the compiler rejects
                row["status"] = type(e).__name__
        if "status" not in row:
            tflops = dense_flops * useful / ms / 1e9
            row.update(status="ok", ms=round(ms, 4), useful_tflops=round(tflops, 1),
                       vs_dense=round(tflops / dense_rate, 3))
        rows.append(row)
        if csv_name:  # after every case: a sweep cut short keeps every finished case
            write_csv(rows, csv_name, dev)
    return rows


def triton_resource_study(head_dims: Iterable[int] = (64, 128, 256), *,
                          capability: tuple[int, int] = (9, 0),
                          progress: bool = True) -> list[dict]:
    """Shared memory, registers and spills of our Triton kernels compiled offline for a GPU of
    ``capability``: the ``features`` and ``backward`` sweeps at head_dim 128, the defaults at
    each of ``head_dims``, and shapes too large for a Hopper program; ``fits`` per row."""
    import triton
    from tqdm.auto import tqdm

    from ..backends.triton_sparse import KERNELS, KernelConfig, default_configs
    from .triton_resources import SHARED_LIMIT, kernel_resources

    cuda = torch.device("cuda")  # only named: the defaults are asked for its type
    jobs = [("default", kernel, d, default_configs(kernel, 128, cuda, d, capability)[0])
            for d in head_dims for kernel in KERNELS]
    jobs += [("features", "forward", 128, c) for c in kernel_configs("features")]
    swept = kernel_configs("backward")
    jobs += [("backward", kernel, 128, c) for kernel in ("dkdv", "dq")
             for c in dict.fromkeys(getattr(b, kernel) for b in swept)]
    # shapes a Hopper program cannot hold: two stages of 256-wide heads
    jobs += [("too_large", "forward", 256, KernelConfig(64, 64, 4, 2, True)),
             ("too_large", "dkdv", 256, KernelConfig(64, 128, 8, 2, True)),
             ("too_large", "dq", 256, KernelConfig(128, 64, 8, 2, True))]
    rows = []
    limit = SHARED_LIMIT[capability]
    for space, kernel, d, cfg in tqdm(jobs, desc="compile", disable=not progress):
        res = kernel_resources(kernel, cfg, d, capability=capability)
        rows.append({"space": space, "kernel": kernel, "head_dim": d, **dataclasses.asdict(cfg),
                     "shared_bytes": res.shared_bytes, "shared_limit": limit,
                     "fits": res.fits(capability), "registers": res.registers,
                     "spill_bytes": res.spill_bytes,
                     "target": f"sm_{capability[0]}{capability[1]}",
                     "compiled_by": f"triton {triton.__version__}",
                     "kernel_sha": kernel_source_sha()})
    return rows

