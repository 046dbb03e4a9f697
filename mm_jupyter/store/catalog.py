"""The SQLite catalog (WAL mode): an index over the manifests in the object area.

Each version's manifest is a verified object (``manifest.py``); the catalog row holds its id plus
copies of the fields that listing needs. Recovery reads the manifest, never trusts a catalog
column: a row that disagrees with its manifest raises IntegrityError.

A set becomes visible in exactly one transaction, after all of its objects are durable on disk;
its manifest is written inside that transaction (the version number is only known there), so a
crash leaves either the whole set or nothing listed. ``mmlib-base`` saves model by model (as MMlib
does) under a pending set row that only becomes visible when its last model is saved.

Opening never writes: an existing catalog is opened read-write when the file system allows, else
read-only; where even that needs a write SQLite cannot do (a full disk, a read-only mount without
``-wal``/``-shm`` files), it is opened ``immutable`` — exact, because every commit is checkpointed
into the main file and this is only done when the ``-wal`` file is absent or empty.
"""
from __future__ import annotations

import os
import shlex
import sqlite3
import stat
import time
import urllib.parse
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ..errors import IntegrityError, StoreError
from . import manifest as manifests
from . import refs
from .files import OutOfSpace, is_read_only

if TYPE_CHECKING:
    from .objects import ObjectStore

