"""Plots of benchmark rows (``workbench.bench``) against sequence length: time, throughput, memory.

Every function takes a tidy ``pandas.DataFrame`` with the columns that ``run_bench`` writes
(``family``, ``variant``, ``pass``, ``seq_len``, ``ms``, ``peak_mib``, ``useful_tflops``, ...)
and returns the figure; saving is left to ``workbench.viz.save_figure``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, FormatStrFormatter, NullFormatter

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

__all__ = [
    "DTYPE_BYTES",
    "VARIANT_STYLE",
    "FAMILY_COLOR",
    "environment_note",
    "peak_over_io",
    "plot_dilated_gather",
    "plot_kernel_options",
    "plot_longest_sequence",
    "plot_memory_vs_length",
    "plot_rate_bars",
    "plot_time_vs_length",
    "plot_useful_tflops",
]

#: colour, marker and label of each benchmark variant (the same in every figure).
VARIANT_STYLE = {
    "ours": ("tab:blue", "o", "ours"),
    "flex_natural": ("tab:orange", "s", "FlexAttention, natural order"),
    "triton": ("tab:cyan", "*", "ours, Triton kernel"),
    "triton_no_tma": ("tab:olive", "*", "ours, Triton kernel without TMA"),
    "strided_view": ("tab:brown", "X", "strided views into SDPA (naive LongNet)"),
    "strided_gather": ("tab:red", "P", "contiguous strided gather + SDPA"),
    "blockwise": ("tab:green", "^", "blockwise (pure PyTorch)"),
    "sdpa_dense": ("tab:gray", "D", "dense SDPA (no sparsity)"),
    "sdpa_masked": ("tab:purple", "v", "SDPA + dense bool mask"),
}
#: colour of each pattern family (figures with one line per family).
FAMILY_COLOR = {
    "dense": "tab:gray",
    "causal": "tab:purple",
    "random10": "tab:green",
    "local": "tab:orange",
    "dilated": "tab:blue",
    "longnet": "tab:cyan",
}
_FLOOR_STYLE = dict(color="black", ls=":", lw=1.6, marker="_", ms=10)
#: bytes per element of the ``dtype`` names the benchmark writes.
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}


def _families(df, families=None):
    return list(families) if families is not None else list(dict.fromkeys(df["family"]))


def _variants(df):
    order = list(VARIANT_STYLE)
    present = set(df["variant"])
    return [v for v in order if v in present and v != "ours"] + sorted(present - set(order)) \
        + (["ours"] if "ours" in present else [])


def _style(variant):
    return VARIANT_STYLE.get(variant, ("tab:brown", "x", variant))


def environment_note(df) -> str:
    """``device · torch X · date`` of the rows (each distinct value listed once)."""
    parts = []
    for col, prefix in (("device", ""), ("torch", "torch "), ("date", "")):
        if col in df:
            vals = sorted({str(v) for v in df[col].dropna()})
            if vals:
                parts.append(prefix + ", ".join(vals))
    return " · ".join(parts)


def _line(variant):
    """Line style of ``variant``; ``ours`` is drawn on top, smaller, so that a baseline it
    coincides with stays visible underneath."""
    c, m, _ = _style(variant)
    if variant == "ours":
        return dict(color=c, marker=m, ms=4.5, lw=1.5, zorder=4)
    return dict(color=c, marker=m, ms=7, lw=2.4, alpha=0.85, zorder=3)


def _log_length_axis(ax, lengths):
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths)
    ax.set_xticklabels([_k(s) for s in lengths])
    ax.minorticks_off()
    ax.set_xlim(min(lengths) / 1.4, max(lengths) * 1.4)


def _k(s: int) -> str:
    s = int(s)
    if s >= 1 << 20 and s % (1 << 20) == 0:
        return f"{s >> 20}M"
    if s >= 1024 and s % 1024 == 0:
        return f"{s >> 10}K"
    return str(s)


def _legend(fig, axes, extra_handles=()):
    handles, labels = [], []
    for ax in np.ravel(axes):
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    for h in extra_handles:
        if h.get_label() not in labels:
            handles.append(h)
            labels.append(h.get_label())
    order = sorted(range(len(labels)), key=lambda i: labels[i] != "ours")  # ours first
    handles, labels = [handles[i] for i in order], [labels[i] for i in order]
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), frameon=False,
               bbox_to_anchor=(0.5, -0.005))


def _label_panel(ax, top: bool, bottom: bool, left: bool, family: str, ylabel: str) -> None:
    """Titles on the top row, x labels on the bottom row, y labels on the left column."""
    if top:
        ax.set_title(family)
    if bottom:
        ax.set_xlabel("sequence length S")
    if left:
        ax.set_ylabel(ylabel)


def plot_time_vs_length(df, *, floor=None, families=None, passes=("fwd", "fwd+bwd"),
                        title="", note=""):
    """Log-log time vs ``S``: one column per family, one row per pass, lines per variant.

    ``floor``: optional DataFrame with ``family``, ``pass``, ``seq_len``, ``floor_ms`` (the
    roofline floor), drawn as a black dotted line.
    """
    fams = _families(df, families)
    passes = [p for p in passes if (df["pass"] == p).any()]
    height = 3.0 * len(passes) + (0.9 if len(passes) == 1 else 0.0)
    fig, axes = plt.subplots(len(passes), len(fams), figsize=(3.1 * len(fams), height),
                             squeeze=False, sharex=True)
    lengths = sorted(df["seq_len"].unique())
    for i, ps in enumerate(passes):
        for j, fam in enumerate(fams):
            ax = axes[i, j]
            sub = df[(df["family"] == fam) & (df["pass"] == ps) & (df["status"] == "ok")]
            for var in _variants(sub):
                r = sub[sub["variant"] == var].sort_values("seq_len")
                lab = _style(var)[2]
                ax.plot(r["seq_len"], r["ms"], label=lab, **_line(var))
            if floor is not None:
                f = floor[(floor["family"] == fam) & (floor["pass"] == ps)].sort_values("seq_len")
                if len(f):
                    ax.plot(f["seq_len"], f["floor_ms"], label="roofline floor", **_FLOOR_STYLE)
            ax.set_yscale("log")
            _log_length_axis(ax, lengths)
            ax.grid(True, which="major", alpha=0.3)
            _label_panel(ax, i == 0, i == len(passes) - 1, j == 0, fam, f"{ps}: time (ms)")
    _finish(fig, axes, title, note)
    return fig


def plot_useful_tflops(df, *, families=None, passes=("fwd", "fwd+bwd"), reference=None,
                       target_fraction=None, title="", note=""):
    """Useful TFLOP/s vs ``S`` per family (columns) and pass (rows), lines per variant.

    ``reference``: DataFrame with ``pass``, ``seq_len``, ``tflops`` (dense SDPA's rate), drawn
    dashed in every panel; ``target_fraction`` adds that fraction of it, dotted.
    """
    fams = _families(df, families)
    passes = [p for p in passes if (df["pass"] == p).any()]
    fig, axes = plt.subplots(len(passes), len(fams), figsize=(3.1 * len(fams), 3.0 * len(passes)),
                             squeeze=False, sharex=True, sharey="row")
    lengths = sorted(df["seq_len"].unique())
    for i, ps in enumerate(passes):
        for j, fam in enumerate(fams):
            ax = axes[i, j]
            sub = df[(df["family"] == fam) & (df["pass"] == ps) & (df["status"] == "ok")]
            if reference is not None:
                ref = reference[reference["pass"] == ps].sort_values("seq_len")
                ax.plot(ref["seq_len"], ref["tflops"], color="black", ls="--", lw=1.2,
                        label="dense SDPA rate (dense family)")
                if target_fraction:
                    ax.plot(ref["seq_len"], target_fraction * ref["tflops"], color="black",
                            ls=":", lw=1.0, label=f"{target_fraction:.0%} of dense SDPA rate")
            for var in _variants(sub):
                r = sub[sub["variant"] == var].sort_values("seq_len")
                lab = _style(var)[2]
                ax.plot(r["seq_len"], r["useful_tflops"].astype(float), label=lab, **_line(var))
            _log_length_axis(ax, lengths)
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
            _label_panel(ax, i == 0, i == len(passes) - 1, j == 0, fam, f"{ps}: useful TFLOP/s")
    _finish(fig, axes, title, note)
    return fig


def plot_memory_vs_length(df, *, families=None, pass_="fwd", title="", note=""):
    """Log-log peak memory above the inputs (MiB) vs ``S``, one panel per family."""
    fams = _families(df, families)
    sub_all = df[(df["pass"] == pass_) & (df["status"] == "ok")]
    fig, axes = plt.subplots(1, len(fams), figsize=(3.1 * len(fams), 3.9), squeeze=False,
                             sharey=True)
    lengths = sorted(sub_all["seq_len"].unique())
    for j, fam in enumerate(fams):
        ax = axes[0, j]
        sub = sub_all[sub_all["family"] == fam]
        for var in _variants(sub):
            r = sub[sub["variant"] == var].sort_values("seq_len")
            lab = _style(var)[2]
            ax.plot(r["seq_len"], r["peak_mib"], label=lab, **_line(var))
        ax.set_yscale("log")
        _log_length_axis(ax, lengths)
        ax.grid(True, which="major", alpha=0.3)
        ax.set_title(fam)
        ax.set_xlabel("sequence length S")
        if j == 0:
            ax.set_ylabel(f"{pass_}: peak MiB above inputs")
    _finish(fig, axes, title, note)
    return fig


def _finish(fig, axes, title, note, extra_handles=()):
    """Title (with the environment ``note`` on a second, smaller line) on top, legend below
    (``extra_handles``: legend entries drawn on no axis, appended at the end)."""
    nrows = axes.shape[0]
    top = {1: 0.86, 2: 0.9}.get(nrows, 0.92)
    bottom = {1: 0.15, 2: 0.1}.get(nrows, 0.08)
    fig.tight_layout(rect=(0, bottom, 1, top))
    _legend(fig, axes, extra_handles)
    if title:
        fig.suptitle(title, fontsize=12, y=0.995, va="top")
    if note:
        fig.text(0.5, 0.995 - (0.06 if nrows == 1 else 0.04), note, ha="center", va="top",
                 fontsize=8.5, color="0.3")


def _bar_labels(ax, bars, fmt, fontsize=7.5, rotation=0):
    for b in bars:
        h = b.get_height()
        if np.isfinite(h):
            ax.annotate(fmt.format(h), (b.get_x() + b.get_width() / 2, h), xytext=(0, 2),
                        textcoords="offset points", ha="center", va="bottom", fontsize=fontsize,
                        rotation=rotation)


def plot_kernel_options(df, *, configs=None, labels=None, families=None, target_fraction=0.85,
                        title="", note=""):
    """Grouped bars of ``rel`` (useful TFLOP/s over dense SDPA's) per kernel-option ``config``
    (x) and ``family`` (one bar each), with dense SDPA (1.0) and ``target_fraction`` drawn.

    ``df``: columns ``family``, ``config``, ``rel``; rows with ``config == "sdpa"`` (the dense
    reference itself) are left out of the bars. ``labels``: optional ``config -> tick label``.
    """
    rows = df[df["config"] != "sdpa"]
    configs = list(configs) if configs is not None else list(dict.fromkeys(rows["config"]))
    fams = _families(rows, families)
    fig, ax = plt.subplots(figsize=(1.35 * len(configs) * max(1, len(fams)) / 2 + 3.0, 4.4))
    x = np.arange(len(configs))
    width = 0.8 / len(fams)
    for i, fam in enumerate(fams):
        rel = rows[rows["family"] == fam].set_index("config")["rel"].reindex(configs)
        bars = ax.bar(x + (i - (len(fams) - 1) / 2) * width, rel.to_numpy(dtype=float), width,
                      color=FAMILY_COLOR.get(fam, f"C{i}"), label=fam, edgecolor="white")
        _bar_labels(ax, bars, "{:.2f}")
    ax.axhline(1.0, color="black", ls="--", lw=1.2, label="dense SDPA rate")
    if target_fraction:
        ax.axhline(target_fraction, color="black", ls=":", lw=1.2,
                   label=f"target: {target_fraction:.0%} of dense SDPA")
    ax.set_xticks(x)
    ax.set_xticklabels([(labels or {}).get(c, c) for c in configs], fontsize=8.5)
    ax.set_xlabel("FlexAttention kernel options")
    ax.set_ylabel("useful TFLOP/s / dense SDPA's")
    ax.set_ylim(0, 1.12)
    ax.grid(True, axis="y", alpha=0.3)
    _finish(fig, np.array([[ax]]), title, note)
    return fig


def plot_rate_bars(df, *, families=None, variants=None, reference=None, target_fraction=None,
                   title="", note=""):
    """Useful TFLOP/s as grouped bars: one panel per sequence length, one group per family,
    one bar per variant (families a variant does not apply to get no bar).

    ``reference``: mapping ``seq_len -> TFLOP/s`` (dense SDPA's rate), drawn dashed, with
    ``target_fraction`` of it dotted.
    """
    ok = df[df["status"] == "ok"]
    fams = _families(ok, families)
    lengths = sorted(ok["seq_len"].unique())
    vars_ = list(variants) if variants is not None else _variants(ok)[::-1]
    fig, axes = plt.subplots(1, len(lengths), figsize=(1.3 * len(fams) * len(lengths) + 1.5, 4.2),
                             squeeze=False, sharey=True)
    width = 0.8 / len(vars_)
    for j, s in enumerate(lengths):
        ax = axes[0, j]
        sub = ok[ok["seq_len"] == s]
        x = np.arange(len(fams))
        for xf, fam in zip(x, fams):  # the bars of a family centred on it, no gaps
            rate = sub[sub["family"] == fam].set_index("variant")["useful_tflops"]
            present = [v for v in vars_ if v in rate.index]
            for i, var in enumerate(present):
                bars = ax.bar(xf + (i - (len(present) - 1) / 2) * width, float(rate[var]), width,
                              color=_style(var)[0], label=_style(var)[2], edgecolor="white")
                _bar_labels(ax, bars, "{:.0f}", fontsize=7)
        if reference is not None and s in reference:
            ax.axhline(reference[s], color="black", ls="--", lw=1.2,
                       label="dense SDPA rate (same run)")
            if target_fraction:
                ax.axhline(target_fraction * reference[s], color="black", ls=":", lw=1.0,
                           label=f"{target_fraction:.0%} of dense SDPA rate")
        ax.set_xticks(x)
        ax.set_xticklabels(fams)
        ax.set_title(f"S = {_k(s)}")
        ax.grid(True, axis="y", alpha=0.3)
        if j == 0:
            ax.set_ylabel("useful TFLOP/s")
    axes[0, 0].set_ylim(0, axes[0, 0].get_ylim()[1] * 1.06)
    _finish(fig, axes, title, note)
    return fig


def plot_kernel_resources(df, *, title="", note=""):
    """Shared memory per program of each compiled kernel configuration as horizontal bars (KiB),
    one panel per kernel, against the GPU's limit (dashed): green when a program fits, red when
    it cannot launch, hatched when it loads through TMA.

    ``df``: the rows of ``workbench.bench.triton_resource_study`` (``kernel``, ``head_dim``,
    ``space``, ``block_m``, ``block_n``, ``num_warps``, ``num_stages``, ``use_tma``,
    ``shared_bytes``, ``shared_limit``, ``fits``)."""
    kernels = list(dict.fromkeys(df["kernel"]))
    counts = [int((df["kernel"] == k).sum()) for k in kernels]
    fig, axes = plt.subplots(1, len(kernels), figsize=(5.2 * len(kernels), 0.32 * max(counts) + 2),
                             squeeze=False)
    for ax, kernel in zip(axes[0], kernels):
        rows = df[df["kernel"] == kernel].iloc[::-1]  # first row on top
        kib = rows["shared_bytes"].to_numpy(dtype=float) / 1024
        fits = rows["fits"].astype(str) == "True"
        tma = rows["use_tma"].astype(str) == "True"
        y = np.arange(len(rows))
        ax.barh(y, kib, color=np.where(fits, "#4c9a5b", "#c0392b"), edgecolor="white")
        for yi, k, t in zip(y, kib, tma):
            if t:
                ax.barh(yi, k, color="none", edgecolor="black", hatch="///", lw=0)
            ax.annotate(f"{k:.0f}", (k, yi), xytext=(2, 0), textcoords="offset points",
                        va="center", fontsize=7)
        ax.set_yticks(y)
        ax.set_yticklabels([f"d={r.head_dim} {r.block_m}x{r.block_n} w{r.num_warps} "
                            f"s{r.num_stages} ({r.space})" for r in rows.itertuples()],
                           fontsize=7.5)
        limit = float(rows["shared_limit"].iloc[0]) / 1024
        ax.axvline(limit, color="black", ls="--", lw=1.2)
        ax.set_xlim(0, max(limit, float(kib.max())) * 1.15)
        ax.set_title(kernel)
        ax.set_xlabel("shared memory per program (KiB)")
        ax.grid(True, axis="x", alpha=0.3)
    from matplotlib.patches import Patch

    handles = [Patch(color="#4c9a5b", label="fits"), Patch(color="#c0392b", label="cannot launch"),
               Patch(facecolor="white", edgecolor="black", hatch="///", label="TMA loads"),
               plt.Line2D([], [], color="black", ls="--", label="limit per program")]
    _finish(fig, axes, title, note, extra_handles=handles)
    return fig


def plot_longest_sequence(df, *, families=None, capacity_gib=None, title="", note=""):
    """The doubling search of ``workbench.bench.longest_sequence``: peak memory (GiB, inputs
    included) and time of one call against ``S``, one line per family; the first length that
    ran out of memory is marked with a cross at the top of the memory panel, one not run
    because its call would have taken too long (``too_slow``) with a hollow triangle.

    ``capacity_gib``: the card's memory, drawn as a dashed line. A ``useful_tflops`` column,
    if present, labels each point of the time panel.
    """
    fams = _families(df, families)
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.3), squeeze=False)
    mem_ax, time_ax = axes[0]
    lengths = sorted(df["seq_len"].unique())
    oom = df[df["status"] == "oom"]
    top = capacity_gib if capacity_gib else float(df["peak_gib"].max()) * 1.1
    for i, fam in enumerate(fams):
        c = FAMILY_COLOR.get(fam, "tab:brown")
        r = df[(df["family"] == fam) & (df["status"] == "ok")].sort_values("seq_len")
        mem_ax.plot(r["seq_len"], r["peak_gib"], color=c, marker="o", lw=2, label=fam)
        time_ax.plot(r["seq_len"], r["ms"] / 1e3, color=c, marker="o", lw=2, label=fam)
        if "useful_tflops" in r:
            for s, ms, tf in zip(r["seq_len"], r["ms"], r["useful_tflops"]):
                if np.isfinite(tf):
                    time_ax.annotate(f"{tf:.0f} TFLOP/s", (s, ms / 1e3), xytext=(7, -3),
                                     textcoords="offset points", fontsize=7.5, color=c,
                                     va="top")
        shift = 2.0 ** (0.09 * (i - (len(fams) - 1) / 2))  # markers side by side at a length
        o = oom[oom["family"] == fam]
        if len(o):  # crosses side by side, so that families failing at one length stay visible
            x_oom = o["seq_len"].to_numpy() * shift
            mem_ax.plot(x_oom, [top * 1.04] * len(o), color=c, marker="x", ms=9, mew=2.5,
                        ls="none")
            if len(r):  # dotted: the doubling that failed
                mem_ax.plot([r["seq_len"].iloc[-1], x_oom.min()],
                            [r["peak_gib"].iloc[-1], top * 1.04], color=c, ls=":", lw=1.2)
        slow = df[(df["family"] == fam) & (df["status"] == "too_slow")]
        if len(slow):  # not run: its one call was predicted to take too long
            x_slow = slow["seq_len"].to_numpy() * shift
            mem_ax.plot(x_slow, [top * 1.04] * len(slow), color=c, marker=">", ms=8, mew=2,
                        mfc="none", ls="none")
    if capacity_gib:
        mem_ax.axhline(capacity_gib, color="black", ls="--", lw=1.2,
                       label=f"GPU memory ({capacity_gib:g} GiB)")
    mem_ax.plot([], [], color="0.3", marker="x", ms=9, mew=2.5, ls="none",
                label="out of memory")
    if (df["status"] == "too_slow").any():
        mem_ax.plot([], [], color="0.3", marker=">", ms=8, mew=2, mfc="none", ls="none",
                    label="not run: one call too slow")
    ok_lengths = sorted(df.loc[df["status"] == "ok", "seq_len"].unique()) or lengths
    for ax, lens in ((mem_ax, lengths), (time_ax, ok_lengths)):
        _log_length_axis(ax, lens)
        ax.set_xlabel("sequence length S")
        ax.grid(True, which="major", alpha=0.3)
    time_ax.set_xlim(min(ok_lengths) / 1.4, max(ok_lengths) * 2.2)  # room for the labels
    mem_ax.set_ylim(0, top * 1.12)
    mem_ax.set_ylabel("peak GiB (inputs included)")
    mem_ax.set_title("memory")
    time_ax.set_yscale("log")
    t_ok = df.loc[df["status"] == "ok", "ms"].astype(float) / 1e3
    if len(t_ok):  # room below the lowest point for its label
        time_ax.set_ylim(t_ok.min() / 1.8, t_ok.max() * 1.6)
    time_ax.set_ylabel("one forward call (s)")
    time_ax.set_title("time of one call (lengths that fit)")
    _finish(fig, axes, title, note)
    return fig


def peak_over_io(df: pd.DataFrame) -> pd.Series:
    """Peak memory *including* the inputs over the bytes of ``q + k + v + out``, per row.

    ``peak_mib`` is the allocator peak above the inputs (what ``run_bench`` records), so the
    ratio is ``(3 * io + peak_mib) / (4 * io)`` with ``io`` one ``[B, H, S, D]`` tensor in MiB
    (columns ``batch``, ``heads``, ``seq_len``, ``head_dim``, ``dtype``). 1.0 means nothing
    beyond the output.
    """
    io_mib = (df["batch"] * df["heads"] * df["seq_len"] * df["head_dim"]
              * df["dtype"].map(DTYPE_BYTES) / 2**20)
    return (3 * io_mib + df["peak_mib"]) / (4 * io_mib)


def plot_dilated_gather(df: pd.DataFrame, *, floor: pd.DataFrame | None = None,
                        reference: Mapping[int, float] | None = None,
                        earlier: pd.DataFrame | None = None, memory_target: float | None = 1.2,
                        earlier_label: str = "earlier run",
                        backward: pd.DataFrame | None = None,
                        backward_label: str = "forward+backward", title: str = "",
                        note: str = "") -> Figure:
    """One pattern's variants against ``S`` in three panels: log-log time, useful TFLOP/s
    (log y) and peak memory including the inputs over ``q + k + v + out`` (bars).

    ``df``: benchmark rows of one run (``variant``, ``seq_len``, ``status``, ``ms``,
    ``useful_tflops`` and the columns of ``peak_over_io``); only ``status == "ok"`` is drawn.
    ``floor``: ``seq_len``, ``floor_ms`` and ``floor_tflops`` (the useful rate the floor
    allows), drawn dotted black in the time and rate panels. ``reference``: ``seq_len ->``
    dense SDPA's TFLOP/s in the same run, dashed. ``earlier``: rows of an earlier run (same
    columns), whose memory bars are drawn hatched beside this run's, labelled
    ``earlier_label``. ``memory_target``: a dotted line in the memory panel. ``backward``:
    forward+backward rows (``variant``, ``seq_len``, ``status``, ``ms``; lengths of ``df``
    only), drawn in the time panel as hollow markers on thin dashed lines of each variant's
    colour, labelled ``backward_label`` in the legend (keep it short).
    """
    ok = df[df["status"] == "ok"]
    old = None if earlier is None else earlier[earlier["status"] == "ok"]
    fig, axes = plt.subplots(1, 3, figsize=(14.5, 4.4), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1, 1.25]})
    time_ax, rate_ax, mem_ax = axes[0]
    lengths = sorted(ok["seq_len"].unique())
    variants = _variants(ok)
    for var in variants:  # ours last: drawn on top
        r = ok[ok["variant"] == var].sort_values("seq_len")
        lab = _style(var)[2]
        time_ax.plot(r["seq_len"], r["ms"], label=lab, **_line(var))
        rate_ax.plot(r["seq_len"], r["useful_tflops"].astype(float), label=lab, **_line(var))
    bwd = None if backward is None else backward[(backward["status"] == "ok")
                                                 & backward["seq_len"].isin(lengths)]
    if bwd is not None:
        for var in _variants(bwd):
            r = bwd[bwd["variant"] == var].sort_values("seq_len")
            c, m, _ = _style(var)
            time_ax.plot(r["seq_len"], r["ms"], color=c, marker=m, ms=7, mfc="white", mew=1.6,
                         ls="--", lw=1.0, zorder=3, label=f"_{var} {backward_label}")
    if reference is not None:
        ref = sorted((s, float(t)) for s, t in reference.items() if s in set(lengths))
        rate_ax.plot([s for s, _ in ref], [t for _, t in ref], color="black", ls="--", lw=1.2,
                     label="dense SDPA rate (same run)", zorder=2)
    if floor is not None:
        f = floor[floor["seq_len"].isin(lengths)].sort_values("seq_len")
        time_ax.plot(f["seq_len"], f["floor_ms"], label="roofline floor", **_FLOOR_STYLE)
        rate_ax.plot(f["seq_len"], f["floor_tflops"], label="roofline floor", **_FLOOR_STYLE)
    has_bwd = bwd is not None and len(bwd) > 0
    for ax, ylabel, panel in ((time_ax, "time (ms)" if has_bwd else "forward time (ms)",
                               "time (hollow: forward+backward)" if has_bwd else "time"),
                              (rate_ax, "useful TFLOP/s",
                               "useful throughput (floor: the rate it allows)")):
        ax.set_yscale("log")
        _log_length_axis(ax, lengths)
        ax.grid(True, which="major", alpha=0.3)
        ax.set_xlabel("sequence length S")
        ax.set_ylabel(ylabel)
        ax.set_title(panel)

    # memory: one group per S, this run's bar of each variant with the earlier run's beside it
    ratio = ok.assign(x=peak_over_io(ok)).set_index(["variant", "seq_len"])["x"]
    ratio_old = (old.assign(x=peak_over_io(old)).set_index(["variant", "seq_len"])["x"]
                 if old is not None else None)
    bars_per_var = 2 if ratio_old is not None else 1
    width = 0.84 / (len(variants) * bars_per_var)
    heights = []
    bar_order = variants[-1:] + variants[:-1] if "ours" in variants else variants  # ours first
    for xs, s in enumerate(lengths):
        slots = []
        for var in bar_order:
            if (var, s) in ratio.index:
                slots.append((var, float(ratio[(var, s)]), False))
            if ratio_old is not None and (var, s) in ratio_old.index:
                slots.append((var, float(ratio_old[(var, s)]), True))
        for i, (var, h, is_old) in enumerate(slots):  # centred on the group, no gaps
            c = _style(var)[0]
            style = (dict(color="white", edgecolor=c, hatch="////", lw=1.0) if is_old
                     else dict(color=c, edgecolor="white", label=_style(var)[2]))
            bars = mem_ax.bar(xs + (i - (len(slots) - 1) / 2) * width, h, width, **style)
            _bar_labels(mem_ax, bars, "{:.3f}", fontsize=7, rotation=90)
            heights.append(h)
    mem_ax.axhline(1.0, color="0.4", lw=1.0, label="q + k + v + out (nothing extra)")
    if memory_target:
        mem_ax.axhline(memory_target, color="black", ls=":", lw=1.4,
                       label=f"target: {memory_target:g}× q + k + v + out")
        heights.append(memory_target)
    mem_ax.set_xticks(range(len(lengths)))
    mem_ax.set_xticklabels([f"S = {_k(s)}" for s in lengths])
    top = max(heights + [1.0])
    if top > 3:  # one variant far above the rest: a log axis keeps the others readable
        mem_ax.set_yscale("log")
        mem_ax.set_ylim(0.9, top * 1.6)
        mem_ax.yaxis.set_major_locator(FixedLocator([1, 1.2, 1.5, 2, 3, 5, 10, 20, 50, 100]))
        mem_ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        mem_ax.yaxis.set_minor_formatter(NullFormatter())
        mem_ax.set_title("memory (log y axis from 0.9)")
    else:
        mem_ax.set_ylim(0.9, top * 1.1)  # 1.0 is the least possible
        mem_ax.set_title("memory (y axis from 0.9)")
    mem_ax.grid(True, axis="y", alpha=0.3)
    mem_ax.set_ylabel("peak incl. inputs / (q + k + v + out)")
    extra = ()
    if has_bwd:
        extra += (Line2D([], [], color="0.3", marker="o", ms=7, mfc="white", mew=1.6, ls="--",
                         lw=1.0, label=f"hollow: {backward_label}"),)
    if ratio_old is not None and len(ratio_old):
        extra += (Patch(facecolor="white", edgecolor="0.3", hatch="////",
                        label=f"hatched: {earlier_label}"),)
    _finish(fig, axes, title, note, extra)
    return fig
