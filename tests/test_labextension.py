"""The JupyterLab extension "mm-jupyter": the committed prebuilt frontend, its discovery by JupyterLab,
the server extension's payloads and one real HTTP round trip through ``jupyter server``."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from lab_server import TOKEN, jupyter

from mm_jupyter.jupyter.display import human_bytes
from mm_jupyter.jupyter.locations import register
from mm_jupyter.jupyter.server import (
    PayloadError,
    error_payload,
    lineage_payload,
    searches_payload,
    sets_payload,
    store_path,
)

ROOT = Path(__file__).resolve().parents[1]
PREBUILT = ROOT / "mm_jupyter" / "labextension"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
SET_KEYS = ["name", "version", "approach", "models", "bytes", "size", "created", "tts_s"]


def _jupyter(*args: str, timeout: float = 120) -> str:
    """Output (stdout and stderr, colours removed) of ``python -m jupyter ARGS`` in this interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "MM_JUPYTER_STORE"}
    proc = subprocess.run([sys.executable, "-m", "jupyter", *args], check=False, capture_output=True, text=True,
                          timeout=timeout, env=env)
    out = ANSI.sub("", proc.stdout + proc.stderr)
    assert proc.returncode == 0, out
    return out


def _save_demo(path: Path) -> None:
    import mm_jupyter
    from mm_jupyter.usecases.models import ffnn

    store = mm_jupyter.Store(path)
    try:
        store.save_set({"a": ffnn(hidden=8), "b": ffnn(hidden=8)}, "demo")
        store.save_set({"a": ffnn(hidden=8), "b": ffnn(hidden=8), "c": ffnn(hidden=8)}, "demo", approach="update")
    finally:
        store.close()


@pytest.fixture(scope="module")
def demo_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("labext") / "store"
    _save_demo(path)
    return path


# -- the prebuilt frontend --------------------------------------------------------------------------
def test_prebuilt_extension_is_committed_and_complete() -> None:
    meta = json.loads((PREBUILT / "package.json").read_text())
    assert meta["name"] == "mm-jupyter"
    build = meta["jupyterlab"]["_build"]
    load = PREBUILT / build["load"]
    assert load.is_file() and load.parent == PREBUILT / "static"
    bundle = "".join(p.read_text() for p in (PREBUILT / "static").glob("*.js"))
    for text in ("mm-jupyter:plugin", "mm-jupyter:open-tour", "mm-jupyter:insert-save-cell",
                 "mm-jupyter:insert-search-cell", "Model store", "notebooks/00_tour.ipynb",
                 "%%modelset save NAME --approach baseline", "%modelsearch CANDIDATES DATA -k 1 -o result",
                 "lineage", "sets",
                 # the sidebar asks the kernel which store its magics use, and draws lineage with plotly
                 "kernel_store()", "user_expressions", "application/vnd.plotly.v1+json",
                 # widget outputs whose model is gone show their static picture
                 "jupyter.widget", "application/vnd.jupyter.widget-view+json",
                 # a selected version's details; the store a notebook's kernel last reported is remembered
                 "mm-store-details", "mm-store-selected", "mm-jupyter:notebook-stores", "last used by this notebook",
                 # the kept searches: dataset, day, winner, top 5, and an empty state that says what to do
                 "Kept searches", "mm-store-search", "top 5: ", "No kept searches yet"):
        assert text in bundle, f"{text!r} is not in the prebuilt bundle: rebuild it (labextension/README.md)"
    # the source points its build output at the committed folder, under the same name
    source = json.loads((ROOT / "labextension" / "package.json").read_text())
    assert source["name"] == meta["name"] and source["version"] == meta["version"]
    assert (ROOT / "labextension" / source["jupyterlab"]["outputDir"]).resolve() == PREBUILT
    # python discovery hook used by `jupyter labextension develop` names the same folder
    import mm_jupyter

    (hook,) = mm_jupyter._jupyter_labextension_paths()
    assert (Path(mm_jupyter.__file__).parent / hook["src"]).resolve() == PREBUILT and hook["dest"] == "mm-jupyter"


@pytest.mark.slow
def test_jupyterlab_lists_the_extension_enabled() -> None:
    out = _jupyter("labextension", "list")
    assert re.search(r"mm-jupyter v\S+ enabled\s+OK", out), out


