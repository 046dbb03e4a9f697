"""Serving a stored model set: bounded request queue, dynamic and multi-model batching, a prediction
cache, metrics, and an HTTP endpoint.

``mm_jupyter.serve`` is both this package and the function ``mm.serve(store, "cells@latest", ...)``:
importing a submodule binds the package to the attribute ``mm_jupyter.serve``, so the package module
itself is made callable and delegates to ``server.serve`` (as ``mm_jupyter.search`` does).
"""
from __future__ import annotations

import sys
import types
from typing import Any


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from .server import serve

        return serve(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["BATCHING", "BadInputError", "HTTPEndpoint", "Prediction", "QueueFullError", "Server",
           "ServerClosedError", "UnknownModelError", "serve"]
_LAZY = {
    "serve": "server", "Server": "server", "Prediction": "server", "BATCHING": "server",
    "HTTPEndpoint": "http",
    "BadInputError": "errors", "QueueFullError": "errors", "ServerClosedError": "errors",
    "UnknownModelError": "errors",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
