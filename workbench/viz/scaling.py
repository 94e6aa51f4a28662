"""Benchmark rows drawn with seaborn, and the axes of figures against sequence length.

Every ``plot_*`` function takes the tidy rows ``workbench.lab.bench`` writes, draws them in the
palettes of :mod:`workbench.viz.style`, stamps the figure with the rows' provenance
(:meth:`~workbench.viz.style.Provenance.from_rows`, or ``provenance=``) and returns it."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.colors import to_hex
from matplotlib.lines import Line2D
from matplotlib.ticker import NullFormatter

from . import style
from .style import Provenance, distinct

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["DTYPE_BYTES", "METRIC_LABEL", "VARIANT_MARKER", "length_axis", "length_label",
           "peak_over_io", "plot_kernel_resources", "plot_layout_build", "plot_longest_sequence",
           "plot_rate_bars", "plot_vs_length", "waste_axis"]

#: bytes per element of the ``dtype`` names the benchmark writes.
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}

#: marker of each variant (colours and legend text come from :mod:`workbench.viz.style`).
VARIANT_MARKER = {"ours": "o", "triton": "*", "blockwise": "^", "flex_natural": "s",
                  "strided_gather": "P", "strided_view": "X", "paper": "h", "sdpa_dense": "D",
                  "sdpa_masked": "v", "reference": "d"}

#: axis label of each measured column.
METRIC_LABEL = {"ms": "time (ms)", "peak_mib": "peak MiB above the inputs",
                "useful_tflops": "useful TFLOP/s", "peak_over_io": "peak / (q + k + v + out)",
                "peak_gib": "peak GiB (inputs included)"}
_LOG_METRICS = {"ms", "peak_mib", "peak_gib"}


def length_label(s: int) -> str:
    """``65536 -> "64K"``, ``4194304 -> "4M"``; other lengths as they are."""
    s = int(s)
    if s >= 1 << 20 and s % (1 << 20) == 0:
        return f"{s >> 20}M"
    if s >= 1024 and s % 1024 == 0:
        return f"{s >> 10}K"
    return str(s)


def length_axis(ax, lengths: Iterable[int], *, margin: float | None = None) -> None:
    """Log2 x axis with one tick per sequence length (``512``, ``1K``, ``64K``); ``margin``
    pads the limits by that factor, else the axis is labelled and gridded for a lone panel."""
    lengths = sorted({int(s) for s in lengths})
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths)
    ax.set_xticklabels([length_label(s) for s in lengths])
    ax.minorticks_off()
    if margin is None:
        ax.set_xlabel("sequence length S (tokens)")
        ax.grid(True, which="major", color="#dddddd", lw=0.6)
    elif lengths:
        ax.set_xlim(min(lengths) / margin, max(lengths) * margin)


def waste_axis(ax, top: float, *, label: str = "waste = computed / useful pairs") -> None:
    """Log y axis of a ratio >= 1 whose ticks (``x1``, ``x2``, ``x5``, ``x10``, ...) run past
    ``top``, the largest value drawn, so every point lies below a labelled tick. Raises
    ``ValueError`` when ``top`` is not a finite number."""
    if not math.isfinite(top):
        raise ValueError(f"top must be the largest finite ratio drawn, got {top!r}")
    steps = (1, 1.5, 2, 3, 5) if top <= 12 else (1, 2, 5)  # fewer ticks on tall ranges
    ticks, decade = [], 1
    while not ticks or ticks[-1] < top:
        ticks += [decade * t for t in steps]
        decade *= 10
    ticks = ticks[: next(i for i, t in enumerate(ticks) if t >= top) + 1]
    ax.set_yscale("log")
    ax.set_ylim(0.9, ticks[-1] * 1.15)
    ax.set_yticks(ticks)
    ax.set_yticklabels([f"x{t:g}" for t in ticks])
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.axhline(1.0, color="#888888", lw=0.8, ls=":")
    ax.set_ylabel(label)


def peak_over_io(df: pd.DataFrame) -> pd.Series:
    """Peak memory *including* the inputs over the bytes of ``q + k + v + out``, per row:
    ``(3 * io + peak_mib) / (4 * io)``, ``io`` one ``[B, H, S, D]`` tensor in MiB (``peak_mib``
    is the peak above the inputs). 1.0 means nothing beyond the output."""
    io_mib = (df["batch"] * df["heads"] * df["seq_len"] * df["head_dim"]
              * df["dtype"].map(DTYPE_BYTES) / 2**20)
    return (3 * io_mib + df["peak_mib"]) / (4 * io_mib)


def _in_order(values, known: Iterable[str] = ()) -> list:
    """Distinct ``values``: those in ``known`` in its order, then the rest as first seen."""
    seen = list(dict.fromkeys(values))
    first = [k for k in known if k in seen]
    return first + [v for v in seen if v not in first]


def _ordered(values, column: str) -> list:
    """Distinct ``values``; families in :data:`~workbench.viz.style.FAMILY`'s order."""
    return _in_order(values, style.FAMILY if column == "family" else ())


