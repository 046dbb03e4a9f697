"""The catalog is an index, not the truth: manifests are verified objects, a missing, empty or
damaged catalog is a clear error (never an empty store), ``rebuild_catalog`` gives every version
back bit-exactly from the objects alone, and no mutation of a manifest or of a catalog row makes
recovery return a wrong tensor."""
from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import store_models as sm
import torch

import mm_jupyter as mm
from mm_jupyter.modelsearch.stored import add_candidates, load_candidates
from mm_jupyter.usecases.battery import cell_ref
from mm_jupyter.usecases.training import initial_models

ARCH = mm.Architecture.factory("store_models:mlp", width=16, depth=2, inputs=4)
TRAIN = "mm_jupyter.usecases.training:train"


def models(seed: int, names: list[str] | None = None) -> dict[str, torch.nn.Module]:
    names = names or ["a", "b", "c"]
    return {nm: sm.fill_(sm.mlp(width=16), seed * 100 + i) for i, nm in enumerate(names)}


def build(root: Path, provenance: bool) -> dict[str, list[dict[str, str]]]:
    """Every kind of version: baseline, an update chain that adds and drops models, a chain limit
    promotion, mmlib-base, auto, a base of another name, (provenance,) and a candidate set."""
    store = mm.Store(root, max_chain=2)
    want: dict[str, list[dict[str, str]]] = {}

    def save(ms: Any, name: str, approach: str, **kw: Any) -> None:
        ref = store.save_set(ms, name, approach=approach, architecture=kw.pop("architecture", ARCH), **kw)
        want[str(ref)] = sm.model_digests(ms)

    save(models(1), "base", "baseline")
    v = models(2)
    save(v, "upd", "update")
    v = dict(v)
    v["b"] = sm.fill_(sm.mlp(width=16), 77, only=["2.bias"])
    v["d"] = sm.fill_(sm.mlp(width=16), 78)
    save(v, "upd", "update")
    v = {k: m for k, m in v.items() if k != "a"}
    save(v, "upd", "update")
    save(v, "upd", "update")  # chain limit 2: stored in full
    save(models(3, ["x", "y"]), "mm", "mmlib-base")
    save(models(4), "auto", "auto")
    save(models(4) | {"c": sm.fill_(sm.mlp(width=16), 5)}, "branch", "update", base="auto@1")
    if provenance:
        base = {str(i): m for i, m in enumerate(initial_models(3, hidden=8))}
        save(base, "cells", "baseline", architecture=None)
        prov = mm.Provenance(train=TRAIN, config={"epochs": 1}, datasets={"1": cell_ref(1, 1)}, seed=3)
        save(base | prov.run(base), "cells", "provenance", provenance=prov, architecture=None)
        add_candidates(store, {f"c{i}": sm.fill_(sm.mlp(width=16), 200 + i) for i in range(3)}, "cands",
                       architectures={f"c{i}": ARCH for i in range(3)})
    store.close()
    return want


def snapshot(root: Path) -> dict[str, Any]:
    """Everything the catalog says: listing, lineage, stats, refs (with ids), candidate sets."""
    store = mm.Store(root)
    try:
        frame = store.sets()
        out: dict[str, Any] = {"sets": frame.values.tolist()}
        for name in sorted(set(frame["name"])):
            out[f"lineage {name}"] = store.lineage(name).frame.astype(str).values.tolist()
        for name, version in frame[["name", "version"]].values.tolist():
            ref = f"{name}@{version}"
            out[f"stats {ref}"] = store.stats(ref)
            row = store.row(ref)
            out[f"row {ref}"] = (row.id, row.base_id, row.manifest_oid)
        found = store.catalog.find_candidates("cands")
        if found is not None:
            out["cands"] = found
        return out
    finally:
        store.close()


def recovered(root: Path, want: dict[str, Any]) -> dict[str, Any]:
    store = mm.Store(root)
    try:
        return {ref: [sm.sd_digests(sd) for sd in store.recover_set(ref).state_dicts()] for ref in want}
    finally:
        store.close()


@pytest.fixture(scope="module")
def rich(tmp_path_factory) -> tuple[Path, dict, dict]:
    root = tmp_path_factory.mktemp("catalog") / "store"
    want = build(root, provenance=True)
    return root, want, snapshot(root)


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("mutations") / "store"
    return root, build(root, provenance=False)


