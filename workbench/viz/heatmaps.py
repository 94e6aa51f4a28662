"""Pattern heatmaps, token level with the block grid drawn over it and block level, in the tile
colours of :mod:`workbench.viz.style`; every drawing function takes an optional ``ax``."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from ..layout import BlockLayout
from ..patterns import Pattern
from .style import TILE, TILE_CMAP, TOKEN_CMAP, grid_lines, new_axes, set_title, tile_separators

__all__ = ["block_legend", "figure_legend", "head_layout", "plot_block_layout",
           "plot_pattern", "plot_token_mask", "tile_grid"]


def _head_index(head: int, num_heads: int) -> int:
    """Index into a ``[H, ...]`` tensor: head-independent patterns (H = 1) broadcast."""
    if num_heads == 1:
        return 0
    if not 0 <= head < num_heads:
        raise ValueError(f"head={head} is out of range for a {num_heads}-head pattern "
                         f"(heads 0..{num_heads - 1})")
    return head


def head_layout(layout: BlockLayout, head: int | None) -> BlockLayout:
    """The one-head :class:`BlockLayout` of ``head`` (its stats are that head's alone); ``None``
    merges all heads: a tile is active if any head's is, full if every head's is."""
    if head is None:
        active, full = layout.active.any(0, keepdim=True), layout.full.all(0, keepdim=True)
    else:
        h = _head_index(head, layout.num_heads)
        active, full = layout.active[h : h + 1], layout.full[h : h + 1]
    return BlockLayout(active, full, layout.q_len, layout.k_len, layout.block_size)


def tile_grid(layout: BlockLayout, head: int = 0) -> np.ndarray:
    """int ``[nq, nk]`` tile states of ``head``: 0 empty, 1 partial, 2 full."""
    h = _head_index(head, layout.num_heads)
    return layout.active[h].to(int).numpy() + layout.full[h].to(int).numpy()


def draw_mask(ax, mask: np.ndarray, block_size: int | None, lw: float = 0.5) -> None:
    """A bool ``[q, k]`` mask, allowed pairs dark, with the block grid drawn over it."""
    ax.imshow(mask, cmap=TOKEN_CMAP, vmin=0, vmax=1, interpolation="nearest")
    ax.grid(False)  # the block grid is the only grid of a mask
    if block_size:
        grid_lines(ax, np.arange(block_size, len(mask), block_size) - 0.5, color="#888888", lw=lw)


def plot_token_mask(pattern: Pattern, seq_len: int, *, head: int = 0, block_size: int | None = None,
                    ax=None, title: str | None = None):
    """Token-level mask of ``pattern`` (rows = queries, columns = keys) for one head, with the
    grid of ``block_size`` blocks drawn over it when given. Only for small ``seq_len``."""
    ax = new_axes(ax)
    mask = pattern.token_mask(seq_len)[_head_index(head, pattern.num_heads)].numpy()
    draw_mask(ax, mask, block_size)
    set_title(ax, title, f"tokens, head {head}: {mask.mean():.1%} allowed")
    ax.set(xlabel="key position", ylabel="query position")
    return ax


def plot_block_layout(layout: BlockLayout, *, head: int = 0, ax=None, title: str | None = None,
                      annotate: bool = True):
    """Block-level layout of one head: full, partial (needs the token mask) and empty tiles;
    ``annotate`` writes the computed density under the axes."""
    ax = new_axes(ax)
    grid = tile_grid(layout, head)
    ax.imshow(grid, cmap=TILE_CMAP, vmin=0, vmax=2, interpolation="nearest")
    ax.grid(False)  # tile separators, not the theme's grid, mark the tiles
    tile_separators(ax, *grid.shape)
    set_title(ax, title, f"blocks of {layout.block_size}, head {head}: "
              f"{(grid > 0).mean():.1%} of tiles")
    ax.set(xlabel="key block", ylabel="query block")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if annotate:
        ax.text(0.02, -0.22, f"computed density {layout.stats().density:.1%} (all heads)",
                transform=ax.transAxes, fontsize=7, color="#555555")
    return ax


def _tile_handles(full: str, partial: str, empty: str) -> list[Patch]:
    """Legend patches of the three tile states, labelled ``full``, ``partial`` and ``empty``."""
    return [Patch(color=TILE["full"], label=full), Patch(color=TILE["partial"], label=partial),
            Patch(facecolor=TILE["empty"], edgecolor="#bbbbbb", label=empty)]


def block_legend(ax) -> None:
    """Legend for full / partial / empty tiles."""
    ax.legend(handles=_tile_handles("full tile", "partial tile", "skipped tile"),
              loc="upper right", fontsize=7, frameon=True)


def figure_legend(fig, *, fontsize: float = 10):
    """One legend for a whole figure of token and block panels, centred below the axes (leave
    room for it, e.g. ``fig.tight_layout(rect=(0, 0.03, 1, 1))``)."""
    handles = _tile_handles("allowed pair / full tile", "partial tile (computed, then masked)",
                            "not allowed / skipped tile")
    return fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.0), ncol=3,
                      fontsize=fontsize, frameon=False)


def plot_pattern(pattern: Pattern, seq_len: int, block_size: int, *, head: int = 0, axes=None):
    """Token view (with block grid) beside block view of one head; returns the figure."""
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(8, 4))
    fig = axes[0].figure
    plot_token_mask(pattern, seq_len, head=head, block_size=block_size, ax=axes[0])
    plot_block_layout(pattern.block_structure(seq_len, block_size), head=head, ax=axes[1])
    block_legend(axes[1])
    fig.suptitle(repr(pattern), fontsize=10)
    return fig
