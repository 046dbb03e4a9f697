"""The server side of the JupyterLab extension: read-only REST endpoints over the model store.

``GET <base_url>/mm-jupyter/sets`` lists every stored version, ``GET <base_url>/mm-jupyter/lineage?name=NAME``
the version graph of one set (its versions, and the same plotly figure as the notebook's lineage graph),
``GET <base_url>/mm-jupyter/searches`` the kept searches (newest first).
Which store: ``?store=ID`` (the id a kernel of this server registered for the store its magics use, see
``locations``), else ``?path=NOTEBOOK`` (the store the magics would use in that notebook's folder:
``$MM_JUPYTER_STORE`` or ``.mm_store``, relative to the folder — ``store.store.default_path``, the rule the
magics and ``mm.Store()`` follow), else the server's root folder by the same rule. ``?store=`` also takes an
absolute folder under the server's root. Nothing else is opened: not a folder elsewhere on disk, not a
database URL from a query (a request could otherwise read any store the server's user can, or make the
server connect to any host). A GET never creates a store: a missing one lists as empty.

Store URLs are shown with their password masked everywhere: in responses, in error messages and in the
server's log. Handlers need an authenticated user allowed to ``read`` the resource ``mm_jupyter``
(jupyter_server's ``authorized``).

The payload builders (``sets_payload``, ``lineage_payload``) are plain functions so that they can be tested
without a server. Nothing here imports torch: the store's catalog and lineage are read without it.
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..errors import MMError, PayloadError as PayloadError, RefError

URL_PREFIX = "mm-jupyter"
CATALOG = "catalog.sqlite"
#: What jupyter_server's authorizer is asked about (action ``read``) before a store is read.
AUTH_RESOURCE = "mm_jupyter"


def store_path(root_dir: str | os.PathLike[str] | None = None, store: str | None = None,
               notebook: str | None = None, runtime_dir: str | os.PathLike[str] | None = None) -> str | Path:
    """The store a request means: ``store`` (an id a kernel registered in ``runtime_dir``, or an
    absolute folder under ``root_dir``), else the default store of the folder of ``notebook`` (a path
    under ``root_dir``), else that of ``root_dir`` (the server's own configuration).

    Raises ``PayloadError``: 400 for a relative ``store``, 403 for a location outside the root that
    no kernel registered, 404 for an unknown id.
    """
    from ..store.backends import display, is_database
    from ..store.store import default_path
    from .locations import is_id, lookup

    root = Path(root_dir).expanduser() if root_dir else Path.cwd()
    configured = default_path(root)  # the server's own $MM_JUPYTER_STORE, else <root>/.mm_store
    if store:
        if is_id(store):
            found = lookup(store, runtime_dir)
            if found is None:
                raise PayloadError(404, f"store {store} is not registered with this server (the kernel that "
                                        "reported it runs elsewhere)")
            return _location(found)
        if is_database(store) or ":" in store.split("/")[0]:
            if store == configured:
                return store
            raise PayloadError(403, f"store={display(store)!r}: a database store is named by the id its kernel "
                                    "registered, never by its URL")
        path = Path(store)
        if not path.is_absolute():
            raise PayloadError(400, f"store={store!r} must be an absolute path")
        if _under(path, root) or (not isinstance(configured, str) and path.resolve() == configured.resolve()):
            return path
        raise PayloadError(403, f"store={store!r} is outside the server's root folder and no kernel of this server "
                                "registered it")
    if notebook:
        folder = (root / notebook).parent.resolve()
        if not folder.is_relative_to(root.resolve()):
            raise PayloadError(400, f"path={notebook!r} is outside the server's root folder")
        return default_path(folder)
    return configured


def _under(path: Path, root: Path) -> bool:
    """``path`` (symbolic links resolved) lies in ``root``."""
    return path.resolve().is_relative_to(root.resolve())


def store_exists(path: str | os.PathLike[str]) -> bool:
    """A store to open: one with a catalog, or one whose catalog is gone while its objects hold
    saved versions (opening it then fails with the store's rebuild message: never an empty list).
    An empty folder is not a store yet; a database URL is (opening it reports what is wrong)."""
    from ..store.backends import is_database

    if is_database(path):
        return True
    path = Path(path)
    if (path / CATALOG).is_file():
        return True
    if not (path / "objects").is_dir():
        return False
    from ..store.backends import saved_evidence
    from ..store.objects import FolderObjects

    return saved_evidence(FolderObjects(path)) is not None


def _size(n: Any) -> str | None:
    from .display import human_bytes

    return human_bytes(n) if isinstance(n, (int, float)) else None


def _plain(value: Any) -> Any:
    """numpy/pandas scalars, tuples and NaN/NA -> JSON types (lists, int, float, str, None)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else float(value)
    item = getattr(value, "item", None)  # numpy scalar
    if callable(item):
        return _plain(item())
    try:
        import pandas as pd

        if pd.isna(value):
            return None
    except (TypeError, ValueError, ImportError):
        pass
    return str(value)


def _location(path: str | os.PathLike[str]) -> str | Path:
    """A store location as ``Store`` takes it: a database URL stays a string."""
    from ..store.backends import is_database

    return path if isinstance(path, str) and is_database(path) else Path(path)


def _open_store(path: str | Path) -> Any:
    """The one place the server opens a store (only after ``store_exists``: reading never creates one)."""
    from ..store import Store

    return Store(path)


def sets_payload(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"store": path, "exists": bool, "sets": [{name, version, approach, models, bytes, size, created, tts_s}]}``.

    ``size`` is ``bytes`` in the notebook's units (``human_bytes``). A folder without a catalog is
    reported as an empty store and is not created.
    """
    from ..store.backends import display

    path = _location(path)
    if not store_exists(path):
        return {"store": display(path), "exists": False, "sets": []}
    store = _open_store(path)
    try:
        frame = store.sets()
    finally:
        store.close()
    rows = [_plain(row) for row in frame.to_dict(orient="records")]
    rows = [{**{k: v for k, v in row.items() if k not in ("created", "tts_s")}, "size": _size(row["bytes"]),
             "created": row["created"], "tts_s": row["tts_s"]} for row in rows]
    return {"store": display(path), "exists": True, "sets": rows}


def lineage_payload(path: str | os.PathLike[str], name: str | None) -> dict[str, Any]:
    """``{"store", "name", "versions": [Version as dict, tuples as lists], "edges": [[base, derived]],
    "figure": plotly JSON}``: ``figure`` is the notebook's lineage graph, laid out for a narrow panel.

    Raises ``PayloadError`` (400 without a name, 404 for an unknown name or a missing store).
    """
    from ..store.backends import display

    path = _location(path)
    if not name:
        raise PayloadError(400, "lineage needs a set name: lineage?name=NAME")
    if not store_exists(path):
        raise PayloadError(404, f"no set named {name!r}: there is no store at {display(path)!r}")
    store = _open_store(path)
    try:
        lineage = store.lineage(name)
    except RefError as e:
        raise PayloadError(404, str(e)) from None
    except MMError as e:
        raise PayloadError(400, str(e)) from None
    finally:
        store.close()
    from .widgets._static import figure_json
    from .widgets.lineage import LineageGraph

    return {
        "store": display(path),
        "name": lineage.name,
        "versions": [{**_plain(asdict(v)), "size": _size(v.bytes)} for v in lineage.versions],
        "edges": _plain(lineage.edges),
        "figure": figure_json(LineageGraph(lineage, compact=True).figure),
    }


def searches_payload(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"store", "exists", "searches": [{id, dataset, created, approach, k, candidates, winner, score, top5,
    source}]}``, newest first: the searches kept with ``result.save(store, dataset=...)``. A store
    without any (or none at all) lists none and is not created; a malformed row is a 400 naming it."""
    from ..store.backends import display

    path = _location(path)
    if not store_exists(path):
        return {"store": display(path), "exists": False, "searches": []}
    store = _open_store(path)
    try:
        frame = store.searches()
    finally:
        store.close()
    keep = ("id", "dataset", "created", "approach", "k", "candidates", "winner", "score", "top5", "source")
    rows = [{k: _plain(row[k]) for k in keep} for row in frame.to_dict(orient="records")]
    return {"store": display(path), "exists": True, "searches": rows[::-1]}


#: ``scheme://user:password@`` in any text: the password is masked before text leaves the server.
_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")


def scrub(text: str) -> str:
    """``text`` with every URL password masked (error messages of database drivers may quote them)."""
    return _PASSWORD.sub(r"\1***@", text)


def error_payload(error: BaseException) -> tuple[int, dict[str, str]]:
    """HTTP status and ``{"error": message}`` for an exception raised while building a payload."""
    if isinstance(error, PayloadError):
        return error.status, {"error": scrub(error.message)}
    if isinstance(error, RefError):
        return 404, {"error": scrub(str(error))}
    if isinstance(error, MMError):
        return 400, {"error": scrub(str(error))}
    return 500, {"error": scrub(f"{type(error).__name__}: {error}")}


def _handlers(serverapp: Any) -> list[tuple[str, type, dict[str, Any]]]:
    import tornado.web
    from jupyter_server.auth.decorator import authorized
    from jupyter_server.base.handlers import APIHandler
    from jupyter_server.utils import url_path_join

    root_dir = getattr(serverapp, "root_dir", None)
    runtime_dir = getattr(serverapp, "runtime_dir", None)

    class _StoreHandler(APIHandler):
        auth_resource = AUTH_RESOURCE

        async def _reply(self, build: Any) -> None:
            store = self.get_query_argument("store", default="") or None
            notebook = self.get_query_argument("path", default="") or None
            try:  # in a worker thread: a slow disk or a busy catalog never blocks the server
                payload = await asyncio.to_thread(lambda: build(store_path(root_dir, store, notebook, runtime_dir)))
            except Exception as e:  # noqa: BLE001 - every failure becomes {"error": ...}, never an HTML page
                status, payload = error_payload(e)
                if status == 500:  # one line, password masked (a traceback could quote a store URL)
                    self.log.error("mm_jupyter: %s failed: %s", self.request.path, payload["error"])
                self.set_status(status)
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps(payload))

    class SetsHandler(_StoreHandler):
        @tornado.web.authenticated
        @authorized
        async def get(self) -> None:
            await self._reply(sets_payload)

    class LineageHandler(_StoreHandler):
        @tornado.web.authenticated
        @authorized
        async def get(self) -> None:
            name = self.get_query_argument("name", default="")
            await self._reply(lambda path: lineage_payload(path, name))

    class SearchesHandler(_StoreHandler):
        @tornado.web.authenticated
        @authorized
        async def get(self) -> None:
            await self._reply(searches_payload)

    base = url_path_join(serverapp.web_app.settings["base_url"], URL_PREFIX)
    return [
        (url_path_join(base, "sets"), SetsHandler, {}),
        (url_path_join(base, "lineage"), LineageHandler, {}),
        (url_path_join(base, "searches"), SearchesHandler, {}),
    ]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    """Register ``<base_url>/mm-jupyter/sets``, ``.../lineage`` and ``.../searches``."""
    from ..store.backends import display

    serverapp.web_app.add_handlers(".*$", _handlers(serverapp))
    serverapp.log.info("mm_jupyter: model store endpoints at %s/ (store %s)", URL_PREFIX,
                       display(store_path(getattr(serverapp, "root_dir", None))))


# jupyter_server < 2 looked for this name.
load_jupyter_server_extension = _load_jupyter_server_extension