def copy_store(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def damage(root: Path, how: str) -> None:
    cat = root / "catalog.sqlite"
    if how == "deleted":
        cat.unlink()
    elif how == "empty":
        cat.write_bytes(b"")
    elif how == "header":
        raw = bytearray(cat.read_bytes())
        raw[:100] = os.urandom(100)
        cat.write_bytes(raw)
    elif how == "pages":
        raw = bytearray(cat.read_bytes())
        for page in range(1, len(raw) // 4096):
            raw[page * 4096: page * 4096 + 64] = b"\xa5" * 64
        cat.write_bytes(raw)
    elif how == "deleted-with-refs":
        cat.unlink()
        shutil.rmtree(root / "refs")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["deleted", "empty", "header", "pages", "deleted-with-refs"])
def test_damaged_catalog_is_an_error_and_rebuild_restores_everything(rich, tmp_path, how):
    src, want, before = rich
    root = copy_store(src, tmp_path / "store")
    damage(root, how)
    with pytest.raises(mm.StoreError, match="rebuild") as err:
        store = mm.Store(root)
        try:  # a damaged page may only show when it is read
            store.sets()
            for name in ("upd", "mm", "cells"):
                store.lineage(name)
        finally:
            store.close()
    assert "rebuild_catalog" in str(err.value) and "python -m mm_jupyter store rebuild" in str(err.value)
    assert not (root / "catalog.sqlite").exists() or how != "deleted"  # the error wrote nothing
    report = mm.Store.rebuild_catalog(root)
    assert report.problems == [] and report.versions == len(want) and report.candidate_sets == 1
    assert snapshot(root) == before
    assert recovered(root, want) == want
    if how == "deleted-with-refs":  # from the objects alone: modules built in a fresh process too
        fresh = sm.fresh_report(root, [r for r in want if not r.startswith("cells")])
        assert all(fresh[ref]["module"] == fresh[ref]["state_dicts"] == want[ref] for ref in fresh), fresh
    store = mm.Store(root)
    assert store.verify() == []
    cands = load_candidates(store, "cands")
    assert sorted(cands.names) == ["c0", "c1", "c2"]
    assert sm.sd_digests(cands.model("c1").state_dict()) == sm.sd_digests(sm.fill_(sm.mlp(width=16), 201).state_dict())
    ref = store.save_set(models(9), "upd", approach="update", architecture=ARCH)  # the rebuilt store keeps working
    assert ref.version == 5 and store.recover_set(ref).names == ["a", "b", "c"]
    store.close()


@pytest.mark.slow
def test_rebuild_cli(rich, tmp_path):
    src, want, before = rich
    root = copy_store(src, tmp_path / "store")
    damage(root, "deleted")
    cli = [sys.executable, "-m", "mm_jupyter", "store"]
    env = sm.subprocess_env()
    proc = subprocess.run(cli + ["verify", str(root)], capture_output=True, text=True, env=env, cwd=sm.ROOT)
    assert proc.returncode == 2 and "rebuild" in proc.stderr and len(proc.stderr.splitlines()) == 1
    proc = subprocess.run(cli + ["rebuild", str(root)], capture_output=True, text=True, env=env, cwd=sm.ROOT)
    assert proc.returncode == 0, proc.stderr
    assert f"{len(want)} version(s), 1 candidate set(s)" in proc.stdout
    proc = subprocess.run(cli + ["verify", str(root)], capture_output=True, text=True, env=env, cwd=sm.ROOT)
    assert (proc.returncode, proc.stdout.strip()) == (0, "intact")
    assert snapshot(root) == before


def test_verify_checks_catalog_against_objects(plain, tmp_path):
    src, want = plain
    root = copy_store(src, tmp_path / "store")
    store = mm.Store(root)
    assert store.verify() == []
    row = store.row("upd@2")
    db = sqlite3.connect(root / "catalog.sqlite")
    with db:
        db.execute("DELETE FROM artifacts WHERE set_id=? AND role='index'", (row.id,))
        db.execute("UPDATE sets SET bytes=bytes+1 WHERE name='base'")
    db.close()
    other = store.row("auto@1").manifest_oid
    (root / "refs" / "sets" / "mm@1").write_text(other + "\n")
    problems = "\n".join(store.verify())
    assert "upd@2: the catalog's artifact list differs" in problems
    assert "base@1: catalog columns" in problems
    assert "mm@1: refs/ names manifest" in problems
    store.objects.path(store.row("mm@1").manifest_oid).unlink()
    store.close()
    store = mm.Store(root)
    assert any("mm@1" in p and "missing" in p for p in store.verify())
    with pytest.raises(mm.IntegrityError, match="missing"):
        store.recover_set("mm@1")
    with pytest.raises(mm.IntegrityError, match="gc refuses"):
        store.gc()  # never collect around a version it cannot read
    store.close()


# -- the -wal file deleted under an open writer ------------------------------------------------------
SAVE_ONE = r"""
import sys
import mm_jupyter as mm
from test_store_catalog import ARCH, models
store = mm.Store(sys.argv[1])
print(store.save_set(models(int(sys.argv[3])), sys.argv[2], architecture=ARCH), flush=True)
"""


@pytest.mark.slow
def test_deleted_wal_under_an_open_writer_loses_no_acknowledged_save(tmp_path):
    root = tmp_path / "store"
    writer = mm.Store(root)
    writer.save_set(models(1), "first", architecture=ARCH)
    reader = mm.Store(root)  # another open connection keeps the log alive
    reader.sets()
    (root / "catalog.sqlite-wal").unlink()
    acked = sm.run_python(SAVE_ONE, str(root), "second", "2").stdout.strip()
    assert acked == "second@1"
    writer.save_set(models(3), "third", architecture=ARCH)
    writer.close()
    reader.close()
    try:
        store = mm.Store(root)
    except mm.StoreError as e:  # the catalog lost something: said clearly, never silently
        assert "rebuild" in str(e)
        mm.Store.rebuild_catalog(root)
        store = mm.Store(root)
    listed = [f"{n}@{v}" for n, v in store.sets()[["name", "version"]].values.tolist()]
    assert {"first@1", "second@1", "third@1"} <= set(listed)
    for ref, seed in (("first@1", 1), ("second@1", 2), ("third@1", 3)):
        got = [sm.sd_digests(sd) for sd in store.recover_set(ref).state_dicts()]
        assert got == sm.model_digests(models(seed)), ref
    assert store.verify() == []
    store.close()


# -- a save killed after its manifest was written, before its row committed ---------------------------
KILLED_IN_COMMIT = r"""
import os, signal, sys
import mm_jupyter as mm
from mm_jupyter.store import catalog
from test_store_catalog import ARCH, models
store = mm.Store(sys.argv[1])
def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)
catalog.SQLiteCatalog.insert_set = die
store.save_set(models(5), "upd", architecture=ARCH, approach="update")
"""


@pytest.mark.slow
@pytest.mark.parametrize("keep_refs", [True, False])
def test_rebuild_picks_the_committed_manifest(plain, tmp_path, keep_refs):
    """A killed save leaves a manifest claiming the next version; the next save takes that number.
    Rebuild restores the committed one (named by its ref, or the newer one without refs)."""
    src, want = plain
    root = copy_store(src, tmp_path / "store")
    proc = sm.run_python(KILLED_IN_COMMIT, str(root), check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    store = mm.Store(root)
    assert store.sets()["name"].tolist().count("upd") == 4
    ref = store.save_set(models(6), "upd", approach="update", architecture=ARCH)
    assert ref.version == 5
    expect = [sm.sd_digests(sd) for sd in store.recover_set(ref).state_dicts()]
    store.close()
    before = snapshot(root)
    damage(root, "deleted" if keep_refs else "deleted-with-refs")
    report = mm.Store.rebuild_catalog(root)
    assert report.unreferenced == 1 and report.problems == []
    assert snapshot(root) == before
    store = mm.Store(root)
    assert [sm.sd_digests(sd) for sd in store.recover_set("upd@5").state_dicts()] == expect
    gc = store.gc()
    assert gc.objects >= 1  # the killed save's manifest and objects
    assert store.verify() == []
    store.close()


# -- mutations: never a silently wrong tensor ----------------------------------------------------
def outcome(root: Path, refs: list[str], want: dict) -> dict[str, str]:
    """'ok' when a fresh store recovers exactly ``want``; the MMError otherwise. A wrong tensor or
    any other exception fails the test."""
    out = {}
    try:
        store = mm.Store(root)
    except mm.MMError as e:
        return {ref: f"{type(e).__name__}: {e}" for ref in refs}
    try:
        for ref in refs:
            try:
                got = [sm.sd_digests(sd) for sd in store.recover_set(ref).state_dicts()]
            except mm.MMError as e:
                out[ref] = f"{type(e).__name__}: {e}"
                continue
            assert got == want[ref], f"{ref}: a mutation returned wrong tensors silently"
            out[ref] = "ok"
    finally:
        store.close()
    return out


@pytest.mark.slow
def test_every_byte_and_digit_of_every_manifest(plain, tmp_path):
    src, want = plain
    root = copy_store(src, tmp_path / "store")
    store = mm.Store(root)
    manifests = {ref: store.objects.path(store.row(ref).manifest_oid) for ref in want}
    checked = 0
    for ref, path in manifests.items():
        pristine = path.read_bytes()
        mutants = [(pos, pristine[pos] ^ 0x01) for pos in range(len(pristine))]
        mutants += [(pos, ord("0") + (c - ord("0") + step) % 10) for pos, c in enumerate(pristine[64:], 64)
                    if chr(c).isdigit() for step in (1, 5)]  # digit edits keep the JSON valid
        fd = os.open(path, os.O_WRONLY)
        for pos, value in mutants:
            os.pwrite(fd, bytes([value]), pos)  # in place: rewriting whole files is slow on ext4
            store.catalog._manifests.clear()  # manifests are cached by id; the file changed under it
            with pytest.raises(mm.IntegrityError):
                got = [sm.sd_digests(sd) for sd in store.recover_set(ref).state_dicts()]
                assert got == want[ref], f"{ref}: byte {pos} of its manifest changed its tensors silently"
            os.pwrite(fd, pristine[pos:pos + 1], pos)
            checked += 1
        os.close(fd)
    store.close()
    assert checked > 10_000
    assert set(outcome(root, list(want), want).values()) == {"ok"}


def test_every_digit_of_the_catalog_rows(plain, tmp_path):
    """Catalog columns and model rows mutated one digit at a time: recovery is exact or an error."""
    src, want = plain
    root = copy_store(src, tmp_path / "store")
    db = sqlite3.connect(root / "catalog.sqlite", isolation_level=None)
    cases = []
    for set_id, name, version, manifest, base_id in db.execute(
            "SELECT id, name, version, manifest, base_id FROM sets").fetchall():
        for col, value in (("id", set_id), ("version", version), ("base_id", base_id)):
            for new in {0, 1, 2, 3, (value or 0) + 1, (value or 0) - 1, None}:
                if new != value:
                    cases.append(("sets", col, new, "id", set_id, name))
        for pos in (0, 1, 31, 62, 63):  # any other id names a missing object or another version's manifest
            digit = manifest[pos]
            cases.append(("sets", "manifest", manifest[:pos] + ("0" if digit != "0" else "1") + manifest[pos + 1:],
                          "id", set_id, name))
    for set_id, idx, params, arch in db.execute("SELECT set_id, idx, params, architecture FROM models").fetchall():
        for col, value in (("params", params), ("architecture", arch)):
            for pos in (0, 31, 63):
                cases.append(("models", col, value[:pos] + ("0" if value[pos] != "0" else "1") + value[pos + 1:],
                              "rowid", db.execute("SELECT rowid FROM models WHERE set_id=? AND idx=?",
                                                  (set_id, idx)).fetchone()[0], "mm"))
        cases.append(("models", "idx", idx + 7, "rowid", db.execute(
            "SELECT rowid FROM models WHERE set_id=? AND idx=?", (set_id, idx)).fetchone()[0], "mm"))
    swapped = db.execute(
        "SELECT a.id, b.manifest FROM sets a JOIN sets b ON a.name = b.name AND a.id != b.id").fetchall()
    cases += [("sets", "manifest", other, "id", set_id, "upd") for set_id, other in swapped[:6]]
    db.execute("PRAGMA synchronous=OFF")  # thousands of tiny edits: durability is not under test here
    errors = 0
    for table, col, new, key, key_value, name in cases:
        old = db.execute(f"SELECT {col} FROM {table} WHERE {key}=?", (key_value,)).fetchone()[0]
        try:
            db.execute(f"UPDATE {table} SET {col}=? WHERE {key}=?", (new, key_value))
        except sqlite3.IntegrityError:
            continue
        result = outcome(root, [r for r in want if r.split("@")[0] == name], want)
        errors += sum(v != "ok" for v in result.values())
        db.execute(f"UPDATE {table} SET {col}=? WHERE {key}=?", (old, key_value if col != key else new))
    db.close()
    assert errors > len(cases) // 2  # most mutations are detected (the rest change nothing recovery uses)
    assert set(outcome(root, list(want), want).values()) == {"ok"}


def test_the_store_browser_never_lists_a_store_that_lost_its_catalog(rich, tmp_path):
    from mm_jupyter.jupyter.server import error_payload, sets_payload

    src, want, _ = rich
    root = copy_store(src, tmp_path / "store")
    damage(root, "deleted-with-refs")
    with pytest.raises(mm.StoreError) as err:
        sets_payload(root)
    status, payload = error_payload(err.value)
    assert status == 400 and "rebuild" in payload["error"]
    assert not (root / "catalog.sqlite").exists()  # a GET never creates a catalog
    assert sets_payload(tmp_path / "nothing") == {"store": str(tmp_path / "nothing"), "exists": False, "sets": []}
