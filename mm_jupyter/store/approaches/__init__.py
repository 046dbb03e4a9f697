"""The four multi-model management approaches and the ``auto`` rule that picks one."""
from __future__ import annotations

from typing import TYPE_CHECKING

from . import baseline, mmlib_base, provenance, update

if TYPE_CHECKING:
    from ..catalog import SetRow

APPROACHES = ("mmlib-base", "baseline", "update", "provenance")
MODULES = {"mmlib-base": mmlib_base, "baseline": baseline, "update": update, "provenance": provenance}



def derived(row: "SetRow") -> bool:
    """True when a version needs its base to be resolved (an update delta or a provenance record)."""
    return row.approach == "provenance" or (row.approach == "update" and "params" not in row.manifest)


__all__ = ["APPROACHES", "MODULES", "baseline", "derived", "mmlib_base", "provenance", "update"]
