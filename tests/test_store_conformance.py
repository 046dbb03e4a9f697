"""Conformance of every backend pair (as zarr-python tests every Store with one class). The whole-store
suite runs on SQLite + folder and PostgreSQL + S3 (a real PostgreSQL server from the Debian packages and
moto's S3 emulator, started per test module by ``mm_jupyter.store.testing``); the contract-level kit
(``mm_jupyter.store.conformance``: ``ObjectAreaTests``, ``CatalogTests``) runs at the end of this module
on both object areas and on all three pairs the docs name: folder + SQLite, SQLite + S3, PostgreSQL + S3.

Round trips per approach (recovered in a fresh process that shares nothing but the two URLs),
integrity (a flipped byte), crash safety (a writer killed with SIGKILL), two processes saving and
recovering at once (gapless versions, nothing lost), gc while another process saves, and a catalog
rebuilt from the objects alone. PostgreSQL + S3 adds: one model of a 5,000-model set fetches only
its chunks (bytes counted), and large objects go up in parallel multipart parts.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest
import store_models as sm
import torch
import zygote
from torch import nn

import mm_jupyter as mm
from mm_jupyter.store import testing
from mm_jupyter.store.backends import open_objects, open_store
from mm_jupyter.store.catalog import SQLiteCatalog
from mm_jupyter.store.conformance import CatalogTests, ObjectAreaTests
from mm_jupyter.store.contracts import Catalog, ObjectArea
from mm_jupyter.store.objects import FolderObjects, chunk_size_for
from mm_jupyter.store.postgres import PostgresCatalog
from mm_jupyter.store.s3 import PROBE, S3Objects
from mm_jupyter.usecases.battery import cell_ref
from mm_jupyter.usecases.training import initial_models

pytestmark = pytest.mark.xdist_group("team-store")  # one PostgreSQL + S3 server for the module

BACKENDS = ["sqlite+folder", pytest.param("postgresql+s3", marks=pytest.mark.services)]
TRAIN = "mm_jupyter.usecases.training:train"


@dataclass
class Team:
    pg: testing.PostgresServer
    s3: testing.S3Server


@pytest.fixture(scope="module")
def team() -> Iterator[Team]:
    with testing.postgres_server(durable=False) as pg, testing.s3_server() as s3:
        yield Team(pg, s3)


@dataclass
class Backend:
    """A fresh, empty store of one backend pair; ``args`` are all another process needs."""

    kind: str
    path: str
    objects: str | None
    team: Team | None = None
    stores: list[mm.Store] = field(default_factory=list)

    def open(self, **kw: Any) -> mm.Store:
        store = mm.Store(self.path, objects=self.objects, **kw)
        self.stores.append(store)
        return store

    @property
    def args(self) -> list[str]:
        return [self.path, self.objects or ""]

    def flip_byte(self, store: mm.Store, oid: str, offset: int) -> None:
        """Change one stored byte of object ``oid`` (offset into the stored object)."""
        if self.objects is None:
            path = store.objects.path(oid)  # type: ignore[attr-defined]
            data = bytearray(path.read_bytes())
            data[offset] ^= 0xFF
            path.chmod(0o644)
            path.write_bytes(bytes(data))
            return
        area = store.objects
        key = area.key(oid)  # type: ignore[attr-defined]
        data = bytearray(area.client.get_object(Bucket=area.bucket, Key=key)["Body"].read())  # type: ignore[attr-defined]
        data[offset] ^= 0xFF
        area.client.put_object(Bucket=area.bucket, Key=key, Body=bytes(data))  # type: ignore[attr-defined]

    def lose_catalog(self) -> Backend:
        """The same objects with the catalog gone: the folder's file deleted, or a new database."""
        for s in self.stores:
            s.close()
        if not self.kind.startswith("postgresql"):
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.path}/catalog.sqlite{suffix}").unlink(missing_ok=True)
            return self
        return Backend(self.kind, self.team.pg.database(), self.objects, self.team)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite+folder":
        b = Backend(request.param, str(tmp_path / "store"), None)
    else:
        t: Team = request.getfixturevalue("team")
        b = Backend(request.param, t.pg.database(), t.s3.bucket_url(), t)
    yield b
    for s in b.stores:
        s.close()