def _labelled(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str], dict[str, str], dict]:
    """``df`` with a ``who`` column (each variant's legend text), and the legend order, palette
    and markers keyed by it."""
    order = _in_order(df["variant"], style.VARIANT)
    label = {v: style.VARIANT_LABEL.get(v, v) for v in order}
    out = df.assign(who=df["variant"].map(label))
    names = [label[v] for v in order]
    palette = {label[v]: style.color_of(v, style.VARIANT) for v in order}
    markers = {label[v]: VARIANT_MARKER.get(v, "o") for v in order}
    return out, names, palette, markers


def _finish(fig: Figure, df: pd.DataFrame, title: str, provenance: Provenance | None,
            y: float = 1.02) -> Figure:
    """``title`` above the panels and the stamp of the rows' provenance; returns ``fig``."""
    if title:
        fig.suptitle(title, y=y)
    style.stamp(fig, provenance if provenance is not None else Provenance.from_rows(df))
    return fig


def _label_bars(ax, fmt: str, fontsize: float, padding: float) -> None:
    """Each bar of ``ax`` labelled with ``fmt`` of its length (none where it has none)."""
    for container in ax.containers:
        ax.bar_label(container, labels=[fmt.format(v) if np.isfinite(v) and v > 0 else ""
                                        for v in container.datavalues], fontsize=fontsize,
                     padding=padding)


def plot_vs_length(df: pd.DataFrame, *, metrics=("ms",), col: str = "family", title: str = "",
                   provenance: Provenance | None = None, height: float = 2.7,
                   aspect: float = 1.15) -> Figure:
    """Measured columns against ``S``: one panel column per ``col`` value (a family), one
    panel row per metric of ``metrics`` (``ms`` and memory on log axes), one line per variant,
    ``ours`` on top. Only ``status == "ok"`` rows are drawn; ``peak_over_io`` is computed when
    absent. Raises ``ValueError`` when no row is left to draw.
    """
    ok = df[df["status"] == "ok"] if "status" in df else df
    if "peak_over_io" in metrics and "peak_over_io" not in ok:
        ok = ok.assign(peak_over_io=peak_over_io(ok))
    if ok.empty:
        raise ValueError("plot_vs_length: no row with status 'ok' to draw")
    ok, names, palette, markers = _labelled(ok)
    long = ok.melt(id_vars=["who", "seq_len", col], value_vars=list(metrics),
                   var_name="metric", value_name="value").dropna(subset=["value"])
    g = sns.relplot(data=long, x="seq_len", y="value", hue="who", style="who", col=col,
                    row="metric", kind="line", hue_order=names, style_order=names,
                    palette=palette, markers=markers, dashes=False,
                    col_order=_ordered(ok[col], col), row_order=list(metrics), height=height,
                    aspect=aspect, linewidth=2, markersize=7,
                    facet_kws={"sharey": "row", "sharex": True, "margin_titles": False})
    lengths = ok["seq_len"].unique()
    ours = to_hex(palette[names[0]]) if "ours" in set(ok["variant"]) else None
    for (metric, c), ax in g.axes_dict.items():
        for line in ax.lines:  # ours on top of the baselines it may coincide with
            if ours is not None and to_hex(line.get_color()) == ours:
                line.set_zorder(line.get_zorder() + 1)
        length_axis(ax, lengths, margin=1.4)
        if metric in _LOG_METRICS:
            ax.set_yscale("log")
        ax.set(title=str(c) if metric == metrics[0] else "", xlabel="sequence length S",
               ylabel=METRIC_LABEL.get(metric, metric))
    g.legend.set_title("")
    return _finish(g.figure, df, title, provenance)


