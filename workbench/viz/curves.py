"""Space-filling curves drawn: a curve over a grid, and a visit path over a block layout."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.collections import LineCollection

from ..curves import grid_decode
from ..layout import BlockLayout
from ..orderings import block_visit_order
from .heatmaps import BLOCK_COLORS

__all__ = ["plot_curve", "plot_visit_path"]


def _axes(ax):
    if ax is None:
        _, ax = plt.subplots(figsize=(3.5, 3.5))
    return ax


def _path(ax, xy: np.ndarray, cmap: str = "viridis", lw: float = 1.6) -> None:
    """Polyline through ``xy`` ``[N, 2]`` coloured from start (dark) to end (light)."""
    if len(xy) < 2:
        ax.plot(xy[:, 0], xy[:, 1], "o", color="k", ms=3)
        return
    segs = np.stack([xy[:-1], xy[1:]], axis=1)
    lc = LineCollection(segs, cmap=cmap, linewidths=lw)
    lc.set_array(np.arange(len(segs)))
    ax.add_collection(lc)
    ax.plot(*xy[0], "o", color="#2ca02c", ms=4, zorder=3)
    ax.plot(*xy[-1], "s", color="#d62728", ms=4, zorder=3)


def plot_curve(shape: tuple[int, int], curve: str = "hilbert", *, ax=None, title: str | None = None,
               numbers: bool | None = None):
    """Draw ``curve`` over a 2-D grid (row 0 at the top); jumps on non-power-of-two grids show.

    ``numbers`` writes each cell's curve index (default: when the grid has at most 64 cells).
    """
    ax = _axes(ax)
    h, w = shape
    n = h * w
    rc = grid_decode(torch.arange(n), shape, curve).numpy()
    xy = np.stack([rc[:, 1], rc[:, 0]], axis=1).astype(float)
    _path(ax, xy)
    if numbers is None:
        numbers = n <= 64
    if numbers:
        for i, (x, y) in enumerate(xy):
            ax.text(x + 0.12, y - 0.12, str(i), fontsize=6, color="#555555")
    steps = np.abs(np.diff(rc, axis=0)).sum(1)
    jumps = int((steps > 1).sum())
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title if title is not None else f"{curve}, {h} x {w} ({jumps} jumps)", fontsize=9)
    return ax


def plot_visit_path(layout: BlockLayout, block_order: str | None = "hilbert", *, head: int = 0,
                    ax=None, title: str | None = None):
    """A layout's active tiles with the path a backend walks through them in ``block_order``."""
    ax = _axes(ax)
    h = 0 if layout.num_heads == 1 else head
    grid = layout.active[h].to(int).numpy() + layout.full[h].to(int).numpy()
    ax.imshow(grid, cmap=BLOCK_COLORS, vmin=0, vmax=2, interpolation="nearest", alpha=0.45)
    one = BlockLayout(layout.active[h : h + 1], layout.full[h : h + 1], layout.q_len,
                      layout.k_len, layout.block_size)
    tiles = block_visit_order(one, block_order).numpy()
    xy = np.stack([tiles[:, 2], tiles[:, 1]], axis=1).astype(float)
    _path(ax, xy, lw=1.2)
    ax.set_xlabel("key block")
    ax.set_ylabel("query block")
    name = block_order or "natural"
    ax.set_title(title if title is not None else f"visit order: {name}", fontsize=9)
    return ax
