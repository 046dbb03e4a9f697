"""The store's contracts: what an approach, a catalog and an object area must provide.

The store talks to its backends only through these interfaces, so one store can keep its catalog
in SQLite (one folder, embedded) or PostgreSQL (a team), and its objects in a folder or an
S3-compatible bucket; ``tests/test_store_conformance.py`` runs one suite against every pair, as
zarr-python runs one test class against every implementation of its ``Store`` ABC.

* ``ObjectArea``: content-addressed, immutable objects (``objects.py`` has the format), verified on
  every read, plus the refs (one small record per acknowledged version). A write is atomic: a
  reader sees a whole object or none.
* ``Catalog``: an index over the manifests in the object area, one row per version, plus the search's
  candidate sets. A version becomes visible in one ``transaction()`` after its objects are durable;
  its version number is taken inside that transaction, so concurrent writers get numbers without
  gaps. ``save_lock`` is held shared by every save and exclusively by gc and rebuilds.
* ``Approach``: how one multi-model management approach saves a set and resolves a version.
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Protocol

from ..errors import IntegrityError
from . import manifest as manifests
from .basetypes import REF_KINDS, Listed, PutResult, RebuildWriter, SetRow

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
        """Store bytes (atomically, durable on return); an existing identical object is kept."""

    @abstractmethod
    def put_filled(self, nbytes: int, fill: Callable[["torch.Tensor", Callable[[int], None]], None]) -> PutResult:
        """Store ``nbytes`` written by ``fill(dst, progress)`` straight into the upload buffer."""

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


class Catalog(ABC):
    """An index over the manifests in ``objects``. Recovery never trusts a catalog column:
    ``set_row`` checks each row against its (verified) manifest."""

    location: str
    objects: ObjectArea
    #: why writes are impossible (None: they are possible)
    read_only: str | None = None
    #: how to recreate this catalog, for error messages
    hint: str = ""
    #: the catalog kind's name in messages and benchmarks ("sqlite", "postgresql")
    KIND: ClassVar[str]

    def __init__(self, objects: ObjectArea) -> None:
        self.objects = objects
        self._manifests: OrderedDict[str, dict[str, Any]] = OrderedDict()

    # -- manifests (shared by every backend) -----------------------------------------------
    def manifest(self, oid: str) -> dict[str, Any]:
        """A verified, parsed manifest object (cached: objects never change)."""
        m = self._manifests.get(oid)
        if m is None:
            m = manifests.decode(self.objects.get(oid), oid)
            self._manifests[oid] = m
            if len(self._manifests) > _MANIFEST_CACHE:
                self._manifests.popitem(last=False)
        return m

    def put_manifest(self, m: dict[str, Any]) -> tuple[str, int]:
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

    def set_row(self, r: tuple[Any, ...]) -> SetRow:
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

    def lost_versions(self) -> list[str]:
        """Versions that have a ref (were acknowledged) but no catalog row: the catalog lost them.

        Refs are listed *before* the catalog is read: a ref is written after its row committed,
        so any ref seen is already in the catalog snapshot read next."""
        want = {k: self.objects.ref_names(k) for k in REF_KINDS}
        have_sets, have_cands = self.visible_versions()
        lost = [f"{n}@{v}" for n, v in sorted(want["sets"] - have_sets)]
        lost += [f"candidates {n}@{v}" for n, v in sorted(want["candidates"] - have_cands)]
        return lost

    # -- writes ------------------------------------------------------------------------------
    @abstractmethod
    def transaction(self) -> AbstractContextManager[Any]:
        """A write transaction; writers are serialised, so numbers taken inside are gapless."""

    @abstractmethod
    def next_id(self, tx: Any, table: str = "sets") -> int: ...

    @abstractmethod
    def next_version(self, tx: Any, name: str) -> int: ...

    @abstractmethod
    def insert_set(self, tx: Any, m: dict[str, Any], oid: str, size: int) -> None:
        """Insert (or, for a pending mmlib-base row, complete) the row of manifest ``m``."""

    @abstractmethod
    def insert_pending(self, tx: Any, name: str, approach: str, n_models: int) -> int:
        """An invisible row (version NULL) for a save that commits model by model."""

    @abstractmethod
    def add_artifacts(self, tx: Any, set_id: int, rows: list[Listed]) -> None: ...

    @abstractmethod
    def add_model(self, tx: Any, set_id: int, idx: int, name: str, params: str, architecture: str,
                  environment: str) -> None:
        """One per-model row (mmlib-base keeps one document per model, as MMlib does)."""

    @abstractmethod
    def delete_pending(self, tx: Any) -> int:
        """Remove rows of saves that never became visible (gc, under the exclusive lock)."""

    @abstractmethod
    def insert_candidates(self, name: str, manifest: dict[str, Any], nbytes: int,
                          objects: list[Listed]) -> tuple[int, int]:
        """Record a candidate set whose objects are durable; (id, version)."""

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
    def raw_rows(self) -> list[tuple[Any, ...]]:
        """Every visible version's catalog columns, unchecked (``set_row`` checks one)."""

    @abstractmethod
    def listing(self) -> list[tuple[Any, ...]]:
        """(name, version, approach, models, bytes, created, tts_s) of every visible set."""

    @abstractmethod
    def columns(self, set_id: int) -> tuple[Any, ...]:
        """(approach, requested, chain, n_models, bytes, tts_s, created) as the row stores them."""

    @abstractmethod
    def artifacts(self, set_id: int) -> list[Listed]: ...

    @abstractmethod
    def model_rows(self, set_id: int, idx: int | None = None) -> list[tuple[Any, ...]]:
        """(idx, name, params, architecture, environment) rows of an mmlib-base set."""

    @abstractmethod
    def all_objects(self) -> list[str]:
        """Every object referenced by a visible set or a candidate set, manifests included."""

    @abstractmethod
    def visible_versions(self) -> tuple[set[tuple[str, int]], set[tuple[str, int]]]:
        """(name, version) of every visible set and of every candidate set."""

    @abstractmethod
    def raw_candidates(self) -> list[tuple[Any, ...]]:
        """(id, name, version, manifest, bytes, created) of every candidate set."""

    @abstractmethod
    def candidate_objects(self, cset_id: int) -> list[Listed]: ...

    @abstractmethod
    def find_candidates(self, name: str, version: int | None = None) -> tuple[int, int, dict[str, Any]] | None:
        """(id, version, manifest record) of a candidate set, the latest version by default."""

    # -- rebuilding ---------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def rebuilding(cls, location: str, objects: ObjectArea, wait_s: float
                   ) -> AbstractContextManager[RebuildWriter]:
        """Hold the store exclusively; yields ``write(sets, candidate_sets, set_objects)``, which
        replaces the whole catalog with rows for those manifests at once."""
