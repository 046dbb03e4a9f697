"""Bounds on what is decoded from a store: JSON nesting depth, and JSON parsed with them.

Everything read from a store may have been written by someone else. Deeply nested JSON would make
the recursive code that interprets it (record rebuilding, manifest walking) exhaust Python's stack
with a raw ``RecursionError``; it is refused when parsed, with the store's own error types. Saving
checks architecture records against :data:`MAX_RECORD_DEPTH`, so nothing is stored that could not
be read back.
"""
from __future__ import annotations

import json
import zlib
from contextlib import contextmanager
from typing import Any, Iterator

from ..errors import IntegrityError, MMError

#: Nesting depth of any JSON document read from a store (manifests, index headers, records).
MAX_JSON_DEPTH = 256
#: Nesting depth of an architecture record (about three levels per level of the module tree, so
#: some 60 nested modules); it sits inside a manifest, hence below MAX_JSON_DEPTH.
MAX_RECORD_DEPTH = 200


def depth(value: Any, limit: int) -> int:
    """The nesting depth of lists and dicts in ``value``, counted iteratively up to ``limit + 1``."""
    deepest = 0
    todo: list[tuple[Any, int]] = [(value, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, (list, tuple, dict)):
            deepest = max(deepest, d)
            if d > limit:
                return d
            todo.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def check_depth(value: Any, limit: int, what: str, error: type[MMError] = IntegrityError) -> None:
    if depth(value, limit) > limit:
        raise error(f"{what} is nested deeper than {limit} levels; refused")


def loads(payload: bytes | str, what: str, limit: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` whose every failure — bad JSON, nesting beyond ``limit``, numbers too long to
    convert — is an IntegrityError naming ``what``."""
    try:
        value = json.loads(payload)
    except RecursionError:
        raise IntegrityError(f"{what} is nested deeper than {limit} levels; refused") from None
    except (ValueError, UnicodeDecodeError, TypeError) as e:
        raise IntegrityError(f"{what} is not valid JSON: {e}") from None
    check_depth(value, limit, what)
    return value


#: What interpreting a malformed record raises in Python (a KeyError for a missing field, a
#: TypeError for a wrong type, ...): at the boundaries where a store's records are decoded they
#: become one IntegrityError. MemoryError is not among them: allocations are bounded before they
#: happen (the declared sizes are checked against the objects' real sizes).
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError, RecursionError, UnicodeDecodeError,
    zlib.error)


@contextmanager
def decoding(what: str) -> Iterator[None]:
    """Raise IntegrityError naming ``what`` for any ``DECODE_ERRORS`` raised inside."""
    try:
        yield
    except DECODE_ERRORS as e:
        raise IntegrityError(f"{what} is malformed ({type(e).__name__}: {str(e)[:200]})") from None


def inflate(data: bytes, limit: int, what: str) -> bytes:
    """zlib-decompress at most ``limit`` bytes: a small object must not expand into gigabytes."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, limit)
    except zlib.error as e:
        raise IntegrityError(f"{what} is not zlib data: {e}") from None
    if d.unconsumed_tail or not d.eof:
        raise IntegrityError(f"{what} expands to more than {limit} bytes (or is cut off); refused")
    return out
