"""Keeping a store honest: ``verify`` (catalog against objects), ``gc`` (what no version references)
and ``rebuild`` (the catalog from the objects alone).

``gc`` and ``rebuild`` hold the store's save lock exclusively: they wait for saves in flight (each
holds it shared from its first object write to its ref) and hold new ones back, so neither ever
sees a save half done — in this process, another process, another PID namespace or container.
"""
from __future__ import annotations

import os
import sqlite3
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import IntegrityError, MMError, StoreError
from . import manifest as manifests
from . import refs
from .catalog import _SCHEMA, FILE, SCHEMA_VERSION, rebuild_hint
from .files import StoreLock, fsync_path, human_bytes, is_read_only, os_error
from .objects import ObjectStore
from .tensors import unpack_arrays

if TYPE_CHECKING:
    from .store import Store

_MODEL_ROLES = ("params", "architecture", "environment")


@dataclass(frozen=True)
class GcReport:
    """What ``store.gc()`` removed and repaired."""

    objects: int
    bytes_freed: int
    pending_rows: int
    temp_files: int
    refs_written: int

    def __str__(self) -> str:
        return (f"removed {self.objects} unreferenced object(s), {self.pending_rows} pending row(s) of killed "
                f"saves and {self.temp_files} stale temp file(s): {human_bytes(self.bytes_freed)} freed; "
                f"wrote {self.refs_written} missing ref(s)")


@dataclass(frozen=True)
class RebuildReport:
    """What ``Store.rebuild_catalog`` restored, and what it could not."""

    versions: int
    candidate_sets: int
    unreferenced: int
    problems: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        head = (f"rebuilt the catalog: {self.versions} version(s), {self.candidate_sets} candidate set(s); "
                f"{self.unreferenced} manifest(s) of saves that never committed left for gc")
        return "\n".join([head] + [f"  problem: {p}" for p in self.problems])


