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
from typing import Any

from ..errors import IntegrityError

MAGIC = b"MMMANIFEST\x00\x01\n"
KINDS = ("set", "candidates")
_FIELDS = {
    "set": ("id", "name", "version", "approach", "requested", "base_id", "base", "chain", "n_models",
            "bytes", "tts", "created", "artifacts", "set"),
    "candidates": ("id", "name", "version", "bytes", "created", "artifacts", "set"),
}


def seconds(value: float) -> str:
    """A duration as fixed-width text: a manifest's size (and so a version's bytes) must not
    depend on how many digits a float happens to print with."""
    return f"{value:017.6f}"


def encode(manifest: dict[str, Any]) -> bytes:
    return MAGIC + json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()


def decode(payload: bytes, oid: str) -> dict[str, Any]:
    """Parse a verified manifest payload; IntegrityError when it is not one."""
    if not payload.startswith(MAGIC):
        raise IntegrityError(f"object {oid[:12]}… is not a manifest")
    try:
        m = json.loads(payload[len(MAGIC):])
    except (ValueError, UnicodeDecodeError) as e:
        raise IntegrityError(f"manifest {oid[:12]}… is not valid JSON: {e}") from None
    kind = m.get("kind") if isinstance(m, dict) else None
    if kind not in KINDS or any(f not in m for f in _FIELDS[kind]):
        raise IntegrityError(f"manifest {oid[:12]}… lacks fields of a {kind or 'known'} manifest")
    out: dict[str, Any] = m
    return out


def is_manifest(prefix: bytes) -> bool:
    return prefix.startswith(MAGIC)
