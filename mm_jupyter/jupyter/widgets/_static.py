"""Outputs that outlive the kernel: every display carries a picture a saved notebook can show.

A notebook output is a *bundle* of representations; each viewer draws the richest one it knows.
Two shapes share that rule:

* ``FigureOutput`` (lineage graph, comparison chart): the output *is* a plotly figure. Its bundle holds
  the figure as ``application/vnd.plotly.v1+json``, an HTML fallback (``<img>`` of a PNG drawn with
  matplotlib, no browser needed) and deterministic ``text/plain``. JupyterLab and VS Code draw the plotly
  figure interactively, with or without a kernel; JupyterLab's plotly renderer also stores its own PNG
  snapshot of the drawn figure in the output, shown after a reload until the pointer enters it (the PNG
  is deliberately not ``image/png`` here: that renderer would show a PNG it finds *instead* of drawing).
  nbconvert HTML and GitHub, which know no plotly JSON, show the HTML picture. Nothing in the bundle
  refers to kernel state, so a reload or a fresh kernel shows the same figure.
* ``StaticFallback`` (live widgets: search progress, serving): the ipywidgets view *plus* static entries
  (``static_bundle()``: HTML and text, or a figure). ``display_live()`` shows it under a display id and
  ``refresh_static()`` replaces the output's static entries with the widget's current state (call it when
  the live work ends), so a saved notebook keeps the final picture. nbconvert skips a widget view whose
  state is not saved and draws the static entries; the JupyterLab extension drops the view of a widget
  whose model is gone (fresh kernel) so the static entries show instead of "Error displaying widget".
"""
from __future__ import annotations

import base64
import html
import io
from typing import Any, Callable

PLOTLY_MIME = "application/vnd.plotly.v1+json"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
#: Pixels per inch of the PNG fallback; figure sizes are given in pixels like plotly's.
PNG_DPI = 100
#: Colours of the PNG's palette: charts use a few flat colours plus anti-aliasing, and a palette PNG
#: is about a tenth of the RGBA one, which keeps saved notebooks small.
PNG_COLOURS = 64


def figure_json(figure: Any) -> dict[str, Any]:
    """The plotly figure as the plain JSON of its mime type (``config`` as JupyterLab expects it)."""
    import json

    import plotly.io as pio

    return {**json.loads(pio.to_json(figure, validate=False)), "config": {"displaylogo": False}}


