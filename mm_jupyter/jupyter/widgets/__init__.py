"""Notebook widgets: lineage graph, storage/TTS/TTR comparison, live search progress, live serving.

They import ipywidgets and plotly (this layer's privilege) but never torch at import time.
"""
from .comparison import ComparisonChart
from .lineage import APPROACH_COLOURS, LineageGraph
from .progress import SearchProgress
from .serving import ServingMonitor

__all__ = ["APPROACH_COLOURS", "ComparisonChart", "LineageGraph", "SearchProgress", "ServingMonitor"]
