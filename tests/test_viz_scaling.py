"""The scaling figures drawn from small frames: one line point or bar per recorded value, at its
value, in the palettes of ``workbench.viz.style``, stamped with the rows' provenance (Agg
backend: conftest sets ``MPLBACKEND``)."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex

from workbench.viz import scaling as vs
from workbench.viz import style
from workbench.viz.save import save_figure

_ENV = {"device": "NVIDIA X", "date": "2026-01-02", "dtype": "bf16", "torch": "2.11",
        "batch": 1, "heads": 2, "head_dim": 64}


def _rows(variant, seq_len, ms, peak_mib=1.0, tflops=1.0, status="ok", family="local",
          pass_="fwd"):
    return {**_ENV, "variant": variant, "seq_len": seq_len, "status": status, "ms": ms,
            "peak_mib": peak_mib, "useful_tflops": tflops, "family": family, "pass": pass_}


def _line(ax, variant):
    """The line of ``variant`` in ``ax`` (seaborn's lines are known by their colour)."""
    color = style.VARIANT[variant].lower()
    return next(ln for ln in ax.lines
                if len(ln.get_xdata()) and to_hex(ln.get_color()) == color)


def _bars(ax):
    return [p for c in ax.containers for p in c]


def test_length_label():
    assert [vs.length_label(s) for s in (1000, 16384, 1 << 20, 3 << 21)] == \
        ["1000", "16K", "1M", "6M"]


@pytest.mark.parametrize("top, ticks", [(0.5, [1]), (7.0, [1, 1.5, 2, 3, 5, 10]),
                                         (40.0, [1, 2, 5, 10, 20, 50])])
def test_waste_axis_ticks_run_just_past_top(top, ticks):
    ax = plt.figure().gca()
    vs.waste_axis(ax, top)
    assert list(ax.get_yticks()) == ticks
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"x{t:g}" for t in ticks]
    plt.close("all")


@pytest.mark.parametrize("top", [math.inf, math.nan])
def test_waste_axis_refuses_a_top_that_is_not_finite(top):
    with pytest.raises(ValueError, match="top must be"):
        vs.waste_axis(plt.figure().gca(), top)
    plt.close("all")


def test_peak_over_io_counts_the_inputs():
    # one [1, 2, 1024, 64] bf16 tensor is 0.25 MiB: 3 inputs + 0.25 MiB output = 1.0x
    df = pd.DataFrame([_rows("a", 1024, 1.0, 0.25), _rows("b", 1024, 1.0, 0.5)])
    assert list(vs.peak_over_io(df)) == [1.0, 1.25]


def test_vs_length_one_panel_per_family_and_metric_lines_per_variant():
    df = pd.DataFrame([
        _rows("ours", 1024, 1.0, 0.25, family="local"),
        _rows("ours", 4096, 2.0, 1.0, family="local"),
        _rows("flex_natural", 1024, 3.0, 0.5, family="local"),
        _rows("flex_natural", 4096, 6.0, 2.0, family="local"),
        _rows("ours", 1024, 5.0, 0.25, family="dense"),
        _rows("sdpa_dense", 4096, 9.0, 9.0, status="oom", family="dense"),  # not drawn
    ])
    fig = vs.plot_vs_length(df, metrics=("ms", "peak_over_io"))
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert len(axes) == 4  # 2 metrics x 2 families
    dense_ms, local_ms = axes[0], axes[1]  # families in the palette's order: dense first
    assert [ax.get_title() for ax in axes[:2]] == ["dense", "local"]
    assert list(_line(local_ms, "ours").get_ydata()) == [1.0, 2.0]
    assert list(_line(local_ms, "flex_natural").get_ydata()) == [3.0, 6.0]
    assert list(_line(dense_ms, "ours").get_ydata()) == [5.0]
    # ours is drawn above the baselines it may coincide with
    assert _line(local_ms, "ours").get_zorder() > _line(local_ms, "flex_natural").get_zorder()
    with pytest.raises(StopIteration):  # the oom row is not drawn
        _line(dense_ms, "sdpa_dense")
    assert dense_ms.get_yscale() == "log" and axes[2].get_yscale() == "linear"
    assert list(_line(axes[3], "ours").get_ydata()) == [1.0, 1.0]  # peak_over_io computed
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == [style.VARIANT_LABEL["ours"], style.VARIANT_LABEL["flex_natural"]]
    assert [t.get_text() for t in axes[3].get_xticklabels()] == ["1K", "4K"]
    assert "NVIDIA X" in fig._workbench_stamp.line()
    plt.close(fig)


def test_vs_length_refuses_rows_with_nothing_to_draw():
    df = pd.DataFrame([_rows("ours", 1024, 1.0, status="oom")])
    with pytest.raises(ValueError, match="no row"):
        vs.plot_vs_length(df)


def test_rate_bars_one_bar_per_value_and_the_reference_line():
    df = pd.DataFrame([_rows("triton", 1, 1.0, tflops=10.0, family="local"),
                       _rows("flex_natural", 1, 1.0, tflops=20.0, family="local"),
                       _rows("triton", 1, 1.0, tflops=30.0, family="dense"),
                       _rows("triton", 1, 1.0, tflops=40.0, family="dense", pass_="fwd+bwd")])
    fig = vs.plot_rate_bars(df, col="pass", reference={"fwd": 50.0})
    fwd_ax, bwd_ax = fig.axes[:2]
    heights = sorted(b.get_height() for b in _bars(fwd_ax) if np.isfinite(b.get_height()))
    assert heights == [10.0, 20.0, 30.0]
    assert sorted(b.get_height() for b in _bars(bwd_ax) if b.get_height() > 0) == [40.0]
    assert [t.get_text() for t in fwd_ax.get_xticklabels()] == ["dense", "local"]
    assert [ln.get_ydata()[0] for ln in fwd_ax.lines if ln.get_linestyle() == "--"] == [50.0]
    assert not [ln for ln in bwd_ax.lines if ln.get_linestyle() == "--"]
    flex_bar = next(b for b in _bars(fwd_ax) if b.get_height() == 20.0)
    assert to_hex(flex_bar.get_facecolor()) == style.VARIANT["flex_natural"].lower()
    assert "20" in [t.get_text() for t in fwd_ax.texts]
    assert "NVIDIA X" in fig._workbench_stamp.line()
    plt.close(fig)


