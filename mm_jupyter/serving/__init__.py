"""Serving a stored model set: bounded request queue, dynamic and multi-model batching, a prediction
cache, metrics, and an HTTP endpoint. The entry point is :func:`mm_jupyter.serve` (``serving.server.serve``)."""
from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = ["BATCHING", "BadInputError", "HTTPEndpoint", "Prediction", "QueueFullError", "Server",
           "ServerClosedError", "UnknownModelError", "serve"]
_LAZY = {
    "serve": "server", "Server": "server", "Prediction": "types", "BATCHING": "server",
    "HTTPEndpoint": "http",
    "BadInputError": "errors", "QueueFullError": "errors", "ServerClosedError": "errors",
    "UnknownModelError": "errors",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:

        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