def run_child(code: str, *args: str) -> "zygote.Child | subprocess.Popen[str]":
    return zygote.start(code, *args, cwd=sm.ROOT, env=sm.subprocess_env())


#: per ref: approach and the sha256 of every tensor of every model, recovered in a fresh process
RECOVER = r"""
import json, sys
import mm_jupyter as mm
import store_models as sm
store = mm.Store(sys.argv[1], objects=sys.argv[2] or None)
out = {}
for ref in sys.argv[3:]:
    ms = store.recover_set(ref)
    out[ref] = {"approach": ms.approach, "models": {n: sm.sd_digests(sd) for n, sd in zip(ms.names, ms.state_dicts())}}
print(json.dumps(out))
"""


def digests(models: dict[str, nn.Module]) -> dict[str, dict[str, str]]:
    return {n: sm.sd_digests(m.state_dict()) for n, m in models.items()}


@pytest.mark.slow
def test_round_trip_every_approach_in_a_fresh_process(backend: Backend) -> None:
    store = backend.open()
    base = {str(i): m for i, m in enumerate(initial_models(4))}
    want = {}
    refs = [store.save_set(base, "cells", approach="baseline")]
    want[str(refs[-1])] = ("baseline", digests(base))
    prov = mm.Provenance(train=TRAIN, config={"epochs": 1}, datasets={"2": cell_ref(2, 1)}, seed=3)
    trained = {**base, **prov.run(base)}
    refs.append(store.save_set(trained, "cells", approach="provenance", provenance=prov))
    want[str(refs[-1])] = ("provenance", digests(trained))
    changed = {**trained, "0": sm.fill_(initial_models(1)[0], 5)}
    for approach in ("update", "mmlib-base", "auto"):
        refs.append(store.save_set(changed, "cells", approach=approach))
        stored = store.stats(refs[-1])["approach"]
        want[str(refs[-1])] = (stored, digests(changed))
    assert [store.stats(r)["approach"] for r in refs] == ["baseline", "provenance", "update", "mmlib-base", "update"]
    assert store.lineage("cells").edges == [(1, 2), (2, 3), (3, 4), (4, 5)]  # every version follows the last

    out = zygote.run(RECOVER, *backend.args, *map(str, refs), cwd=sm.ROOT, env=sm.subprocess_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)
    assert {r: (g["approach"], g["models"]) for r, g in got.items()} == want
    assert store.verify() == []


def test_a_flipped_byte_is_an_integrity_error(backend: Backend) -> None:
    store = backend.open()
    ref = store.save_set(sm.crash_models(0, 1), "fam0", approach="baseline")
    params = store.row(ref).manifest["params"]
    backend.flip_byte(store, params, store.objects.size(params) - 100)
    fresh = backend.open()
    with pytest.raises(mm.IntegrityError, match="corrupt"):
        fresh.recover_set(ref).load()
    assert any(params[:12] in p for p in fresh.verify())


WRITER = r"""
import faulthandler, json, sys
faulthandler.dump_traceback_later(150, exit=True)  # a hang fails the test with every thread's stack
import mm_jupyter as mm
import store_models as sm
store = mm.Store(sys.argv[1], objects=sys.argv[2] or None)
w, count = int(sys.argv[3]), int(sys.argv[4])
approaches = ["baseline", "update", "mmlib-base", "auto"]
print(json.dumps({"ready": True}), flush=True)
k = 0
while count < 0 or k < count:
    seed = w * 10000 + k
    approach = approaches[(w + k) % len(approaches)]
    ref = store.save_set(sm.crash_models(0, seed), "shared", approach=approach)
    print(json.dumps({"ref": str(ref), "seed": seed, "approach": approach}), flush=True)
    if count >= 0:  # recover the latest version, whoever saved it
        ms = store.recover_set("shared")
        print(json.dumps({"read": str(ms.ref), "seed": sm.check_crash_set(ms, 0)}), flush=True)
    k += 1
"""


def check_versions(store: mm.Store, reported: dict[str, dict[str, Any]]) -> None:
    """Every acknowledged version recovers with its content; numbers are 1..N without gaps."""
    frame = store.sets()
    listed = [f"{n}@{v}" for n, v in zip(frame["name"], frame["version"])]
    assert set(reported) <= set(listed), f"acknowledged versions vanished: {set(reported) - set(listed)}"
    assert sorted(frame["version"]) == list(range(1, len(frame) + 1))
    for ref in listed:
        seed = sm.check_crash_set(store.recover_set(ref), 0)
        if ref in reported:
            assert seed == reported[ref]["seed"], ref


