"""Visualizers: patterns at token and block level, per head, with one save function."""

from .save import figures_dir, save_figure

__all__ = ["figures_dir", "save_figure"]
