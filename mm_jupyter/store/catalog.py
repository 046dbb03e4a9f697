"""The SQLite catalog (WAL mode): which sets exist, their versions, bases and artifacts.

A set becomes visible in exactly one transaction, after all of its objects are durable on disk,
so a crash leaves either the whole set or nothing listed. ``mmlib-base`` saves model by model (as
MMlib does) under a pending set row that only becomes visible when its last model is saved.
"""
from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from ..errors import StoreError

SCHEMA_VERSION = 1

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
    manifest TEXT NOT NULL,          -- JSON: architecture, layout, names, object ids
    bytes INTEGER NOT NULL,          -- bytes this version added: its objects + manifest
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
    manifest TEXT NOT NULL,          -- JSON: per candidate its architecture and block objects
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


@dataclass(frozen=True)
class SetRow:
    """One stored set version as the catalog records it."""

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


_COLUMNS = "id, name, version, approach, requested, base_id, chain, n_models, manifest, bytes, tts_s, created"


def _row(r: tuple) -> SetRow:
    return SetRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], json.loads(r[8]), r[9], r[10], r[11])


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class Catalog:
    """Thin, typed access to the catalog database of one store."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._db = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA busy_timeout=60000")
        self._retry(lambda: self._db.execute("PRAGMA journal_mode=WAL"))
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._retry(lambda: self._db.executescript(_SCHEMA))
        found = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if found is None:
            self._retry(
                lambda: self._db.execute(
                    "INSERT OR IGNORE INTO meta(key, value) VALUES('schema', ?)", (str(SCHEMA_VERSION),)
                )
            )
        elif int(found[0]) != SCHEMA_VERSION:
            raise StoreError(f"{self.path} has catalog schema {found[0]}, this version reads {SCHEMA_VERSION}")

    @staticmethod
    def _retry(fn: Any, attempts: int = 50) -> Any:
        for i in range(attempts):
            try:
                return fn()
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) and "busy" not in str(e) or i == attempts - 1:
                    raise
                time.sleep(0.05 * (i + 1))
        return None

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """An IMMEDIATE transaction: writers queue up instead of failing on lock upgrades."""
        self._retry(lambda: self._db.execute("BEGIN IMMEDIATE"))
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        else:
            self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()

    # -- writes -----------------------------------------------------------------------------
    def insert_set(
        self,
        db: sqlite3.Connection,
        *,
        name: str,
        approach: str,
        requested: str,
        base_id: int | None,
        chain: int,
        n_models: int,
        manifest: dict[str, Any],
        nbytes: int,
        tts_s: float,
        pending: bool = False,
    ) -> tuple[int, int | None]:
        """Insert a set row inside ``db``'s open transaction; returns (id, version)."""
        version = None if pending else self.next_version(db, name)
        cur = db.execute(
            "INSERT INTO sets(name, version, approach, requested, base_id, chain, n_models, manifest,"
            " bytes, tts_s, created) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (name, version, approach, requested, base_id, chain, n_models,
             json.dumps(manifest, separators=(",", ":")), nbytes, tts_s, now_iso()),
        )
        return int(cur.lastrowid), version  # type: ignore[arg-type]

    @staticmethod
    def next_version(db: sqlite3.Connection, name: str) -> int:
        (v,) = db.execute("SELECT COALESCE(MAX(version), 0) FROM sets WHERE name=?", (name,)).fetchone()
        return int(v) + 1

    @staticmethod
    def add_artifacts(db: sqlite3.Connection, set_id: int, rows: list[tuple[str, str, int]]) -> None:
        db.executemany(
            "INSERT OR IGNORE INTO artifacts(set_id, role, object, bytes) VALUES (?,?,?,?)",
            [(set_id, role, oid, size) for role, oid, size in rows],
        )

    # -- reads ------------------------------------------------------------------------------
    def get(self, set_id: int) -> SetRow:
        r = self._db.execute(f"SELECT {_COLUMNS} FROM sets WHERE id=?", (set_id,)).fetchone()
        if r is None:
            raise StoreError(f"catalog has no set with id {set_id}")
        return _row(r)

    def find(self, name: str, version: int | None) -> SetRow | None:
        if version is None:
            r = self._db.execute(
                f"SELECT {_COLUMNS} FROM sets WHERE name=? AND version IS NOT NULL"
                " ORDER BY version DESC LIMIT 1",
                (name,),
            ).fetchone()
        else:
            r = self._db.execute(
                f"SELECT {_COLUMNS} FROM sets WHERE name=? AND version=?", (name, version)
            ).fetchone()
        return None if r is None else _row(r)

    def versions(self, name: str) -> list[SetRow]:
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM sets WHERE name=? AND version IS NOT NULL ORDER BY version", (name,)
        ).fetchall()
        return [_row(r) for r in rows]

    def listing(self) -> list[tuple]:
        """(name, version, approach, models, bytes, created, tts_s) of every visible set."""
        return self._db.execute(
            "SELECT name, version, approach, n_models, bytes, created, tts_s FROM sets"
            " WHERE version IS NOT NULL ORDER BY name, version"
        ).fetchall()

    def artifacts(self, set_id: int) -> list[tuple[str, str, int]]:
        return self._db.execute(
            "SELECT role, object, bytes FROM artifacts WHERE set_id=? ORDER BY role, object", (set_id,)
        ).fetchall()

    def model_rows(self, set_id: int, idx: int | None = None) -> list[tuple]:
        """(idx, name, params, architecture, environment) rows of an mmlib-base set."""
        if idx is None:
            return self._db.execute(
                "SELECT idx, name, params, architecture, environment FROM models WHERE set_id=? ORDER BY idx",
                (set_id,),
            ).fetchall()
        return self._db.execute(
            "SELECT idx, name, params, architecture, environment FROM models WHERE set_id=? AND idx=?",
            (set_id, idx),
        ).fetchall()

    def all_objects(self) -> list[str]:
        """Every object referenced by a visible set (for verification and garbage collection)."""
        rows = self._db.execute(
            "SELECT DISTINCT object FROM artifacts JOIN sets ON sets.id = artifacts.set_id"
            " WHERE sets.version IS NOT NULL UNION SELECT object FROM candidate_objects"
        ).fetchall()
        return [r[0] for r in rows]

    # -- candidate sets (the search's block store) --------------------------------------------
    def insert_candidates(self, name: str, manifest: dict[str, Any], nbytes: int,
                          objects: list[tuple[str, str, int]]) -> tuple[int, int]:
        """Record a candidate set (its block objects are already durable); returns (id, version)."""
        with self.transaction() as db:
            (v,) = db.execute("SELECT COALESCE(MAX(version), 0) FROM candidate_sets WHERE name=?", (name,)).fetchone()
            cur = db.execute(
                "INSERT INTO candidate_sets(name, version, manifest, bytes, created) VALUES (?,?,?,?,?)",
                (name, int(v) + 1, json.dumps(manifest, separators=(",", ":")), nbytes, now_iso()),
            )
            set_id = int(cur.lastrowid)  # type: ignore[arg-type]
            db.executemany(
                "INSERT OR IGNORE INTO candidate_objects(cset_id, role, object, bytes) VALUES (?,?,?,?)",
                [(set_id, role, oid, size) for role, oid, size in objects],
            )
        return set_id, int(v) + 1

    def find_candidates(self, name: str, version: int | None = None) -> tuple[int, int, dict[str, Any]] | None:
        """(id, version, manifest) of a candidate set, the latest version by default."""
        if version is None:
            r = self._db.execute(
                "SELECT id, version, manifest FROM candidate_sets WHERE name=? ORDER BY version DESC LIMIT 1",
                (name,)).fetchone()
        else:
            r = self._db.execute(
                "SELECT id, version, manifest FROM candidate_sets WHERE name=? AND version=?",
                (name, version)).fetchone()
        return None if r is None else (r[0], r[1], json.loads(r[2]))