@pytest.mark.slow
def test_two_processes_save_and_recover_at_once(backend: Backend) -> None:
    backend.open().save_set(sm.crash_models(0, 99), "shared", approach="baseline")  # creates the store
    procs = [run_child(WRITER, *backend.args, str(w), "3") for w in (1, 2)]
    reported: dict[str, dict[str, Any]] = {"shared@1": {"seed": 99}}
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-6000:]
        for line in out.splitlines():
            x = json.loads(line)
            if "ref" in x:
                assert x["ref"] not in reported, f"two saves got {x['ref']}"
                reported[x["ref"]] = x
            elif "read" in x:
                assert x["seed"] == reported.get(x["read"], x)["seed"]
    store = backend.open()
    assert len(reported) == 7
    check_versions(store, reported)
    assert store.verify() == []


@pytest.mark.slow
def test_a_killed_writer_loses_nothing_acknowledged(backend: Backend) -> None:
    backend.open().save_set(sm.crash_models(0, 99), "shared", approach="baseline")
    reported: dict[str, dict[str, Any]] = {"shared@1": {"seed": 99}}
    rng = random.Random(14)
    for _ in range(2):
        p = run_child(WRITER, *backend.args, "3", "-1")
        assert p.stdout is not None
        assert json.loads(p.stdout.readline()) == {"ready": True}, p.stderr.read() if p.stderr else ""
        for _ in range(2):
            x = json.loads(p.stdout.readline())
            reported[x["ref"]] = x
        time.sleep(rng.uniform(0.0, 0.3))
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=60)
        out = p.stdout.read()  # the buffered reader: readline() may already hold later lines
        for line in out.splitlines():
            x = json.loads(line)
            reported[x["ref"]] = x
    store = backend.open()
    check_versions(store, reported)
    assert store.verify() == []
    store.gc()
    check_versions(store, reported)
    ref = store.save_set(sm.crash_models(0, 7), "shared", approach="update")
    assert sm.check_crash_set(store.recover_set(ref), 0) == 7


@pytest.mark.slow
def test_gc_while_another_process_saves(backend: Backend) -> None:
    store = backend.open()
    store.save_set(sm.crash_models(0, 99), "shared", approach="baseline")
    orphan = store.objects.put(b"no version references this object").oid
    p = run_child(WRITER, *backend.args, "1", "2")
    reports = []
    while p.poll() is None:
        reports.append(store.gc())
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    reports.append(store.gc())
    assert sum(r.objects for r in reports) >= 1 and not store.objects.exists(orphan)
    reported = {x["ref"]: x for x in map(json.loads, out.splitlines()) if "ref" in x}
    check_versions(store, reported)
    assert store.verify() == []


def test_catalog_rebuilt_from_the_objects(backend: Backend) -> None:
    store = backend.open()
    for k, approach in enumerate(["baseline", "update", "mmlib-base", "update"]):
        store.save_set(sm.crash_models(1, k), "fam1", approach=approach)
    store.save_set(sm.crash_models(2, 9), "fam2", approach="baseline")
    frame = store.sets()
    lineage = store.lineage("fam1").frame
    lost = backend.lose_catalog()
    with pytest.raises(mm.StoreError, match="rebuild"):
        lost.open()
    report = mm.Store.rebuild_catalog(lost.path, objects=lost.objects)
    assert (report.versions, report.problems) == (5, [])
    again = lost.open()
    assert again.sets().equals(frame)
    assert again.lineage("fam1").frame.equals(lineage)
    assert sm.check_crash_set(again.recover_set("fam1@4"), 1) == 3
    assert again.verify() == []


