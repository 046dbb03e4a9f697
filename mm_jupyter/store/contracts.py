"""The store's contracts: what an approach, a catalog and an object area must provide.

The store talks to its backends only through these interfaces, so one store can keep its catalog
in SQLite (one folder, embedded) or PostgreSQL (a team), and its objects in a folder or an
S3-compatible bucket; ``conformance.py`` holds the checks of these contracts as base classes a
backend's tests subclass (as zarr-python's ``StoreTests``), and ``tests/test_store_conformance.py``
runs them on every pair.

* ``ObjectArea``: content-addressed, immutable objects (``objects.py`` has the format), verified on
  every read, plus the refs (one small record per acknowledged version). A write is atomic: a
  reader sees a whole object or none.
* ``Catalog``: an index over the manifests in the object area, split by job: ``VersionCatalog``
  (one row per model-set version), ``CandidateCatalog`` (the search's candidate sets) and
  ``SearchCatalog`` (kept search results), with
  typed rows (``basetypes.py``). A version becomes visible in one ``transaction()`` after its
  objects are durable; its version number is taken inside that transaction, so concurrent writers
  get numbers without gaps. ``save_lock`` is held shared by every save and exclusively by gc and
  rebuilds.
* ``Reader``: a verified view of one object.

``approaches/common.py`` holds the ``Approach`` protocol and the narrow ``StoreContext`` an
approach sees; ``conformance.py`` is the test kit every backend pair passes.
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Callable, ClassVar, Hashable, Iterator, Protocol

from ..errors import IntegrityError
from . import manifest as manifests
from .basetypes import (
    REF_KINDS,
    CandidateRow,
    CatalogRow,
    FoundCandidates,
    Listed,
    ListingRow,
    Manifest,
    ModelRow,
    PutResult,
    RebuildWriter,
    SearchRow,
    SetColumns,
    SetRow,
)

if TYPE_CHECKING:
    import torch

_MANIFEST_CACHE = 20_000


class Reader(Protocol):
    """A verified view of one stored object (``objects.ObjectReader`` and its subclasses)."""

    oid: str
    size: int

    def verify(self) -> None:
        """Hash every chunk; IntegrityError naming the first that does not match."""

    def tensor(self, offset: int = 0, nbytes: int | None = None) -> "torch.Tensor":
        """Verified zero-copy uint8 tensor over payload bytes."""

    def read(self, offset: int, nbytes: int) -> bytes:
        """Verified payload bytes."""

    def read_all(self) -> bytes:
        """The whole verified payload."""

    def close(self) -> None:
        """Drop this reader's buffer (tensors from it keep what they need)."""


class ObjectArea(ABC):
    """Content-addressed objects and refs. Objects never change once written; reads verify
    every chunk they touch. ``bytes_fetched`` counts bytes read from remote storage."""

    location: str

    def __init__(self) -> None:
        self.bytes_verified = 0
        self.bytes_fetched = 0
        self._counter = threading.Lock()

    def count_bytes(self, verified: int = 0, fetched: int = 0) -> None:
        with self._counter:
            self.bytes_verified += verified
            self.bytes_fetched += fetched

    @abstractmethod
    def prepare(self) -> None:
        """Create what a writer needs (on the first save)."""

    @abstractmethod
    def put(self, data: bytes | bytearray | memoryview) -> PutResult:
        """Store bytes (atomically; durable on return outside ``deferred_durability``); an existing identical
        object is kept."""

    @abstractmethod
    def put_filled(self, nbytes: int, fill: Callable[["torch.Tensor", Callable[[int], None]], None]) -> PutResult:
        """Store ``nbytes`` written by ``fill(dst, progress)`` straight into the upload buffer."""

    def deferred_durability(self) -> AbstractContextManager[None]:
        """Inside (one thread's scope): puts may return before their objects are durable, and
        ``make_durable`` makes them so; a save calls it right before its catalog commit, so one
        journal commit carries all of its objects. Areas whose puts are durable anyway ignore it."""
        return nullcontext()

    def make_durable(self) -> None:
        """Make every object put in this thread's ``deferred_durability`` scope durable."""
        return None  # the default scope defers nothing

    @abstractmethod
    def open(self, oid: str) -> Reader:
        """A verified reader; IntegrityError when the object is missing or damaged."""

    def get(self, oid: str) -> bytes:
        """Whole object payload, verified."""
        reader = self.open(oid)
        try:
            return reader.read_all()
        finally:
            reader.close()

    def stamp(self, oid: str) -> Hashable | None:
        """What changes whenever an object's stored bytes may have (for a file: device, inode, size,
        modification and change times), or None where the area cannot tell (remote storage): a
        caller may then keep bytes it wrote or verified only while the stamp stays the same."""
        return None

    @abstractmethod
    def exists(self, oid: str) -> bool: ...

    @abstractmethod
    def size(self, oid: str) -> int:
        """Stored bytes of an object (header + payload)."""

    @abstractmethod
    def delete(self, oid: str) -> bool:
        """Remove an object (gc, or the manifest of a transaction that did not commit)."""

    @abstractmethod
    def scan(self) -> Iterator[tuple[str, int]]:
        """(object id, bytes its storage takes: what deleting it frees) of every object."""

    @abstractmethod
    def payload_prefix(self, oid: str, n: int) -> bytes:
        """The first ``n`` payload bytes, unverified (to tell manifests apart while scanning)."""

    @abstractmethod
    def clean_temp(self, exclusive: bool = False) -> tuple[int, int]:
        """Remove leftovers of writers that are gone: (items, bytes). ``exclusive``: no save is in
        flight (gc holds the save lock), so anything half-written is a leftover."""

    @abstractmethod
    def write_ref(self, kind: str, name: str, version: int, oid: str) -> None: ...

    @abstractmethod
    def ref_names(self, kind: str) -> set[tuple[str, int]]: ...

    @abstractmethod
    def read_ref(self, kind: str, name: str, version: int) -> str | None: ...

    @abstractmethod
    def remove_ref(self, kind: str, name: str, version: int) -> None: ...

    def any_refs(self) -> int:
        return sum(len(self.ref_names(k)) for k in REF_KINDS)


