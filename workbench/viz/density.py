"""Density against sequence length: what a block-sparse kernel computes as problems grow.

Rows are plain dicts (or a pandas DataFrame) with one line per (family, length), such as
those a notebook writes with :func:`workbench.lab.records.write_csv`; the functions here only draw.
Colours default to :data:`workbench.viz.style.FAMILY`. A notebook that draws the same tidy rows
with seaborn formats its axes with :func:`length_axis` and :func:`waste_axis`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
from matplotlib.ticker import NullFormatter

from .style import FAMILY, color_of

__all__ = ["length_axis", "plot_density_vs_length", "plot_waste_vs_length", "waste_axis"]



def _records(rows) -> list[Mapping[str, object]]:
    if hasattr(rows, "to_dict"):  # a pandas DataFrame
        return rows.to_dict("records")
    return list(rows)


def _series(rows: Iterable[Mapping[str, object]], by: str, x: str, y: str):
    """``{group: (xs, ys)}`` in first-seen group order, sorted by ``x``, skipping missing ``y``."""
    groups: dict[object, list[tuple[float, float]]] = {}
    for r in rows:
        val = r.get(y)
        if val is None or val == "" or val != val:  # missing or NaN
            continue
        groups.setdefault(r[by], []).append((float(r[x]), float(val)))
    return {g: tuple(zip(*sorted(pts))) for g, pts in groups.items()}


def _colors(groups, colors: Mapping[object, str] | None) -> dict[object, str]:
    """``colors`` where given, else the family palette (names matched by prefix)."""
    return {g: (colors or {}).get(g) or color_of(str(g), FAMILY) for g in groups}


def length_axis(ax, xs) -> None:
    """Log2 x axis with one tick per sequence length in ``xs`` (``512``, ``1K``, ``64K``)."""
    _log_length_axis(ax, xs)


def waste_axis(ax, top: float, *, label: str = "waste = computed / useful pairs") -> None:
    """Log y axis of a ratio >= 1 whose ticks (``x1``, ``x2``, ``x5``, ``x10``, ...) run past
    ``top``, the largest value drawn, so every point lies below a labelled tick."""
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


def _log_length_axis(ax, xs) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(xs))
    ax.set_xticklabels([f"{int(v) // 1024}K" if v >= 1024 else f"{int(v)}" for v in sorted(xs)])
    ax.minorticks_off()
    ax.set_xlabel("sequence length S (tokens)")
    ax.grid(True, which="major", color="#dddddd", lw=0.6)


def plot_density_vs_length(
    rows,
    *,
    ax=None,
    by: str = "family",
    x: str = "seq_len",
    computed: str = "computed_density",
    useful: str | None = "useful_density",
    colors: Mapping[object, str] | None = None,
    legend: bool = True,
    title: str | None = None,
):
    """Log-log density against length, one colour per ``by`` group; returns the axes.

    Solid lines with markers: ``computed`` (what a block-sparse kernel computes). Dashed lines:
    ``useful`` (what the pattern allows), when given and present in the rows.
    """
    rows = _records(rows)
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4.5))
    comp = _series(rows, by, x, computed)
    use = _series(rows, by, x, useful) if useful else {}
    col = _colors(list(comp) + [g for g in use if g not in comp], colors)
    for g, (xs, ys) in comp.items():
        ax.plot(xs, ys, "-o", color=col[g], lw=1.8, ms=4, label=str(g))
    for g, (xs, ys) in use.items():
        ax.plot(xs, ys, "--", color=col[g], lw=1.2, alpha=0.8)
    ax.set_yscale("log")
    _log_length_axis(ax, {v for xs, _ in comp.values() for v in xs})
    ax.set_ylabel("density (fraction of the S x S pairs)")
    if title is not None:
        ax.set_title(title, fontsize=11)
    if legend:
        handles, labels = ax.get_legend_handles_labels()
        if use:
            handles += [Line2D([], [], color="#444444", ls="-", marker="o", ms=4),
                        Line2D([], [], color="#444444", ls="--")]
            labels += ["computed (active tiles)", "useful (allowed pairs)"]
        ax.legend(handles, labels, fontsize=8, loc="best", framealpha=0.9)
    return ax


def plot_waste_vs_length(
    rows,
    *,
    ax=None,
    by: str = "family",
    x: str = "seq_len",
    waste: str = "waste",
    colors: Mapping[object, str] | None = None,
    legend: bool = False,
    title: str | None = None,
):
    """Computed / useful pairs against length (1 = no wasted work), one line per group."""
    rows = _records(rows)
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 4.5))
    series = _series(rows, by, x, waste)
    col = _colors(list(series), colors)
    for g, (xs, ys) in series.items():
        ax.plot(xs, ys, "-o", color=col[g], lw=1.8, ms=4, label=str(g))
    waste_axis(ax, max([max(ys) for _, ys in series.values()] + [1.0]))
    _log_length_axis(ax, {v for xs, _ in series.values() for v in xs})
    if title is not None:
        ax.set_title(title, fontsize=11)
    if legend:
        ax.legend(fontsize=8, loc="best", framealpha=0.9)
    return ax