# -- PostgreSQL + S3 only: what only remote objects have ------------------------------------------
@pytest.mark.slow
def test_one_model_of_5000_fetches_only_its_chunks(team: Team) -> None:
    objects = team.s3.bucket_url()
    url = team.pg.database()
    store = mm.Store(url, objects=objects)
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(5, 48), nn.ReLU(), nn.Linear(48, 1)) for _ in range(5000)]
    ref = store.save_set(models, "cells", approach="baseline")
    store.close()

    fresh = mm.Store(url, objects=objects)
    params = fresh.row(ref).manifest["params"]  # reads the manifest
    before = fresh.objects.bytes_fetched
    ms = fresh.recover_set(ref)
    sd = ms.state_dict(2345)
    fetched = fresh.objects.bytes_fetched - before
    stride = ms.layout.stride
    total = fresh.objects.size(params)
    chunk = chunk_size_for(5000 * stride)
    assert all(torch.equal(sd[k], v) for k, v in models[2345].state_dict().items())
    assert fetched <= PROBE + 2 * chunk, (fetched, chunk)
    assert fetched * 20 < total
    assert fresh.objects.bytes_verified <= 2 * chunk + 4 * PROBE
    fresh.close()


@pytest.mark.services
def test_large_objects_go_up_in_parallel_parts(team: Team) -> None:
    store = mm.Store(team.pg.database(), objects=team.s3.bucket_url())
    parts: list[int] = []
    store.objects.client.meta.events.register(  # type: ignore[attr-defined]
        "before-parameter-build.s3.UploadPart", lambda params, **_: parts.append(int(params["PartNumber"])))
    big = [nn.Linear(1500, 1500) for _ in range(3)]  # 27 MB of parameters in one object
    ref = store.save_set(big, "big", approach="baseline")
    assert sorted(parts) == list(range(1, len(parts) + 1)) and len(parts) >= 3
    ms = store.recover_set(ref)
    assert all(torch.equal(ms.state_dict(i)["weight"], m.weight) for i, m in enumerate(big))
    store.close()


@pytest.mark.services
def test_the_two_urls_from_the_environment(team: Team, monkeypatch: pytest.MonkeyPatch) -> None:
    url, objects = team.pg.database(), team.s3.bucket_url()
    monkeypatch.setenv("MM_JUPYTER_STORE", url)
    monkeypatch.setenv("MM_JUPYTER_OBJECTS", objects)
    store = mm.Store()
    ref = store.save_set(sm.crash_models(0, 4), "env", approach="baseline")
    assert repr(store) == f"Store({url!r})"
    twin = store.twin()
    assert sm.check_crash_set(twin.recover_set(str(ref)), 0) == 4
    monkeypatch.delenv("MM_JUPYTER_OBJECTS")
    with pytest.raises(mm.StoreError, match="objects="):
        mm.Store()
    twin.close()
    store.close()


