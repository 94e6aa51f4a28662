"""Interactive explorers for JupyterLab: each a pure ``compute(params) -> view``, testable
without a browser, a drawing function built on the static figures' own, and widgets bound to
both by :class:`~.binding.Explorer`."""

from .binding import Explorer
from .core import ExplorerState, advance
from .curve import CurveParams, CurveView, curve_explorer, curve_view, draw_curve_view
from .pattern import PatternParams, PatternView, draw_pattern_view, pattern_explorer, pattern_view
from .ring import RingParams, RingView, draw_ring_view, ring_explorer, ring_view

__all__ = ["CurveParams", "CurveView", "Explorer", "ExplorerState", "PatternParams", "PatternView",
           "RingParams", "RingView", "advance", "curve_explorer", "curve_view", "draw_curve_view",
           "draw_pattern_view", "draw_ring_view", "pattern_explorer", "pattern_view",
           "ring_explorer", "ring_view"]
