"""The widget layer: controls bound to an explorer's pure function, one figure (an ipympl
canvas) redrawn in place. ipywidgets and ipympl are imported only when an explorer is built."""

from __future__ import annotations

import html
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Generic

from matplotlib.figure import Figure

from .core import ExplorerState, ViewT, advance

__all__ = ["Explorer", "figure_canvas", "int_slider", "message_html", "panels"]

INSTALL_HINT = "the explorers need ipywidgets and ipympl: pip install 'workbench[notebooks]'"


def widgets():
    """The ipywidgets module, or an ``ImportError`` that says how to install it and ipympl."""
    try:
        import ipympl  # noqa: F401  (the explorers' figure canvas)
        import ipywidgets
    except ImportError as err:  # pragma: no cover - the notebooks extra installs them
        raise ImportError(INSTALL_HINT) from err
    return ipywidgets


def int_slider(value: int, lo: int, hi: int, description: str, **kwargs: Any):
    """An ``IntSlider`` over ``[lo, max(hi, value)]`` that updates when released."""
    return widgets().IntSlider(value=value, min=lo, max=max(hi, value), description=description,
                               continuous_update=False, **kwargs)


def panels(figure: Figure) -> list:
    """The two side-by-side axes of an explorer's figure (made on the first draw), cleared."""
    axes = figure.axes or list(figure.subplots(1, 2))
    for ax in axes:
        ax.clear()
    return axes


def figure_canvas(figsize: tuple[float, float]) -> tuple[Figure, Any]:
    """A figure drawn on its own ipympl canvas widget, outside pyplot's list of figures: it works
    whatever ``%matplotlib`` backend the notebook uses, and ``plt.show()`` never shows it again."""
    widgets()  # or an ImportError that says how to install ipympl
    from ipympl.backend_nbagg import Canvas, FigureManager

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
        controls: value widgets by name; ``compute`` receives their values by the same names
            (and raises ``ValueError``/``TypeError`` on bad ones).
        draw: draws a view into the figure, reusing its axes; ``readout``: a view's HTML line.
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
        ipywidgets = widgets()
        self.controls = dict(controls)
        self.state: ExplorerState[ViewT] = ExplorerState()
        self._compute, self._draw, self._readout, self._adjust = compute, draw, readout, adjust
        self._adjusting = False
        self.figure, self.canvas = figure_canvas(figsize)
        self.message = ipywidgets.HTML()
        self.readout = ipywidgets.HTML()
        for part, widget in (("message", self.message), ("readout", self.readout),
                             ("figure", self.canvas)):
            widget.add_class(f"{name}-{part}")
        for key, control in self.controls.items():
            control.add_class(f"{name}-{key}")
            control.observe(self._on_change, names="value")
        boxes = ipywidgets.GridBox(list(self.controls.values()),
                                   layout=ipywidgets.Layout(grid_template_columns="repeat(3, 1fr)"))
        self.widget = ipywidgets.VBox([*header, boxes, self.message, self.readout, self.canvas])
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
