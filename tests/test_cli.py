"""The command line: a value a command cannot use ends it with one line on stderr that names the
option, exit status 2 and no traceback, before any work; an error raised by the work is one
line too (a traceback with ``WORKBENCH_DEBUG=1``); good invocations still run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from workbench.lab.cli import main

_REPO_DATA = Path(__file__).resolve().parents[1] / "data"
COMMANDS = ("figures", "bench", "bench-hilbert", "bench-adaptive", "bench-longest",
            "copy-bandwidth", "bench-triton", "bench-overhead", "triton-resources", "ring-demo",
            "ring-bench", "ring-plan")

# Tiny invocations (cheap even if a check were missing); a bad case appends an option, whose
# value replaces the one given here.
BENCH = ["bench", "--study", "cli_test", "--seq-lens", "64", "--families", "causal",
         "--variants", "sdpa_dense", "--heads", "2", "--head-dim", "16", "--reps", "1",
         "--warmup", "0", "--device", "cpu", "--dtype", "fp32"]
RING_PLAN = ["ring-plan", "--study", "cli_test", "--seq-lens", "256", "--world", "2",
             "--families", "causal", "--shardings", "contiguous", "--heads", "1", "--head-dim",
             "16", "--block-size", "64", "--reps", "1", "--device", "cpu"]
RING_BENCH = ["ring-bench", "--study", "cli_test", "--seq-lens", "256", "--families", "causal",
              "--heads", "1", "--head-dim", "16", "--block-size", "64", "--reps", "1",
              "--warmup", "0", "--backend", "gloo", "--timeout", "5"]
HILBERT = ["bench-hilbert", "--grids", "8", "--radii", "1", "--reps", "1"]
ADAPTIVE = ["bench-adaptive", "--seq-lens", "256", "--reps", "1"]
LONGEST = ["bench-longest", "--study", "cli_test", "--families", "causal", "--start", "256",
           "--limit", "256"]
COPY = ["copy-bandwidth", "--study", "cli_test", "--mib", "1", "--reps", "1"]
TRITON = ["bench-triton", "--study", "cli_test", "--seq-len", "256", "--families", "causal",
          "--space", "features", "--reps", "1"]
OVERHEAD = ["bench-overhead", "--study", "cli_test", "--seq-lens", "128", "--entry-points",
            "module", "dilated_head_groups", "--heads", "4", "--head-dim", "16", "--reps", "2",
            "--warmup", "0", "--device", "cpu"]
RESOURCES = ["triton-resources", "--study", "cli_test", "--head-dims", "16"]
RING_DEMO = ["ring-demo", "--seq-len", "256", "--families", "causal", "--heads", "1",
             "--head-dim", "16", "--block-size", "64", "--backend", "gloo", "--timeout", "5"]


def bad(*argv: str, names: str, gpu: bool = False, world: int | None = None):
    """A bad invocation whose one-line error must contain ``names``; ``gpu``: run it as on a
    machine with one CUDA device; ``world``: as a rank of a torchrun job of that many ranks."""
    shown = list(argv)
    for base in (BENCH, HILBERT, ADAPTIVE, LONGEST, COPY, TRITON, OVERHEAD, RESOURCES,
                 RING_PLAN, RING_BENCH, RING_DEMO):
        if shown[:len(base)] == base:
            shown = [base[0], "<tiny>", *shown[len(base):]]
    return pytest.param(list(argv), names, gpu, world, id=" ".join(shown))


BAD = [
    # no command, or an unknown one
    bad(names="COMMAND"),
    bad("nope", names="COMMAND"),
    # figures
    bad("figures", "--only", "99", names="--only 99"),
    bad("figures", "--only", "01", "99", names="--only 99"),
    bad("figures", "-p", "seq_len", names="-p"),
    bad("figures", "-p", "=3", names="-p"),
    bad("figures", "--only", "01", "-p", "seqlen=64", names="-p seqlen"),
    bad("figures", "--profile", "nope", names="--profile nope"),
    bad("figures", "--only", "results_scaling", "--profile", "odd", names="--profile odd"),
    bad("figures", "--save-outputs", "-p", "seq_len=64", names="--save-outputs"),
    bad("figures", "--bogus", names="--bogus"),
    # bench
    bad("bench", names="--study"),
    bad(*BENCH, "--seq-lens", "0", names="--seq-lens"),
    bad(*BENCH, "--seq-lens", "-5", names="--seq-lens"),
    bad(*BENCH, "--seq-lens", "1e3", names="--seq-lens"),
    bad(*BENCH, "--heads", "0", names="--heads"),
    bad(*BENCH, "--head-dim", "0", names="--head-dim"),
    bad(*BENCH, "--batch", "0", names="--batch"),
    bad(*BENCH, "--block-size", "0", names="--block-size"),
    bad(*BENCH, "--reps", "-1", names="--reps"),
    bad(*BENCH, "--reps", "0", names="--reps"),
    bad(*BENCH, "--warmup", "-1", names="--warmup"),
    bad(*BENCH, "--families", "nope", names="--families"),
    bad(*BENCH, "--variants", "nope", names="--variants"),
    bad(*BENCH, "--dtype", "fp8", names="--dtype"),
    bad(*BENCH, "--device", "cuda", names="--device cuda"),
    bad(*BENCH, "--device", "tpu", names="--device"),
    bad(*BENCH, "--device", "cuda:3", names="--device cuda:3", gpu=True),
    bad(*BENCH, "--study", "a/b", names="--study"),
    bad(*BENCH, "--variants", "triton", names="--variants triton"),
    bad(*BENCH, "--variants", "strided_view", names="--variants strided_view"),
    bad("bench", "--study", "cli_test", "--seq-lens", "1000", "--families", "dilated",
        "--variants", "strided_view", "--device", "cpu", names="--variants strided_view"),
    bad(*BENCH, "--variants", "flex_natural", "--backward", names="--variants flex_natural"),
    bad(*BENCH, "--families", "dilated", "--heads", "3", names="--heads 3"),
    bad(*BENCH, "--layout-timing", "0", names="--layout-timing"),
    bad("bench", "--study", "cli_test", "--device", "cpu", names="--layout-timing"),
    bad(*BENCH, "--layout-timing", "64", "--layout-cells", "0", names="--layout-cells"),
    bad(*BENCH, "--layout-timing", "64", "--layout-max-gib", "0", names="--layout-max-gib"),
    bad(*BENCH, "--bogus", "1", names="--bogus"),
    # bench-hilbert, bench-adaptive
    bad(*HILBERT, names="--device cuda"),
    bad(*HILBERT, "--device", "cpu", "--grids", "0", names="--grids"),
    bad(*HILBERT, "--device", "cpu", "--radii", "-1", names="--radii"),
    bad(*HILBERT, "--device", "cpu", "--reps", "0", names="--reps"),
    bad(*ADAPTIVE, names="--device cuda"),
    bad(*ADAPTIVE, "--device", "cpu", "--seq-lens", "0", names="--seq-lens"),
    # bench-longest: measures a GPU
    bad(*LONGEST, names="CUDA GPU"),
    bad(*LONGEST, "--device", "cpu", names="--device"),
    bad(*LONGEST, "--start", "0", names="--start"),
    bad(*LONGEST, "--families", "nope", names="--families"),
    bad(*LONGEST, "--max-seconds", "nan", names="--max-seconds"),
    bad(*LONGEST, "--memory-gib", "-1", names="--memory-gib"),
    bad(*LONGEST, "--start", "1024", "--limit", "512", names="--limit", gpu=True),
    # copy-bandwidth
    bad(*COPY, names="--device cuda"),
    bad(*COPY, "--device", "cpu", "--mib", "0", names="--mib"),
    bad(*COPY, "--device", "cpu", "--reps", "0", names="--reps"),
    bad(*COPY, "--device", "cpu", "--study", "", names="--study"),
    # bench-triton: measures a GPU
    bad(*TRITON, names="CUDA GPU"),
    bad(*TRITON, "--device", "cpu", names="--device"),
    bad(*TRITON, "--seq-len", "0", names="--seq-len"),
    bad(*TRITON, "--space", "nope", names="--space"),
    bad(*TRITON, "--families", "nope", names="--families"),
    # bench-overhead
    bad("bench-overhead", names="--study"),
    bad(*OVERHEAD, "--seq-lens", "0", names="--seq-lens"),
    bad(*OVERHEAD, "--entry-points", "nope", names="--entry-points"),
    bad(*OVERHEAD, "--dtype", "fp8", names="--dtype"),
    bad(*OVERHEAD, "--device", "cuda", names="--device cuda"),
    bad(*OVERHEAD, "--heads", "1", names="--heads 1"),
    # triton-resources
    bad(*RESOURCES, "--head-dims", "0", names="--head-dims"),
    bad(*RESOURCES, "--head-dims", "48", names="--head-dims"),
    bad(*RESOURCES, "--capability", "7", "5", names="--capability 7 5"),
    bad(*RESOURCES, "--capability", "9", names="--capability"),
    bad(*RESOURCES, "--study", "x y", names="--study"),
    # ring-demo
    bad(*RING_DEMO, "--seq-len", "0", names="--seq-len"),
    bad(*RING_DEMO, "--seq-len", "64", names="--seq-len 64"),
    bad(*RING_DEMO, "--heads", "0", names="--heads"),
    bad(*RING_DEMO, "--families", "dilated", "--heads", "2", names="--heads 2"),
    bad(*RING_DEMO, "--sharding", "nope", names="--sharding"),
    bad(*RING_DEMO, "--backend", "nccl", names="--backend nccl"),
    bad(*RING_DEMO, "--timeout", "0", names="--timeout"),
    # ring-bench
    bad("ring-bench", "--seq-lens", "256", names="--study"),
    bad(*RING_BENCH, "--seq-lens", "0", names="--seq-lens"),
    bad(*RING_BENCH, "--seq-lens", "64", names="--seq-lens 64", world=2),
    bad(*RING_BENCH, "--reps", "0", names="--reps"),
    bad(*RING_BENCH, "--profile", "-1", names="--profile"),
    bad(*RING_BENCH, "--shardings", "nope", names="--shardings"),
    bad(*RING_BENCH, "--double-until", "128", names="--double-until 128"),
    bad(*RING_BENCH, "--seq-lens", "256", "512", "--double-until", "1024",
        names="--double-until"),
    bad(*RING_BENCH, "--baseline", names="--baseline", world=3),
    bad(*RING_BENCH, "--backend", "nccl", names="--backend nccl"),
    # ring-plan
    bad("ring-plan", "--seq-lens", "256", names="--study"),
    bad(*RING_PLAN, "--world", "0", names="--world"),
    bad(*RING_PLAN, "--seq-lens", "64", "--world", "4", names="--seq-lens 64"),
    bad(*RING_PLAN, "--passes", "nope", names="--passes"),
    bad(*RING_PLAN, "--device", "cuda", names="--device cuda"),
    bad(*RING_PLAN, "--families", "dilated", "--heads", "2", names="--heads 2"),
]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """No CUDA (deterministic on any machine), no torchrun, no debug, data in ``tmp_path``."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setenv("WORKBENCH_DATA_DIR", str(tmp_path / "data"))
    for name in ("WORKBENCH_DEBUG", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def _exit(argv: list[str], capsys) -> tuple[int | str | None, str]:
    """The exit status ``main(argv)`` leaves by ``SystemExit`` and what it wrote to stderr."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code, capsys.readouterr().err


def _assert_one_line_error(status, err: str, prefix: str, names: str) -> str:
    """Exit status 2 and stderr one line, ``prefix`` then a message containing ``names``."""
    assert status == 2, f"exit status {status!r}, stderr:\n{err}"
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith(prefix), lines[0]
    assert names in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(("argv", "names", "gpu", "world"), BAD)
def test_bad_invocation_is_one_line_naming_the_option(argv, names, gpu, world, capsys,
                                                      monkeypatch, tmp_path):
    if gpu:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    if world is not None:  # as torchrun sets it for rank 0
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("WORLD_SIZE", str(world))
    status, err = _exit(argv, capsys)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    prefix = f"workbench {command}: error: " if command else "workbench: error: "
    _assert_one_line_error(status, err, prefix, names)
    assert not (tmp_path / "data").exists(), "a bad invocation wrote data"


@pytest.mark.parametrize(("argv", "names"), [
    (BENCH[:4] + ["0"], "--seq-lens"),
    (RING_PLAN + ["--seq-lens", "64", "--world", "4"], "--seq-lens 64"),
])
def test_no_traceback_from_a_real_process(argv, names, tmp_path):
    env = {**os.environ, "WORKBENCH_DATA_DIR": str(tmp_path / "data"), "CUDA_VISIBLE_DEVICES": ""}
    env.pop("WORKBENCH_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "workbench", *argv], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=120)
    _assert_one_line_error(proc.returncode, proc.stderr, f"workbench {argv[0]}: error: ", names)
    assert proc.stdout == ""


@pytest.mark.parametrize("error", [ValueError, TypeError, NotImplementedError, RuntimeError,
                                   OSError])
def test_error_from_the_work_is_one_line(error, capsys, monkeypatch):
    def fail(*args, **kwargs):
        raise error("what went wrong\n  detail on a second line")

    monkeypatch.setattr("workbench.lab.bench.run_bench", fail)
    status, err = _exit(BENCH, capsys)
    line = _assert_one_line_error(status, err, "workbench bench: error: ", "what went wrong")
    assert "WORKBENCH_DEBUG=1" in line and "second line" not in line


def test_debug_lets_the_error_propagate(capsys, monkeypatch):
    def fail(*args, **kwargs):
        raise ValueError("what went wrong")

    monkeypatch.setattr("workbench.lab.bench.run_bench", fail)
    monkeypatch.setenv("WORKBENCH_DEBUG", "1")
    with pytest.raises(ValueError, match="what went wrong"):
        main(BENCH)


def test_a_bug_is_not_disguised(monkeypatch):
    def fail(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr("workbench.lab.bench.run_bench", fail)
    with pytest.raises(KeyError):
        main(BENCH)


def test_interrupt_is_one_line_and_status_130(capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("workbench.lab.bench.run_bench", interrupted)
    try:
        status, err = _exit(BENCH, capsys)
    except KeyboardInterrupt:  # would end the whole test session
        pytest.fail("KeyboardInterrupt escaped main()")
    assert status == 130
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.strip()] == ["workbench bench: interrupted"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert f"usage: workbench {command}" in capsys.readouterr().out


def test_figures_list_runs(capsys):
    assert main(["figures", "--list"]) == 0
    out = capsys.readouterr().out
    assert "01_sparsity_patterns" in out and "figures/01_" in out


def test_tiny_cpu_bench_writes_its_csv_where_told(tmp_path, capsys):
    assert main(BENCH) == 0
    assert "sdpa_dense" in capsys.readouterr().out
    assert (tmp_path / "data" / "bench_cli_test.csv").is_file()
    assert not (_REPO_DATA / "bench_cli_test.csv").exists()


def test_a_bench_without_lengths_times_layouts_alone(tmp_path, capsys):
    from workbench.lab.records import read_csv

    assert main(["bench", "--study", "cli_test", "--device", "cpu", "--families", "random",
                 "causal", "--layout-timing", "300", "--layout-heads", "1", "2",
                 "--layout-cells", "16", "64", "--block-size", "32", "--reps", "1"]) == 0
    assert "layout    random heads=2 cell=16 S=300" in capsys.readouterr().out
    rows = read_csv("layouts_cli_test")
    assert [(r["family"], r["heads"], r["cell"]) for r in rows] == [
        ("random", "1", "64"), ("random", "2", "64"), ("random", "1", "16"),
        ("random", "2", "16"), ("causal", "1", "")]
    assert not (tmp_path / "data" / "bench_cli_test.csv").exists()


def test_an_interrupted_layout_sweep_keeps_the_rows_it_measured(tmp_path, monkeypatch):
    from workbench.lab import bench
    from workbench.lab.records import read_csv

    timed = bench._time_layout

    def second_case_fails(pattern, *args):
        if pattern.num_heads == 2:
            raise KeyboardInterrupt
        return timed(pattern, *args)

    monkeypatch.setattr(bench, "_time_layout", second_case_fails)
    with pytest.raises(SystemExit):  # the command line's exit on an interruption
        main(["bench", "--study", "cli_test", "--device", "cpu", "--families", "random",
              "--layout-timing", "300", "--layout-heads", "1", "2", "--layout-cells", "64",
              "--block-size", "32", "--reps", "1"])
    assert [(r["heads"], r["status"]) for r in read_csv("layouts_cli_test")] == [("1", "ok")]


def test_the_bench_runs_every_registered_family(capsys):
    from workbench.patterns import FAMILIES

    assert main([*BENCH, "--families", *FAMILIES, "random10", "--heads", "4", "--variants",
                 "ours"]) == 0
    out = capsys.readouterr().out
    assert all(f" {name} " in out for name in [*FAMILIES, "random10"])


def test_tiny_cpu_overhead_study_writes_its_csv(tmp_path, capsys):
    from workbench.lab.records import read_csv

    assert main(OVERHEAD) == 0
    assert "dilated_head_groups" in capsys.readouterr().out
    rows = read_csv("overhead_cli_test")
    assert [r["entry_point"] for r in rows] == ["module", "dilated_head_groups"]
    assert {"device", "torch", "date", "commit", "ours_us", "kernel_us", "overhead_us",
            "cpu_overhead_us", "backend"} <= set(rows[0])
    assert [r["backend"] for r in rows] == ["blockwise", "gather"]


def test_tiny_cpu_ring_plan_runs(tmp_path, capsys):
    assert main(RING_PLAN) == 0
    assert "rank=1" in capsys.readouterr().out
    assert (tmp_path / "data" / "ring_cli_test_plan.csv").is_file()
