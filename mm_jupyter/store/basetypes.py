"""The store's plain types: rows and results every layer of the package passes around.

A leaf module (it imports nothing from the store), so that the contracts, the backends, the
approaches and the ``Store`` can all name these types without importing one another.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

#: kinds of refs (one per kind of catalog entry): model-set versions and candidate sets
REF_KINDS = ("sets", "candidates")

#: (role, object id, bytes) of one object a version references
Listed = tuple[str, str, int]
#: a rebuilt catalog's content: manifest id -> (manifest, its size), for sets and candidate sets
Manifests = dict[str, tuple[dict[str, Any], int]]
#: (idx, name, params, architecture, environment) of one model of an mmlib-base version
ModelRow = tuple[int, str, str, str, str]
#: what a rebuild writes for each set manifest (by id) beyond its row: the objects it references
#: and its per-model rows (the approach that stored it knows them; the catalog does not)
SetObjects = dict[str, tuple[list[Listed], list[ModelRow]]]
#: ``write(sets, candidate_sets, set_objects)``: replace a catalog's rows at once
RebuildWriter = Callable[[Manifests, Manifests, SetObjects], None]


@dataclass(frozen=True)
class PutResult:
    """Outcome of writing one object: its id, its size on disk and whether it was new."""

    oid: str
    size: int
    written: bool


@dataclass(frozen=True)
class SetRow:
    """One stored set version: identity from the catalog, everything else from its manifest."""

    id: int
    name: str
    version: int
    approach: str
    requested: str
    base_id: int | None
    chain: int
    n_models: int
    manifest: dict[str, Any]
    bytes: int
    tts_s: float
    created: str
    manifest_oid: str = ""
    base_oid: str | None = None
    #: why ``auto`` (or a chain bound) chose the approach, as recorded at save time (None: as asked)
    why: str | None = None


__all__ = ["REF_KINDS", "Listed", "Manifests", "ModelRow", "PutResult", "RebuildWriter", "SetObjects", "SetRow"]
