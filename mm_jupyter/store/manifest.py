"""Manifests: what a version *is*, stored as a content-addressed object of its own.

A manifest holds everything the catalog row of a version holds — catalog id, name, version,
approach, base (catalog id and the base's manifest id), chain, model count, bytes, time-to-save,
creation time, its artifacts — and the approach's own record (architecture, layout, names, object
ids). It is verified on read like every object, so a damaged manifest raises IntegrityError
instead of steering recovery to wrong bytes, and the catalog can be rebuilt from manifests alone.

The version number is decided inside the catalog's write transaction and the manifest is written
there, before the row commits; a manifest whose transaction never committed is an orphan that
``gc`` removes (or that a rebuild may restore as the in-flight save it was).
"""
from __future__ import annotations

import json
import re
from typing import Any

from ..errors import IntegrityError, MMError
from .limits import loads
from .tensors import Layout

MAGIC = b"MMMANIFEST\x00\x01\n"
KINDS = ("set", "candidates")
_FIELDS = {
    "set": ("id", "name", "version", "approach", "requested", "base_id", "base", "chain", "n_models",
            "bytes", "tts", "created", "artifacts", "set"),
    "candidates": ("id", "name", "version", "bytes", "created", "artifacts", "set"),
}
#: Most models one version may hold (a bound on what a manifest may declare; the paper's sets hold 5,000).
MAX_MODELS = 10_000_000
_OID = re.compile(r"^[0-9a-f]{64}$")
_COUNT = ("id", "version", "chain", "n_models", "bytes", "base_id")
#: Object-id fields of a set payload, per approach (None: may be null).
_OBJECTS = {
    "baseline": {"params": False},
    "update": {"params": True, "digests": True, "index": True, "delta": True},
    "provenance": {"record": False, "index": False},
    "mmlib-base": {"models": False},
}


def seconds(value: float) -> str:
    """A duration as fixed-width text: a manifest's size (and so a version's bytes) must not
    depend on how many digits a float happens to print with."""
    return f"{value:017.6f}"


def encode(manifest: dict[str, Any]) -> bytes:
    return MAGIC + json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()


def is_oid(x: Any) -> bool:
    return isinstance(x, str) and _OID.match(x) is not None


def _count(x: Any, low: int = 0, high: int = 2**62) -> bool:
    return type(x) is int and low <= x <= high


def decode(payload: bytes, oid: str) -> dict[str, Any]:
    """Parse a verified manifest payload; IntegrityError when it is not one — not JSON, nested too
    deep, lacking fields, or holding fields of the wrong type or range (a manifest may have been
    written by someone else: every field later code relies on is checked here)."""
    if not payload.startswith(MAGIC):
        raise IntegrityError(f"object {oid[:12]}… is not a manifest")
    m = loads(payload[len(MAGIC):], f"manifest {oid[:12]}…")
    kind = m.get("kind") if isinstance(m, dict) else None
    if kind not in KINDS or any(f not in m for f in _FIELDS[kind]):
        raise IntegrityError(f"manifest {oid[:12]}… lacks fields of a {kind or 'known'} manifest")
    problem = _problem(m, kind)
    if problem is not None:
        raise IntegrityError(f"manifest {oid[:12]}… is malformed: {problem}")
    out: dict[str, Any] = m
    return out


def _problem(m: dict[str, Any], kind: str) -> str | None:
    for f in _COUNT:
        if f in m and not (_count(m[f], 0 if f in ("chain", "n_models", "bytes") else 1)
                           or (f == "base_id" and m[f] is None)):
            return f"{f} is {str(m[f])[:40]!r}"
    name = m["name"]
    if not isinstance(name, str) or not 0 < len(name) <= 200 or "/" in name or "\x00" in name:
        return f"name {str(name)[:40]!r}"
    if not isinstance(m["created"], str) or len(m["created"]) > 64:
        return "created is not a timestamp"
    arts = m["artifacts"]
    if not isinstance(arts, list) or not all(
            isinstance(a, list) and len(a) == 3 and isinstance(a[0], str) and is_oid(a[1]) and _count(a[2])
            for a in arts):
        return "artifacts are not [role, object id, bytes] entries"
    if not isinstance(m["set"], dict):
        return "its set record is not an object"
    if kind == "candidates":
        cands = m["set"].get("candidates")
        if not isinstance(cands, list) or not all(isinstance(c, dict) for c in cands):
            return "its candidates are not a list of records"
        return None
    for f in ("approach", "requested"):
        if not isinstance(m[f], str) or len(m[f]) > 40:
            return f"{f} is not an approach name"
    if not (m["base"] is None or is_oid(m["base"])) or (m["base"] is None) != (m["base_id"] is None):
        return "base and base_id disagree"
    try:
        tts = float(m["tts"]) if isinstance(m["tts"], (str, int, float)) and not isinstance(m["tts"], bool) else -1.0
    except ValueError:
        tts = -1.0
    if not 0 <= tts < 1e12:
        return "tts is not a duration"
    return set_problem(m["set"], m["approach"])


def set_problem(s: dict[str, Any], approach: str) -> str | None:
    """What is wrong with the set record of a version (None: its fields have the types and
    ranges recovery relies on)."""

    if not isinstance(s.get("architecture"), dict):
        return "architecture record is not an object"
    try:
        layout = Layout.from_json(s.get("layout"))
    except MMError as e:
        return f"layout: {e}"
    n, names = s.get("n"), s.get("names")
    if not _count(n, 0, MAX_MODELS):
        return f"model count {str(n)[:40]!r}"
    if names is not None and not (isinstance(names, list) and len(names) == n
                                  and all(isinstance(x, str) and len(x) <= 1000 for x in names)):
        return "model names are not n strings"
    for field, nullable in _OBJECTS.get(approach, {}).items():
        if field in s and not (is_oid(s[field]) or (nullable and s[field] is None)):
            return f"{field} is not an object id"
    if approach == "update" and "params" not in s:
        k = len(layout.specs)
        for f in ("starts", "counts"):
            v = s.get(f)
            if not isinstance(v, list) or (k and not (len(v) == k and all(_count(x) for x in v))):
                return f"{f} are not {k} offsets"
        if not is_oid(s.get("index")):
            return "index is not an object id"
    return None


def is_manifest(prefix: bytes) -> bool:
    return prefix.startswith(MAGIC)