class Transaction(Protocol):
    """A catalog's open write transaction (its database connection): a token the caller only hands
    back to the catalog that opened it, ``with catalog.transaction() as tx: catalog.next_version(tx, name)``."""


class VersionCatalog(ABC):
    """The index of model-set versions over the manifests in ``objects``: one row per version, made
    visible in one ``transaction()`` after its objects are durable. Recovery never trusts a catalog
    column: ``set_row`` checks each row against its (verified) manifest."""

    location: str
    objects: ObjectArea
    #: why writes are impossible (None: they are possible)
    read_only: str | None = None
    #: how to recreate this catalog, for error messages
    hint: str = ""

    def __init__(self, objects: ObjectArea) -> None:
        self.objects = objects
        self._manifests: OrderedDict[str, Manifest] = OrderedDict()

    # -- manifests (shared by every backend) -----------------------------------------------
    def manifest(self, oid: str) -> Manifest:
        """A verified, parsed manifest object (cached: objects never change)."""
        m = self._manifests.get(oid)
        if m is None:
            m = manifests.decode(self.objects.get(oid), oid)
            self._manifests[oid] = m
            if len(self._manifests) > _MANIFEST_CACHE:
                self._manifests.popitem(last=False)
        return m

    def put_manifest(self, m: Manifest) -> tuple[str, int]:
        """Write a manifest object; (id, stored bytes)."""
        put = self.objects.put(manifests.encode(m))
        self._manifests[put.oid] = m
        return put.oid, put.size

    def drop_manifest(self, oid: str) -> None:
        """Remove the manifest of a transaction that did not commit (it is unique to that save)."""
        self._manifests.pop(oid, None)
        try:
            self.objects.delete(oid)
        except Exception:  # noqa: BLE001 - best effort: gc removes what is left
            pass

    def set_row(self, r: CatalogRow) -> SetRow:
        """A catalog row checked against its manifest (IntegrityError when they disagree)."""
        set_id, name, version, oid, base_id, nbytes, tts, created = r
        if not isinstance(oid, str) or not oid:
            raise IntegrityError(f"catalog row of {name}@{version} names no manifest; {self.hint}")
        m = self.manifest(oid)
        if m["kind"] != "set" or (m["id"], m["name"], m["version"]) != (set_id, name, version) or (
                m["base_id"] != base_id and not (base_id is None and m["chain"] == 0)):
            raise IntegrityError(f"catalog row of {name}@{version} does not match its manifest {oid[:12]}…; "
                                 f"{self.hint}")
        # A self-contained version (chain 0) may list no parent although its manifest names one: a
        # rebuild whose parent manifest was lost restores it without that lineage edge.
        return SetRow(set_id, name, version, m["approach"], m["requested"], base_id, m["chain"], m["n_models"],
                      m["set"], nbytes, tts, created, oid, m["base"] if base_id is not None else None,
                      m["why"] if isinstance(m.get("why"), str) else None)

    # -- writes ------------------------------------------------------------------------------
    @abstractmethod
    def transaction(self) -> AbstractContextManager[Transaction]:
        """A write transaction; writers are serialised, so numbers taken inside are gapless."""

    @abstractmethod
    def next_id(self, tx: Transaction, table: str = "sets") -> int: ...

    @abstractmethod
    def next_version(self, tx: Transaction, name: str) -> int: ...

    @abstractmethod
    def insert_set(self, tx: Transaction, m: Manifest, oid: str, size: int) -> None:
        """Insert (or, for a pending mmlib-base row, complete) the row of manifest ``m``."""

    @abstractmethod
    def insert_pending(self, tx: Transaction, name: str, approach: str, n_models: int) -> int:
        """An invisible row (version NULL) for a save that commits model by model."""

    @abstractmethod
    def add_artifacts(self, tx: Transaction, set_id: int, rows: list[Listed]) -> None: ...

    @abstractmethod
    def add_model(self, tx: Transaction, set_id: int, idx: int, name: str, params: str, architecture: str,
                  environment: str) -> None:
        """One per-model row (mmlib-base keeps one document per model, as MMlib does)."""

    @abstractmethod
    def delete_pending(self, tx: Transaction) -> int:
        """Remove rows of saves that never became visible (gc, under the exclusive lock)."""

    @abstractmethod
    def save_lock(self, exclusive: bool, wait_s: float, why: str) -> AbstractContextManager[None]:
        """Shared while saving; exclusive for gc and rebuilds (bounded wait, StoreError)."""

    @abstractmethod
    def check_writable(self, action: str) -> None:
        """StoreError ending in ``action`` ("cannot save set 'x'") when the store is read-only."""

    def checkpoint(self) -> None:  # noqa: B027 - optional hook: most databases have nothing to do
        """Make committed data independent of logs a reader might lack (SQLite's WAL)."""

    def compact(self) -> None:  # noqa: B027 - optional hook
        """Give back space after gc (SQLite: truncate the WAL)."""

    @abstractmethod
    def close(self) -> None: ...

    # -- reads -------------------------------------------------------------------------------
    @abstractmethod
    def get(self, set_id: int) -> SetRow: ...

    @abstractmethod
    def find(self, name: str, version: int | None) -> SetRow | None:
        """A visible version (the latest when ``version`` is None)."""

    @abstractmethod
    def versions(self, name: str) -> list[SetRow]: ...

    @abstractmethod
    def raw_rows(self) -> list[CatalogRow]:
        """Every visible version's catalog columns, unchecked (``set_row`` checks one)."""

    @abstractmethod
    def listing(self) -> list[ListingRow]:
        """(name, version, approach, models, bytes, created, tts_s) of every visible set."""

    @abstractmethod
    def columns(self, set_id: int) -> SetColumns | None:
        """The columns the row copied from its manifest (None: no such row)."""

    @abstractmethod
    def artifacts(self, set_id: int) -> list[Listed]: ...

    @abstractmethod
    def model_rows(self, set_id: int, idx: int | None = None) -> list[ModelRow]:
        """(idx, name, params, architecture, environment) rows of an mmlib-base set."""


