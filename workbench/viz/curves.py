"""Space-filling curves drawn: a curve over a grid, and a visit path over a block layout, each a
path from pale to its ordering's colour (:data:`.style.ORDERING`), circle to square."""

from __future__ import annotations

import numpy as np
import torch
from matplotlib.collections import LineCollection
from matplotlib.colors import LinearSegmentedColormap, to_rgb

from ..curves import grid_decode
from ..layout import BlockLayout
from ..orderings import block_visit_order
from .heatmaps import head_layout, tile_grid
from .style import ORDERING, TILE_CMAP, color_of, new_axes, set_title

__all__ = ["ordering_cmap", "plot_curve", "plot_visit_path"]


def ordering_cmap(name: str | None) -> LinearSegmentedColormap:
    """A colour map from pale to the colour of ordering ``name`` (darkened), for the steps of a
    path; ``None`` is natural order, ``"gilbert"`` takes Hilbert's colour."""
    name = "natural" if name is None else name
    rgb = np.array(to_rgb(color_of("hilbert" if name == "gilbert" else name, ORDERING)))
    pale_to_dark = [0.82 + 0.18 * rgb, rgb, 0.55 * rgb]
    return LinearSegmentedColormap.from_list(f"ordering_{name}", pale_to_dark)


def _path(ax, xy: np.ndarray, cmap, lw: float = 1.6, marker_size: float = 6.0) -> None:
    """Polyline through ``xy`` ``[N, 2]`` coloured from the first step (pale) to the last
    (dark); the start is a circle, the end a square."""
    if len(xy) < 2:
        ax.plot(xy[:, 0], xy[:, 1], "o", color="black", ms=marker_size)
        return
    segs = np.stack([xy[:-1], xy[1:]], axis=1)
    lc = LineCollection(segs, cmap=cmap, linewidths=lw, capstyle="round", zorder=2)
    lc.set_array(np.arange(len(segs)))
    ax.add_collection(lc)
    ax.plot(*xy[0], "o", mfc="none", mec="black", mew=1.6, ms=marker_size, zorder=4)
    ax.plot(*xy[-1], "s", mfc="none", mec="black", mew=1.6, ms=marker_size, zorder=4)


def plot_curve(shape: tuple[int, int], curve: str = "hilbert", *, ax=None, title: str | None = None,
               numbers: bool | None = None):
    """Draw ``curve`` over a 2-D grid (row 0 at the top; jumps on non-power-of-two grids show);
    ``numbers`` writes each cell's curve index (default: when the grid has at most 64 cells)."""
    ax = new_axes(ax, 3.5)
    h, w = shape
    n = h * w
    rc = grid_decode(torch.arange(n), shape, curve).numpy()
    xy = np.stack([rc[:, 1], rc[:, 0]], axis=1).astype(float)
    _path(ax, xy, ordering_cmap(curve), lw=2.0, marker_size=9)
    if numbers or (numbers is None and n <= 64):
        for i, (x, y) in enumerate(xy):
            ax.text(x + 0.12, y - 0.12, str(i), fontsize=6, color="#555555")
    steps = np.abs(np.diff(rc, axis=0)).sum(1)
    jumps = int((steps > 1).sum())
    ax.set(xlim=(-0.5, w - 0.5), ylim=(h - 0.5, -0.5), aspect="equal", xticks=[], yticks=[])
    ax.grid(False)
    set_title(ax, title, f"{curve}, {h} x {w} ({jumps} jumps)")
    return ax


def plot_visit_path(layout: BlockLayout, block_order: str | None = "hilbert", *, head: int = 0,
                    ax=None, title: str | None = None, numbers: bool | None = None):
    """A layout's active tiles, drawn pale, with the path a backend walks through them in
    ``block_order``; ``numbers`` writes each tile's step (default: up to 64 active tiles)."""
    ax = new_axes(ax, 3.5)
    one = head_layout(layout, head)
    grid = tile_grid(one)
    ax.imshow(grid, cmap=TILE_CMAP, vmin=0, vmax=2, interpolation="nearest", alpha=0.35)
    tiles = block_visit_order(one, block_order).numpy()
    xy = np.stack([tiles[:, 2], tiles[:, 1]], axis=1).astype(float)
    many = len(tiles) > 64
    if numbers is None:
        numbers = not many
    _path(ax, xy, ordering_cmap(block_order), lw=1.2 if many else 2.2,
          marker_size=15 if numbers else (5 if many else 8))
    if numbers:
        for i, (x, y) in enumerate(xy):
            ax.text(x, y, str(i), fontsize=6.5, ha="center", va="center", zorder=5,
                    color="#222222", bbox={"boxstyle": "round,pad=0.12", "fc": "white",
                                           "ec": "none", "alpha": 0.85})
    nq, nk = grid.shape
    step = max(1, int(np.ceil(max(nq, nk) / 16)))
    ax.set(xticks=np.arange(0, nk, step), yticks=np.arange(0, nq, step), xlabel="key block",
           ylabel="query block")
    ax.grid(False)
    set_title(ax, title, f"visit order: {block_order or 'natural'}")
    return ax