@pytest.mark.slow
def test_server_extension_is_enabled_and_valid() -> None:
    out = _jupyter("server", "extension", "list")
    assert re.search(r"mm_jupyter enabled", out), out
    assert re.search(r"Validating mm_jupyter\.\.\.\s*\n\s*mm_jupyter \S+ OK", out), out


# -- payloads ---------------------------------------------------------------------------------------
def test_sets_payload_lists_every_version_as_plain_json(demo_store: Path) -> None:
    payload = sets_payload(demo_store)
    assert json.loads(json.dumps(payload, allow_nan=False)) == payload
    assert payload["store"] == str(demo_store) and payload["exists"] is True
    rows = payload["sets"]
    assert [list(r) for r in rows] == [SET_KEYS, SET_KEYS]
    assert [(r["name"], r["version"], r["approach"], r["models"]) for r in rows] == [
        ("demo", 1, "baseline", 2), ("demo", 2, "update", 3)]
    for r in rows:
        assert type(r["version"]) is int and type(r["models"]) is int and type(r["bytes"]) is int
        assert r["bytes"] > 0 and isinstance(r["tts_s"], float) and r["created"].startswith("20")
        assert r["size"] == human_bytes(r["bytes"])  # the notebook's units (kB, MB), not KiB


def test_lineage_payload_has_versions_edges_and_lists(demo_store: Path) -> None:
    payload = lineage_payload(demo_store, "demo")
    assert json.loads(json.dumps(payload, allow_nan=False)) == payload
    assert payload["name"] == "demo" and payload["edges"] == [[1, 2]]
    v1, v2 = payload["versions"]
    assert (v1["version"], v1["base"], v1["approach"], v1["models"]) == (1, None, "baseline", 2)
    assert (v2["version"], v2["base"], v2["approach"], v2["models"]) == (2, 1, "update", 3)
    assert v2["added"] == ["c"] and v2["dropped"] == [] and isinstance(v2["datasets"], list)
    assert v1["bytes"] == sets_payload(demo_store)["sets"][0]["bytes"] and v1["size"] == human_bytes(v1["bytes"])
    # the notebook's lineage graph, laid out for the sidebar
    figure = payload["figure"]
    assert [t["name"] for t in figure["data"]] == ["baseline", "update"]
    assert [t["customdata"] for t in figure["data"]] == [[1], [2]]
    assert figure["layout"]["legend"]["orientation"] == "h" and "title" not in figure["layout"]


def test_a_full_copy_saved_again_is_an_edge_in_the_sidebar(tmp_path: Path) -> None:
    """Saving a name again as a full copy (baseline) still links the versions: the payload the sidebar
    draws has the edge, and the figure draws it as an arrow."""
    import mm_jupyter
    from mm_jupyter.usecases.models import ffnn

    store = mm_jupyter.Store(tmp_path / "store")
    for _ in range(2):
        store.save_set({"a": ffnn(hidden=8)}, "again", approach="baseline")
    store.close()
    payload = lineage_payload(tmp_path / "store", "again")
    assert payload["edges"] == [[1, 2]] and [v["base"] for v in payload["versions"]] == [None, 1]
    assert [v["chain"] for v in payload["versions"]] == [0, 0]  # a lineage edge, not a storage base
    assert len(payload["figure"]["layout"]["annotations"]) == 1  # the arrow from v1 to v2