def plot_rate_bars(df: pd.DataFrame, *, y: str = "useful_tflops", x: str = "family",
                   col: str | None = None, reference=None,
                   fmt: str = "{:.0f}", log: bool = False, title: str = "",
                   provenance: Provenance | None = None, height: float = 3.4,
                   aspect: float = 1.3) -> Figure:
    """Grouped bars of ``y`` (useful TFLOP/s by default) per ``x`` value, one bar per variant
    (coloured by :data:`~workbench.viz.style.VARIANT`), one panel per ``col`` value; each bar
    is labelled with ``fmt`` of its height.

    ``reference``: mapping ``col value -> y`` (``None`` key when ``col`` is ``None``), e.g.
    dense SDPA's rate, drawn as a dashed black line. A variant a group lacks gets no bar.
    """
    ok, names, palette, _ = _labelled(df[df["status"] == "ok"] if "status" in df else df)
    kw = {"col": col, "col_order": _ordered(ok[col], col)} if col else {}
    g = sns.catplot(data=ok, x=x, y=y, hue="who", kind="bar", hue_order=names, palette=palette,
                    errorbar=None, height=height, aspect=aspect, order=_ordered(ok[x], x),
                    saturation=1, edgecolor="white", sharey=True, **kw)
    for key, ax in (g.axes_dict.items() if col else [(None, g.ax)]):
        _label_bars(ax, fmt, fontsize=7.5, padding=1.5)
        if reference is not None and key in reference:
            ax.axhline(reference[key], color="black", ls="--", lw=1.2)
        if log:
            ax.set_yscale("log")
        if col:
            ax.set_title(str(key))
        ax.set(xlabel="", ylabel=METRIC_LABEL.get(y, y))
    g.legend.set_title("")
    return _finish(g.figure, df, title, provenance)


