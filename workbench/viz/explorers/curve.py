"""Curve explorer: a Hilbert, Morton, gilbert or raster curve over a grid beside its blocks of
consecutive cells, and how compact such a block is in this order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from ...curves import CURVES, grid_decode
from ..curves import plot_curve
from ..style import set_title
from .binding import Explorer, int_slider, panels, widgets
from .core import check_int

__all__ = ["CurveParams", "CurveView", "curve_explorer", "curve_readout_html", "curve_view",
           "draw_curve_view", "plot_curve_blocks"]

MAX_GRID_SIDE = 64
NUMBERS_MAX_CELLS = 256  # cell numbers are written up to this many cells
_BLOCK_COLORS = ListedColormap(
    ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
     "#9c755f", "#bab0ac"])


@dataclass(frozen=True)
class CurveParams:
    """A grid of ``rows x cols`` cells in ``curve`` order, cut into blocks of ``block`` cells."""

    rows: int = 8
    cols: int = 8
    curve: str = "hilbert"
    block: int = 4
    numbers: bool = True


@dataclass(frozen=True)
class CurveView:
    """The curve over the grid and its blocks: ``path``, int64 ``[rows * cols, 2]``, the cells
    in curve order; ``block_ids``, int64 ``[rows, cols]``, each cell's ``curve index // block``;
    ``jumps``, steps to a non-neighbour; ``block_box``, a block's mean bounding box (rows,
    columns), ``raster_block_box`` the same in raster order."""

    params: CurveParams
    path: np.ndarray
    block_ids: np.ndarray
    jumps: int
    longest_step: int
    block_box: tuple[float, float]
    raster_block_box: tuple[float, float]


def _mean_block_box(path: np.ndarray, block: int) -> tuple[float, float]:
    """Mean bounding box (rows, columns) of each run of ``block`` consecutive cells of ``path``."""
    boxes = [path[i : i + block].max(0) - path[i : i + block].min(0) + 1
             for i in range(0, len(path), block)]
    mean = np.mean(boxes, axis=0)
    return float(mean[0]), float(mean[1])


def curve_view(params: CurveParams) -> CurveView:
    """The explorer's pure function: grid and curve to path, blocks and locality numbers."""
    if params.curve not in CURVES:
        raise ValueError(f"curve must be one of {', '.join(CURVES)}, got {params.curve!r}")
    check_int("rows", params.rows, 1, MAX_GRID_SIDE)
    check_int("cols", params.cols, 1, MAX_GRID_SIDE)
    shape = (params.rows, params.cols)
    cells = params.rows * params.cols
    check_int("block", params.block, 1, cells, f"a block holds at most the grid's {cells} cells")
    path = grid_decode(torch.arange(cells), shape, params.curve).numpy()
    block_ids = np.empty(shape, dtype=np.int64)
    block_ids[path[:, 0], path[:, 1]] = np.arange(cells) // params.block
    steps = np.abs(np.diff(path, axis=0)).sum(1)
    raster = grid_decode(torch.arange(cells), shape, "raster").numpy()
    return CurveView(params, path, block_ids, jumps=int((steps > 1).sum()),
                     longest_step=int(steps.max()) if len(steps) else 0,
                     block_box=_mean_block_box(path, params.block),
                     raster_block_box=_mean_block_box(raster, params.block))


def plot_curve_blocks(block_ids: np.ndarray, *, ax, title: str | None = None):
    """Cells coloured by block (consecutive cells in curve order), row 0 at the top."""
    ax.imshow(block_ids % _BLOCK_COLORS.N, cmap=_BLOCK_COLORS, vmin=0, vmax=_BLOCK_COLORS.N - 1,
              interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    set_title(ax, title, f"{int(block_ids.max()) + 1} blocks")
    return ax


def draw_curve_view(view: CurveView, figure: Figure) -> None:
    """The curve beside its blocks, in ``figure`` (its axes are reused)."""
    axes = panels(figure)
    p = view.params
    plot_curve((p.rows, p.cols), p.curve, ax=axes[0],
               numbers=p.numbers and p.rows * p.cols <= NUMBERS_MAX_CELLS)
    plot_curve_blocks(view.block_ids, ax=axes[1],
                      title=f"blocks of {p.block} consecutive cells ({p.curve} order)")


def curve_readout_html(view: CurveView) -> str:
    """The readout line of a view (HTML)."""
    p = view.params
    (br, bc), (rr, rc) = view.block_box, view.raster_block_box
    return (f"<b>{p.rows * p.cols} cells</b>, each visited once · <b>jumps</b> {view.jumps} "
            f"(longest step {view.longest_step} cells) · <b>a block of {p.block} cells</b> spans "
            f"{br:.1f} x {bc:.1f} cells on average (raster order: {rr:.1f} x {rc:.1f})")


def curve_explorer(**params: Any) -> Explorer[CurveView]:
    """The curve explorer widget, started at ``CurveParams(**params)``."""
    p = CurveParams(**params)
    controls = {
        "curve": widgets().ToggleButtons(options=list(CURVES), value=p.curve, description="curve"),
        "rows": int_slider(p.rows, 1, MAX_GRID_SIDE, "rows"),
        "cols": int_slider(p.cols, 1, MAX_GRID_SIDE, "cols"),
        "block": int_slider(p.block, 1, MAX_GRID_SIDE, "block (cells)",
                            style={"description_width": "initial"}),
        "numbers": widgets().Checkbox(value=p.numbers, description="cell numbers"),
    }
    return Explorer(controls=controls, compute=lambda values: curve_view(CurveParams(**values)),
                    draw=draw_curve_view, readout=curve_readout_html, figsize=(8.0, 4.0),
                    name="wb-curve")

