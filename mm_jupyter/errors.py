"""The exception tree of mm_jupyter: every public exception the package raises is defined here.

Every failure the library raises on purpose is an ``MMError``; notebooks render it as one clear line
(``_render_traceback_``) instead of a long traceback, and the cell still fails. The modules that raise
them re-export their classes under the old paths (``mm_jupyter.serving.errors``, ``store.catalog``, ...).

* MMError
  + StoreError ............. bad input to the store, or a request it cannot satisfy; nothing was written
  | + RefError ............. a set reference does not name a stored set
  | + ArchitectureError .... an architecture cannot be recorded or rebuilt without pickling
  | | + TrustError ......... rebuilding would run recorded code in an untrusted store
  | + IntegrityError ....... stored bytes do not match their recorded hash
  | + RecoveryError ........ a stored set cannot be recovered exactly
  | + OutOfSpace ........... a write failed with ENOSPC/EDQUOT
  | + MissingCatalog ....... a store folder without a catalog file
  | + EmptyCatalog ......... a catalog file without tables
  + SearchError ............ bad input to model search, or a search that cannot run
  | + ProbeMismatch ........ the model's own forward fails on the probe data
  + ServeError ............. a serving request that cannot be answered
  | + BadInputError ........ not numeric, not finite, or the wrong shape
  | + UnknownModelError .... the served version has no model of that name
  | + QueueFullError ....... back-pressure: the request queue is full
  | + ServerClosedError .... the server closed before answering
  + CellError .............. the user's own notebook cell raised (shown as IPython shows it)
  + PayloadError ........... a store-browser request answered with an HTTP status
  + CourseError ............ a malformed or unrunnable exercise notebook
  + BenchError ............. a paper benchmark or report that cannot run
  | + PaperNumbersError .... ``paper_numbers.toml`` malformed, or an unknown id
  + ServiceError ........... (also a RuntimeError) a test service (PostgreSQL, moto) did not start

This module imports nothing of the package (every layer may import it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


class MMError(Exception):
    """Base class of all mm_jupyter errors."""

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]


# --- store ----------------------------------------------------------------------------------------


class StoreError(MMError):
    """Bad input to the store or a request it cannot satisfy; nothing was written."""


class RefError(StoreError):
    """A set reference (name, name@version, SetRef) does not name a stored set."""


class ArchitectureError(StoreError):
    """An architecture cannot be recorded or rebuilt without pickling."""


class TrustError(ArchitectureError):
    """Rebuilding or recovering would run code recorded in the store, and the store is not trusted."""


class IntegrityError(StoreError):
    """Stored bytes do not match their recorded hash (bit rot, truncation, tampering)."""


class RecoveryError(StoreError):
    """A stored set cannot be recovered exactly (e.g. retraining did not reproduce it)."""


class OutOfSpace(StoreError):
    """A write failed with ENOSPC/EDQUOT: names the file system (``fs``), what was being saved
    (``what``), the bytes it needed and those free. ``about(what)`` names another thing being saved."""

    def __init__(self, path: Path, needed: int, what: str = "the store", *, fs: Path, free: int) -> None:
        self.path, self.needed, self.what = Path(path), int(needed), what
        self.fs, self.free = Path(fs), int(free)
        super().__init__(
            f"no space left on {self.fs} for {what}: needed {human_bytes(self.needed)}, "
            f"free {human_bytes(self.free)}; nothing was stored (free space and save again)"
        )

    def about(self, what: str) -> OutOfSpace:
        return OutOfSpace(self.path, self.needed, what, fs=self.fs, free=self.free)


class MissingCatalog(StoreError):
    """The store folder has no catalog file."""


class EmptyCatalog(StoreError):
    """The catalog file holds no tables (0 bytes, or created but never initialised)."""


# --- search ---------------------------------------------------------------------------------------


class SearchError(MMError):
    """Bad input to model search or a search that cannot run."""


class ProbeMismatch(SearchError):
    """The model's own forward fails on the probe: the data does not fit the model (not a split
    problem). ``split`` is an unverified ``modelsearch.blocks.Split``, to name the block that fails
    (typed ``Any`` here because this module imports nothing of the package)."""

    def __init__(self, message: str, split: Any = None) -> None:
        super().__init__(message)
        self.split = split


# --- serving --------------------------------------------------------------------------------------


class ServeError(MMError):
    """A serving request that cannot be answered (bad input, unknown model, full queue, closed server)."""


class BadInputError(ServeError):
    """The input is not numeric, not finite, or does not have the model's input shape."""


class UnknownModelError(ServeError):
    """The served version has no model of that name."""


class QueueFullError(ServeError):
    """Back-pressure: the request queue is full, the request was rejected (never dropped silently)."""


class ServerClosedError(ServeError):
    """The server was closed before the request could be answered."""


# --- notebooks, server extension, course, benchmarks, test services -------------------------------


class CellError(MMError):
    """The user's own cell code failed. The notebook shows that error as IPython shows any cell's:
    the traceback from the cell's first frame down (their frames, none of the magic's)."""

    def __init__(self, error: BaseException, lines: list[str]) -> None:
        super().__init__(f"the cell raised {type(error).__name__}: {error}")
        self.error = error
        self._lines = lines

    def _render_traceback_(self) -> list[str]:
        return self._lines


class PayloadError(MMError):
    """A store-browser request the server extension answers with ``{"error": message}`` and an HTTP
    ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class CourseError(MMError):
    """An exercise notebook whose task markers or metadata are malformed, or one that cannot be run."""


class BenchError(MMError):
    """A paper benchmark or report that cannot run: malformed paper numbers or results files, a bad option."""


class PaperNumbersError(BenchError):
    """``paper_numbers.toml`` is malformed, or an id asked for is not in it."""


class ServiceError(MMError, RuntimeError):
    """A test service (``store.testing``: PostgreSQL, moto's S3) could not be started (missing
    package, port, permissions). Also a ``RuntimeError``, as it was before it moved here."""


# --- message helpers ------------------------------------------------------------------------------


def a_type(value: object) -> str:
    """The type of ``value`` with its article, for messages: 'an int', 'a str', 'a NoneType'."""
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def human_bytes(n: float) -> str:
    """``n`` bytes for messages, in decimal units: '512 B', '1.5 kB', '2.0 GB'."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


__all__ = [
    "MMError",
    "StoreError",
    "RefError",
    "ArchitectureError",
    "TrustError",
    "IntegrityError",
    "RecoveryError",
    "OutOfSpace",
    "MissingCatalog",
    "EmptyCatalog",
    "SearchError",
    "ProbeMismatch",
    "ServeError",
    "BadInputError",
    "UnknownModelError",
    "QueueFullError",
    "ServerClosedError",
    "CellError",
    "PayloadError",
    "CourseError",
    "BenchError",
    "PaperNumbersError",
    "ServiceError",
]
