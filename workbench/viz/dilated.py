"""Drawings for LongNet dilated attention: the positions each head keeps, per-head masks, and
one head's pattern before and after the dilation ordering."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import patheffects
from matplotlib.colors import to_rgb

from ..orderings import dilation_gather, dilation_permutation, permuted
from ..patterns import Pattern, check_dilation_pairs, head_groups
from .heatmaps import (
    _head_index,
    block_legend,
    draw_mask,
    head_layout,
    plot_block_layout,
    plot_token_mask,
)
from .style import ORDERING, set_title

__all__ = ["BRANCH_COLORS", "plot_dilation_strips", "plot_head_masks", "plot_natural_vs_ordered"]

BRANCH_COLORS = ["#1f3b73", "#2a9d8f", "#e76f51", "#8e5ea2", "#c9a227", "#6c757d"]


def _smooth(ax) -> None:
    """Average pixels when a mask is drawn smaller than its size, so sparse dots stay visible."""
    for im in ax.images:
        im.set_interpolation("antialiased")
        im.set_interpolation_stage("rgba")


def plot_head_masks(pattern: Pattern, seq_len: int, block_size: int, axes,
                    titles: Sequence[str] | None = None, *, level: str = "token",
                    zoom: int | None = None) -> None:
    """Masks of heads ``0, 1, ...`` in ``axes`` (one per head), small-multiple style.

    Args:
        level: ``"token"`` draws allowed pairs (dark) on the block grid; ``"block"`` draws the
            tile states of the block layout (full, partial, empty: :data:`~.style.TILE`).
        zoom: token level only: draw the top-left ``zoom x zoom`` pairs, one cell per pair, so
            a dilated head's comb of kept pairs stays visible (default: the whole mask, with
            pixels averaged when the panel is smaller than ``seq_len``).
    """
    if level not in ("token", "block"):
        raise ValueError(f"level must be 'token' or 'block', got {level!r}")
    if zoom is not None and not 0 < zoom <= seq_len:
        raise ValueError(f"zoom={zoom} must be in [1, seq_len={seq_len}]")
    layout = pattern.block_structure(seq_len, block_size) if level == "block" else None
    masks = pattern.token_mask(seq_len) if zoom is not None else None
    for j, ax in enumerate(axes):
        title = titles[j] if titles is not None else f"head {j}"
        if level == "block":
            plot_block_layout(layout, head=j, ax=ax, title=title, annotate=False)
        elif zoom is not None:
            draw_mask(ax, masks[_head_index(j, masks.shape[0]), :zoom, :zoom].numpy(),
                      block_size, lw=0.6)
            ax.set_title(title, fontsize=9)
        else:
            plot_token_mask(pattern, seq_len, head=j, block_size=block_size, ax=ax, title=title)
            _smooth(ax)
        ax.set(xticks=[], yticks=[], xlabel="", ylabel="")


def plot_dilation_strips(segment_lengths: Sequence[int], dilation_rates: Sequence[int],
                         num_heads: int, seq_len: int, *, mode: str = "head_groups", ax=None,
                         title: str | None = None):
    """One strip per head (``mode="head_groups"``) or per (head, branch) (``"paper"``): a cell in
    the pair's colour is a position the head keeps for that (segment, dilation) pair, faint bands
    alternate with its segments; row labels give the pair and the head's offset ``j mod r``."""
    check_dilation_pairs(segment_lengths, dilation_rates)
    if mode not in ("head_groups", "paper"):
        raise ValueError(f"mode must be 'head_groups' or 'paper', got {mode!r}")
    pairs = list(zip(segment_lengths, dilation_rates))
    if mode == "head_groups":
        group = head_groups(num_heads, len(pairs))
        rows = [(j, group[j]) for j in range(num_heads)]
    else:
        rows = [(j, i) for j in range(num_heads) for i in range(len(pairs))]
    if ax is None:
        _, ax = plt.subplots(figsize=(10, 0.32 * len(rows) + 1.0))
    img = np.ones((len(rows), seq_len, 3))
    labels = []
    for y, (j, i) in enumerate(rows):
        w, r = pairs[i]
        pos, valid = dilation_gather(seq_len, w, r, [j % r])
        kept = np.zeros((seq_len, 1), dtype=bool)
        kept[pos[valid].numpy()] = True
        shade = np.where(np.arange(seq_len)[:, None] // w % 2 == 0, 0.96, 0.90)
        img[y] = np.where(kept, to_rgb(BRANCH_COLORS[i % len(BRANCH_COLORS)]), shade)
        labels.append(f"head {j}: w={w}, r={r}, s={j % r}")
        ax.vlines(np.arange(w, seq_len, w) - 0.5, y - 0.5, y + 0.5, color="black", lw=1.0,
                  path_effects=[patheffects.withStroke(linewidth=2.6, foreground="white")])
    ax.imshow(img, aspect="auto", interpolation="nearest")
    ax.grid(False)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xlabel("token position")
    step, color, lw = (len(pairs), "black", 0.8) if mode == "paper" else (1, "white", 0.6)
    for y in range(step, len(rows), step):  # between heads
        ax.axhline(y - 0.5, color=color, lw=lw)
    unit = "head" if mode == "head_groups" else "(head, branch)"
    set_title(ax, title, f"kept positions per {unit} ({mode} mode); black ticks = segment "
              "boundaries")
    return ax


def plot_natural_vs_ordered(pattern: Pattern, seq_len: int, block_size: int, head: int,
                            segment: int, dilation: int, offset: int):
    """2 x 2 figure: ``head``'s tokens and tiles in natural order, and after the dilation ordering
    (:func:`~workbench.orderings.dilation_permutation` of ``(segment, dilation, offset)``, which
    must be that head's pair and offset); each column framed in its order's colour. Returns
    ``(fig, natural_layout, ordered_layout)``, both one-head layouts."""
    ordered = permuted(pattern, dilation_permutation(seq_len, segment, dilation, offset))
    cap = f"head {head}: w={segment}, r={dilation}, offset {offset}"
    fig, axes = plt.subplots(2, 2, figsize=(8.6, 8.8))
    layouts = []
    for (top, bottom), pat, order, tokens in (
            (axes[:, 0], pattern, "natural", f"tokens ({cap})"),
            (axes[:, 1], ordered, "dilation", "kept tokens first in each segment")):
        lay = head_layout(pat.block_structure(seq_len, block_size), head)
        layouts.append(lay)
        plot_token_mask(pat, seq_len, head=head, block_size=block_size, ax=top,
                        title=f"{order} order: {tokens}")
        _smooth(top)
        plot_block_layout(lay, ax=bottom, title=f"{order} order: tiles of {block_size}",
                          annotate=False)
        st = lay.stats()
        bottom.text(0.02, -0.2, f"{st.active_blocks} active tiles, {st.full_blocks} full; "
                    f"computed density {st.density:.2%}", transform=bottom.transAxes,
                    fontsize=8, color="#333333")
        for ax in (top, bottom):  # the column framed in its order's colour
            for spine in ax.spines.values():
                spine.set_visible(True)
                spine.set_color(ORDERING[order])
                spine.set_linewidth(2.5)
            ax.title.set_color(ORDERING[order])
    axes[0, 1].set(xlabel="key position (reordered)", ylabel="query position (reordered)")
    block_legend(axes[1, 1])
    mask = pattern.token_mask(seq_len)[_head_index(head, pattern.num_heads)]
    useful = int(mask.sum()) / seq_len**2
    fig.suptitle(f"Same pairs, two token orders (useful density {useful:.2%} for this head)",
                 fontsize=11)
    fig.tight_layout()
    return fig, *layouts

