"""Store locations a kernel reports to the JupyterLab sidebar, by opaque id.

The sidebar asks the notebook's kernel which store its magics use and passes the answer to the
server extension as ``?store=``. That query lands in request logs and browser history, and the
location may be a ``postgresql://user:password@host`` URL; and a server that took any location
from a query would read stores anywhere on disk and connect to any host. So the kernel reports an
id instead: it writes the location to ``<runtime dir>/mm_jupyter_stores/<id>.json`` (owner-only,
next to the kernels' connection files, which hold secrets of the same kind) and answers the id;
the server maps ids back through the same folder. Only a location a kernel of this server
registered, the server's own default, or a folder under the server's root is ever opened.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

PREFIX = "mmstore-"
_ID = re.compile(r"^mmstore-[0-9a-f]{32}$")
FOLDER = "mm_jupyter_stores"


def location_id(location: str) -> str:
    return PREFIX + hashlib.sha256(location.encode()).hexdigest()[:32]


def is_id(text: str) -> bool:
    return _ID.match(text) is not None


def runtime_folder(runtime_dir: str | os.PathLike[str] | None = None) -> Path:
    if runtime_dir is None:
        from jupyter_core.paths import jupyter_runtime_dir

        runtime_dir = jupyter_runtime_dir()
    return Path(runtime_dir) / FOLDER


def register(location: str, runtime_dir: str | os.PathLike[str] | None = None) -> str:
    """Record ``location`` for the server and return its id (idempotent; owner-only file)."""
    sid = location_id(location)
    folder = runtime_folder(runtime_dir)
    target = folder / f"{sid}.json"
    if lookup(sid, runtime_dir) == location:
        return sid
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = folder / f".{sid}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, json.dumps({"location": location}).encode())
    finally:
        os.close(fd)
    os.replace(tmp, target)
    return sid


def lookup(sid: str, runtime_dir: str | os.PathLike[str] | None = None) -> str | None:
    """The location registered under ``sid`` (None: not an id, or none registered)."""
    if not is_id(sid):
        return None
    try:
        fd = os.open(runtime_folder(runtime_dir) / f"{sid}.json", os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        data = os.read(fd, 65536)
    finally:
        os.close(fd)
    try:
        found = json.loads(data).get("location")
    except (ValueError, AttributeError):
        return None
    return found if isinstance(found, str) and location_id(found) == sid else None
