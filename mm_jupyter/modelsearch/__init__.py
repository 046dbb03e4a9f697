"""Alsatian model search: blocks, task tree, DFS+ planner, cached execution, successive halving,
proxies, and the ``base``/``shift`` baselines. The entry point is :func:`mm_jupyter.search`
(``modelsearch.api.search``)."""
from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = ["APPROACHES", "Blocks", "RayExecutor", "SearchResult", "add_candidates", "block_id", "load_candidates",
           "search", "split_model"]
_LAZY = {
    "search": "api", "SearchResult": "api", "APPROACHES": "api",
    "Blocks": "blocks", "split_model": "splitting", "block_id": "hashing",
    "add_candidates": "stored", "load_candidates": "stored", "RayExecutor": "distributed",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:

        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