def plot_longest_sequence(df: pd.DataFrame, *, capacity_gib=None, style_col: str | None = None,
                          title: str = "", provenance: Provenance | None = None) -> Figure:
    """The longest-sequence search (``workbench.lab.bench.longest_sequence``): peak memory (GiB,
    inputs included) and time of one call against ``S``, one colour per family; a cross above
    the memory panel where a length ran out of memory, a hollow triangle where it was
    ``too_slow`` to run. ``capacity_gib``: ``{label: GiB}`` of memory limits drawn dashed (or one
    number); ``style_col``: a column whose values (e.g. the memory cap) get their own markers.
    """
    fams = _ordered(df["family"], "family")
    palette = style.palette(fams, style.FAMILY)
    ok = df[df["status"] == "ok"].assign(seconds=lambda d: d["ms"] / 1e3)
    fig, (mem_ax, time_ax) = plt.subplots(1, 2, figsize=(11.5, 4.0))
    kw = dict(x="seq_len", hue="family", hue_order=fams, palette=palette, markersize=8,
              linewidth=2)
    if style_col:  # one marker per value of style_col (solid lines)
        values = list(dict.fromkeys(df[style_col]))
        kw.update(style=style_col, style_order=values, dashes=False,
                  markers=dict(zip(values, "osD^v")))
    else:
        kw.update(marker="o")
    sns.lineplot(data=ok, y="peak_gib", ax=mem_ax, **kw)
    sns.lineplot(data=ok, y="seconds", ax=time_ax, legend=False, **kw)
    if capacity_gib is not None:
        caps = capacity_gib if isinstance(capacity_gib, dict) else {"GPU memory": capacity_gib}
        for lab, cap in caps.items():
            mem_ax.axhline(cap, color="black", ls="--", lw=1.1)
            mem_ax.annotate(f"{lab}: {cap:g} GiB", (0.99, cap), xycoords=("axes fraction", "data"),
                            xytext=(0, 2), textcoords="offset points", fontsize=8, ha="right")
        top = max(caps.values())
    else:
        top = float(ok["peak_gib"].max())
    handles, labels = mem_ax.get_legend_handles_labels()
    for status, marker, fill, text in (("oom", "x", None, "out of memory"),
                                       ("too_slow", ">", "none", "not run: one call too slow")):
        bad = df[df["status"] == status]
        if bad.empty:
            continue
        for i, fam in enumerate(fams):  # side by side: families failing at one length stay visible
            b = bad[bad["family"] == fam]
            shift = 2.0 ** (0.08 * (i - (len(fams) - 1) / 2))
            mem_ax.scatter(b["seq_len"] * shift, [top * 1.06] * len(b), marker=marker, s=70,
                           color=palette[fam], facecolors=fill, linewidths=2, zorder=4)
        handles.append(Line2D([], [], color="0.3", marker=marker, ls="none", mfc="none", mew=2,
                              ms=8))
        labels.append(text)
    mem_ax.get_legend().remove()
    time_ax.legend(handles, labels, fontsize=8.5, loc="upper left", bbox_to_anchor=(1.02, 1),
                   frameon=False)
    mem_ax.set_ylim(0, top * 1.14)
    for ax in (mem_ax, time_ax):
        length_axis(ax, df["seq_len"], margin=1.4)
        ax.set_xlabel("sequence length S")
    mem_ax.set(ylabel=METRIC_LABEL["peak_gib"], title="memory")
    time_ax.set(xlim=mem_ax.get_xlim(), yscale="log", ylabel="one forward call (s)",
                title="time of one call")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _finish(fig, df, "", provenance)


def plot_kernel_resources(df: pd.DataFrame, *, title: str = "",
                          provenance: Provenance | None = None) -> Figure:
    """Shared memory per program (KiB) of each compiled kernel configuration as horizontal
    bars, one panel per kernel, against the GPU's limit (dashed); green when a program fits, red
    when it cannot launch. ``df``: rows of ``workbench.lab.bench.triton_resource_study``; the
    default provenance says "compiled offline" for their ``target``.
    """
    fits = df["fits"].astype(str) == "True"
    tma = np.where(df["use_tma"].astype(str) == "True", ", TMA", "")
    rows = df.assign(
        kib=df["shared_bytes"] / 1024,
        fit=np.where(fits, "fits", "cannot launch"),
        config=[f"{r.space}: d={r.head_dim}, {r.block_m}x{r.block_n}, {r.num_warps} warps, "
                f"{r.num_stages} stages{t}" for r, t in zip(df.itertuples(), tma)])
    kernels = list(dict.fromkeys(rows["kernel"]))
    longest = max(int((rows["kernel"] == k).sum()) for k in kernels)
    g = sns.catplot(data=rows, x="kib", y="config", hue="fit", col="kernel", col_order=kernels,
                    kind="bar", orient="h", errorbar=None,
                    palette={"fits": "#4c9a5b", "cannot launch": "#c0392b"},
                    hue_order=["fits", "cannot launch"], sharey=False, dodge=False,
                    height=0.28 * longest + 1.4, aspect=5.6 / (0.28 * longest + 1.4),
                    saturation=1)
    for kernel, ax in g.axes_dict.items():
        limit = float(rows.loc[rows["kernel"] == kernel, "shared_limit"].iloc[0]) / 1024
        ax.axvline(limit, color="black", ls="--", lw=1.2)
        ax.annotate(f"limit {limit:.0f}", (limit, 0), xytext=(3, 0), textcoords="offset points",
                    fontsize=7.5, va="center")
        _label_bars(ax, "{:.0f}", fontsize=7, padding=2)
        ax.set_xlim(0, max(limit, float(rows.loc[rows["kernel"] == kernel, "kib"].max())) * 1.2)
        ax.set(title=kernel, xlabel="shared memory per program (KiB)", ylabel="")
        ax.tick_params(axis="y", labelsize=7.5)
    g.legend.set_title("")
    g.tight_layout(w_pad=1.0)  # room for each panel's own configuration labels
    if provenance is None:
        devices = distinct(sorted({str(v) for v in rows["device"].dropna()}))
        provenance = Provenance(
            device=f"{distinct(rows['target'])} (compiled offline on {devices})",
            date=distinct(rows["date"]), dtype="bf16",
            shape=f"head_dim {distinct(rows['head_dim'])}",
            software=distinct(rows["compiled_by"]) if "compiled_by" in rows else "")
    return _finish(g.figure, rows, title, provenance, y=1.03)


