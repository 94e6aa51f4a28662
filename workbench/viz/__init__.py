"""Visualizers: patterns at token and block level, per head, with one save function."""

from .heatmaps import block_legend, plot_block_layout, plot_heads, plot_pattern, plot_token_mask
from .save import figures_dir, save_figure

__all__ = [
    "block_legend",
    "figures_dir",
    "plot_block_layout",
    "plot_heads",
    "plot_pattern",
    "plot_token_mask",
    "save_figure",
]
