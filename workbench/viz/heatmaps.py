"""Pattern heatmaps: token level with the block grid drawn over it, and block level.

Every drawing function takes an optional ``ax`` and returns it (figures and explorer panels
alike); colours are the tile states of :mod:`workbench.viz.style`.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from ..layout import BlockLayout
from ..patterns import Pattern
from .style import TILE, TILE_CMAP, TOKEN_CMAP

__all__ = ["BLOCK_COLORS", "block_legend", "figure_legend", "plot_block_layout", "plot_pattern",
           "plot_token_mask"]

ALLOWED, PARTIAL, EMPTY = TILE["allowed"], TILE["partial"], TILE["empty"]
BLOCK_COLORS = TILE_CMAP  # 0 empty, 1 partial, 2 full
_TOKEN_CMAP = TOKEN_CMAP


SEPARATOR_MAX_TILES = 48  # draw thin lines between tiles when a side has at most this many


def _axes(ax):
    if ax is None:
        _, ax = plt.subplots(figsize=(4, 4))
    return ax


def _head_index(head: int, num_heads: int) -> int:
    """Index into a ``[H, ...]`` tensor: head-independent patterns (H = 1) broadcast."""
    if num_heads == 1:
        return 0
    if not 0 <= head < num_heads:
        raise ValueError(f"head={head} is out of range for a {num_heads}-head pattern "
                         f"(heads 0..{num_heads - 1})")
    return head


def _tile_separators(ax, nq: int, nk: int, color: str = "white", lw: float = 0.8) -> None:
    """Thin lines between tiles so that neighbouring tiles of one colour stay countable."""
    for edge in np.arange(1, nq) - 0.5:
        ax.axhline(edge, color=color, lw=lw)
    for edge in np.arange(1, nk) - 0.5:
        ax.axvline(edge, color=color, lw=lw)


def plot_token_mask(pattern: Pattern, seq_len: int, *, head: int = 0, block_size: int | None = None,
                    ax=None, title: str | None = None):
    """Token-level mask of ``pattern`` (rows = queries, columns = keys) for one head.

    With ``block_size`` the block grid is drawn over it. Only for small ``seq_len``.
    """
    ax = _axes(ax)
    mask = pattern.token_mask(seq_len)[_head_index(head, pattern.num_heads)].numpy()
    ax.imshow(mask, cmap=_TOKEN_CMAP, vmin=0, vmax=1, interpolation="nearest")
    ax.grid(False)  # the block grid below is the only grid of a mask
    if block_size:
        for edge in np.arange(block_size, seq_len, block_size) - 0.5:
            ax.axhline(edge, color="#888888", lw=0.5)
            ax.axvline(edge, color="#888888", lw=0.5)
    density = mask.mean()
    ax.set_title(title if title is not None else f"tokens, head {head}: {density:.1%} allowed",
                 fontsize=9)
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
    return ax


def plot_block_layout(layout: BlockLayout, *, head: int = 0, ax=None, title: str | None = None,
                      separators: bool | None = None, annotate: bool = True):
    """Block-level layout of one head: full, partial (needs the token mask) and empty tiles.

    ``separators`` draws thin lines between tiles (default: when a side has at most
    ``SEPARATOR_MAX_TILES`` tiles); ``annotate`` writes the computed density under the axes.
    """
    ax = _axes(ax)
    h = _head_index(head, layout.num_heads)
    grid = layout.active[h].to(int).numpy() + layout.full[h].to(int).numpy()
    ax.imshow(grid, cmap=BLOCK_COLORS, vmin=0, vmax=2, interpolation="nearest")
    ax.grid(False)  # tile separators, not the theme's grid, mark the tiles
    if separators is None:
        separators = max(grid.shape) <= SEPARATOR_MAX_TILES
    if separators:
        _tile_separators(ax, *grid.shape)
    per_head_active = int(layout.active[h].sum())
    frac = per_head_active / grid.size
    ax.set_title(
        title if title is not None
        else f"blocks of {layout.block_size}, head {head}: {frac:.1%} of tiles",
        fontsize=9,
    )
    ax.set_xlabel("key block")
    ax.set_ylabel("query block")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    if annotate:
        st = layout.stats()
        ax.text(0.02, -0.22 if ax.get_xlabel() else -0.1,
                f"computed density {st.density:.1%} (all heads)", transform=ax.transAxes,
                fontsize=7, color="#555555")
    return ax


def block_legend(ax) -> None:
    """Legend for full / partial / empty tiles."""
    ax.legend(
        handles=[Patch(color=ALLOWED, label="full tile"),
                 Patch(color=PARTIAL, label="partial tile"),
                 Patch(facecolor=EMPTY, edgecolor="#bbbbbb", label="skipped tile")],
        loc="upper right", fontsize=7, frameon=True,
    )


def figure_legend(fig, *, ncol: int = 3, fontsize: float = 10, y: float = 0.0):
    """One legend for a whole figure of token and block panels, centred below the axes.

    Leave room for it with ``fig.tight_layout(rect=(0, 0.03, 1, 1))`` (or similar).
    """
    handles = [
        Patch(color=ALLOWED, label="allowed pair / full tile"),
        Patch(color=PARTIAL, label="partial tile (computed, then masked)"),
        Patch(facecolor=EMPTY, edgecolor="#bbbbbb", label="not allowed / skipped tile"),
    ]
    return fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, y), ncol=ncol,
                      fontsize=fontsize, frameon=False)


def plot_pattern(pattern: Pattern, seq_len: int, block_size: int, *, head: int = 0, axes=None):
    """Token view (with block grid) beside block view of one head; returns the figure."""
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    else:
        fig = axes[0].figure
    plot_token_mask(pattern, seq_len, head=head, block_size=block_size, ax=axes[0])
    plot_block_layout(pattern.block_structure(seq_len, block_size), head=head, ax=axes[1])
    block_legend(axes[1])
    fig.suptitle(repr(pattern), fontsize=10)
    return fig