def plot_layout_build(df: pd.DataFrame, *, title: str = "",
                      provenance: Provenance | None = None) -> Figure:
    """Time to build each case's layout and kernel structure (``total_ms``, log axis): one row
    per family (random tiles: per cell size), one colour per head count, one panel per device
    with its ``target_ms`` dashed. ``df``: rows of :func:`workbench.lab.bench.layout_build_time`
    with a ``target_ms`` column; cases not run are left out. Raises ``ValueError`` when no case
    has a time.
    """
    rows = df.dropna(subset=["total_ms"])
    if rows.empty:
        raise ValueError("plot_layout_build: no case with a total_ms to draw")
    cell = pd.to_numeric(rows["cell"], errors="coerce")
    rows = rows.assign(case=[f if c != c else f"{f} cell {int(c)}"
                             for f, c in zip(rows["family"], cell)])
    order = list(dict.fromkeys(rows["case"]))
    heads = sorted(rows["heads"].astype(int).unique())
    colors = dict(zip(heads, sns.color_palette("viridis", len(heads))))
    g = sns.catplot(data=rows.assign(heads=rows["heads"].astype(int)), x="total_ms", y="case",
                    hue="heads", hue_order=heads, col="device", kind="strip", order=order,
                    orient="h", jitter=False, dodge=True, size=7, palette=colors, legend=False,
                    height=0.32 * len(order) + 1.2, aspect=6.0 / (0.32 * len(order) + 1.2))
    g.add_legend(legend_data={str(h): Line2D([], [], marker="o", ls="", color=c, markersize=7)
                              for h, c in colors.items()}, title="heads")
    for device, ax in g.axes_dict.items():
        target = float(rows.loc[rows["device"] == device, "target_ms"].iloc[0])
        ax.axvline(target, color="black", ls="--", lw=1.2)
        ax.annotate(f"target {target:.0f} ms", (target, -0.5), xytext=(3, 0),
                    textcoords="offset points", fontsize=8, va="top")
        ax.set(xscale="log", xlabel="layout + kernel structure (ms)", ylabel="",
               title=str(device))
        ax.grid(axis="x", which="both", alpha=0.3)
    if provenance is None:  # layouts have no dtype: bool maps and int32 block lists
        shape = ", ".join(f"{k}={distinct(rows[c])}"
                          for k, c in (("S", "seq_len"), ("block", "block_size")) if c in rows)
        provenance = Provenance.from_rows(rows.assign(dtype="bool layouts, int32 lists"),
                                          shape=shape or f"H={distinct(heads)}")
    return _finish(g.figure, rows, title, provenance)
