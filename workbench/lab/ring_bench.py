"""The distributed ring's tools: :func:`ring_demo` (under ``torchrun``) checks every rank against
one process, :func:`ring_bench` times the ring, :func:`ring_plan_study` runs each (rank, step)
of a ring on one device to plan a multi-GPU run."""

from __future__ import annotations

import functools
import itertools
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from .. import distributed as D
from ..attention import block_sparse_attention
from ..backends import accumulation_dtype
from ..layout import BlockLayout
from ..patterns import Pattern, check_int
from ..sharding import DistributedPlan, run_tile_rows
from .bench import DTYPES, family_pattern, time_and_peak
from .records import environment, write_csv

__all__ = ["PASSES", "ring_bench", "ring_demo", "ring_plan_study", "simulated_steps"]

PASSES = ("fwd", "fwd+bwd")


def _start(backend: str | None, timeout: float,
           init: tuple[str, int, int] | None = None) -> torch.device:
    """Join the process group torchrun describes (or ``init`` = (init_method, rank, world), or a
    one-rank group), and pick this rank's device."""
    if init is None and "RANK" not in os.environ:  # plain `python -m workbench ...`
        init = (f"file://{tempfile.mkdtemp(prefix='workbench-ring-')}/rendezvous", 0, 1)
    method, rank, world = init or (None, None, None)  # None: torchrun's env://
    D.init_ring(backend, timeout=timeout, init_method=method, rank=rank, world_size=world)
    if dist.get_backend() == "nccl":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
        return dev
    return torch.device("cpu")


def _gather_rows(rows: list[dict], group=None) -> list[dict]:
    everyone: list[list[dict] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, rows, group=group)
    return [r for part in everyone for r in (part or [])]


def ring_demo(seq_len: int = 1000, heads: int = 4, head_dim: int = 32, block_size: int = 64,
              families: Sequence[str] = ("causal", "local", "random10", "dilated"),
              sharding: str = "zigzag", backend: str | None = None,
              timeout: float = 120.0) -> list[dict]:
    """Check every rank's output and gradients against one process (rank 0 prints the error
    and the ring's work per family and rank); returns every rank's rows."""
    dev = _start(backend, timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = torch.float64 if dev.type == "cpu" else torch.float32
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, seq_len, head_dim, generator=g, dtype=dtype).to(dev)
               for _ in range(3))
    sh = D.shard_plan(seq_len, world, block_size, sharding)
    local_rows = []
    for family in families:
        pattern, params = family_pattern(family, seq_len, heads)
        full = [x.clone().requires_grad_() for x in (q, k, v)]
        ref = block_sparse_attention(*full, pattern, block_size)
        grad = torch.randn(ref.shape, generator=g, dtype=dtype).to(dev)
        ref.backward(grad)
        mine = [sh.shard(x, rank).clone().requires_grad_() for x in (q, k, v)]
        stats = D.RingStats()
        out = D.distributed_ring_attention(*mine, pattern, block_size, sharding=sharding,
                                           stats=stats, timeout=timeout)
        out.backward(sh.shard(grad, rank))
        pairs = [(out, ref)] + [(m.grad, f.grad) for m, f in zip(mine, full)]
        err = max(float((a - sh.shard(b, rank)).abs().max().detach()) for a, b in pairs)
        local_rows.append({"family": family, "params": params, "sharding": sharding,
                          "world": world, "rank": rank, "local_len": sh.local_len(rank),
                          "max_abs_error": err, "tolerance": 1e-9 if dev.type == "cpu" else 1e-3,
                          **stats.as_dict(), "bwd_bytes_sent": stats.backward.bytes_sent})
    rows = _gather_rows(local_rows)
    if rank == 0:
        print(f"ring demo: {world} ranks ({dist.get_backend()}), S={seq_len}, "
              f"{heads} heads x {head_dim}, block {block_size}, {sharding} sharding")
        print(f"{'family':>9} {'rank':>4} {'max|err|':>9} {'steps':>5} {'pairs':>5} "
              f"{'skipped':>7} {'tiles':>6} {'fwd KiB sent':>12} {'bwd KiB sent':>12}")
        for r in rows:
            print(f"{r['family']:>9} {r['rank']:>4} {r['max_abs_error']:>9.1e} {r['steps']:>5} "
                  f"{r['pairs_computed']:>5} {r['pairs_skipped']:>7} {r['tiles_computed']:>6} "
                  f"{r['bytes_sent'] / 1024:>12.1f} {r['bwd_bytes_sent'] / 1024:>12.1f}")
        bad = [r for r in rows if r["max_abs_error"] > r["tolerance"]]
        print("every rank matches the single-process result" if not bad else
              f"MISMATCH on {len(bad)} (family, rank) pairs")
    dist.destroy_process_group()
    return rows


