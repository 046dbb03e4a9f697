"""The four multi-model management approaches and the ``auto`` rule that picks one."""
from __future__ import annotations

from . import baseline, mmlib_base, provenance, update

APPROACHES = ("mmlib-base", "baseline", "update", "provenance")
MODULES = {"mmlib-base": mmlib_base, "baseline": baseline, "update": update, "provenance": provenance}

__all__ = ["APPROACHES", "MODULES", "baseline", "mmlib_base", "provenance", "update"]
