"""The scaling figures drawn from small frames: one bar or line per recorded value, at its value
(Agg backend: conftest sets ``MPLBACKEND``)."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import pandas as pd
import pytest
from matplotlib.patches import Rectangle

from workbench.viz import scaling as vs


def _bars(ax):
    return [p for p in ax.patches if isinstance(p, Rectangle) and p.get_width() < 1]


def test_kernel_options_one_bar_per_config_and_family():
    df = pd.DataFrame({"S": 4096, "family": ["dense", "a", "a", "b", "b"],
                       "config": ["sdpa", "default", "tma", "default", "tma"],
                       "ms": 1.0, "tflops": 1.0, "rel": [1.0, 0.5, 0.6, 0.7, 0.8]})
    fig = vs.plot_kernel_options(df, labels={"tma": "USE_TMA"}, title="t", note="n")
    ax = fig.axes[0]
    heights = sorted(round(b.get_height(), 6) for b in _bars(ax))
    assert heights == [0.5, 0.6, 0.7, 0.8]  # the sdpa reference row is a line, not a bar
    assert [t.get_text() for t in ax.get_xticklabels()] == ["default", "USE_TMA"]
    assert {round(line.get_ydata()[0], 6) for line in ax.lines} == {1.0, 0.85}
    plt.close(fig)


def test_rate_bars_skip_variants_a_family_lacks():
    df = pd.DataFrame({"family": ["a", "a", "b", "b", "b"], "seq_len": 1024,
                       "variant": ["ours", "sdpa_dense", "ours", "strided_gather", "sdpa_dense"],
                       "status": "ok", "useful_tflops": [10.0, 20.0, 30.0, 40.0, 50.0]})
    fig = vs.plot_rate_bars(df, variants=["ours", "strided_gather", "sdpa_dense"],
                            reference={1024: 60.0}, target_fraction=0.5)
    ax = fig.axes[0]
    bars = sorted(_bars(ax), key=lambda b: b.get_x())
    assert [b.get_height() for b in bars] == [10.0, 20.0, 30.0, 40.0, 50.0]
    # family "a" has two bars centred on x = 0, "b" three centred on x = 1
    assert sum(b.get_x() + b.get_width() / 2 for b in bars[:2]) / 2 == pytest.approx(0)
    assert sum(b.get_x() + b.get_width() / 2 for b in bars[2:]) / 3 == pytest.approx(1)
    assert {line.get_ydata()[0] for line in ax.lines} == {60.0, 30.0}
    plt.close(fig)


def test_longest_sequence_marks_the_oom_and_plots_ok_rows():
    df = pd.DataFrame({"family": ["x", "x", "x"], "seq_len": [1 << 20, 1 << 21, 1 << 22],
                       "status": ["ok", "ok", "oom"], "ms": [100.0, 400.0, math.nan],
                       "peak_gib": [10.0, 20.0, math.nan],
                       "useful_tflops": [5.0, 6.0, math.nan]})
    fig = vs.plot_longest_sequence(df, capacity_gib=30.0)
    mem_ax, time_ax = fig.axes[:2]
    mem_line = next(line for line in mem_ax.lines if line.get_label() == "x")
    assert list(mem_line.get_ydata()) == [10.0, 20.0]
    crosses = [line for line in mem_ax.lines if line.get_marker() == "x" and len(line.get_xdata())]
    assert [list(c.get_xdata()) for c in crosses] == [[1 << 22]]
    time_line = next(line for line in time_ax.lines if line.get_label() == "x")
    assert list(time_line.get_ydata()) == [0.1, 0.4]
    assert [t.get_text() for t in time_ax.texts] == ["5 TFLOP/s", "6 TFLOP/s"]
    plt.close(fig)


def _bench_rows(variant, seq_len, ms, peak_mib, tflops, status="ok"):
    return {"variant": variant, "seq_len": seq_len, "status": status, "ms": ms,
            "peak_mib": peak_mib, "useful_tflops": tflops, "batch": 1, "heads": 2,
            "head_dim": 64, "dtype": "bf16"}


def test_peak_over_io_counts_the_inputs():
    # one [1, 2, 1024, 64] bf16 tensor is 0.25 MiB: 3 inputs + 0.25 MiB output = 1.0x
    df = pd.DataFrame([_bench_rows("a", 1024, 1.0, 0.25, 1.0),
                       _bench_rows("b", 1024, 1.0, 0.5, 1.0)])
    assert list(vs.peak_over_io(df)) == [1.0, 1.25]


def test_dilated_gather_draws_times_rates_floor_and_memory_bars():
    s1, s2 = 1024, 4096
    io1, io2 = 0.25, 1.0  # MiB of one tensor at s1, s2
    df = pd.DataFrame([
        _bench_rows("ours", s1, 1.0, io1, 10.0), _bench_rows("ours", s2, 2.0, 1.5 * io2, 40.0),
        _bench_rows("strided_gather", s1, 3.0, 2 * io1, 3.0),
        _bench_rows("strided_gather", s2, 6.0, 2 * io2, 13.0),
        _bench_rows("sdpa_dense", s2, 50.0, 9.0, 1.0, status="oom"),  # not drawn
    ])
    earlier = pd.DataFrame([_bench_rows("ours", s2, 2.5, 2 * io2, 30.0)])
    floor = pd.DataFrame({"seq_len": [s1, s2], "floor_ms": [0.5, 1.5],
                          "floor_tflops": [20.0, 50.0]})
    fig = vs.plot_dilated_gather(df, floor=floor, reference={s1: 60.0, s2: 70.0},
                                 earlier=earlier, memory_target=1.2, earlier_label="old run")
    time_ax, rate_ax, mem_ax = fig.axes[:3]

    def line(ax, label):
        return next(ln for ln in ax.lines if ln.get_label() == label)

    assert list(line(time_ax, "ours").get_ydata()) == [1.0, 2.0]
    assert list(line(time_ax, "contiguous strided gather + SDPA").get_ydata()) == [3.0, 6.0]
    assert "dense SDPA (no sparsity)" not in [ln.get_label() for ln in time_ax.lines]
    assert list(line(time_ax, "roofline floor").get_ydata()) == [0.5, 1.5]
    assert list(line(rate_ax, "ours").get_ydata()) == [10.0, 40.0]
    assert list(line(rate_ax, "roofline floor").get_ydata()) == [20.0, 50.0]
    assert list(line(rate_ax, "dense SDPA rate (same run)").get_ydata()) == [60.0, 70.0]
    # memory: ours first in each group, the earlier run hatched right beside it
    bars = sorted(_bars(mem_ax), key=lambda b: b.get_x())
    assert [round(b.get_height(), 6) for b in bars] == [1.0, 1.25, 1.125, 1.25, 1.25]
    assert [bool(b.get_hatch()) for b in bars] == [False, False, False, True, False]
    assert {ln.get_ydata()[0] for ln in mem_ax.lines} == {1.0, 1.2}
    assert [t.get_text() for t in fig.legends[0].get_texts()][-1] == "hatched: old run"
    plt.close(fig)


def test_dilated_gather_memory_panel_goes_log_when_one_variant_towers():
    s1, s2 = 1024, 4096
    df = pd.DataFrame([_bench_rows("ours", s1, 1.0, 0.25, 10.0),
                       _bench_rows("ours", s2, 2.0, 1.0, 40.0),
                       _bench_rows("strided_view", s2, 20.0, 50.0, 4.0)])
    mem_ax = vs.plot_dilated_gather(df, memory_target=None).axes[2]
    assert mem_ax.get_yscale() == "log" and "log" in mem_ax.get_title()
    plt.close("all")
    small = vs.plot_dilated_gather(df[df["variant"] == "ours"], memory_target=None).axes[2]
    assert small.get_yscale() == "linear"
    plt.close("all")


def test_dilated_gather_draws_forward_backward_hollow_in_the_time_panel():
    s1, s2 = 1024, 4096
    df = pd.DataFrame([_bench_rows("ours", s1, 1.0, 0.25, 10.0),
                       _bench_rows("ours", s2, 2.0, 1.0, 40.0),
                       _bench_rows("strided_gather", s2, 6.0, 2.0, 13.0)])
    bwd = pd.DataFrame([_bench_rows("ours", s2, 8.0, 5.0, 30.0),
                        _bench_rows("strided_gather", s2, 15.0, 7.0, 12.0),
                        _bench_rows("strided_gather", 1 << 20, 99.0, 9.0, 1.0),  # not in df
                        _bench_rows("ours", s1, 4.0, 1.0, 5.0, status="oom")])  # not drawn
    fig = vs.plot_dilated_gather(df, backward=bwd, backward_label="fwd+bwd", memory_target=None)
    time_ax, rate_ax = fig.axes[:2]
    hollow = {ln.get_color(): list(ln.get_ydata()) for ln in time_ax.lines
              if ln.get_markerfacecolor() == "white"}
    assert hollow == {"tab:blue": [8.0], "tab:red": [15.0]}
    assert not any(ln.get_markerfacecolor() == "white" for ln in rate_ax.lines)
    assert time_ax.get_ylabel() == "time (ms)"
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels.count("hollow: fwd+bwd") == 1 and labels[0] == "ours"
    plt.close(fig)


def test_kernel_resources_one_bar_per_configuration_coloured_by_fit():
    df = pd.DataFrame({"kernel": ["forward", "forward", "dq"], "head_dim": 128,
                       "space": ["default", "too_large", "default"], "block_m": 64,
                       "block_n": 64, "num_warps": 4, "num_stages": [2, 4, 2],
                       "use_tma": [True, False, False], "shared_bytes": [1024 * 100, 1024 * 300,
                                                                          1024 * 50],
                       "shared_limit": 1024 * 227, "fits": [True, False, True]})
    fig = vs.plot_kernel_resources(df, title="t", note="n")
    fwd, dq = fig.axes[:2]
    widths = lambda ax: sorted(round(p.get_width()) for p in ax.patches if p.get_width())  # noqa: E731
    assert widths(fwd) == [100, 100, 300]  # the TMA bar is drawn twice (colour, then hatch)
    assert widths(dq) == [50]
    assert [round(line.get_xdata()[0]) for line in fwd.lines] == [227]
    red = [p for p in fwd.patches if p.get_width() == 300][0]
    assert red.get_facecolor()[0] > 0.7  # the one that cannot launch is red
    plt.close(fig)
