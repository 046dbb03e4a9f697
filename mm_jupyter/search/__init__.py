"""Alsatian model search: blocks, task tree, DFS+ planner, cached execution, successive halving,
proxies, and the ``base``/``shift`` baselines.

``mm_jupyter.search`` is both this package and the function ``mm.search(...)``: importing a
submodule binds the package to the attribute ``mm_jupyter.search``, so the package module itself
is made callable and delegates to ``api.search``.
"""
from __future__ import annotations

import sys
import types
from typing import Any


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from .api import search

        return search(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["APPROACHES", "Blocks", "RayExecutor", "SearchResult", "add_candidates", "block_id", "load_candidates",
           "search", "split_model"]
_LAZY = {
    "search": "api", "SearchResult": "api", "APPROACHES": "api",
    "Blocks": "blocks", "split_model": "blocks", "block_id": "hashing",
    "add_candidates": "stored", "load_candidates": "stored", "RayExecutor": "distributed",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