class CandidateCatalog(ABC):
    """The search's candidate sets: one row per stored candidate-set version and the objects it
    references (``modelsearch/stored.py``)."""

    @abstractmethod
    def insert_candidates(self, name: str, manifest: Manifest, nbytes: int,
                          objects: list[Listed]) -> tuple[int, int]:
        """Record a candidate set whose objects are durable; (id, version)."""

    @abstractmethod
    def raw_candidates(self) -> list[CandidateRow]:
        """(id, name, version, manifest, bytes, created) of every candidate set."""

    @abstractmethod
    def candidate_objects(self, cset_id: int) -> list[Listed]: ...

    @abstractmethod
    def find_candidates(self, name: str, version: int | None = None) -> FoundCandidates | None:
        """(id, version, manifest record) of a candidate set, the latest version by default."""


class SearchCatalog(ABC):
    """Kept search results (``result.save(store, dataset=...)``): one row per saved search. Its
    table is created by the first save, so a store written before it reads as "no searches"."""

    @abstractmethod
    def insert_search(self, dataset: str, approach: str, winner: str, record: str) -> SearchRow:
        """Keep one search (``record``: its JSON, ``searchlog.py``) in its own transaction; its row."""

    @abstractmethod
    def raw_searches(self) -> list[SearchRow]:
        """Every kept search, oldest first, unchecked (empty when the table does not exist yet)."""


class Catalog(VersionCatalog, CandidateCatalog, SearchCatalog):
    """A store's whole catalog: its versions and its candidate sets, rebuilt together from the
    manifests in the object area, and the kept searches (rows only: a rebuild carries them over
    from the old catalog where it can still be read)."""

    #: the catalog kind's name in messages and benchmarks ("sqlite", "postgresql")
    KIND: ClassVar[str]

    def lost_versions(self) -> list[str]:
        """Versions that have a ref (were acknowledged) but no catalog row: the catalog lost them.

        Refs are listed *before* the catalog is read: a ref is written after its row committed,
        so any ref seen is already in the catalog snapshot read next."""
        want = {k: self.objects.ref_names(k) for k in REF_KINDS}
        have_sets, have_cands = self.visible_versions()
        lost = [f"{n}@{v}" for n, v in sorted(want["sets"] - have_sets)]
        lost += [f"candidates {n}@{v}" for n, v in sorted(want["candidates"] - have_cands)]
        return lost

    @abstractmethod
    def all_objects(self) -> list[str]:
        """Every object referenced by a visible set or a candidate set, manifests included."""

    @abstractmethod
    def visible_versions(self) -> tuple[set[tuple[str, int]], set[tuple[str, int]]]:
        """(name, version) of every visible set and of every candidate set."""

    # -- rebuilding ---------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def rebuilding(cls, location: str, objects: ObjectArea, wait_s: float
                   ) -> AbstractContextManager[RebuildWriter]:
        """Hold the store exclusively; yields ``write(sets, candidate_sets, set_objects)``, which
        replaces the whole catalog with rows for those manifests at once."""