def png(draw: Callable[[Any], None], width: int, height: int) -> bytes:
    """Render ``draw(matplotlib_figure)`` to a palette PNG: no pyplot, no global state, no timestamp,
    so the same data give the same bytes (stable diffs of saved notebooks)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    fig = Figure(figsize=(width / PNG_DPI, height / PNG_DPI), dpi=PNG_DPI)
    canvas = FigureCanvasAgg(fig)
    draw(fig)
    canvas.draw()
    image = Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba()).convert("RGB")
    out = io.BytesIO()
    image.quantize(PNG_COLOURS, method=Image.Quantize.MEDIANCUT).save(out, format="png", optimize=True)
    return out.getvalue()


LOG_SUFFIXES = (", log scale", " (log scale)")
#: Pixels added above a figure for its log/linear buttons.
TOGGLE_STRIP = 34


def _title(axis: dict[str, Any]) -> str:
    title = axis.get("title")
    return str(title.get("text") or "") if isinstance(title, dict) else str(title or "")


def add_log_toggle(figure: dict[str, Any]) -> dict[str, Any]:
    """``figure`` (plotly JSON) with "log axes / linear axes" buttons that switch every value axis at
    once: each y axis that is not categorical, and each x axis that starts on a log scale. An axis title
    saying "log scale" loses that note on linear axes. Works without a kernel (plotly ``updatemenus``);
    a figure that has buttons of its own, or no axis to switch, is returned as it is."""
    layout = figure.get("layout", {})
    if layout.get("updatemenus"):
        return figure
    axes = {k: v for k, v in layout.items() if isinstance(v, dict) and (
        (k.startswith("yaxis") and v.get("type") != "category") or (k.startswith("xaxis") and v.get("type") == "log"))}
    if not axes:
        return figure
    scales: dict[str, dict[str, Any]] = {"log": {}, "linear": {}}
    for key, axis in axes.items():
        title = _title(axis)
        plain = next((title[: -len(s)] for s in LOG_SUFFIXES if title.endswith(s)), title)
        for scale in scales:
            scales[scale][f"{key}.type"] = scale
            if plain != title:
                scales[scale][f"{key}.title.text"] = title if scale == "log" else plain
    starts_log = any(axis.get("type") == "log" for axis in axes.values())
    # the buttons get a strip of their own above everything (titles, legends), at the left: the mode bar
    # takes the top right corner on hover. Menus are placed in plot-area units, so the strip's pixels are
    # converted with the figure's height and margins (plotly's defaults where the figure sets none).
    margin = {"t": 100, "b": 80, **layout.get("margin", {})}
    top, height = margin["t"] + TOGGLE_STRIP, layout.get("height", 450) + TOGGLE_STRIP
    plot = max(1, height - top - margin["b"])
    menu = {"type": "buttons", "direction": "right", "x": 0, "xanchor": "left", "y": 1 + (top - 4) / plot,
            "yanchor": "top", "showactive": True, "active": 0 if starts_log else 1, "pad": {"t": 0, "r": 0},
            "buttons": [{"label": f"{scale} axes", "method": "relayout", "args": [scales[scale]]}
                        for scale in ("log", "linear")]}
    return {**figure, "layout": {**layout, "margin": {**margin, "t": top}, "height": height, "updatemenus": [menu]}}


class FigureOutput:
    """A display object whose output is a plotly figure with a PNG and a text fallback.

    Subclasses set ``figure`` (a plotly ``go.Figure``) and implement ``draw_png(fig)`` (matplotlib: the
    same picture without a browser) and ``__repr__`` (deterministic text); ``png_size`` is the static
    picture's size in pixels.
    """

    figure: Any
    png_size: tuple[int, int] = (900, 420)
    #: whether the plotly figure gets "log axes / linear axes" buttons (``add_log_toggle``)
    log_toggle: bool = True

    def draw_png(self, fig: Any) -> None:
        raise NotImplementedError

    def png(self) -> bytes:
        """The static picture (what GitHub and nbconvert show)."""
        return png(self.draw_png, *self.png_size)

    def html(self) -> str:
        """The static picture as HTML: an inline PNG, described by the text's first line."""
        data = base64.b64encode(self.png()).decode("ascii")
        alt = html.escape(repr(self).splitlines()[0], quote=True)
        return f'<img src="data:image/png;base64,{data}" alt="{alt}" style="max-width:100%">'

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        figure = figure_json(self.figure)
        return {PLOTLY_MIME: add_log_toggle(figure) if self.log_toggle else figure, "text/html": self.html(),
                "text/plain": repr(self)}


class StaticFallback:
    """Mixin for an ipywidgets widget: its output also carries ``static_bundle()``.

    Put it before the widget class (``class W(StaticFallback, widgets.VBox)``) and implement
    ``static_bundle`` (e.g. ``{"text/html": ...}``; ``text/plain`` defaults to ``repr(self)``).
    """

    _handle: Any = None

    def static_bundle(self) -> dict[str, Any]:
        raise NotImplementedError

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        live = super()._repr_mimebundle_(**kwargs) or {}  # type: ignore[misc]
        return {**live, "text/plain": repr(self), **self.static_bundle()}

    def display_live(self) -> None:
        """Show the widget under a display id, so ``refresh_static`` can update its saved picture."""
        from IPython.display import display

        self._handle = display(self, display_id=True)

    def refresh_static(self) -> None:
        """Put the current state into the output's static entries (what a saved notebook keeps)."""
        if self._handle is not None:
            self._handle.update(self)
