"""Which catalog and object area a store location names.

* a folder (the embedded default): SQLite catalog + object files inside it;
* ``postgresql://…`` (a team's shared catalog) with ``objects="s3://bucket/prefix"`` — or
  ``$MM_JUPYTER_OBJECTS`` — for the objects in an S3-compatible bucket.

``objects=`` may also point a folder store's objects elsewhere. The S3 endpoint, region and
credentials come from boto3's usual settings (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...), or
from the objects URL's query (``s3://bucket/prefix?endpoint_url=http://host:9000``).
"""
from __future__ import annotations

import os
import stat
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from ..errors import EmptyCatalog, IntegrityError, MissingCatalog, StoreError
from . import manifest as manifests
from .catalog import SQLiteCatalog, rebuild_hint
from .contracts import Catalog, ObjectArea
from .files import is_read_only, os_error
from .locations import URL_SCHEME, display, is_database
from .objects import FolderObjects
from .postgres import PostgresCatalog
from .s3 import S3Objects

ENV_STORE = "MM_JUPYTER_STORE"
ENV_OBJECTS = "MM_JUPYTER_OBJECTS"


def default_location(root: str | os.PathLike[str] | None = None) -> str | Path:
    """``$MM_JUPYTER_STORE`` (a folder or a database URL), else ``.mm_store``; a relative folder is
    taken from ``root`` (default: the working directory)."""
    env = os.environ.get(ENV_STORE)
    if is_database(env):
        assert env is not None
        return env
    path = Path(env).expanduser() if env else Path(".mm_store")
    return path if root is None or path.is_absolute() else Path(root).expanduser() / path


def open_objects(spec: str | os.PathLike[str]) -> ObjectArea:
    """The object area an ``objects=`` value names: ``s3://bucket/prefix[?endpoint_url=…]`` or a folder."""
    text = os.fspath(spec)
    if text.startswith("s3://"):

        return S3Objects(text)
    if text.startswith("file://"):
        text = urllib.parse.urlsplit(text).path
    elif URL_SCHEME.match(text):
        raise StoreError(f"objects {display(text)!r}: use s3://bucket/prefix or a folder")
    return FolderObjects(Path(text))


def portable(path: str | os.PathLike[str], objects: str | os.PathLike[str] | None) -> tuple[str, str | None]:
    """``(path, objects)`` that open the same store from any process: folders made absolute (a Ray
    worker may run in another working directory) and a database catalog's object area written out
    (``$MM_JUPYTER_OBJECTS`` may be unset there)."""
    def absolute(location: str | os.PathLike[str]) -> str:
        text = os.fspath(location)
        return text if URL_SCHEME.match(text) else os.path.abspath(text)

    if is_database(path):
        spec = objects if objects is not None else os.environ.get(ENV_OBJECTS)
        return os.fspath(path), absolute(spec) if spec else None
    return absolute(path), None if objects is None else absolute(objects)


@dataclass
class Opened:
    """A store's backends, as ``Store`` holds them."""

    root: Path | None
    location: str
    objects: ObjectArea
    catalog: Catalog


def open_store(path: str | os.PathLike[str] | None, objects: str | os.PathLike[str] | None) -> Opened:
    """Open (or create) the store at ``path`` with its object area."""
    location = path if path is not None else default_location()
    if is_database(location):
        assert isinstance(location, str)
        spec = objects if objects is not None else os.environ.get(ENV_OBJECTS)
        if not spec:
            raise StoreError(f"a PostgreSQL catalog needs an object area: mm.Store({display(location)!r}, "
                             f"objects='s3://bucket/prefix') or ${ENV_OBJECTS}")

        area = open_objects(spec)
        return Opened(None, display(location), area, PostgresCatalog(location, area))
    if isinstance(location, str) and URL_SCHEME.match(location) and not location.startswith("file://"):
        raise StoreError(f"unknown store location {display(location)!r}: a folder or postgresql://...")
    text = os.fspath(location)
    root = Path(urllib.parse.urlsplit(text).path if text.startswith("file://") else text)
    try:
        mode: int | None = os.stat(root).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise StoreError(f"cannot open store {str(root)!r}: {e.strerror or e}") from None
    if mode is not None and not stat.S_ISDIR(mode):
        raise StoreError(f"store path {str(root)!r} exists and is not a folder")
    area = open_objects(objects) if objects is not None else FolderObjects(root)
    return Opened(root, str(root), area, _open_folder_catalog(root, area, create=mode is None))


def for_rebuild(path: str | os.PathLike[str], objects: str | os.PathLike[str] | None
                ) -> tuple[type[Catalog], str, ObjectArea]:
    """(catalog class, location, object area) whose catalog ``Store.rebuild_catalog`` recreates."""
    if is_database(path):

        spec = objects if objects is not None else os.environ.get(ENV_OBJECTS)
        if not spec:
            raise StoreError("rebuilding a PostgreSQL catalog needs its object area (objects='s3://...')")
        return PostgresCatalog, os.fspath(path), open_objects(spec)
    root = Path(path)
    return SQLiteCatalog, str(root), open_objects(objects) if objects is not None else FolderObjects(root)


def _open_folder_catalog(root: Path, objects: ObjectArea, create: bool) -> SQLiteCatalog:
    """The catalog of an existing store (opened without writing), or of a new one. A catalog that is
    missing or empty while the folder holds saved versions is an error that says how to rebuild:
    never an empty store."""
    if not create:
        try:
            return SQLiteCatalog(root, objects)
        except (MissingCatalog, EmptyCatalog) as e:
            evidence = saved_evidence(objects)
            if evidence:
                state = "missing" if isinstance(e, MissingCatalog) else "empty"
                raise StoreError(f"the catalog of store {str(root)!r} is {state}, but {evidence}; "
                                 f"{rebuild_hint(root, None if objects.location == str(root) else objects.location)}"
                                 ) from None
    if is_read_only(root if root.exists() else root.parent):
        raise StoreError(f"{str(root)!r} holds no store and one cannot be created there (read-only)")
    init_store(root, objects)
    return SQLiteCatalog(root, objects, create=True)


def init_store(root: Path, objects: ObjectArea) -> None:
    """The folders of a new store."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        (root / "locks").mkdir(exist_ok=True)
    except OSError as e:
        raise os_error(e, root, 4096, f"store {str(root)!r}") from None
    objects.prepare()


def saved_evidence(objects: ObjectArea) -> str | None:
    """Why an object area without a usable catalog still holds saved versions (None: it does not)."""
    n = objects.any_refs()
    if n:
        return f"refs/ records {n} saved version(s)"
    for oid, _ in objects.scan():
        try:
            if manifests.is_manifest(objects.payload_prefix(oid, len(manifests.MAGIC))):
                return "objects/ holds manifests of saved versions"
        except (OSError, IntegrityError):
            continue
    return None


__all__ = ["ENV_OBJECTS", "ENV_STORE", "Opened", "default_location", "display", "for_rebuild", "init_store",
           "is_database", "open_objects", "open_store", "saved_evidence"]
