"""Plots of benchmark rows (``workbench.bench``) against sequence length: time, throughput, memory.

Every function takes a tidy ``pandas.DataFrame`` with the columns that ``run_bench`` writes
(``family``, ``variant``, ``pass``, ``seq_len``, ``ms``, ``peak_mib``, ``useful_tflops``, ...)
and returns the figure; saving is left to ``workbench.viz.save_figure``.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

__all__ = [
    "VARIANT_STYLE",
    "environment_note",
    "plot_memory_vs_length",
    "plot_time_vs_length",
    "plot_useful_tflops",
]

#: colour, marker and label of each benchmark variant (the same in every figure).
VARIANT_STYLE = {
    "ours": ("tab:blue", "o", "ours"),
    "flex_natural": ("tab:orange", "s", "FlexAttention, natural order"),
    "blockwise": ("tab:green", "^", "blockwise (pure PyTorch)"),
    "sdpa_dense": ("tab:gray", "D", "dense SDPA (no sparsity)"),
    "sdpa_masked": ("tab:purple", "v", "SDPA + dense bool mask"),
}
_FLOOR_STYLE = dict(color="black", ls=":", lw=1.6, marker="_", ms=10)


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


def _finish(fig, axes, title, note):
    """Title (with the environment ``note`` on a second, smaller line) on top, legend below."""
    nrows = axes.shape[0]
    top = {1: 0.86, 2: 0.9}.get(nrows, 0.92)
    bottom = {1: 0.15, 2: 0.1}.get(nrows, 0.08)
    fig.tight_layout(rect=(0, bottom, 1, top))
    _legend(fig, axes)
    if title:
        fig.suptitle(title, fontsize=12, y=0.995, va="top")
    if note:
        fig.text(0.5, 0.995 - (0.06 if nrows == 1 else 0.04), note, ha="center", va="top",
                 fontsize=8.5, color="0.3")
