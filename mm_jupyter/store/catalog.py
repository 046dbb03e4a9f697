"""The SQL catalog shared by every database backend, and its SQLite implementation (WAL mode):
an index over the manifests in the object area.

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
import uuid
from abc import abstractmethod
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

from ..errors import (
    EmptyCatalog as EmptyCatalog,
    IntegrityError,
    MissingCatalog as MissingCatalog,
    StoreError,
)
from .basetypes import (
    CandidateRow,
    CatalogRow,
    FoundCandidates,
    Listed,
    ListingRow,
    Manifests,
    ModelRow,
    RebuildWriter,
    SearchRow,
    SetColumns,
    SetObjects,
    SetRow,
)
from .contracts import Catalog, ObjectArea
from .files import StoreLock, fsync_path, is_read_only, os_error, out_of_space

SCHEMA_VERSION = 2
FILE = "catalog.sqlite"

#: Kept search results. Not part of the tables every catalog of this schema has: a store written
#: before them gets the table on its first kept search (opening never writes) and reads as none.
SEARCHES = """CREATE TABLE IF NOT EXISTS searches(
    id INTEGER PRIMARY KEY,
    dataset TEXT NOT NULL,
    created TEXT NOT NULL,
    approach TEXT NOT NULL,
    winner TEXT NOT NULL,
    record TEXT NOT NULL             -- JSON (searchlog.py): bounded and checked when read
)"""
_SEARCH_COLUMNS = "id, dataset, created, approach, winner, record"

SCHEMA = """
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
""" + SEARCHES + ";\n"

#: SQLite primary result codes (``sqlite3.Error.sqlite_errorcode & 0xff``)
_READONLY, _IOERR, _CORRUPT, _FULL, _CANTOPEN, _NOTADB = 8, 10, 11, 13, 14, 26
_BUSY, _LOCKED = 5, 6


_COLUMNS = "id, name, version, manifest, base_id, bytes, tts_s, created"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def rebuild_hint(root: str | Path, objects: str | None = None) -> str:
    """How to recreate the catalog at ``root`` (a folder or a database URL) from its objects."""
    extra = f", objects={objects!r}" if objects else ""
    flag = f" --objects {shlex.quote(objects)}" if objects else ""
    return (f"rebuild it from the objects with mm.Store.rebuild_catalog({str(root)!r}{extra}) "
            f"or `python -m mm_jupyter store rebuild {shlex.quote(str(root))}{flag}`")


def _code(e: sqlite3.Error) -> int:
    return (getattr(e, "sqlite_errorcode", None) or 0) & 0xFF


class SQLCatalog(Catalog):
    """The catalog's queries, in SQL that SQLite and PostgreSQL both run (``?`` placeholders; a
    backend whose driver wants another style rewrites them in ``_sql``). Subclasses provide the
    connection: ``_rows``/``_one`` for reads, ``transaction`` and ``_run`` for writes."""

    #: the searches table's definition in this database's dialect
    SEARCHES_DDL: ClassVar[str] = SEARCHES

    def _sql(self, sql: str) -> str:
        return sql

    @abstractmethod
    def _has_table(self, name: str) -> bool:
        """Whether the table exists (a catalog written before the searches table lacks it)."""

    @abstractmethod
    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]: ...

    def _one(self, sql: str, params: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
        rows = self._rows(sql, params)
        return rows[0] if rows else None

    def _x(self, tx: Any, sql: str, params: tuple[Any, ...] = ()) -> Any:
        """Execute one statement inside a transaction; the cursor."""
        return tx.execute(self._sql(sql), params)

    def _xmany(self, tx: Any, sql: str, rows: list[tuple[Any, ...]]) -> None:
        if rows:
            tx.cursor().executemany(self._sql(sql), rows)

    # -- writes -----------------------------------------------------------------------------
    def next_id(self, tx: Any, table: str = "sets") -> int:
        assert table in ("sets", "candidate_sets")
        (v,) = self._x(tx, f"SELECT COALESCE(MAX(id), 0) FROM {table}").fetchone()
        return int(v) + 1

    def next_version(self, tx: Any, name: str) -> int:
        (v,) = self._x(tx, "SELECT COALESCE(MAX(version), 0) FROM sets WHERE name=?", (name,)).fetchone()
        return int(v) + 1

    def insert_set(self, tx: Any, m: dict[str, Any], oid: str, size: int) -> None:
        values = (m["name"], m["version"], m["approach"], m["requested"], m["base_id"], m["chain"], m["n_models"],
                  oid, m["bytes"] + size, float(m["tts"]), m["created"], m["id"])
        updated = self._x(tx,
            "UPDATE sets SET name=?, version=?, approach=?, requested=?, base_id=?, chain=?, n_models=?,"
            " manifest=?, bytes=?, tts_s=?, created=? WHERE id=? AND version IS NULL", values).rowcount
        if not updated:
            self._x(tx, "INSERT INTO sets(name, version, approach, requested, base_id, chain, n_models, manifest,"
                        " bytes, tts_s, created, id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", values)

    def insert_pending(self, tx: Any, name: str, approach: str, n_models: int) -> int:
        set_id = self.next_id(tx)
        self._x(tx, "INSERT INTO sets(id, name, version, approach, requested, base_id, chain, n_models, manifest,"
                    " bytes, tts_s, created) VALUES (?,?,NULL,?,?,NULL,0,?,'',0,0,?)",
                (set_id, name, approach, approach, n_models, now_iso()))
        return set_id

    def add_artifacts(self, tx: Any, set_id: int, rows: list[Listed]) -> None:
        self._xmany(tx, "INSERT INTO artifacts(set_id, role, object, bytes) VALUES (?,?,?,?) ON CONFLICT DO NOTHING",
                    [(set_id, role, oid, size) for role, oid, size in rows])

    def add_model(self, tx: Any, set_id: int, idx: int, name: str, params: str, architecture: str,
                  environment: str) -> None:
        self._x(tx, "INSERT INTO models(set_id, idx, name, params, architecture, environment) VALUES (?,?,?,?,?,?)",
                (set_id, idx, name, params, architecture, environment))

    def delete_pending(self, tx: Any) -> int:
        pending = [r[0] for r in self._x(tx, "SELECT id FROM sets WHERE version IS NULL").fetchall()]
        for set_id in pending:
            for table, column in (("models", "set_id"), ("artifacts", "set_id"), ("sets", "id")):
                self._x(tx, f"DELETE FROM {table} WHERE {column}=?", (set_id,))
        return len(pending)

    def insert_candidates(self, name: str, manifest: dict[str, Any], nbytes: int,
                          objects: list[Listed]) -> tuple[int, int]:
        oid = ""
        try:
            with self.transaction() as tx:
                (v,) = self._x(tx, "SELECT COALESCE(MAX(version), 0) FROM candidate_sets WHERE name=?",
                               (name,)).fetchone()
                set_id, version = self.next_id(tx, "candidate_sets"), int(v) + 1
                m = {"kind": "candidates", "id": set_id, "name": name, "version": version, "bytes": nbytes,
                     "created": now_iso(), "artifacts": [list(o) for o in objects], "set": manifest}
                oid, size = self.put_manifest(m)
                self._x(tx, "INSERT INTO candidate_sets(id, name, version, manifest, bytes, created)"
                            " VALUES (?,?,?,?,?,?)", (set_id, name, version, oid, nbytes + size, m["created"]))
                self._xmany(tx, "INSERT INTO candidate_objects(cset_id, role, object, bytes) VALUES (?,?,?,?)"
                                " ON CONFLICT DO NOTHING", [(set_id, role, o, size) for role, o, size in objects])
        except BaseException:
            if oid:
                self.drop_manifest(oid)
            raise
        self.checkpoint()
        try:
            self.objects.write_ref("candidates", name, version, oid)
        except (OSError, StoreError):
            pass  # the version is committed and its manifest durable; gc writes missing refs
        return set_id, version

    def insert_search(self, dataset: str, approach: str, winner: str, record: str) -> SearchRow:
        with self.transaction() as tx:
            self._x(tx, self.SEARCHES_DDL)
            (v,) = self._x(tx, "SELECT COALESCE(MAX(id), 0) FROM searches").fetchone()
            row = SearchRow(int(v) + 1, dataset, now_iso(), approach, winner, record)
            self._x(tx, f"INSERT INTO searches({_SEARCH_COLUMNS}) VALUES (?,?,?,?,?,?)", tuple(row))
        self.checkpoint()
        return row

    def raw_searches(self) -> list[SearchRow]:
        if not self._has_table("searches"):
            return []
        return [SearchRow(*r) for r in self._rows(f"SELECT {_SEARCH_COLUMNS} FROM searches ORDER BY id")]

    def write_all(self, tx: Any, sets: Manifests, cands: Manifests, set_objects: SetObjects) -> None:
        """Rows for every manifest of a rebuild (inside one transaction on an empty catalog)."""
        for oid in sorted(sets, key=lambda o: sets[o][0]["id"]):
            m, size = sets[oid]
            sid = m["id"]
            self._x(tx, "INSERT INTO sets(id, name, version, approach, requested, base_id, chain, n_models, manifest,"
                        " bytes, tts_s, created) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (sid, m["name"], m["version"], m["approach"], m["requested"], m["base_id"], m["chain"],
                     m["n_models"], oid, m["bytes"] + size, float(m["tts"]), m["created"]))
            listed, model_rows = set_objects[oid]
            self.add_artifacts(tx, sid, listed)
            self._xmany(tx, "INSERT INTO models(set_id, idx, name, params, architecture, environment)"
                            " VALUES (?,?,?,?,?,?)", [(sid, *r) for r in model_rows])
        for oid in sorted(cands, key=lambda o: cands[o][0]["id"]):
            m, size = cands[oid]
            cid = m["id"]
            self._x(tx, "INSERT INTO candidate_sets(id, name, version, manifest, bytes, created) VALUES (?,?,?,?,?,?)",
                    (cid, m["name"], m["version"], oid, m["bytes"] + size, m["created"]))
            self._xmany(tx, "INSERT INTO candidate_objects(cset_id, role, object, bytes) VALUES (?,?,?,?)"
                            " ON CONFLICT DO NOTHING", [(cid, r, o, int(s)) for r, o, s in m["artifacts"]])

    # -- reads ------------------------------------------------------------------------------
    def get(self, set_id: int) -> SetRow:
        r = self._one(f"SELECT {_COLUMNS} FROM sets WHERE id=? AND version IS NOT NULL", (set_id,))
        if r is None:
            raise IntegrityError(f"catalog has no set with id {set_id}; {self.hint}")
        return self.set_row(CatalogRow(*r))

    def find(self, name: str, version: int | None) -> SetRow | None:
        if version is None:
            r = self._one(f"SELECT {_COLUMNS} FROM sets WHERE name=? AND version IS NOT NULL"
                          " ORDER BY version DESC LIMIT 1", (name,))
        else:
            r = self._one(f"SELECT {_COLUMNS} FROM sets WHERE name=? AND version=?", (name, version))
        return None if r is None else self.set_row(CatalogRow(*r))

    def versions(self, name: str) -> list[SetRow]:
        rows = self._rows(f"SELECT {_COLUMNS} FROM sets WHERE name=? AND version IS NOT NULL ORDER BY version",
                          (name,))
        return [self.set_row(CatalogRow(*r)) for r in rows]

    def raw_rows(self) -> list[CatalogRow]:
        rows = self._rows(f"SELECT {_COLUMNS} FROM sets WHERE version IS NOT NULL ORDER BY id")
        return [CatalogRow(*r) for r in rows]

    def raw_candidates(self) -> list[CandidateRow]:
        return [CandidateRow(*r) for r in self._rows(
            "SELECT id, name, version, manifest, bytes, created FROM candidate_sets ORDER BY id")]

    def candidate_objects(self, cset_id: int) -> list[Listed]:
        return [(r[0], r[1], r[2]) for r in self._rows(
            "SELECT role, object, bytes FROM candidate_objects WHERE cset_id=? ORDER BY role, object", (cset_id,))]

    def listing(self) -> list[ListingRow]:
        return [ListingRow(*r) for r in self._rows("SELECT name, version, approach, n_models, bytes, created, tts_s"
                                                   " FROM sets WHERE version IS NOT NULL ORDER BY name, version")]

    def columns(self, set_id: int) -> SetColumns | None:
        r = self._one("SELECT approach, requested, chain, n_models, bytes, tts_s, created FROM sets WHERE id=?",
                      (set_id,))
        return SetColumns(*r) if r is not None else None

    def artifacts(self, set_id: int) -> list[Listed]:
        return [(r[0], r[1], r[2]) for r in self._rows(
            "SELECT role, object, bytes FROM artifacts WHERE set_id=? ORDER BY role, object", (set_id,))]

    def model_rows(self, set_id: int, idx: int | None = None) -> list[ModelRow]:
        if idx is None:
            rows = self._rows("SELECT idx, name, params, architecture, environment FROM models WHERE set_id=?"
                              " ORDER BY idx", (set_id,))
        else:
            rows = self._rows("SELECT idx, name, params, architecture, environment FROM models"
                              " WHERE set_id=? AND idx=?", (set_id, idx))
        return [(int(i), n, p, a, e) for i, n, p, a, e in rows]

    def all_objects(self) -> list[str]:
        visible = "JOIN sets ON sets.id = {t}.set_id WHERE sets.version IS NOT NULL"
        rows = self._rows(
            f"SELECT DISTINCT object FROM artifacts {visible.format(t='artifacts')}"
            " UNION SELECT object FROM candidate_objects"
            " UNION SELECT manifest FROM sets WHERE version IS NOT NULL"
            " UNION SELECT manifest FROM candidate_sets"
            + "".join(f" UNION SELECT {c} FROM models {visible.format(t='models')}"
                      for c in ("params", "architecture", "environment")))
        return sorted(r[0] for r in rows)

    def visible_versions(self) -> tuple[set[tuple[str, int]], set[tuple[str, int]]]:
        sets = {(n, int(v)) for n, v in self._rows("SELECT name, version FROM sets WHERE version IS NOT NULL")}
        cands = {(n, int(v)) for n, v in self._rows("SELECT name, version FROM candidate_sets")}
        return sets, cands

    def find_candidates(self, name: str, version: int | None = None) -> FoundCandidates | None:
        if version is None:
            r = self._one("SELECT id, version, manifest FROM candidate_sets WHERE name=? ORDER BY version DESC LIMIT 1",
                          (name,))
        else:
            r = self._one("SELECT id, version, manifest FROM candidate_sets WHERE name=? AND version=?",
                          (name, version))
        if r is None:
            return None
        m = self.manifest(r[2])
        if m["kind"] != "candidates" or (m["id"], m["name"], m["version"]) != (r[0], name, r[1]):
            raise IntegrityError(f"catalog row of candidate set {name}@{r[1]} does not match its manifest; "
                                 f"{self.hint}")
        return FoundCandidates(r[0], r[1], m["set"])


class SQLiteCatalog(SQLCatalog):
    """The catalog database of one store folder; every SQLite error becomes an MMError."""

    KIND: ClassVar[str] = "sqlite"

    def __init__(self, root: Path, objects: ObjectArea, *, create: bool = False) -> None:
        super().__init__(objects)
        self.root = Path(root)
        self.location = str(self.root)
        self.path = self.root / FILE
        self.hint = rebuild_hint(self.root, None if _same_folder(objects, self.root) else objects.location)
        self.read_only: str | None = None  # why writes are impossible, when they are
        self._db: sqlite3.Connection | None = None
        self._ino = 0
        self._lock = StoreLock(self.root / "locks" / "save")
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
                for stmt in SCHEMA.split(";"):
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
            self.read_only = None if mode == "mode=rw" else ("the file system is read-only" if not writable else
                                                             f"the catalog could not be opened for writing ({failure})")
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
                             f"{self.hint}") from None
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
            return out_of_space(self.path, 8 * page, "the catalog")
        if code in (_CORRUPT, _NOTADB):
            return IntegrityError(f"catalog {self.path} is damaged ({e}); {self.hint}")
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

    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        result: list[tuple[Any, ...]] = self._q(lambda db: db.execute(sql, params).fetchall())
        return result

    def _has_table(self, name: str) -> bool:
        return bool(self._rows("SELECT count(*) FROM sqlite_master WHERE type='table' AND name=?", (name,))[0][0])

    def save_lock(self, exclusive: bool, wait_s: float, why: str) -> AbstractContextManager[None]:
        return self._lock.hold(exclusive, wait_s, why)

    def check_writable(self, action: str) -> None:
        if self.read_only is not None and is_read_only(self.root):
            raise StoreError(f"store {str(self.root)!r} is read-only ({self.read_only}); {action}")

    def compact(self) -> None:
        try:
            self._fresh().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error:
            pass

    @classmethod
    @contextmanager
    def rebuilding(cls, location: str, objects: ObjectArea, wait_s: float
                   ) -> Iterator[RebuildWriter]:
        """A complete catalog is written to a new file in one transaction and swapped in
        atomically (the old ``-wal``/``-shm`` removed first, so an old log is never replayed)."""
        root = Path(location)
        if _same_folder(objects, root) and not (root / "objects").is_dir():
            raise StoreError(f"{location!r} has no objects/ folder: there is nothing to rebuild a catalog from")
        if is_read_only(root):
            raise StoreError(f"{location!r} is read-only: a catalog cannot be rebuilt there")
        (root / "tmp").mkdir(parents=True, exist_ok=True)

        def write(sets: Manifests, cands: Manifests, set_objects: SetObjects) -> None:
            tmp = root / "tmp" / f"catalog-rebuild-{uuid.uuid4().hex}.sqlite"
            kept = _old_searches(root / FILE)
            try:
                db = sqlite3.connect(tmp, isolation_level=None)
                try:
                    db.execute("PRAGMA journal_mode=WAL")
                    db.execute("BEGIN")
                    for stmt in SCHEMA.split(";"):
                        if stmt.strip():
                            db.execute(stmt)
                    db.execute("INSERT INTO meta(key, value) VALUES('schema', ?)", (str(SCHEMA_VERSION),))
                    writer = cls.__new__(cls)
                    SQLCatalog.__init__(writer, objects)
                    writer.write_all(db, sets, cands, set_objects)
                    db.executemany(f"INSERT INTO searches({_SEARCH_COLUMNS}) VALUES (?,?,?,?,?,?)", kept)
                    db.execute("COMMIT")
                except sqlite3.Error as e:
                    raise StoreError(f"cannot write the rebuilt catalog {tmp}: {e}") from None
                finally:
                    db.close()  # the last connection checkpoints the log into the file and removes it
                fsync_path(tmp)
                for suffix in ("-wal", "-shm"):  # an old log must never be replayed onto the new file
                    Path(f"{root / FILE}{suffix}").unlink(missing_ok=True)
                os.replace(tmp, root / FILE)
                fsync_path(root)
            except OSError as e:
                raise os_error(e, root, 0, "the rebuilt catalog") from None
            finally:
                for suffix in ("", "-journal", "-wal", "-shm"):
                    Path(f"{tmp}{suffix}").unlink(missing_ok=True)

        with StoreLock(root / "locks" / "save").hold(True, wait_s, "cannot rebuild the catalog"):
            yield write


def _old_searches(path: Path) -> list[tuple[Any, ...]]:
    """The kept searches of the catalog a rebuild replaces, where it can still be read (they live
    in no object, so a rebuild can only carry them over; a damaged or missing file has none)."""
    if not path.is_file():
        return []
    try:
        db = sqlite3.connect("file:" + urllib.parse.quote(str(path.absolute())) + "?mode=ro", uri=True, timeout=5.0)
        try:
            exists = "SELECT count(*) FROM sqlite_master WHERE type='table' AND name='searches'"
            if not db.execute(exists).fetchone()[0]:
                return []
            return db.execute(f"SELECT {_SEARCH_COLUMNS} FROM searches ORDER BY id").fetchall()
        finally:
            db.close()
    except sqlite3.Error:
        return []


def _same_folder(objects: ObjectArea, root: Path) -> bool:
    """True when ``objects`` is the object area inside the catalog's own folder."""
    return Path(objects.location).absolute() == root.absolute()
