"""Interactive explorers for JupyterLab, each a pure function with a thin widget layer.

Every explorer has a pure part, testable without a browser: parameters (a dataclass) in, a
view (the pattern or plan, the arrays its figure shows, the readout numbers) out, and a drawing
function built on the static figures' own functions. The widget layer
(:class:`~.binding.Explorer`, ipywidgets and ipympl) binds controls to them and redraws one
figure in place; a bad value shows a message and keeps the last good picture.

- :func:`pattern_explorer`: a pattern family, token view beside block view, with density,
  FLOPs against dense attention and layout memory.
- :func:`curve_explorer`: Hilbert / Morton / gilbert / raster curves over a grid.
- :func:`ring_explorer`: play or step through the ring schedule of a layout.
"""

from .binding import Explorer
from .core import ExplorerState, advance
from .curve import CurveParams, CurveView, curve_explorer, curve_view, draw_curve_view
from .pattern import PatternParams, PatternView, draw_pattern_view, pattern_explorer, pattern_view
from .ring import RingParams, RingView, draw_ring_view, ring_explorer, ring_view

__all__ = [
    "CurveParams",
    "CurveView",
    "Explorer",
    "ExplorerState",
    "PatternParams",
    "PatternView",
    "RingParams",
    "RingView",
    "advance",
    "curve_explorer",
    "curve_view",
    "draw_curve_view",
    "draw_pattern_view",
    "draw_ring_view",
    "pattern_explorer",
    "pattern_view",
    "ring_explorer",
    "ring_view",
]