SCHEMA_VERSION = 2
FILE = "catalog.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sets(
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    version INTEGER,                 -- NULL while pending (mmlib-base saves model by model)
    approach TEXT NOT NULL,          -- what was stored
    requested TEXT NOT NULL,         -- what the caller asked for ("auto", or promoted to full)
    base_id INTEGER REFERENCES sets(id),
    chain INTEGER NOT NULL,          -- derived steps down to a self-contained version
    n_models INTEGER NOT NULL,
    manifest TEXT NOT NULL,          -- id of the manifest object ('' while pending)
    bytes INTEGER NOT NULL,          -- bytes this version added: its new objects + its manifest
    tts_s REAL NOT NULL,
    created TEXT NOT NULL,
    UNIQUE(name, version)
);
CREATE INDEX IF NOT EXISTS sets_by_name ON sets(name, version);
CREATE TABLE IF NOT EXISTS artifacts(
    set_id INTEGER NOT NULL REFERENCES sets(id),
    role TEXT NOT NULL,
    object TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY(set_id, role, object)
);
CREATE TABLE IF NOT EXISTS candidate_sets(
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    manifest TEXT NOT NULL,          -- id of the manifest object
    bytes INTEGER NOT NULL,
    created TEXT NOT NULL,
    UNIQUE(name, version)
);
CREATE TABLE IF NOT EXISTS candidate_objects(
    cset_id INTEGER NOT NULL REFERENCES candidate_sets(id),
    role TEXT NOT NULL,
    object TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY(cset_id, role, object)
);
CREATE TABLE IF NOT EXISTS models(
    set_id INTEGER NOT NULL REFERENCES sets(id),
    idx INTEGER NOT NULL,
    name TEXT NOT NULL,
    params TEXT NOT NULL,
    architecture TEXT NOT NULL,
    environment TEXT NOT NULL,
    PRIMARY KEY(set_id, idx)
);
"""

#: SQLite primary result codes (``sqlite3.Error.sqlite_errorcode & 0xff``)
_READONLY, _IOERR, _CORRUPT, _FULL, _CANTOPEN, _NOTADB = 8, 10, 11, 13, 14, 26
_BUSY, _LOCKED = 5, 6
_MANIFEST_CACHE = 20_000


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


_COLUMNS = "id, name, version, manifest, base_id, bytes, tts_s, created"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def rebuild_hint(root: Path) -> str:
    return (f"rebuild it from the objects with mm.Store.rebuild_catalog({str(root)!r}) "
            f"or `python -m mm_jupyter store rebuild {shlex.quote(str(root))}`")


class MissingCatalog(StoreError):
    """The store folder has no catalog file."""


class EmptyCatalog(StoreError):
    """The catalog file holds no tables (0 bytes, or created but never initialised)."""


def _code(e: sqlite3.Error) -> int:
    return (getattr(e, "sqlite_errorcode", None) or 0) & 0xFF


class Catalog:
    """Typed access to the catalog database of one store; every SQLite error becomes an MMError."""

    def __init__(self, root: Path, objects: "ObjectStore", *, create: bool = False) -> None:
        self.root = Path(root)
        self.path = self.root / FILE
        self.objects = objects
        self.read_only: str | None = None  # why writes are impossible, when they are
        self._manifests: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._db: sqlite3.Connection | None = None
        self._ino = 0
        if create:
            self._create()
        else:
            self._open()

    # -- connections ---------------------------------------------------------------------------
    def _uri(self, mode: str) -> str:
        return "file:" + urllib.parse.quote(str(self.path.absolute())) + "?" + mode

    def _connect(self, mode: str) -> sqlite3.Connection:
        db = sqlite3.connect(self._uri(mode), uri=True, timeout=60.0, isolation_level=None,
                             check_same_thread=False)
        db.execute("PRAGMA busy_timeout=60000")
        if mode == "mode=rw":
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
        return db

    def _create(self) -> None:
        """A new catalog (a new store): WAL mode and the schema, in one transaction."""
        try:
            db = sqlite3.connect(self._uri("mode=rwc"), uri=True, timeout=60.0, isolation_level=None,
                                 check_same_thread=False)
            db.execute("PRAGMA busy_timeout=60000")
            self._retry(lambda: db.execute("PRAGMA journal_mode=WAL"))
            db.close()
            self._db = self._connect("mode=rw")
            self._ino = os.stat(self.path).st_ino
            with self.transaction() as tx:
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        tx.execute(stmt)
                tx.execute("INSERT OR IGNORE INTO meta(key, value) VALUES('schema', ?)", (str(SCHEMA_VERSION),))
        except sqlite3.Error as e:
            raise self._translate(e) from None
        self._check_schema()

    def _open(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            raise MissingCatalog(f"catalog {self.path} is missing") from None
        if not stat.S_ISREG(st.st_mode):
            raise StoreError(f"catalog {self.path} is not a regular file")
        writable = not is_read_only(self.root) and os.access(self.path, os.W_OK)
        attempts = (["mode=rw"] if writable else []) + ["mode=ro", "immutable=1"]
        failure: sqlite3.Error | None = None
        for mode in attempts:
            if mode == "immutable=1" and not self._wal_empty():
                break  # the -wal file may hold commits the main file lacks: never read around it
            db = None
            try:
                db = self._connect(mode)
                db.execute("SELECT count(*) FROM sqlite_master").fetchone()
            except sqlite3.Error as e:
                if db is not None:
                    db.close()
                if _code(e) in (_NOTADB, _CORRUPT):
                    raise self._translate(e) from None
                failure = e
                continue
            self._db = db
            self.read_only = None if mode == "mode=rw" else (
                "the file system is read-only" if not writable else f"the catalog could not be opened for writing ({failure})")
            break
        if self._db is None:
            raise StoreError(f"cannot open catalog {self.path}: {failure}")
        self._ino = st.st_ino
        self._check_schema()

    def _wal_empty(self) -> bool:
        try:
            return os.lstat(str(self.path) + "-wal").st_size == 0
        except FileNotFoundError:
            return True

    def _check_schema(self) -> None:
        has_meta = self._q(lambda db: db.execute(
            "SELECT count(*) FROM sqlite_master WHERE type='table' AND name='meta'").fetchone()[0])
        if not has_meta:
            raise EmptyCatalog(f"catalog {self.path} holds no tables")
        found = self._q(lambda db: db.execute("SELECT value FROM meta WHERE key='schema'").fetchone())
        if found is None:
            raise EmptyCatalog(f"catalog {self.path} has no schema record")
        if found[0] != str(SCHEMA_VERSION):
            raise StoreError(f"{self.path} has catalog schema {found[0]}; this version of mm_jupyter reads "
                             f"schema {SCHEMA_VERSION} (stores of schema 1 predate manifest objects: save their "
                             "sets again with the version that wrote them installed)")

    def _fresh(self) -> sqlite3.Connection:
        """The connection, reopened when a rebuild replaced the catalog file under this store."""
        try:
            ino = os.lstat(self.path).st_ino
        except FileNotFoundError:
            raise StoreError(f"catalog {self.path} was deleted while the store was open; "
                             f"{rebuild_hint(self.root)}") from None
        if ino != self._ino:
            old = self._db
            self._db = None
            self._open()
            if old is not None:
                old.close()
        assert self._db is not None
        return self._db

    def _writable(self) -> sqlite3.Connection:
        db = self._fresh()
        if self.read_only is None:
            return db
        if is_read_only(self.root) or not os.access(self.path, os.W_OK):
            raise StoreError(f"store {self.root} is read-only ({self.read_only}); nothing can be saved")
        try:  # e.g. the disk was full when the store opened and has space again
            new = self._connect("mode=rw")
            new.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as e:
            raise self._translate(e) from None
        db.close()
        self._db, self.read_only = new, None
        return new

    # -- errors ----------------------------------------------------------------------------------
    def _translate(self, e: sqlite3.Error) -> StoreError:
        code = _code(e)
        if code == _FULL:
            page = 4096
            return OutOfSpace(self.path, 8 * page, "the catalog")
        if code in (_CORRUPT, _NOTADB):
            return IntegrityError(f"catalog {self.path} is damaged ({e}); {rebuild_hint(self.root)}")
        if code == _READONLY:
            return StoreError(f"store {self.root} is read-only ({e}); nothing can be saved")
        if code in (_BUSY, _LOCKED):
            return StoreError(f"catalog {self.path} stayed locked by another process ({e})")
        if code in (_IOERR, _CANTOPEN):
            return StoreError(f"catalog {self.path}: {e} (full disk, or a damaged or vanished file?)")
        return StoreError(f"catalog {self.path}: {e}")

    def _q(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        try:
            return fn(self._fresh())
        except sqlite3.Error as e:
            raise self._translate(e) from None

    @staticmethod
    def _retry(fn: Any, attempts: int = 50) -> Any:
        for i in range(attempts):
            try:
                return fn()
            except sqlite3.OperationalError as e:
                if _code(e) not in (_BUSY, _LOCKED) or i == attempts - 1:
                    raise
                time.sleep(0.05 * (i + 1))
        return None

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """An IMMEDIATE transaction: writers queue up instead of failing on lock upgrades."""
        try:
            db = self._writable()
            self._retry(lambda: db.execute("BEGIN IMMEDIATE"))
        except sqlite3.Error as e:
            raise self._translate(e) from None
        try:
            yield db
            db.execute("COMMIT")
        except BaseException as e:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            if isinstance(e, sqlite3.Error):
                raise self._translate(e) from None
            raise

    def checkpoint(self) -> None:
        """Copy committed pages into the main file now (best effort): a reader that must open the
        catalog immutable, or a deleted ``-wal`` file, then loses nothing that was acknowledged."""
        try:
            self._fresh().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except (sqlite3.Error, StoreError):
            pass

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    # -- manifests -----------------------------------------------------------------------------
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
        """Write a manifest object; (id, bytes on disk)."""
        put = self.objects.put(manifests.encode(m))
        self._manifests[put.oid] = m
        return put.oid, put.size

    def drop_manifest(self, oid: str) -> None:
        """Remove the manifest of a transaction that did not commit (it is unique to that save)."""
        self._manifests.pop(oid, None)
        try:
            self.objects.path(oid).unlink(missing_ok=True)
        except OSError:
            pass

    def set_row(self, r: tuple) -> SetRow:
        set_id, name, version, oid, base_id, nbytes, tts, created = r
        if not isinstance(oid, str) or not oid:
            raise IntegrityError(f"catalog row of {name}@{version} names no manifest; {rebuild_hint(self.root)}")
        m = self.manifest(oid)
        if m["kind"] != "set" or (m["id"], m["name"], m["version"], m["base_id"]) != (set_id, name, version, base_id):
            raise IntegrityError(f"catalog row of {name}@{version} does not match its manifest {oid[:12]}…; "
                                 f"{rebuild_hint(self.root)}")
        return SetRow(set_id, name, version, m["approach"], m["requested"], base_id, m["chain"], m["n_models"],
                      m["set"], nbytes, tts, created, oid, m["base"])

    # -- writes -----------------------------------------------------------------------------
    @staticmethod
    def next_id(db: sqlite3.Connection, table: str = "sets") -> int:
        (v,) = db.execute(f"SELECT COALESCE(MAX(id), 0) FROM {table}").fetchone()
        return int(v) + 1

    @staticmethod
    def next_version(db: sqlite3.Connection, name: str) -> int:
        (v,) = db.execute("SELECT COALESCE(MAX(version), 0) FROM sets WHERE name=?", (name,)).fetchone()
        return int(v) + 1

    @staticmethod
    def insert_set(db: sqlite3.Connection, m: dict[str, Any], oid: str, size: int) -> None:
        """Insert (or, for a pending mmlib-base row, complete) the row of manifest ``m``."""
        values = (m["name"], m["version"], m["approach"], m["requested"], m["base_id"], m["chain"], m["n_models"],
                  oid, m["bytes"] + size, float(m["tts"]), m["created"], m["id"])
        updated = db.execute(
            "UPDATE sets SET name=?, version=?, approach=?, requested=?, base_id=?, chain=?, n_models=?,"
            " manifest=?, bytes=?, tts_s=?, created=? WHERE id=? AND version IS NULL", values).rowcount
        if not updated:
            db.execute("INSERT INTO sets(name, version, approach, requested, base_id, chain, n_models, manifest,"
                       " bytes, tts_s, created, id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", values)

    @staticmethod
    def insert_pending(db: sqlite3.Connection, name: str, requested: str, n_models: int) -> int:
        set_id = Catalog.next_id(db)
        db.execute("INSERT INTO sets(id, name, version, approach, requested, base_id, chain, n_models, manifest,"
                   " bytes, tts_s, created) VALUES (?,?,NULL,'mmlib-base',?,NULL,0,?,'',0,0,?)",
                   (set_id, name, requested, n_models, now_iso()))
        return set_id

    @staticmethod
    def add_artifacts(db: sqlite3.Connection, set_id: int, rows: list[tuple[str, str, int]]) -> None:
        db.executemany(
            "INSERT OR IGNORE INTO artifacts(set_id, role, object, bytes) VALUES (?,?,?,?)",
            [(set_id, role, oid, size) for role, oid, size in rows],
        )

    # -- reads ------------------------------------------------------------------------------
    def get(self, set_id: int) -> SetRow:
        r = self._q(lambda db: db.execute(
            f"SELECT {_COLUMNS} FROM sets WHERE id=? AND version IS NOT NULL", (set_id,)).fetchone())
        if r is None:
            raise IntegrityError(f"catalog has no set with id {set_id}; {rebuild_hint(self.root)}")
        return self.set_row(r)

    def find(self, name: str, version: int | None) -> SetRow | None:
        if version is None:
            r = self._q(lambda db: db.execute(
                f"SELECT {_COLUMNS} FROM sets WHERE name=? AND version IS NOT NULL ORDER BY version DESC LIMIT 1",
                (name,)).fetchone())
        else:
            r = self._q(lambda db: db.execute(
                f"SELECT {_COLUMNS} FROM sets WHERE name=? AND version=?", (name, version)).fetchone())
        return None if r is None else self.set_row(r)

    def versions(self, name: str) -> list[SetRow]:
        rows = self._q(lambda db: db.execute(
            f"SELECT {_COLUMNS} FROM sets WHERE name=? AND version IS NOT NULL ORDER BY version", (name,)).fetchall())
        return [self.set_row(r) for r in rows]

    def raw_rows(self) -> list[tuple]:
        """Every visible version's catalog columns, unchecked (``set_row`` checks one)."""
        return self._q(lambda db: db.execute(
            f"SELECT {_COLUMNS} FROM sets WHERE version IS NOT NULL ORDER BY id").fetchall())

    def raw_candidates(self) -> list[tuple]:
        """(id, name, version, manifest, bytes, created) of every candidate set."""
        return self._q(lambda db: db.execute(
            "SELECT id, name, version, manifest, bytes, created FROM candidate_sets ORDER BY id").fetchall())

    def candidate_objects(self, cset_id: int) -> list[tuple[str, str, int]]:
        return self._q(lambda db: db.execute(
            "SELECT role, object, bytes FROM candidate_objects WHERE cset_id=? ORDER BY role, object",
            (cset_id,)).fetchall())

    def listing(self) -> list[tuple]:
        """(name, version, approach, models, bytes, created, tts_s) of every visible set."""
        return self._q(lambda db: db.execute(
            "SELECT name, version, approach, n_models, bytes, created, tts_s FROM sets"
            " WHERE version IS NOT NULL ORDER BY name, version").fetchall())

    def columns(self, set_id: int) -> tuple:
        """(approach, requested, chain, n_models, bytes, tts_s, created) as the row stores them."""
        return self._q(lambda db: db.execute(
            "SELECT approach, requested, chain, n_models, bytes, tts_s, created FROM sets WHERE id=?",
            (set_id,)).fetchone())

    def artifacts(self, set_id: int) -> list[tuple[str, str, int]]:
        return self._q(lambda db: db.execute(
            "SELECT role, object, bytes FROM artifacts WHERE set_id=? ORDER BY role, object", (set_id,)).fetchall())

    def model_rows(self, set_id: int, idx: int | None = None) -> list[tuple]:
        """(idx, name, params, architecture, environment) rows of an mmlib-base set."""
        if idx is None:
            return self._q(lambda db: db.execute(
                "SELECT idx, name, params, architecture, environment FROM models WHERE set_id=? ORDER BY idx",
                (set_id,)).fetchall())
        return self._q(lambda db: db.execute(
            "SELECT idx, name, params, architecture, environment FROM models WHERE set_id=? AND idx=?",
            (set_id, idx)).fetchall())

    def all_objects(self) -> list[str]:
        """Every object referenced by a visible set or a candidate set, manifests included."""
        rows = self._q(lambda db: db.execute(
            "SELECT DISTINCT object FROM artifacts JOIN sets ON sets.id = artifacts.set_id"
            " WHERE sets.version IS NOT NULL"
            " UNION SELECT object FROM candidate_objects"
            " UNION SELECT manifest FROM sets WHERE version IS NOT NULL"
            " UNION SELECT manifest FROM candidate_sets"
            " UNION SELECT params FROM models JOIN sets ON sets.id = models.set_id WHERE sets.version IS NOT NULL"
            " UNION SELECT architecture FROM models JOIN sets ON sets.id = models.set_id"
            " WHERE sets.version IS NOT NULL"
            " UNION SELECT environment FROM models JOIN sets ON sets.id = models.set_id"
            " WHERE sets.version IS NOT NULL").fetchall())
        return sorted(r[0] for r in rows)

    def lost_versions(self) -> list[str]:
        """Versions that have a ref (were acknowledged) but no catalog row: the catalog lost them.

        Refs are listed *before* the catalog is read: a ref is written after its row committed,
        so any ref seen is already in the catalog snapshot read next."""
        want = {k: refs.names(self.root, k) for k in refs.KINDS}
        have_sets = set(self._q(lambda db: db.execute(
            "SELECT name, version FROM sets WHERE version IS NOT NULL").fetchall()))
        have_cands = set(self._q(lambda db: db.execute("SELECT name, version FROM candidate_sets").fetchall()))
        lost = [f"{n}@{v}" for n, v in sorted(want["sets"] - have_sets)]
        lost += [f"candidates {n}@{v}" for n, v in sorted(want["candidates"] - have_cands)]
        return lost

    # -- candidate sets (the search's block store) --------------------------------------------
    def insert_candidates(self, name: str, manifest: dict[str, Any], nbytes: int,
                          objects: list[tuple[str, str, int]]) -> tuple[int, int]:
        """Record a candidate set (its block objects are already durable); returns (id, version)."""
        oid = ""
        try:
            with self.transaction() as db:
                (v,) = db.execute("SELECT COALESCE(MAX(version), 0) FROM candidate_sets WHERE name=?",
                                  (name,)).fetchone()
                set_id, version = self.next_id(db, "candidate_sets"), int(v) + 1
                m = {"kind": "candidates", "id": set_id, "name": name, "version": version, "bytes": nbytes,
                     "created": now_iso(), "artifacts": [list(o) for o in objects], "set": manifest}
                oid, size = self.put_manifest(m)
                db.execute("INSERT INTO candidate_sets(id, name, version, manifest, bytes, created)"
                           " VALUES (?,?,?,?,?,?)", (set_id, name, version, oid, nbytes + size, m["created"]))
                db.executemany(
                    "INSERT OR IGNORE INTO candidate_objects(cset_id, role, object, bytes) VALUES (?,?,?,?)",
                    [(set_id, role, o, size) for role, o, size in objects])
        except BaseException:
            if oid:
                self.drop_manifest(oid)
            raise
        self.checkpoint()
        try:
            refs.write(self.root, "candidates", name, version, oid)
        except OSError:
            pass  # the version is committed and its manifest durable; gc writes missing refs
        return set_id, version

    def find_candidates(self, name: str, version: int | None = None) -> tuple[int, int, dict[str, Any]] | None:
        """(id, version, manifest) of a candidate set, the latest version by default."""
        if version is None:
            r = self._q(lambda db: db.execute(
                "SELECT id, version, manifest FROM candidate_sets WHERE name=? ORDER BY version DESC LIMIT 1",
                (name,)).fetchone())
        else:
            r = self._q(lambda db: db.execute(
                "SELECT id, version, manifest FROM candidate_sets WHERE name=? AND version=?",
                (name, version)).fetchone())
        if r is None:
            return None
        m = self.manifest(r[2])
        if m["kind"] != "candidates" or (m["id"], m["name"], m["version"]) != (r[0], name, r[1]):
            raise IntegrityError(f"catalog row of candidate set {name}@{r[1]} does not match its manifest; "
                                 f"{rebuild_hint(self.root)}")
        return r[0], r[1], m["set"]
