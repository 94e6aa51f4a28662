"""Interactive explorers for JupyterLab, each a pure function with a thin widget layer.

Each explorer is a pure ``compute(params) -> view`` (a parameter dataclass in; the pattern or
plan, the arrays its figure shows and the readout out), testable without a browser, and a
drawing function built on the static figures' own. :class:`~.binding.Explorer` binds widgets to
them and redraws one figure in place; a bad value shows a message and keeps the last good
picture. :func:`pattern_explorer`, :func:`curve_explorer` and :func:`ring_explorer` build them.
"""

from .binding import Explorer
from .core import ExplorerState, advance
from .curve import CurveParams, CurveView, curve_explorer, curve_view, draw_curve_view
from .pattern import PatternParams, PatternView, draw_pattern_view, pattern_explorer, pattern_view
from .ring import RingParams, RingView, draw_ring_view, ring_explorer, ring_view

__all__ = ["CurveParams", "CurveView", "Explorer", "ExplorerState", "PatternParams", "PatternView",
           "RingParams", "RingView", "advance", "curve_explorer", "curve_view", "draw_curve_view",
           "draw_pattern_view", "draw_ring_view", "pattern_explorer", "pattern_view",
           "ring_explorer", "ring_view"]