@pytest.mark.slow
def test_notebooks_point_at_the_team_store(team: Team, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``%config ModelMagics.store/objects`` and the server extension's resolver keep a database URL
    (no folder made of it); the sidebar's payload lists what the magics saved. The kernel reports the
    store by the id it registered: the URL (a password may be in it) never travels."""
    from IPython.testing import globalipapp

    from mm_jupyter.jupyter.magics import kernel_store, store_location
    from mm_jupyter.jupyter.server import sets_payload, store_path

    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))

    url, objects = team.pg.database(), team.s3.bucket_url()
    globalipapp.start_ipython()
    ip = globalipapp.get_ipython()
    ip.run_line_magic("load_ext", "mm_jupyter")
    ip.run_line_magic("config", f"ModelMagics.store = {url!r}")
    ip.run_line_magic("config", f"ModelMagics.objects = {objects!r}")
    try:
        ip.run_cell("import store_models as sm\nmodels = sm.crash_models(0, 6)")
        ip.run_cell_magic("modelset", "save team", "models")
        sid = kernel_store().store
        assert store_location(None, url) == url and store_path(store=sid) == url
        monkeypatch.setenv("MM_JUPYTER_OBJECTS", objects)  # the server's own setting
        payload = sets_payload(store_path(store=sid))
        assert [(s["name"], s["version"], s["models"]) for s in payload["sets"]] == [("team", 1, 3)]
        again = mm.Store(url, objects=objects)
        assert sm.check_crash_set(again.recover_set("team@1"), 0) == 6
        again.close()
    finally:
        ip.run_line_magic("config", "ModelMagics.store = None")
        ip.run_line_magic("config", "ModelMagics.objects = None")


# -- the reusable contract kit (mm_jupyter.store.conformance) on every pair the docs name ---------------------
def _flip_file(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))


def _flip_s3(area: S3Objects, oid: str, offset: int) -> None:
    key = area.key(oid)
    data = bytearray(area.client.get_object(Bucket=area.bucket, Key=key)["Body"].read())
    data[offset] ^= 0xFF
    area.client.put_object(Bucket=area.bucket, Key=key, Body=bytes(data))


def _flip(objects: ObjectArea, oid: str, offset: int) -> None:
    if isinstance(objects, FolderObjects):
        _flip_file(objects.path(oid), offset)
    else:
        assert isinstance(objects, S3Objects)
        _flip_s3(objects, oid, offset)


class TestFolderObjects(ObjectAreaTests):
    def make_objects(self, tmp_path: Path) -> ObjectArea:
        return FolderObjects(tmp_path / "store")

    def corrupt(self, objects: ObjectArea, oid: str, offset: int) -> None:
        _flip(objects, oid, offset)


@pytest.mark.services
class TestS3Objects(ObjectAreaTests):
    @pytest.fixture(autouse=True)
    def _team(self, team: Team) -> None:
        self.team = team

    def make_objects(self, tmp_path: Path) -> ObjectArea:
        return open_objects(self.team.s3.bucket_url())

    def corrupt(self, objects: ObjectArea, oid: str, offset: int) -> None:
        _flip(objects, oid, offset)


class TestSQLiteFolderCatalog(CatalogTests):
    def make_catalog(self, tmp_path: Path) -> Catalog:
        return open_store(tmp_path / "store", None).catalog

    def reopen(self, catalog: Catalog) -> Catalog:
        return SQLiteCatalog(Path(catalog.location), catalog.objects)

    def corrupt(self, objects: ObjectArea, oid: str, offset: int) -> None:
        _flip(objects, oid, offset)


@pytest.mark.services
class TestSQLiteS3Catalog(TestSQLiteFolderCatalog):
    @pytest.fixture(autouse=True)
    def _team(self, team: Team) -> None:
        self.team = team

    def make_catalog(self, tmp_path: Path) -> Catalog:
        catalog = open_store(tmp_path / "store", self.team.s3.bucket_url()).catalog
        assert isinstance(catalog.objects, S3Objects)
        return catalog


@pytest.mark.services
class TestPostgresS3Catalog(CatalogTests):
    @pytest.fixture(autouse=True)
    def _team(self, team: Team) -> None:
        self.team = team
        self.urls: dict[int, str] = {}

    def make_catalog(self, tmp_path: Path) -> Catalog:
        url = self.team.pg.database()
        catalog = open_store(url, self.team.s3.bucket_url()).catalog
        self.urls[id(catalog)] = url
        return catalog

    def location(self, catalog: Catalog) -> str:
        return self.urls[id(catalog)]

    def reopen(self, catalog: Catalog) -> Catalog:
        return PostgresCatalog(self.location(catalog), catalog.objects)

    def corrupt(self, objects: ObjectArea, oid: str, offset: int) -> None:
        _flip(objects, oid, offset)


def test_the_lake_on_every_backend(backend: Backend) -> None:
    """store.models() and kept searches over both backend pairs: a kept search's winner is best on its
    dataset for another opening of the store too (another connection, the candidates read from the area)."""
    import search_models

    store = backend.open()
    torch.manual_seed(0)
    store.save_set([nn.Linear(4, 2), nn.Linear(4, 2)], "pair")
    mm.add_candidates(store, {f"m{i}": search_models.mlp() for i in range(3)}, "zoo")
    assert store.searches().empty
    ident = store.keep_search("cifar-subset", "alsatian", 1, [("m2", 0.9, 0.1, 1), ("m0", 0.5, 0.4, 0),
                                                              ("m1", 0.4, 0.5, 0)], {"inference": 1.0}, ("zoo", 1))
    other = backend.open()
    assert list(other.searches()["winner"]) == ["m2"] and int(other.searches()["id"].iloc[0]) == ident
    models = other.models()
    assert list(zip(models["kind"], models["set"], models["name"])) == [
        ("set", "pair", "0"), ("set", "pair", "1"), ("candidates", "zoo", "m0"), ("candidates", "zoo", "m1"),
        ("candidates", "zoo", "m2")]
    assert list(models.query("params < 20e6 and best_on == 'cifar-subset'")["name"]) == ["m2"]
    assert set(models[models["set"] == "pair"]["params"]) == {10}
