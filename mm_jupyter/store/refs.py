"""Refs: one small file per acknowledged version, ``refs/<kind>/<name>@<version>`` -> manifest id.

A ref is written after the version's catalog transaction committed and before ``save_set``
returns, so every acknowledged save has one. Opening a store compares the ref names with the
catalog (a directory listing and one query): a ref the catalog lacks means the catalog lost a
committed version (its ``-wal`` file deleted under a writer, an old copy restored, ...), and the
store refuses to open instead of silently showing less. Refs also settle which manifest holds a
version number when a rebuild finds two (the first one's transaction never committed).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import IntegrityError
from .files import TempFile, fsync_path, read_small

REF_PATTERN = re.compile(r"^(.+)@([1-9][0-9]{0,18})$")


def folder(root: Path, kind: str) -> Path:
    return Path(root) / "refs" / kind


def write(root: Path, kind: str, name: str, version: int, oid: str) -> None:
    """Durably point ``name@version`` at manifest ``oid`` (atomic replace of the ref file)."""
    target = folder(root, kind)
    target.mkdir(parents=True, exist_ok=True)
    tmp = TempFile(Path(root) / "tmp")
    try:
        tmp.file.write(f"{oid}\n".encode())
        tmp.file.flush()
        os.replace(tmp.path, target / f"{name}@{version}")
        os.fsync(tmp.fileno())  # after the rename: one journal commit for content and name (objects._publish)
        fsync_path(target)
    finally:
        tmp.close()


def names(root: Path, kind: str) -> set[tuple[str, int]]:
    """Every (name, version) with a ref; files not named like refs are ignored."""
    try:
        entries = os.listdir(folder(root, kind))
    except (FileNotFoundError, NotADirectoryError):
        return set()
    out = set()
    for e in entries:
        m = REF_PATTERN.match(e)
        if m is not None:
            out.add((m.group(1), int(m.group(2))))
    return out


def read(root: Path, kind: str, name: str, version: int) -> str | None:
    """The manifest id a ref names, or None (missing, unreadable or not a regular file)."""
    try:
        text = read_small(folder(root, kind) / f"{name}@{version}", 200).decode("ascii", "replace").strip()
    except (OSError, IntegrityError):  # missing, unreadable, or a special file / symbolic link
        return None
    return text if len(text) == 64 else None


def remove(root: Path, kind: str, name: str, version: int) -> None:
    (folder(root, kind) / f"{name}@{version}").unlink(missing_ok=True)
