"""The exception tree of mm_jupyter.

Every failure the library raises on purpose is an ``MMError``; notebooks render it as one clear line
(``_render_traceback_``) instead of a long traceback, and the cell still fails.
"""
from __future__ import annotations


class MMError(Exception):
    """Base class of all mm_jupyter errors."""

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]


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


class SearchError(MMError):
    """Bad input to model search or a search that cannot run."""


class ServeError(MMError):
    """A serving request that cannot be answered (bad input, unknown model, full queue, closed server)."""


class CourseError(MMError):
    """An exercise notebook whose task markers or metadata are malformed, or one that cannot be run."""


class BenchError(MMError):
    """A paper benchmark or report that cannot run: malformed paper numbers or results files, a bad option."""


def a_type(value: object) -> str:
    """The type of ``value`` with its article, for messages: 'an int', 'a str', 'a NoneType'."""
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


__all__ = [
    "MMError",
    "StoreError",
    "RefError",
    "ArchitectureError",
    "TrustError",
    "IntegrityError",
    "RecoveryError",
    "SearchError",
    "ServeError",
    "CourseError",
    "BenchError",
]
