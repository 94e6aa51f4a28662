"""Axes of density-against-length figures: a notebook draws its tidy rows with seaborn and
formats the axes with :func:`length_axis` and :func:`waste_axis`."""

from __future__ import annotations

from matplotlib.ticker import NullFormatter

__all__ = ["length_axis", "waste_axis"]


def length_axis(ax, xs) -> None:
    """Log2 x axis with one tick per sequence length in ``xs`` (``512``, ``1K``, ``64K``)."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(xs))
    ax.set_xticklabels([f"{int(v) // 1024}K" if v >= 1024 else f"{int(v)}" for v in sorted(xs)])
    ax.minorticks_off()
    ax.set_xlabel("sequence length S (tokens)")
    ax.grid(True, which="major", color="#dddddd", lw=0.6)


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
