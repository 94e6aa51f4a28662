"""Visualizers: patterns at token and block level, per head, with one save function."""

from . import style
from .curves import plot_curve, plot_visit_path
from .dilated import plot_dilation_strips, plot_head_masks, plot_natural_vs_ordered
from .explorers import curve_explorer, pattern_explorer, ring_explorer
from .heatmaps import (
    block_legend,
    figure_legend,
    head_layout,
    plot_block_layout,
    plot_pattern,
    plot_token_mask,
)
from .ring import plot_distributed_layout, plot_ring_schedule, plot_ring_step
from .save import figures_dir, save_figure

__all__ = ["block_legend", "curve_explorer", "figure_legend", "figures_dir", "head_layout",
           "pattern_explorer", "plot_curve", "plot_block_layout", "plot_distributed_layout",
           "plot_dilation_strips", "plot_head_masks", "plot_natural_vs_ordered", "plot_pattern",
           "plot_ring_schedule", "plot_ring_step", "plot_token_mask", "plot_visit_path",
           "ring_explorer", "save_figure", "style"]
