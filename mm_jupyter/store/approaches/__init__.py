"""The multi-model management approaches: ONE registry, the only place their names are listed.

Each module implements the ``contracts.Approach`` protocol; the store, maintenance, lineage and the
magics look approaches up here instead of comparing names.
"""
from __future__ import annotations

from typing import Any

from ...errors import IntegrityError
from ..basetypes import Listed, SetRow
from ..contracts import ObjectArea
from . import baseline, mmlib_base, provenance, update
from .common import Approach

REGISTRY: dict[str, Approach] = {a.NAME: a for a in (mmlib_base, baseline, update, provenance)}
APPROACHES = tuple(REGISTRY)
#: approaches that store a version relative to a base (their chains are bounded by max_chain)
DELTA = (update.NAME, provenance.NAME)


def get(name: str) -> Approach:
    """The approach that stored a version; IntegrityError for a name no approach has."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise IntegrityError(f"unknown approach {name!r} recorded in the store") from None


def derived(row: SetRow) -> bool:
    """True when a version needs its base to be resolved (an update delta or a provenance record)."""
    return get(row.approach).derived(row.manifest)


def listed(objects: ObjectArea, manifest: dict[str, Any]) -> list[Listed]:
    """Every (role, object, bytes) a set manifest references."""
    out = [(r, o, int(s)) for r, o, s in manifest["artifacts"]]
    return out + get(manifest["approach"]).listed(objects, manifest["set"])


__all__ = ["APPROACHES", "DELTA", "REGISTRY", "derived", "get", "listed"]