def test_missing_store_lists_empty_and_is_not_created(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / ".mm_store"
    assert sets_payload(missing) == {"store": str(missing), "exists": False, "sets": []}
    with pytest.raises(PayloadError) as e:
        lineage_payload(missing, "demo")
    assert e.value.status == 404
    assert not missing.exists() and not missing.parent.exists()
    empty = tmp_path / "empty"  # a folder that is not a store yet: still nothing written
    empty.mkdir()
    assert sets_payload(empty)["sets"] == [] and list(empty.iterdir()) == []


def _keep_search(path: Path, dataset: str, winner: str = "b") -> None:
    import mm_jupyter

    store = mm_jupyter.Store(path)
    try:
        others = [m for m in "abcdefg" if m != winner]
        ranking = [(winner, 0.9, 0.1, 2)] + [(m, 0.5 - i / 10, 0.5, 1) for i, m in enumerate(others)]
        store.keep_search(dataset, "alsatian", 1, ranking, {"inference": 1.5})
    finally:
        store.close()


def test_searches_payload_lists_kept_searches_newest_first(tmp_path: Path) -> None:
    path = tmp_path / "store"
    _save_demo(path)
    assert searches_payload(path) == {"store": str(path), "exists": True, "searches": []}
    _keep_search(path, "cifar-subset")
    _keep_search(path, "digits", winner="e")
    payload = searches_payload(path)
    assert json.loads(json.dumps(payload)) == payload
    first, second = payload["searches"]
    assert (first["dataset"], first["winner"], first["top5"]) == ("digits", "e", ["e", "a", "b", "c", "d"])
    assert (second["dataset"], second["winner"], second["id"], second["k"]) == ("cifar-subset", "b", 1, 1)
    assert second["candidates"] == 7 and second["score"] == 0.9 and second["source"] is None
    assert second["created"] <= first["created"] and second["approach"] == "alsatian"
    missing = tmp_path / "nowhere"
    assert searches_payload(missing) == {"store": str(missing), "exists": False, "searches": []}
    assert not missing.exists()
    import sqlite3

    db = sqlite3.connect(path / "catalog.sqlite")
    with db:
        db.execute("UPDATE searches SET record='{' WHERE id=2")
    db.close()
    with pytest.raises(Exception) as e:
        searches_payload(path)
    status, body = error_payload(e.value)
    assert status == 400 and "kept search #2" in body["error"] and "digits" in body["error"]


def test_lineage_errors_become_error_payloads(demo_store: Path) -> None:
    with pytest.raises(PayloadError) as e:
        lineage_payload(demo_store, "no-such-set")
    status, body = error_payload(e.value)
    assert status == 404 and "no-such-set" in body["error"] and list(body) == ["error"]
    with pytest.raises(PayloadError) as e:
        lineage_payload(demo_store, "")
    assert e.value.status == 400
    from mm_jupyter.errors import RefError, StoreError

    assert error_payload(RefError("gone"))[0] == 404
    assert error_payload(StoreError("bad")) == (400, {"error": "bad"})
    assert error_payload(ValueError("boom"))[0] == 500


def test_store_path_kernel_then_notebook_folder_then_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MM_JUPYTER_STORE", raising=False)
    assert store_path(tmp_path) == tmp_path / ".mm_store"
    # a notebook's store is the one the magics use in its folder (the kernel's working directory)
    assert store_path(tmp_path, notebook="course/week1/ex.ipynb") == tmp_path / "course" / "week1" / ".mm_store"
    # what the kernel reported (an id it registered) wins; a folder under the root may be named directly
    sid = register("/data/stores/x", tmp_path / "runtime")
    assert (store_path(tmp_path, store=sid, notebook="ex.ipynb", runtime_dir=tmp_path / "runtime")
            == Path("/data/stores/x"))
    assert store_path(tmp_path, store=str(tmp_path / "in" / "s")) == tmp_path / "in" / "s"
    # anything else named by a request is refused: folders elsewhere, database URLs, unknown ids
    for outside in ("/data/stores/x", str(tmp_path / ".." / "escape"), "postgresql://u:pw@evil:5432/db",
                    "file:///etc", "mmstore-" + "0" * 32):
        with pytest.raises(PayloadError) as e:
            store_path(tmp_path, store=outside, runtime_dir=tmp_path / "runtime")
        assert e.value.status in (403, 404) and "pw" not in e.value.message, (outside, e.value.message)
    (tmp_path / "link").symlink_to("/data")  # a link under the root that leads out of it
    with pytest.raises(PayloadError) as e:
        store_path(tmp_path, store=str(tmp_path / "link" / "stores"))
    assert e.value.status == 403
    monkeypatch.setenv("MM_JUPYTER_STORE", str(tmp_path / "elsewhere"))
    assert store_path(tmp_path / "root") == tmp_path / "elsewhere"
    assert store_path(tmp_path, notebook="a/b.ipynb") == tmp_path / "elsewhere"
    monkeypatch.setenv("MM_JUPYTER_STORE", "rel/store")
    assert store_path(tmp_path) == tmp_path / "rel" / "store"
    assert store_path(tmp_path, notebook="a/b.ipynb") == tmp_path / "a" / "rel" / "store"
    with pytest.raises(PayloadError, match="absolute") as e:
        store_path(tmp_path, store="relative/store")
    assert e.value.status == 400
    with pytest.raises(PayloadError, match="outside"):
        store_path(tmp_path / "root", notebook="../../etc/x.ipynb")


def test_one_resolver_for_magics_server_and_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Store(), the magics and the server pick the same store for a notebook in a folder."""
    from mm_jupyter.jupyter.magics import store_location
    from mm_jupyter.store.store import default_path

    folder = tmp_path / "course"
    folder.mkdir()
    monkeypatch.chdir(folder)  # a kernel's working directory is its notebook's folder
    for env in (None, "rel/store", str(tmp_path / "abs")):
        if env is None:
            monkeypatch.delenv("MM_JUPYTER_STORE", raising=False)
        else:
            monkeypatch.setenv("MM_JUPYTER_STORE", env)
        api = default_path().resolve()
        assert store_location() == api == store_path(tmp_path, notebook="course/nb.ipynb").resolve()


def test_payloads_do_not_import_torch(demo_store: Path) -> None:
    code = (
        "import sys, mm_jupyter.jupyter.server as s\n"
        f"assert s.sets_payload({str(demo_store)!r})['sets']\n"
        f"assert s.lineage_payload({str(demo_store)!r}, 'demo')['versions']\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# -- one real server round trip ---------------------------------------------------------------------
def _get(url: str, token: str | None) -> tuple[int, dict]:
    req = urllib.request.Request(url, headers={"Authorization": f"token {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            return e.code, json.loads(body)
        except ValueError:
            return e.code, {"raw": body.decode(errors="replace")}


@pytest.mark.services
def test_server_round_trip(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _save_demo(root / ".mm_store")  # the default store under the server's root folder
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
    with jupyter("server", root, tmp_path / "server.log", ("--ServerApp.jpserver_extensions", "mm_jupyter=True"),
                 env=env, base_url="/base/") as base:
        token = TOKEN
        status, body = _get(f"{base}/mm-jupyter/sets", token)
        assert status == 200, body
        assert body == json.loads(json.dumps(sets_payload(root / ".mm_store")))
        assert [r["version"] for r in body["sets"]] == [1, 2]

        status, body = _get(f"{base}/mm-jupyter/lineage?name=demo", token)
        assert status == 200 and body["edges"] == [[1, 2]] and body["figure"]["data"], body

        status, body = _get(f"{base}/mm-jupyter/searches", token)
        assert status == 200 and body["searches"] == [] and body["exists"], body
        _keep_search(root / ".mm_store", "cifar-subset")
        status, body = _get(f"{base}/mm-jupyter/searches", token)
        assert status == 200 and body == json.loads(json.dumps(searches_payload(root / ".mm_store"))), body
        assert [s["winner"] for s in body["searches"]] == ["b"]
        assert _get(f"{base}/mm-jupyter/searches", None)[0] == 403

        # the store a kernel reported (by the id it registered), and the store of a notebook's folder
        other = tmp_path / "kernel-store"
        _save_demo(other)
        sid = register(str(other), tmp_path / "runtime")
        status, body = _get(f"{base}/mm-jupyter/sets?store={sid}", token)
        assert status == 200 and body["store"] == str(other) and len(body["sets"]) == 2, body
        status, body = _get(f"{base}/mm-jupyter/sets?store={urllib.parse.quote(str(other))}", token)
        assert status == 403 and "outside the server's root" in body["error"], body  # not by its path
        status, body = _get(f"{base}/mm-jupyter/sets?path=course/nb.ipynb", token)
        assert status == 200 and body == {"store": str((root / "course").resolve() / ".mm_store"),
                                          "exists": False, "sets": []}, body
        assert not (root / "course").exists()  # listing a missing store created nothing
        status, body = _get(f"{base}/mm-jupyter/sets?store=relative", token)
        assert status == 400 and "absolute" in body["error"], body

        status, body = _get(f"{base}/mm-jupyter/lineage?name=nope", token)
        assert status == 404 and "nope" in body["error"], body
        status, body = _get(f"{base}/mm-jupyter/lineage", token)
        assert status == 400 and "error" in body, body

        assert _get(f"{base}/mm-jupyter/sets", None)[0] == 403  # authenticated only

        # JupyterLab hands the prebuilt extension to the browser: page config names it, static files are served
        with urllib.request.urlopen(urllib.request.Request(
                f"{base}/lab", headers={"Authorization": f"token {token}"}), timeout=30) as resp:
            page = resp.read().decode()
        found = re.search(r'<script id="jupyter-config-data" type="application/json">(.*?)</script>', page, re.DOTALL)
        assert found, page[:2000]
        federated = {e["name"]: e for e in json.loads(found.group(1))["federated_extensions"]}
        assert "mm-jupyter" in federated, sorted(federated)
        entry = federated["mm-jupyter"]
        committed = json.loads((PREBUILT / "package.json").read_text())["jupyterlab"]["_build"]["load"]
        assert entry["load"] == committed, "the installed copy is stale: re-run pip install -e . after a rebuild"
        with urllib.request.urlopen(f"{base}/lab/extensions/mm-jupyter/{entry['load']}", timeout=30) as resp:
            assert resp.status == 200 and b"mm-jupyter" in resp.read()


SECRET = "S3cretPW-4711"
DB_URL = f"postgresql://mm:{SECRET}@127.0.0.1:9/models"  # port 9 (discard): nothing listens


@pytest.mark.services
def test_store_passwords_never_leave_the_server_and_requests_cannot_redirect_it(tmp_path: Path) -> None:
    """A server configured with a database store (password in the URL): the password appears in no
    response and no log line; a request can neither point the server at another folder or host nor
    learn anything about it; an authorizer that denies ``mm_jupyter`` is obeyed."""
    root = tmp_path / "root"
    root.mkdir()
    runtime = tmp_path / "runtime"
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime), "MM_JUPYTER_OBJECTS": str(tmp_path / "objects")}
    log = tmp_path / "server.log"
    kernel_url = f"postgresql://k:{SECRET}@127.0.0.1:9/kernel"
    sid = register(kernel_url, runtime)  # what a kernel of this server using that store reports
    assert SECRET not in sid
    bodies = []
    with jupyter("server", root, log, ("--ServerApp.jpserver_extensions", "mm_jupyter=True",
                                       "--ServerApp.log_level=DEBUG"), env=env, store=DB_URL) as base:
        for query in ("", f"?store={sid}", f"?store={sid}&name=x", "?path=nb.ipynb"):
            for endpoint in ("sets", "lineage"):
                status, body = _get(f"{base}/mm-jupyter/{endpoint}{query}", TOKEN)
                assert status >= 400 and "error" in body, (endpoint, query, body)  # nothing listens on port 9
                bodies.append(json.dumps(body))
        assert any("mm:***@127.0.0.1:9" in b for b in bodies), bodies  # the location is shown, masked
        # a request cannot name a host, a database URL or a folder outside the root
        for store in ("postgresql://x:y@evil.example:5432/db", "/etc", str(tmp_path)):
            status, body = _get(f"{base}/mm-jupyter/sets?store={urllib.parse.quote(store)}", TOKEN)
            assert status == 403, (store, body)
            bodies.append(json.dumps(body))
    text = log.read_text()
    assert "mm_jupyter: model store endpoints" in text and "mm:***@" in text  # the start-up line, masked
    for where, content in [("responses", "\n".join(bodies)), ("server log", text)]:
        assert SECRET not in content, f"the password leaked into the {where}"


@pytest.mark.services
def test_handlers_ask_the_authorizer_about_mm_jupyter(tmp_path: Path) -> None:
    root = tmp_path / "root"
    _save_demo(root / ".mm_store")
    authorizer = tmp_path / "deny_mm.py"
    authorizer.write_text(
        "from jupyter_server.auth import Authorizer\n"
        "class DenyStore(Authorizer):\n"
        "    def is_authorized(self, handler, user, action, resource):\n"
        "        return resource != 'mm_jupyter'\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    with jupyter("server", root, tmp_path / "server.log", ("--ServerApp.jpserver_extensions", "mm_jupyter=True",
                                                           "--ServerApp.authorizer_class=deny_mm.DenyStore"),
                 env=env) as base:
        assert _get(f"{base}/mm-jupyter/sets", TOKEN)[0] == 403
        assert _get(f"{base}/mm-jupyter/lineage?name=demo", TOKEN)[0] == 403
        assert _get(f"{base}/api/status", TOKEN)[0] == 200  # everything else is allowed