# -- verify ------------------------------------------------------------------------------------
def _model_objects(store_objects: ObjectStore, m: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(role, object, bytes) of every per-model document of an mmlib-base manifest."""
    arrays = unpack_arrays(store_objects.get(m["set"]["models"]))
    out = []
    for ids, sizes in zip(arrays["objects"], arrays["sizes"]):
        out += [(role, bytes(x).hex(), int(s)) for role, x, s in zip(_MODEL_ROLES, ids, sizes)]
    return out


def _listed(objects: ObjectStore, m: dict[str, Any]) -> list[tuple[str, str, int]]:
    """Every (role, object, bytes) a set manifest references."""
    out = [(r, o, int(s)) for r, o, s in m["artifacts"]]
    if m.get("approach") == "mmlib-base":
        out += _model_objects(objects, m)
    return out


def verify(store: "Store") -> list[str]:
    cat, objects = store.catalog, store.objects
    problems = [f"catalog lacks acknowledged version {v} (refs/ records it); {rebuild_hint(store.root)}"
                for v in cat.lost_versions()]
    check: set[str] = set()
    for raw in cat.raw_rows():
        set_id, name, version = raw[0], raw[1], raw[2]
        where = f"{name}@{version}"
        try:
            row = cat.set_row(raw)
            m = cat.manifest(row.manifest_oid)
            check.add(row.manifest_oid)
            listed = _listed(objects, m)
        except MMError as e:
            problems.append(f"{where}: {e}")
            continue
        stored = cat.columns(set_id)
        want = (m["approach"], m["requested"], m["chain"], m["n_models"],
                m["bytes"] + objects.size(row.manifest_oid), float(m["tts"]), m["created"])
        if tuple(stored) != want:
            problems.append(f"{where}: catalog columns {stored} disagree with its manifest {want}")
        if sorted(cat.artifacts(set_id)) != sorted(set(listed)):
            problems.append(f"{where}: the catalog's artifact list differs from the manifest's")
        if row.approach == "mmlib-base":
            per_model = [o for _, o, _ in listed[len(m["artifacts"]):]]
            rows = [tuple(r[2:]) for r in cat.model_rows(set_id)]
            if rows != [tuple(per_model[3 * i: 3 * i + 3]) for i in range(len(per_model) // 3)]:
                problems.append(f"{where}: the catalog's model rows differ from the manifest's model index")
        ref = refs.read(store.root, "sets", name, version)
        if ref is not None and ref != row.manifest_oid:
            problems.append(f"{where}: refs/ names manifest {ref[:12]}…, the catalog {row.manifest_oid[:12]}…")
        check.update(o for _, o, _ in listed)
    for cset_id, name, version, oid, _, _ in cat.raw_candidates():
        where = f"candidate set {name}@{version}"
        try:
            if cat.find_candidates(name, version) is None:
                continue
            m = cat.manifest(oid)
        except MMError as e:
            problems.append(f"{where}: {e}")
            continue
        check.add(oid)
        listed = [(r, o, int(s)) for r, o, s in m["artifacts"]]
        if sorted(cat.candidate_objects(cset_id)) != sorted(set(listed)):
            problems.append(f"{where}: the catalog's object list differs from the manifest's")
        check.update(o for _, o, _ in listed)
    for oid in sorted(check):
        try:
            reader = objects.open(oid)
            try:
                reader.verify()
            finally:
                reader.close()
        except IntegrityError as e:
            problems.append(str(e))
    return problems


# -- gc ----------------------------------------------------------------------------------------
def gc(store: "Store", wait_s: float) -> GcReport:
    cat, objects, root = store.catalog, store.objects, store.root
    if cat.read_only is not None and is_read_only(root):
        raise StoreError(f"store {str(root)!r} is read-only ({cat.read_only}); nothing to collect")
    with StoreLock(root / "locks" / "save").hold(True, wait_s, "cannot collect garbage"):
        lost = cat.lost_versions()
        if lost:
            raise IntegrityError(f"the catalog lacks acknowledged versions ({', '.join(lost[:5])}); "
                                 f"{rebuild_hint(root)} before collecting garbage")
        live = set(cat.all_objects())
        missing_refs = []
        for raw in cat.raw_rows():  # never trust the artifact rows alone: a manifest lists its objects
            try:
                row = cat.set_row(raw)
                live.update(o for _, o, _ in _listed(objects, cat.manifest(row.manifest_oid)))
            except MMError as e:
                raise IntegrityError(f"gc refuses to run: {raw[1]}@{raw[2]}: {e}") from None
            if refs.read(root, "sets", row.name, row.version) is None:
                missing_refs.append(("sets", row.name, row.version, row.manifest_oid))
        for _, name, version, oid, _, _ in cat.raw_candidates():
            try:
                live.update(o for _, o, _ in cat.manifest(oid)["artifacts"])
            except MMError as e:
                raise IntegrityError(f"gc refuses to run: candidate set {name}@{version}: {e}") from None
            if refs.read(root, "candidates", name, version) is None:
                missing_refs.append(("candidates", name, version, oid))
        with cat.transaction() as db:
            pending = [r[0] for r in db.execute("SELECT id FROM sets WHERE version IS NULL").fetchall()]
            for set_id in pending:
                db.execute("DELETE FROM models WHERE set_id=?", (set_id,))
                db.execute("DELETE FROM artifacts WHERE set_id=?", (set_id,))
                db.execute("DELETE FROM sets WHERE id=?", (set_id,))
        removed = freed = 0
        for oid, path, size in list(objects.scan()):
            if oid in live:
                continue
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as e:
                raise os_error(e, path) from None
            removed += 1
            freed += size
        temps, temp_bytes = objects.clean_temp()
        written = 0
        for kind, name, version, oid in missing_refs:
            try:
                refs.write(root, kind, name, version, oid)
                written += 1
            except OSError:
                pass
        try:
            cat._fresh().execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error:
            pass
    return GcReport(removed, freed + temp_bytes, len(pending), temps, written)


# -- rebuild -----------------------------------------------------------------------------------
def _choose(claims: dict[tuple[str, int], list[tuple[str, dict, int]]], root: Path, kind: str
            ) -> tuple[dict[str, tuple[dict, int]], int]:
    """Per (name, version) the manifest that holds it: the one its ref names, else the newest.
    Several claimants exist only when a save's transaction never committed and a later save took
    its number; that later save is the newer one."""
    chosen, unreferenced = {}, 0
    for (name, version), found in claims.items():
        ref = refs.read(root, kind, name, version)
        pick = next((f for f in found if f[0] == ref), None) or max(found, key=lambda f: (f[1]["created"], f[0]))
        chosen[pick[0]] = (pick[1], pick[2])
        unreferenced += len(found) - 1
    return chosen, unreferenced


def _drop_id_conflicts(chosen: dict[str, tuple[dict, int]], root: Path, kind: str) -> int:
    """Keep one manifest per catalog id — the ref-backed, else the newest; a manifest whose id a
    committed save took again never committed itself. Returns how many were dropped."""
    def rank(oid: str) -> tuple:
        m = chosen[oid][0]
        return (refs.read(root, kind, m["name"], m["version"]) == oid, m["created"], oid)

    keep: dict[int, str] = {}
    for oid in list(chosen):
        other = keep.get(chosen[oid][0]["id"])
        if other is None or rank(oid) > rank(other):
            keep[chosen[oid][0]["id"]] = oid
    dropped = [o for o in chosen if keep[chosen[o][0]["id"]] != o]
    for oid in dropped:
        del chosen[oid]
    return len(dropped)


def rebuild(root: Path, wait_s: float) -> RebuildReport:
    objects = ObjectStore(root)
    if not objects.objects.is_dir():
        raise StoreError(f"{str(root)!r} has no objects/ folder: there is nothing to rebuild a catalog from")
    if is_read_only(root):
        raise StoreError(f"{str(root)!r} is read-only: a catalog cannot be rebuilt there")
    objects.prepare()
    with StoreLock(root / "locks" / "save").hold(True, wait_s, "cannot rebuild the catalog"):
        claims: dict[str, dict] = {"set": defaultdict(list), "candidates": defaultdict(list)}
        problems = []
        for oid, _, _ in objects.scan():
            try:
                if not manifests.is_manifest(objects.payload_prefix(oid, len(manifests.MAGIC))):
                    continue
                m = manifests.decode(objects.get(oid), oid)
                claims[m["kind"]][(m["name"], m["version"])].append((oid, m, objects.size(oid)))
            except (MMError, OSError) as e:
                problems.append(f"object {oid[:12]}… looks like a manifest but cannot be read: {e}")
        sets, orphan_sets = _choose(claims["set"], root, "sets")
        cands, orphan_cands = _choose(claims["candidates"], root, "candidates")
        orphan_sets += _drop_id_conflicts(sets, root, "sets")
        orphan_cands += _drop_id_conflicts(cands, root, "candidates")
        while True:  # a version whose base is not restored cannot be resolved: leave it out
            broken = [o for o, (m, _) in sets.items() if m["base"] is not None and (
                m["base"] not in sets or sets[m["base"]][0]["id"] != m["base_id"])]
            if not broken:
                break
            for o in broken:
                m = sets.pop(o)[0]
                problems.append(f"{m['name']}@{m['version']}: its base manifest {str(m['base'])[:12]}… is missing; "
                                "not restored")
        tmp = root / "tmp" / f"catalog-rebuild-{uuid.uuid4().hex}.sqlite"
        try:
            _write_catalog(tmp, objects, sets, cands)
            for suffix in ("-wal", "-shm"):  # an old log must never be replayed onto the new file
                Path(f"{root / FILE}{suffix}").unlink(missing_ok=True)
            os.replace(tmp, root / FILE)
            fsync_path(root)
        except OSError as e:
            raise os_error(e, root, 0, "the rebuilt catalog") from None
        finally:
            for suffix in ("", "-journal", "-wal", "-shm"):
                Path(f"{tmp}{suffix}").unlink(missing_ok=True)
        restored = {"sets": {(m["name"], m["version"]): o for o, (m, _) in sets.items()},
                    "candidates": {(m["name"], m["version"]): o for o, (m, _) in cands.items()}}
        for kind, versions in restored.items():
            for (name, version) in refs.names(root, kind) - set(versions):
                problems.append(f"{'candidate set ' if kind == 'candidates' else ''}{name}@{version}: refs/ records "
                                "it but its manifest is missing or damaged; not restored")
                refs.remove(root, kind, name, version)
            for (name, version), oid in versions.items():
                if refs.read(root, kind, name, version) != oid:
                    refs.write(root, kind, name, version, oid)
    return RebuildReport(len(sets), len(cands), orphan_sets + orphan_cands, problems)


def _write_catalog(path: Path, objects: ObjectStore, sets: dict[str, tuple[dict, int]],
                   cands: dict[str, tuple[dict, int]]) -> None:
    """A complete catalog in one transaction, in WAL mode, at ``path`` (swapped in by the caller)."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("BEGIN")
        for stmt in _SCHEMA.split(";"):
            if stmt.strip():
                db.execute(stmt)
        db.execute("INSERT INTO meta(key, value) VALUES('schema', ?)", (str(SCHEMA_VERSION),))
        for oid in sorted(sets, key=lambda o: sets[o][0]["id"]):
            m, size = sets[oid]
            sid = m["id"]
            db.execute("INSERT INTO sets(id, name, version, approach, requested, base_id, chain, n_models, manifest,"
                       " bytes, tts_s, created) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                       (sid, m["name"], m["version"], m["approach"], m["requested"], m["base_id"], m["chain"],
                        m["n_models"], oid, m["bytes"] + size, float(m["tts"]), m["created"]))
            listed = _listed(objects, m)
            db.executemany("INSERT OR IGNORE INTO artifacts(set_id, role, object, bytes) VALUES (?,?,?,?)",
                           [(sid, r, o, s) for r, o, s in listed])
            if m["approach"] == "mmlib-base":
                per_model = listed[len(m["artifacts"]):]
                db.executemany(
                    "INSERT INTO models(set_id, idx, name, params, architecture, environment) VALUES (?,?,?,?,?,?)",
                    [(sid, i, nm, *(o for _, o, _ in per_model[3 * i: 3 * i + 3]))
                     for i, nm in enumerate(m["set"]["names"])])
        for oid in sorted(cands, key=lambda o: cands[o][0]["id"]):
            m, size = cands[oid]
            cid = m["id"]
            db.execute("INSERT INTO candidate_sets(id, name, version, manifest, bytes, created) VALUES (?,?,?,?,?,?)",
                       (cid, m["name"], m["version"], oid, m["bytes"] + size, m["created"]))
            db.executemany("INSERT OR IGNORE INTO candidate_objects(cset_id, role, object, bytes) VALUES (?,?,?,?)",
                           [(cid, r, o, int(s)) for r, o, s in m["artifacts"]])
        db.execute("COMMIT")
    except sqlite3.Error as e:
        raise StoreError(f"cannot write the rebuilt catalog {path}: {e}") from None
    finally:
        db.close()  # the last connection checkpoints the log into the file and removes it
    fsync_path(path)
