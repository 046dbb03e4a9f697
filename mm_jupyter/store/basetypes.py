"""The store's plain types: rows and results every layer of the package passes around.

A leaf module (it imports nothing from the store), so that the contracts, the backends, the
approaches and the ``Store`` can all name these types without importing one another.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

#: kinds of refs (one per kind of catalog entry): model-set versions and candidate sets
REF_KINDS = ("sets", "candidates")

#: a decoded manifest or set record: a JSON object whose fields ``manifest.py`` checks on read
Manifest = dict[str, Any]
#: (role, object id, bytes) of one object a version references
Listed = tuple[str, str, int]
#: a rebuilt catalog's content: manifest id -> (manifest, its size), for sets and candidate sets
Manifests = dict[str, tuple[Manifest, int]]
#: (idx, name, params, architecture, environment) of one model of an mmlib-base version
ModelRow = tuple[int, str, str, str, str]
#: what a rebuild writes for each set manifest (by id) beyond its row: the objects it references
#: and its per-model rows (the approach that stored it knows them; the catalog does not)
SetObjects = dict[str, tuple[list[Listed], list[ModelRow]]]


class CatalogRow(NamedTuple):
    """A version's catalog columns, unchecked (``Catalog.set_row`` checks them against its manifest)."""

    id: int
    name: str
    version: int
    manifest: str
    base_id: int | None
    bytes: int
    tts_s: float
    created: str


class ListingRow(NamedTuple):
    """One visible version as ``store.sets()`` lists it."""

    name: str
    version: int
    approach: str
    models: int
    bytes: int
    created: str
    tts_s: float


class SetColumns(NamedTuple):
    """The columns a catalog copies from a version's manifest (``store.verify()`` compares them)."""

    approach: str
    requested: str
    chain: int
    n_models: int
    bytes: int
    tts_s: float
    created: str


class CandidateRow(NamedTuple):
    """A candidate set's catalog columns, unchecked."""

    id: int
    name: str
    version: int
    manifest: str
    bytes: int
    created: str


class SearchRow(NamedTuple):
    """A kept search's catalog columns, unchecked (``searchlog.decode`` checks them and its record)."""

    id: int
    dataset: str
    created: str
    approach: str
    winner: str
    record: str


class FoundCandidates(NamedTuple):
    """A candidate set checked against its manifest: catalog id, version and its record."""

    id: int
    version: int
    record: Manifest


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
    manifest: Manifest
    bytes: int
    tts_s: float
    created: str
    manifest_oid: str = ""
    base_oid: str | None = None
    #: why ``auto`` (or a chain bound) chose the approach, as recorded at save time (None: as asked)
    why: str | None = None


__all__ = ["REF_KINDS", "CandidateRow", "CatalogRow", "FoundCandidates", "Listed", "ListingRow", "Manifest",
           "Manifests", "ModelRow", "PutResult", "RebuildWriter", "SearchRow", "SetColumns", "SetObjects",
           "SetRow"]
