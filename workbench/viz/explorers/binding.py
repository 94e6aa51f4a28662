"""The widget layer: controls bound to an explorer's pure function, one figure redrawn in place.

Nothing here decides what is drawn. :class:`Explorer` reads its controls into a dict, hands it to
the explorer's ``compute`` through :func:`~.core.advance` and, on success, redraws its one figure
(an ipympl canvas) with ``draw(view, figure)``: no new figure, no flicker. A refused value shows
its message above the figure. ipywidgets and ipympl are imported only when an explorer is built.
"""

from __future__ import annotations

import html
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Generic

from matplotlib.figure import Figure

from .core import ExplorerState, ViewT, advance

__all__ = ["Explorer", "figure_canvas", "message_html"]

INSTALL_HINT = "the explorers need ipywidgets and ipympl: pip install 'workbench[notebooks]'"


def _widgets():
    try:
        import ipywidgets
    except ImportError as err:  # pragma: no cover - the notebooks extra installs it
        raise ImportError(INSTALL_HINT) from err
    return ipywidgets


def figure_canvas(figsize: tuple[float, float]) -> tuple[Figure, Any]:
    """A figure drawn on its own ipympl canvas widget, outside pyplot's list of figures.

    The canvas works whatever ``%matplotlib`` backend the notebook uses, and ``plt.show()`` in
    later cells never shows this figure again.
    """
    try:
        from ipympl.backend_nbagg import Canvas, FigureManager
    except ImportError as err:  # pragma: no cover - the notebooks extra installs it
        raise ImportError(INSTALL_HINT) from err
    figure = Figure(figsize=figsize, layout="constrained")
    canvas = Canvas(figure)
    with warnings.catch_warnings():  # ipympl's toolbar passes traitlets an argument it drops
        warnings.simplefilter("ignore", DeprecationWarning)
        FigureManager(canvas, 0)  # gives the canvas its toolbar (zoom, pan, save)
    canvas.header_visible = False
    canvas.footer_visible = False
    canvas.resizable = False
    canvas.toolbar_position = "right"
    return figure, canvas


def message_html(message: str) -> str:
    """The widget-area text for a refused value (empty when there is nothing to say)."""
    if not message:
        return ""
    return ('<div style="color:#9b1c1c;background:#fdecea;padding:4px 8px;border-radius:4px">'
            f"<b>Not drawn:</b> {html.escape(message)} <i>(showing the last good picture)</i>"
            "</div>")


class Explorer(Generic[ViewT]):
    """Controls, a message line, a readout and one figure, bound to ``compute`` and ``draw``.

    Args:
        controls: value widgets by name; their values, by the same names, are what
            ``compute`` receives.
        compute: the explorer's pure function (raises ``ValueError``/``TypeError`` on bad
            values).
        draw: draws a view into the figure (clearing and reusing its axes).
        readout: the HTML readout of a view.
        figsize: size of the one figure, in inches.
        adjust: called with the controls before each update (e.g. to bound a slider by
            another control's value); changes it makes do not trigger extra updates.
        header: widgets shown above the controls (e.g. a Play button), not read as values.
        name: CSS class prefix of the parts (``<name>-readout``, ``<name>-message``,
            ``<name>-figure``, ``<name>-<control>``), for styling and browser tests.
    """

    def __init__(self, *, controls: Mapping[str, Any], compute: Callable[[dict[str, Any]], ViewT],
                 draw: Callable[[ViewT, Figure], None], readout: Callable[[ViewT], str],
                 figsize: tuple[float, float],
                 adjust: Callable[[Mapping[str, Any]], None] | None = None,
                 header: tuple[Any, ...] = (), name: str = "wb-explorer") -> None:
        widgets = _widgets()
        self.controls = dict(controls)
        self.state: ExplorerState[ViewT] = ExplorerState()
        self._compute, self._draw, self._readout, self._adjust = compute, draw, readout, adjust
        self._adjusting = False
        self.figure, self.canvas = figure_canvas(figsize)
        self.message = widgets.HTML()
        self.readout = widgets.HTML()
        for part, widget in (("message", self.message), ("readout", self.readout),
                             ("figure", self.canvas)):
            widget.add_class(f"{name}-{part}")
        for key, control in self.controls.items():
            control.add_class(f"{name}-{key}")
            control.observe(self._on_change, names="value")
        boxes = widgets.GridBox(list(self.controls.values()),
                                layout=widgets.Layout(grid_template_columns="repeat(3, 1fr)"))
        self.widget = widgets.VBox([*header, boxes, self.message, self.readout, self.canvas])
        self.widget.add_class(name)
        self._on_change(None)

    def values(self) -> dict[str, Any]:
        """The controls' current values by name."""
        return {key: control.value for key, control in self.controls.items()}

    def set(self, **values: Any) -> None:
        """Set controls by name (as a user would); the explorer updates once."""
        self._adjusting = True
        try:
            for key, value in values.items():
                self.controls[key].value = value
        finally:
            self._adjusting = False
        self._on_change(None)

    def _on_change(self, _change: Any) -> None:
        if self._adjusting:
            return
        if self._adjust is not None:
            self._adjusting = True
            try:
                self._adjust(self.controls)
            finally:
                self._adjusting = False
        self._update()

    def _update(self) -> None:
        self.state = advance(self.state, self._compute, self.values())
        self.message.value = message_html(self.state.message)
        if self.state.ok and self.state.view is not None:
            self._draw(self.state.view, self.figure)
            self.figure.canvas.draw_idle()
            self.readout.value = self._readout(self.state.view)

    def _repr_mimebundle_(self, **kwargs: Any):
        return self.widget._repr_mimebundle_(**kwargs)
