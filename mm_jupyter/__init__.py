"""mm_jupyter: manage and search sets of deep-learning models from Jupyter.

``import mm_jupyter`` is light: the store, search and torch load on first use of a name below
(``mm.search`` is ``modelsearch.api.search`` and ``mm.serve`` is ``serving.server.serve``: plain functions,
so ``help(mm.search)``, ``mm.search?`` and Shift-Tab show their parameters).
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

from .errors import (
    ArchitectureError,
    CourseError,
    IntegrityError,
    MMError,
    RecoveryError,
    RefError,
    SearchError,
    ServeError,
    StoreError,
    TrustError,
)

__version__ = "0.1.0"

_LAZY = {
    "Store": "mm_jupyter.store",
    "ModelSet": "mm_jupyter.store",
    "SetRef": "mm_jupyter.store",
    "Lineage": "mm_jupyter.store",
    "Architecture": "mm_jupyter.store",
    "architecture": "mm_jupyter.store",
    "trusted": "mm_jupyter.store",
    "allow_functions": "mm_jupyter.store",
    "allow_modules": "mm_jupyter.store",
    "Provenance": "mm_jupyter.store",
    "DatasetRef": "mm_jupyter.store",
    "search": "mm_jupyter.modelsearch.api",
    "SearchResult": "mm_jupyter.modelsearch.api",
    "add_candidates": "mm_jupyter.modelsearch.stored",
    "load_candidates": "mm_jupyter.modelsearch.stored",
    "RayExecutor": "mm_jupyter.modelsearch.distributed",
    "serve": "mm_jupyter.serving.server",
}

__all__ = [
    "ArchitectureError", "CourseError", "IntegrityError", "MMError", "RecoveryError", "RefError", "SearchError",
    "ServeError", "StoreError", "TrustError", "__version__", *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mm_jupyter' has no attribute {name!r}")


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext mm_jupyter``: register ``%modelset``/``%%modelset`` and ``%modelsearch``.

    Torch is not imported here; a magic imports what it needs when it runs.
    """
    from .jupyter.magics import register

    register(ipython)


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    """Where JupyterLab finds the prebuilt frontend extension."""
    return [{"src": "labextension", "dest": "mm-jupyter"}]


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    """The server side of the JupyterLab extension (the store browser's REST endpoints)."""
    return [{"module": "mm_jupyter.jupyter.server"}]


def __dir__() -> list[str]:
    return sorted(__all__)