def ring_bench(study: str, seq_lens: Sequence[int], families: Sequence[str],
               shardings: Sequence[str] = ("contiguous",), heads: int = 16, head_dim: int = 128,
               dtype: str = "bf16", block_size: int = 128, reps: int = 10, warmup: int = 2,
               backward: bool = False, backend: str | None = None, timeout: float = 600.0,
               double_until: int | None = None, profile: int = 0, baseline: bool = False,
               init: tuple[str, int, int] | None = None) -> list[dict]:
    """Time the distributed ring per (total length, family, sharding); rank 0 writes
    ``data/ring_<study>.csv`` after every case.

    ``baseline``: after each case rank 0 alone runs ``S / P`` tokens; its row carries the
    parallel efficiency. ``profile``: the costliest operators of one more call per rank
    go to ``data/ring_<study>_profile.csv``. ``double_until``: double ``seq_lens[0]`` until a
    case fails (``oom``, or ``peer_failed`` on the ranks that timed out waiting) or passes it.
    Ranks agree on outcomes over a gloo group and stop at the first failure.
    """
    check_int("profile", profile, 0, None)
    dev = _start(backend, timeout, init)
    rank, world = dist.get_rank(), dist.get_world_size()
    control = dist.new_group(backend="gloo")  # outcomes and rows, even if NCCL is stuck
    solo = dist.new_group([0]) if baseline else None  # the one-rank baseline
    if baseline and any(n % world for n in seq_lens):
        raise ValueError(f"baseline runs S / {world} tokens on one rank: every --seq-lens "
                         f"value must be a multiple of {world}, got {list(seq_lens)}")
    time_case = functools.partial(  # one case on this rank, with what every case shares
        _time_ring, heads=heads, head_dim=head_dim, block_size=block_size, reps=reps,
        warmup=warmup, backward=backward, timeout=timeout, device=dev,
        dtype=DTYPES[dtype] if dev.type == "cuda" else torch.float32)
    env = {**environment(dev), "world_size": world, "backend": dist.get_backend()}
    if dev.type == "cuda":
        env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    rows: list[dict] = []
    profiles: list[dict] = []
    failed = False
    if double_until is not None:  # a longest-sequence search
        seq_lens = [seq_lens[0] << i for i in range((double_until // seq_lens[0]).bit_length())]
    for s, family, sharding in itertools.product(seq_lens, families, shardings):
        pattern, params = family_pattern(family, s, heads)
        row = {"study": study, "family": family, "params": params, "sharding": sharding,
               "seq_len": s, "rank": rank, "heads": heads, "head_dim": head_dim, "dtype": dtype,
               "block_size": block_size, "pass": "fwd+bwd" if backward else "fwd"}
        result = time_case(pattern, s, sharding, profile=profile)
        ops = [{**row, **op} for op in result.pop("profile", [])]
        row.update(result)
        case_rows = _gather_rows([row], control)  # every rank's row of this case
        rows += [{**env, **r} for r in case_rows]
        if profile:
            profiles += [{**env, **r} for r in _gather_rows(ops, control)]
        outcomes = [r["status"] for r in case_rows]
        failed = any(o != "ok" for o in outcomes)
        note = ""
        if solo is not None and not failed:
            base = _baseline_row(time_case, row, case_rows, s // world, solo) if rank == 0 else None
            D.barrier(timeout, control)
            if base is not None:
                rows.append({**env, **base})
                note = (f"  1 rank at S/{world}: {base.get('ms', math.nan):.2f} ms, "
                        f"efficiency {base.get('efficiency', math.nan):.3f}")
        if rank == 0:
            print(f"{s:>9} {family:>9} {sharding:>10} {'/'.join(outcomes):>12} "
                  f"{row.get('ms', math.nan):>10.2f} ms  rank-0 peak "
                  f"{row.get('peak_mib', 0):>9.0f} MiB{note}", flush=True)
            path = write_csv(rows, f"ring_{study}", dev)
            if profiles:
                write_csv(profiles, f"ring_{study}_profile", dev)
        if failed:
            break
    if rank == 0 and rows:
        print(f"wrote {path}")
    if not failed:  # after a failure NCCL may hold unmatched transfers: leave teardown to exit
        dist.destroy_process_group()
    return rows


def _baseline_row(time_case: Callable[..., dict], row: dict, case_rows: list[dict], seq_len: int,
                  solo: dist.ProcessGroup) -> dict:
    """Rank 0 alone at ``seq_len`` (the per-rank length of the case ``case_rows``), with the
    case's parallel efficiency ``E = (W_P / (P T_P)) / (W_1 / T_1)``: tiles computed per ms and
    device by the ``P`` ranks (the slowest rank's time) against one rank; 1 is perfect scaling."""
    pattern, params = family_pattern(row["family"], seq_len, row["heads"])
    base = {**row, "params": params, "seq_len": seq_len, "rank": 0, "world_size": 1,
            **time_case(pattern, seq_len, row["sharding"], group=solo)}
    if base["status"] == "ok" and base["tiles"]:
        many = sum(r["tiles"] for r in case_rows) / len(case_rows) / max(r["ms"] for r in case_rows)
        base["efficiency"] = round(many / (base["tiles"] / base["ms"]), 4)
    return base


def _time_ring(pattern: Pattern, seq_len: int, sharding: str, *, heads: int, head_dim: int,
               dtype: torch.dtype, block_size: int, reps: int, warmup: int, backward: bool,
               timeout: float, device: torch.device, profile: int = 0,
               group: dist.ProcessGroup | None = None) -> dict[str, object]:
    """One case on this rank of ``group`` (None: every rank): ``status`` ok (with times,
    memory and counters, and ``profile``: the rows of :func:`_profile_call` when asked for),
    ``oom`` or ``peer_failed`` (another rank failed and this one timed out waiting for it)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    local = D.shard_plan(seq_len, world, block_size, sharding).local_len(rank)

    def step(stats: D.RingStats | None = None) -> None:
        with torch.set_grad_enabled(backward):
            out = D.distributed_ring_attention(q, k, v, pattern, block_size, stats=stats,
                                               sharding=sharding, timeout=timeout,
                                               process_group=group)
            if backward:
                out.backward(torch.ones_like(out))

    def timed() -> None:
        D.barrier(timeout, group)
        step()

    try:
        g = torch.Generator(device=device).manual_seed(rank)
        q, k, v = (torch.randn(1, heads, local, head_dim, generator=g, device=device,
                               dtype=dtype).requires_grad_(backward) for _ in range(3))
        step()  # compilation, first-call costs and this rank's layout rows stay out
        stats = D.RingStats()
        D.barrier(timeout, group)
        step(stats)  # the counters (bytes, steps, waits) of one warm call
        ms, base, peak = time_and_peak(timed, reps, warmup, device)
        ops = _profile_call(timed, device, profile) if profile else []
    except torch.cuda.OutOfMemoryError:
        return {"status": "oom", "local_len": local}
    except (D.RingTimeoutError, D.RingCommunicationError):
        return {"status": "peer_failed", "local_len": local}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    back = stats.backward or D.RingStats()
    return {"status": "ok", "local_len": local, "ms": round(ms, 3),
            "peak_mib": round((peak - base) / 2**20, 1),
            "inputs_mib": round(3 * q.numel() * q.element_size() / 2**20, 1),
            "steps": stats.steps, "tiles": stats.tiles_computed,
            "pairs_skipped": stats.pairs_skipped, "bytes_sent": stats.bytes_sent,
            "bytes_received": stats.bytes_received, "bwd_bytes_sent": back.bytes_sent,
            "wait_ms": round(1e3 * (stats.wait_s + back.wait_s), 3),
            "gpu_wait_ms": round(stats.gpu_wait_ms() + back.gpu_wait_ms(), 3),
            **({"profile": ops} if profile else {})}


def _profile_call(fn: Callable[[], None], dev: torch.device, top: int) -> list[dict]:
    """One call of ``fn`` under ``torch.profiler``: a ``(call)`` row with its wall time, then
    the ``top`` operators by self time on ``dev`` (self CPU time on the CPU), in ms."""
    from torch.profiler import ProfilerActivity, profile

    cuda = dev.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(dev)
        wall = time.perf_counter() - t0
    by = "self_device_time_total" if cuda else "self_cpu_time_total"
    costliest = sorted(prof.key_averages(), key=lambda e: getattr(e, by), reverse=True)[:top]
    return [{"op": "(call)", "calls": 1, "wall_ms": round(wall * 1e3, 3)}] + [
        {"op": e.key, "calls": e.count, "self_device_ms": round(e.self_device_time_total / 1e3, 3),
         "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 3),
         "cpu_total_ms": round(e.cpu_time_total / 1e3, 3)} for e in costliest]


def simulated_steps(pattern: Pattern, seq_len: int, block_size: int, world: int, sharding: str,
                    heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str,
                    backend: str = "auto", backward: bool = False
                    ) -> Iterator[tuple[int, int, int, int, int, Callable[[], None] | None]]:
    """Every (rank, step) of a ``world``-rank ring as work on one device: yields ``(rank, step,
    kv_from, tiles, kv_bytes, fn)``, ``fn()`` what that rank computes then (with ``backward``
    its backward step too; None when skipped) while the device holds what the rank holds, so
    the peak during ``fn()`` is the rank's. Drop each ``fn`` before asking for the next."""
    shards = D.shard_plan(seq_len, world, block_size, sharding)

    def rank_layouts(r: int) -> list[BlockLayout]:  # built afresh: one rank's rows at a time
        return [pattern.block_structure(seq_len, block_size, device, rows=run)
                for run in shards.pieces[r]]

    plan = DistributedPlan(shards, torch.cat([run_tile_rows(rank_layouts(r), shards)
                                              for r in range(world)]).cpu())
    per_step = plan.tiles_per_step()
    acc = accumulation_dtype(dtype)

    def rand(rank: int) -> torch.Tensor:
        return torch.randn(1, heads, shards.local_len(rank), head_dim, device=device, dtype=dtype)

    for r in range(world):
        q, k, v = rand(r), rand(r), rand(r)
        # the running output and log-sum-exp (one above any partial's keeps the merge weights
        # finite: timing only), the upstream gradient and the query gradient accumulator
        state = ((torch.zeros_like(q), torch.full(q.shape[:3], 60.0, dtype=acc, device=device),
                  torch.randn_like(q), torch.zeros_like(q, dtype=acc)) if backward else None)
        own_grads = tuple(torch.zeros_like(x, dtype=acc) for x in (k, v)) if backward else ()
        work = D.step_work(pattern, plan, r, rank_layouts(r), backend,
                           1.0 / math.sqrt(head_dim))
        for d in range(world):
            src = plan.kv_rank(r, d)
            if not plan.needed(r, src):
                yield r, d, src, 0, 0, None
                continue
            held = (k, v) if d == 0 else (rand(src), rand(src))
            later = [plan.kv_rank(r, e) for e in range(d + 1, world)
                     if plan.needed(r, plan.kv_rank(r, e))]
            pending = (rand(later[0]), rand(later[0])) if later else ()
            grads = None if state is None else (*state, *(
                own_grads if d == 0 else (torch.zeros_like(x, dtype=acc) for x in held)))
            fn = functools.partial(work, src, q, *held, grads)
            nbytes = 2 * held[0].numel() * held[0].element_size() if d else 0
            yield r, d, src, int(per_step[r, d]), nbytes, fn
            del fn, held, pending, grads
        del q, k, v, state, own_grads, work


def ring_plan_study(study: str, seq_lens: Sequence[int], families: Sequence[str], world: int,
                    shardings: Sequence[str] = ("contiguous", "zigzag"), heads: int = 16,
                    head_dim: int = 128, dtype: str = "bf16", block_size: int = 128,
                    reps: int = 5, device: str = "cuda",
                    passes: Sequence[str] = ("fwd",)) -> list[dict]:
    """Per (rank, step) compute time, bytes received and (on CUDA) peak memory of a
    ``world``-rank ring, run on one device; ``passes``: ``"fwd"`` and/or ``"fwd+bwd"`` (the
    step's forward partials plus the backward step's recomputation and gradients)."""
    from tqdm.auto import tqdm

    bad = [p for p in passes if p not in PASSES]
    if not passes or bad:
        raise ValueError(f"passes must be drawn from {PASSES}, got {list(passes)!r}")
    dev = torch.device(device)
    dt = DTYPES[dtype] if dev.type == "cuda" else torch.float32
    env = environment(dev)
    cases = list(itertools.product(seq_lens, families, shardings, passes))
    rows = []
    for s, family, sharding, pass_ in tqdm(cases, desc="ring plan", unit="case"):
        pattern, params = family_pattern(family, s, heads)
        for r, d, src, tiles, nbytes, fn in simulated_steps(
                pattern, s, block_size, world, sharding, heads, head_dim, dt, dev,
                backward=pass_ == "fwd+bwd"):
            ms, peak = 0.0, math.nan
            if fn is not None:
                ms, _, held = time_and_peak(fn, reps, 1, dev)
                peak = held / 2**20 if dev.type == "cuda" else math.nan
            del fn  # the step's buffers go before the next step's are made
            rows.append({**env, "study": study, "family": family, "params": params,
                         "sharding": sharding, "seq_len": s, "world": world, "rank": r,
                         "step": d, "pass": pass_, "kv_from": src, "tiles": tiles,
                         "kv_bytes": nbytes, "compute_ms": round(ms, 3),
                         "peak_mib": round(peak, 1), "heads": heads, "head_dim": head_dim,
                         "dtype": dtype, "block_size": block_size})
            write_csv(rows, f"ring_{study}_plan", dev)  # after every step: nothing lost if cut
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows
