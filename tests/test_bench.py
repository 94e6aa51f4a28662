"""The benchmark harness on the CPU: rows, files written as a sweep goes, the copy bandwidth."""

from __future__ import annotations

import csv
import time

import pytest
import torch

from workbench import patterns as P
from workbench.lab import bench, records
from workbench.lab.bench import BenchConfig, run_bench


def _read(name: str) -> list[dict[str, str]]:
    with (records.data_dir() / f"{name}.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_write_csv_takes_every_key_of_every_row():
    path = records.write_csv([{"a": 1, "status": "oom"}, {"a": 2, "status": "ok", "ms": 3.5}],
                             "test_union")
    rows = _read("test_union")
    assert path.name == "test_union.csv"
    assert [r["a"] for r in rows] == ["1", "2"]
    assert rows[0]["ms"] == "" and rows[1]["ms"] == "3.5"  # the failed case's cell stays empty


def _cfg(**kw) -> BenchConfig:
    return BenchConfig("test_sweep", (128, 192), families=("causal", "local"),
                       variants=("ours", "sdpa_dense"), heads=2, head_dim=8, dtype="fp32",
                       block_size=64, reps=1, warmup=0, device="cpu", **kw)


def test_run_bench_rows_match_the_cases_and_their_flops():
    rows = run_bench(_cfg(), progress=False)
    assert [(r["seq_len"], r["family"], r["variant"]) for r in rows] == [
        (s, f, v) for s in (128, 192) for f in ("causal", "local") for v in ("ours", "sdpa_dense")]
    assert all(r["status"] == "ok" and r["ms"] > 0 for r in rows)
    r = rows[0]
    flops = 4 * r["batch"] * r["heads"] * r["seq_len"] ** 2 * r["head_dim"] * r["useful_density"]
    assert r["useful_tflops"] == pytest.approx(flops / r["ms"] / 1e9, rel=1e-2, abs=0.01)
    assert len(_read("bench_test_sweep")) == len(rows)


def test_a_sweep_cut_short_keeps_every_finished_case(monkeypatch):
    real, calls = bench._measure, []

    def measure_then_stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user stops the sweep (or a time limit kills it)
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "_measure", measure_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_bench(_cfg(), progress=False)
    rows = _read("bench_test_sweep")
    assert [(r["family"], r["variant"]) for r in rows] == [("causal", "ours"),
                                                           ("causal", "sdpa_dense")]


def test_copy_bandwidth_counts_read_and_write_bytes():
    (row,) = bench.copy_bandwidth("cpu", mib=4, reps=3)
    # gb_s is recorded to 0.1 GB/s: a slow (busy) machine must not fail on that rounding
    assert row["gb_s"] == pytest.approx(2 * 4 * 2**20 / row["ms"] / 1e6, rel=1e-3, abs=0.051)
    assert row["gb_s"] > 0


class _Cuda:
    """Stands for a CUDA device where only the type is read."""

    type = "cuda"


def test_kernel_config_spaces():
    from workbench.backends.triton_sparse import default_backward_config
    from workbench.lab.bench import kernel_configs, kernel_source_sha

    launch, features = kernel_configs("launch"), kernel_configs("features")
    assert len(launch) == 27 and not any(c.use_tma for c in launch)
    assert all(c.num_warps == 4 for c in launch if c.block_m == 64)  # 8 warps need 128 rows
    assert sum(c.use_tma for c in features) == len(features) // 2  # each with and without TMA
    backward = kernel_configs("backward")
    assert len(backward) == 20 and backward[0] == default_backward_config(128, _Cuda(), 128,
                                                                          (9, 0))
    assert len({c.dkdv for c in backward}) == 5 and len({c.dq for c in backward}) == 4
    with pytest.raises(ValueError, match="space must be"):
        kernel_configs("all")
    assert len(kernel_source_sha()) == 12


def test_layout_build_time_times_the_kernels_structures_except_for_dilated():
    rows = bench.layout_build_time(8192, 64, ["local", "dilated"], 4, "cpu")
    local, dilated = rows
    assert local["flex_mask_ms"] > 0 and local["triton_plan_ms"] > 0
    pat, _ = bench.family_pattern("local", 8192, 4)
    lay = pat.block_structure(8192, 64)
    assert local["partial_tiles"] == int((lay.active & ~lay.full).sum())
    assert "flex_mask_ms" not in dilated and dilated["build_ms"] > 0


def test_layout_sweep_has_a_row_per_head_count_and_cell_each_family_takes():
    rows = bench.layout_build_time(8191, 128, ["local", "random", "dilated"], [1, 4, 8], "cpu",
                                   cells=[32, 128], reps=2)
    assert [(r["family"], r["heads"], r["cell"]) for r in rows] == [
        ("local", 1, None),  # one layout head serves every head; no cell argument
        ("random", 1, 128), ("random", 4, 128), ("random", 8, 128),
        ("random", 1, 32), ("random", 4, 32), ("random", 8, 32),
        ("dilated", 4, None), ("dilated", 8, None)]  # one head per pair: 1 head is refused
    for r in rows:
        assert r["status"] == "ok" and r["seq_len"] == 8191 and r["block_size"] == 128
        assert r["build_ms"] > 0 and isinstance(r["meets_target"], bool)
        structures = r["family"] != "dilated"
        assert ("flex_mask_ms" in r) == ("triton_plan_ms" in r) == structures
        # on the CPU the total is the layout and the BlockMask (the triton plan runs on CUDA)
        assert r["auto_reads"] == ("BlockMask" if structures else None)
        assert r["total_ms"] == pytest.approx(r["build_ms"] + r.get("flex_mask_ms", 0.0))
        assert r["meets_target"] == (r["total_ms"] <= bench.LAYOUT_TARGET_MS["cpu"])
    random32 = rows[5]
    lay = P.random_blocks(0.1, 0, cell=32, num_heads=4).block_structure(8191, 128)
    assert random32["partial_tiles"] == int((lay.active & ~lay.full).sum())
    assert random32["params"] == "density=0.1 cell=32 seed=0"


def test_the_sweep_counts_the_structure_auto_reads(monkeypatch):
    """On CUDA a layout of mostly partial tiles is read through the triton plan, unless its bit
    masks exceed the budget; everything else, and everything on the CPU, through a BlockMask."""
    from workbench.backends import triton_sparse as T

    partial = P.dilated([256, 512], [1, 4], num_heads=4).block_structure(2048, 64)
    mostly_full = (P.local_window(300) & P.causal()).block_structure(2048, 64)
    assert T.partial_share(partial) >= T.PARTIAL_HEAVY > T.partial_share(mostly_full)
    assert bench.auto_structure(partial, "cuda") == "triton plan"
    assert bench.auto_structure(partial, "cpu") == "BlockMask"
    assert bench.auto_structure(mostly_full, "cuda") == "BlockMask"
    monkeypatch.setattr(T, "BITS_BUDGET", T.plan_bits_bytes(partial) - 1)
    assert bench.auto_structure(partial, "cuda") == "BlockMask"


def test_a_sweep_without_the_structure_auto_reads_gives_no_total(monkeypatch):
    """Where auto would read the triton plan and the plan cannot be built, the case has no
    total (never the layout alone) and does not meet the target."""
    from workbench.backends import triton_sparse as T

    def no_plan(*args, **kwargs):
        raise ValueError("the triton plan's bit masks need too much")

    monkeypatch.setattr(bench, "auto_structure", lambda layout, device_type: "triton plan")
    monkeypatch.setattr(T, "build_plan", no_plan)
    [row] = bench.layout_build_time(4096, 128, ["local"], 1, "cpu")
    assert row["auto_reads"] == "triton plan" and "triton_plan_ms" not in row
    assert row["status"].startswith("no triton plan: the triton plan's bit masks")
    assert row["total_ms"] is None and row["meets_target"] is False


def test_layout_sweep_skips_cases_predicted_too_slow_or_too_large():
    slow = bench.layout_build_time(4096, 64, ["random"], [1, 2], "cpu", cells=[64, 16],
                                   max_seconds=1e-9)
    assert [r["status"].split(":")[0] for r in slow] == ["ok", "too_slow", "too_slow",
                                                         "too_slow"]
    assert "build_ms" not in slow[1]
    big = bench.layout_build_time(4096, 64, ["causal", "dilated"], [4], "cpu", max_gib=1e-6)
    assert [r["status"].split(":")[0] for r in big] == ["too_large", "too_large"]
    no_bits = bench.layout_build_time(4096, 64, ["random"], [1], "cpu", cells=[16],
                                      max_gib=1e-3)
    assert no_bits[0]["status"].startswith("no triton plan") and "flex_mask_ms" in no_bits[0]
    assert "triton_plan_ms" not in no_bits[0]


def test_layout_sweep_leaves_out_a_triton_plan_predicted_too_slow(monkeypatch):
    from workbench.backends import triton_sparse

    build = triton_sparse.build_plan

    def slow(*args):  # 50 ms more per plan
        time.sleep(0.05)
        return build(*args)

    monkeypatch.setattr(triton_sparse, "build_plan", slow)
    first, second = bench.layout_build_time(4096, 64, ["random"], [1, 2], "cpu", cells=[64],
                                            max_seconds=0.08)
    assert first["status"] == "ok" and first["triton_plan_ms"] >= 50
    assert second["status"].startswith("no triton plan: predicted 0.1")  # 2 heads: 0.1 s
    assert second["build_ms"] > 0 and second["flex_mask_ms"] > 0
    assert "triton_plan_ms" not in second


def test_longest_search_doubles_until_oom_or_too_slow_and_writes_each_length(monkeypatch):
    calls = []

    def attempt(family, s, cfg, dev, repeat_below_s):
        calls.append((family, s))
        if family == "dense":  # 10 s at 1024 tokens, quadrupling
            return dict(status="ok", ms=10_000.0 * (s // 1024) ** 2, timed_call="first")
        return dict(status="oom") if s >= 4096 else dict(status="ok", ms=1.0, timed_call="second")

    monkeypatch.setattr(bench, "_longest_attempt", attempt)
    monkeypatch.setattr(bench, "_inputs_fit", lambda *a: True)
    rows = bench.longest_sequence(["dense", "local"], start=1024, limit=1 << 20, device="cpu",
                                  study="test", max_seconds=100.0)
    # dense: 10 s, 40 s, then 160 s predicted > 100 s: not run, but its inputs would fit
    assert calls == [("dense", 1024), ("dense", 2048), ("local", 1024), ("local", 2048),
                     ("local", 4096)]
    assert [(r["family"], r["seq_len"], r["status"]) for r in rows] == [
        ("dense", 1024, "ok"), ("dense", 2048, "ok"), ("dense", 4096, "too_slow"),
        ("local", 1024, "ok"), ("local", 2048, "ok"), ("local", 4096, "oom")]
    assert rows[2]["predicted_s"] == 160 and rows[2]["inputs_fit"] is True
    written = _read("bench_test_longest")
    assert [r["status"] for r in written] == [r["status"] for r in rows]


def test_allocator_fraction_leaves_room_for_memory_held_outside_the_allocator():
    gib = 2**30
    # an 80 GiB card emulated on a 140 GiB one that already holds 0.5 GiB of context
    assert bench.allocator_fraction(80 * gib, 140 * gib, gib // 2) == pytest.approx(79.5 / 140)
    with pytest.raises(ValueError, match="at most"):
        bench.allocator_fraction(141 * gib, 140 * gib, 0)
    with pytest.raises(ValueError, match="nothing for tensors"):
        bench.allocator_fraction(gib, 140 * gib, 2 * gib)


def test_longest_search_records_the_emulated_memory_and_refuses_it_without_a_gpu(monkeypatch):
    import contextlib

    with pytest.raises(ValueError, match="smaller GPU"):
        bench.longest_sequence(["dense"], start=1024, limit=1024, device="cpu", memory_gib=8.0)
    capped = []

    @contextlib.contextmanager
    def emulated(dev, memory_gib):
        capped.append(True)
        yield {"memory_gib": memory_gib, "allocator_cap_gib": memory_gib - 0.5}
        capped.append(False)

    monkeypatch.setattr(bench, "emulated_memory", emulated)
    monkeypatch.setattr(bench, "_longest_attempt",
                        lambda *a: dict(status="oom") if capped[-1] is False else
                        dict(status="ok", ms=1.0, timed_call="second"))
    rows = bench.longest_sequence(["local"], start=1024, limit=2048, device="cpu",
                                  memory_gib=8.0)
    assert [r["status"] for r in rows] == ["ok", "ok"] and capped == [True, False]
    assert all(r["memory_gib"] == 8.0 and r["allocator_cap_gib"] == 7.5 for r in rows)


def test_failed_allocation_size_is_read_from_the_out_of_memory_message():
    msg = ("CUDA out of memory. Tried to allocate 512.00 MiB. GPU 0 has a total capacity of "
           "139.81 GiB of which 60.12 GiB is free.")
    assert bench._failed_alloc_gib(msg) == 0.5
    assert bench._failed_alloc_gib(msg.replace("512.00 MiB", "2.00 GiB")) == 2.0
    assert bench._failed_alloc_gib("out of memory") is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_emulated_memory_caps_the_allocator_and_lifts_the_cap_after():
    dev = torch.device("cuda")
    torch.cuda.init()
    outside = bench._outside_allocator(dev) / 2**30
    with bench.emulated_memory(dev, outside + 1.0) as cap:
        assert 0.9 < cap["allocator_cap_gib"] < 1.1
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(2 * 2**30, dtype=torch.uint8, device=dev)
    x = torch.empty(2 * 2**30, dtype=torch.uint8, device=dev)  # the cap is gone
    del x
    torch.cuda.empty_cache()


@pytest.mark.parametrize("family", ["causal", "random10", "dilated"])
def test_spot_check_measures_the_error_of_sampled_rows(family):
    import workbench as wb

    s, h = 700, 4
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, s, 16, generator=g) for _ in range(3))
    pattern, _ = bench.family_pattern(family, s, h)
    out = wb.block_sparse_attention(q, k, v, pattern, 64, backend="reference").float()
    assert bench.spot_check(pattern, q, k, v, out) < 1e-5
    wrong = out.clone()
    wrong[0, h - 1, s - 1] += 0.01  # the last row of the last head is always sampled
    assert bench.spot_check(pattern, q, k, v, wrong) == pytest.approx(0.01, abs=1e-4)


def test_the_recorded_family_names_keep_their_patterns_and_params():
    # data/*.csv name these cases, and results notebooks compare today's params with theirs
    longnet = "segments=[2048, 4096, 8192, 16384] dilations=[1, 2, 4, 8] head_groups"
    assert bench.family_pattern("dense", 4096, 16) == (P.full(), "full")
    assert bench.family_pattern("causal", 4096, 16) == (P.causal(), "causal")
    assert bench.family_pattern("random10", 4096, 16) == (
        P.random_blocks(0.1, seed=0, cell=128), "density=0.1 cell=128 seed=0")
    assert bench.family_pattern("local", 65536, 16) == (
        P.local_window(4096, causal=True), "window=4096 causal")
    assert bench.family_pattern("local", 1024, 16)[1] == "window=256 causal"
    assert bench.family_pattern("dilated", 65536, 16) == (
        P.dilated([2048, 4096, 8192, 16384], [1, 2, 4, 8], 16), longnet)
    assert bench.family_pattern("dilated", 600, 4)[1] == (
        "segments=[64, 64, 75, 150] dilations=[1, 2, 4, 8] head_groups")
    assert bench.family_pattern("longnet", 4096, 16)[1] == longnet
    assert set(bench.longnet_families()) == {"dilated", "longnet"}


def test_every_registered_family_is_a_bench_family():
    assert set(P.FAMILIES) <= set(bench.bench_families())
    pattern, params = bench.family_pattern("dilated_window", 8192, 4)
    assert pattern == P.dilated_window(512, 4, causal=True)
    assert params == "window=512 dilation=4 causal"
    with pytest.raises(ValueError, match="unknown families"):
        BenchConfig("x", (64,), families=("nope",))
