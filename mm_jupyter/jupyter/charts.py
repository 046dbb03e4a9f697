"""The papers' figures (``bench.figures``) as notebook outputs.

``bench`` draws a ``PaperChart`` (a plotly figure and the same picture with matplotlib) but knows nothing
of notebooks; ``chart_output`` gives it the bundle every saved notebook needs (``FigureOutput``: plotly
JSON, a PNG fallback for viewers without plotly, deterministic text).
"""
from __future__ import annotations

from typing import Any

from .widgets._static import FigureOutput


class ChartOutput(FigureOutput):
    """A ``bench.figures.PaperChart`` shown in a notebook."""

    def __init__(self, chart: Any) -> None:
        self.chart = chart
        self.png_size = chart.png_size

    @property
    def figure(self) -> Any:
        return self.chart.figure

    def draw_png(self, fig: Any) -> None:
        self.chart.draw_png(fig)

    def __repr__(self) -> str:
        return repr(self.chart)


def chart_output(chart: Any) -> ChartOutput:
    """``chart`` (a ``PaperChart``) as a notebook output with its static picture."""
    return ChartOutput(chart)