def test_longest_sequence_marks_the_oom_and_plots_ok_rows():
    df = pd.DataFrame({**_ENV, "family": ["local"] * 3, "seq_len": [1 << 20, 1 << 21, 1 << 22],
                       "status": ["ok", "ok", "oom"], "ms": [100.0, 400.0, math.nan],
                       "peak_gib": [10.0, 20.0, math.nan]})
    fig = vs.plot_longest_sequence(df, capacity_gib=30.0)
    mem_ax, time_ax = fig.axes[:2]
    assert list(mem_ax.lines[0].get_ydata()) == [10.0, 20.0]
    assert to_hex(mem_ax.lines[0].get_color()) == style.FAMILY["local"].lower()
    assert list(time_ax.lines[0].get_ydata()) == [0.1, 0.4]
    marked = [tuple(o) for c in mem_ax.collections for o in c.get_offsets() if o[1] > 30]
    assert marked == [(1 << 22, pytest.approx(30.0 * 1.06))]  # one cross, above the capacity
    assert 30.0 in [ln.get_ydata()[0] for ln in mem_ax.lines if ln.get_linestyle() == "--"]
    assert "out of memory" in [t.get_text() for t in time_ax.get_legend().get_texts()]
    plt.close(fig)


def test_kernel_resources_one_bar_per_configuration_coloured_by_fit():
    df = pd.DataFrame({"kernel": ["forward", "forward", "dq"], "head_dim": 128,
                       "space": ["default", "too_large", "default"], "block_m": 64,
                       "block_n": 64, "num_warps": 4, "num_stages": [2, 4, 2],
                       "use_tma": [True, False, False],
                       "shared_bytes": [1024 * 100, 1024 * 300, 1024 * 50],
                       "shared_limit": 1024 * 227, "fits": [True, False, True],
                       "target": "sm_90", "compiled_by": "triton 3.9", "device": "cpu",
                       "date": "2026-01-02"})
    fig = vs.plot_kernel_resources(df)
    fwd, dq = fig.axes[:2]
    widths = lambda ax: sorted(round(p.get_width()) for p in _bars(ax)  # noqa: E731
                               if np.isfinite(p.get_width()) and p.get_width() > 0)
    assert widths(fwd) == [100, 300]
    assert widths(dq) == [50]
    assert [round(line.get_xdata()[0]) for line in fwd.lines] == [227]
    red = next(p for p in _bars(fwd) if np.isfinite(p.get_width()) and p.get_width() > 299)
    assert red.get_facecolor()[0] > 0.7  # the one that cannot launch is red
    assert "sm_90" in fig._workbench_stamp.line()
    plt.close(fig)


def test_layout_build_one_point_per_timed_case_and_the_target_per_device():
    base = {"date": "2026-01-02", "torch": "2.13"}
    df = pd.DataFrame([
        {**base, "device": "cpu", "family": "causal", "cell": None, "heads": 1,
         "total_ms": 500.0, "target_ms": 2000.0},
        {**base, "device": "cpu", "family": "random", "cell": 64, "heads": 1,
         "total_ms": 1500.0, "target_ms": 2000.0},
        {**base, "device": "cpu", "family": "random", "cell": 64, "heads": 8,
         "total_ms": 9000.0, "target_ms": 2000.0},
        {**base, "device": "cpu", "family": "random", "cell": 16, "heads": 8,
         "total_ms": None, "target_ms": 2000.0},  # not run: not drawn
        {**base, "device": "gpu", "family": "causal", "cell": None, "heads": 1,
         "total_ms": 5.0, "target_ms": 100.0}])
    fig = vs.plot_layout_build(df)
    cpu, gpu = fig.axes[:2]
    assert [t.get_text() for t in cpu.get_yticklabels()] == ["causal", "random cell 64"]

    def points(ax):
        return sorted(float(x) for c in ax.collections for x, _ in c.get_offsets())

    assert points(cpu) == [500.0, 1500.0, 9000.0]
    assert points(gpu) == [5.0]
    assert cpu.lines[-1].get_xdata()[0] == 2000.0 and gpu.lines[-1].get_xdata()[0] == 100.0
    assert cpu.get_xscale() == "log" and "cpu, gpu" in fig._workbench_stamp.line()
    plt.close(fig)
    with pytest.raises(ValueError, match="no case"):
        vs.plot_layout_build(df[df["total_ms"].isna()])


def test_every_figure_can_be_saved(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_FIGURES_DIR", str(tmp_path))
    fig = vs.plot_vs_length(pd.DataFrame([_rows("ours", 1024, 1.0)]))
    assert save_figure(fig, "scaling_test")[0].exists()
    plt.close(fig)


def test_every_family_has_its_own_colour():
    # a family registered in workbench.patterns (or named by the bench) is drawn in a colour
    # of its own, not one borrowed from a name it starts with
    from workbench.lab.bench import bench_families
    from workbench.patterns import FAMILIES

    names = [*FAMILIES, *bench_families()]
    assert set(names) <= set(style.FAMILY), sorted(set(names) - set(style.FAMILY))
    assert len({style.FAMILY[n] for n in FAMILIES}) == len(FAMILIES)  # one colour each
