"""The catalog in PostgreSQL (psycopg 3): one index shared by every machine of a team.

The same tables and queries as the SQLite catalog (``catalog.SQLCatalog``). What SQLite gets from
its single-writer lock, PostgreSQL gets from advisory locks, which hold across machines:

* every write transaction first takes ``pg_advisory_xact_lock(WRITE_KEY)``: commits are serialised
  (each is a few short statements and one manifest write), so ``MAX(version)+1`` taken inside it is
  gapless under any number of concurrent writers; the lock ends with the transaction, also when a
  writer's connection dies;
* ``save_lock``: a session-level advisory lock on a connection of its own — shared while a save
  writes objects, exclusive for gc and rebuilds — released by PostgreSQL when its holder's process
  dies, on whatever machine it ran.
"""
from __future__ import annotations

import threading
import time
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

from ..errors import StoreError
from .basetypes import Manifests, RebuildWriter, SetObjects
from .catalog import SCHEMA, SCHEMA_VERSION, SEARCHES, SQLCatalog, rebuild_hint
from .contracts import ObjectArea
from .locations import display

if TYPE_CHECKING:
    import psycopg

#: advisory lock keys (64-bit; scoped to the database): "mm_save", "mm_write"
SAVE_KEY = 0x6D6D5F73617665
WRITE_KEY = 0x6D6D5F7772697465
def _dialect(sql: str) -> str:
    return sql.replace("INTEGER", "BIGINT").replace(" REAL ", " DOUBLE PRECISION ")


_SCHEMA_PG = _dialect(SCHEMA)
#: the tables every catalog of this schema has (``searches`` is created by the first kept search)
_TABLES = ("meta", "sets", "artifacts", "candidate_sets", "candidate_objects", "models")


class PostgresCatalog(SQLCatalog):
    """The catalog in a PostgreSQL database (created on first use); errors become StoreErrors."""

    KIND: ClassVar[str] = "postgresql"
    SEARCHES_DDL: ClassVar[str] = _dialect(SEARCHES)

    def __init__(self, url: str, objects: ObjectArea) -> None:
        super().__init__(objects)
        self.url = url
        self.location = display(url)
        self.hint = rebuild_hint(self.location, objects.location)
        self._mutex = threading.RLock()
        self._lock_mutex = threading.RLock()
        self._lock_conn: "psycopg.Connection[Any] | None" = None
        self._lock_depth = 0
        self._conn = self._connect()
        self._ensure_schema()

    # -- connections ----------------------------------------------------------------------------
    def _connect(self) -> "psycopg.Connection[Any]":
        try:
            import psycopg
        except ImportError:
            raise StoreError("a PostgreSQL catalog needs psycopg 3: pip install 'mm_jupyter[team]'") from None
        try:
            return psycopg.connect(self.url, autocommit=True, connect_timeout=10)
        except psycopg.Error as e:
            raise StoreError(f"cannot connect to catalog {self.location}: {_first_line(e)}") from None

    def _live(self) -> "psycopg.Connection[Any]":
        if self._conn.closed or self._conn.broken:
            self._conn = self._connect()
        return self._conn

    def _translate(self, e: Exception) -> StoreError:
        return StoreError(f"catalog {self.location}: {_first_line(e)}")

    def _ensure_schema(self) -> None:
        """Create the tables once per database (racing creators wait on the write lock)."""
        missing = [t for t in _TABLES if self._one("SELECT to_regclass(?)", (t,)) == (None,)]
        if missing:
            with self.transaction() as tx:
                for stmt in _SCHEMA_PG.split(";"):
                    if stmt.strip():
                        tx.execute(stmt)
                tx.execute("INSERT INTO meta(key, value) VALUES('schema', %s) ON CONFLICT DO NOTHING",
                           (str(SCHEMA_VERSION),))
        found = self._one("SELECT value FROM meta WHERE key='schema'")
        if found is None or found[0] != str(SCHEMA_VERSION):
            raise StoreError(f"catalog {self.location} has schema {found[0] if found else 'none'}; this version of "
                             f"mm_jupyter reads schema {SCHEMA_VERSION}")

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s")

    def _has_table(self, name: str) -> bool:
        return self._one("SELECT to_regclass(?)", (name,)) != (None,)

    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        import psycopg

        with self._mutex:
            try:
                with self._live().cursor() as cur:
                    cur.execute(self._sql(sql), params)
                    return cur.fetchall()
            except psycopg.Error as e:
                raise self._translate(e) from None

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        import psycopg

        with self._mutex:
            try:
                conn = self._live()
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_KEY,))
                    yield conn
            except psycopg.Error as e:
                raise self._translate(e) from None

    def save_lock(self, exclusive: bool, wait_s: float, why: str) -> AbstractContextManager[None]:
        return self._hold(exclusive, wait_s, why)

    @contextmanager
    def _hold(self, exclusive: bool, wait_s: float, why: str) -> Iterator[None]:
        """Re-entrant within this catalog; the lock lives as long as its own connection."""
        import psycopg

        with self._lock_mutex:
            if self._lock_depth == 0:
                conn = self._connect()
                try:
                    fn = "pg_try_advisory_lock" if exclusive else "pg_try_advisory_lock_shared"
                    deadline = time.monotonic() + wait_s
                    delay = 0.005
                    while not _first(conn.execute(f"SELECT {fn}(%s)", (SAVE_KEY,)).fetchone()):
                        if time.monotonic() > deadline:
                            raise StoreError(f"{why}: the store at {self.location} is busy (waited {wait_s:.0f} s "
                                             "for its save lock)")
                        time.sleep(delay)
                        delay = min(delay * 2, 0.1)
                except (psycopg.Error, StoreError) as e:
                    conn.close()
                    raise e if isinstance(e, StoreError) else self._translate(e) from None
                self._lock_conn = conn
            self._lock_depth += 1
        try:
            yield
        finally:
            with self._lock_mutex:
                self._lock_depth -= 1
                if self._lock_depth == 0 and self._lock_conn is not None:
                    self._lock_conn.close()  # ends the session: PostgreSQL releases the lock
                    self._lock_conn = None

    def check_writable(self, action: str) -> None:
        """A database is writable while it is reachable; failures surface as StoreErrors."""

    def close(self) -> None:
        with self._mutex:
            self._conn.close()

    @classmethod
    @contextmanager
    def rebuilding(cls, location: str, objects: ObjectArea, wait_s: float
                   ) -> Iterator[RebuildWriter]:
        """Every row replaced in one transaction (readers see the old catalog until it commits);
        the kept searches, which no object holds, stay."""
        catalog = cls(location, objects)
        try:
            with catalog.save_lock(True, wait_s, "cannot rebuild the catalog"):
                def write(sets: Manifests, cands: Manifests, set_objects: SetObjects) -> None:
                    with catalog.transaction() as tx:
                        tx.execute("TRUNCATE models, artifacts, candidate_objects, candidate_sets, sets")
                        catalog.write_all(tx, sets, cands, set_objects)

                yield write
        finally:
            catalog.close()


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _first(row: tuple[Any, ...] | None) -> Any:
    """The first column of a fetched row (None when there is no row)."""
    return None if row is None else row[0]
