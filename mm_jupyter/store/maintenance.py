"""Keeping a store honest: ``verify`` (catalog against objects), ``gc`` (what no version references)
and ``rebuild`` (the catalog from the objects alone).

``gc`` and ``rebuild`` hold the store's save lock exclusively: they wait for saves in flight (each
holds it shared from its first object write to its ref) and hold new ones back, so neither ever
sees a save half done — in this process, another process, another PID namespace or container.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from ..errors import IntegrityError, MMError, StoreError, human_bytes
from . import approaches, features as kept_features, manifest as manifests
from .basetypes import Manifests, SetObjects
from .contracts import Catalog, ObjectArea
from .limits import decoding


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
def verify(cat: Catalog) -> list[str]:
    objects = cat.objects
    problems = [f"catalog lacks acknowledged version {v} (refs/ records it); {cat.hint}"
                for v in cat.lost_versions()]
    check: set[str] = set()
    present = {kind: objects.ref_names(kind) for kind in ("sets", "candidates")}
    for raw in cat.raw_rows():
        set_id, name, version = raw[0], raw[1], raw[2]
        where = f"{name}@{version}"
        try:
            with decoding(f"the manifest of {where}"):
                row = cat.set_row(raw)
                m = cat.manifest(row.manifest_oid)
                check.add(row.manifest_oid)
                listed = approaches.listed(objects, m)
                want_models = approaches.get(row.approach).model_rows(objects, m["set"])
        except MMError as e:
            problems.append(f"{where}: {e}")
            continue
        stored = cat.columns(set_id)
        want = (m["approach"], m["requested"], m["chain"], m["n_models"],
                m["bytes"] + objects.size(row.manifest_oid), float(m["tts"]), m["created"])
        if row.base_id is None and m["base_id"] is not None:
            problems.append(f"{where}: its parent (catalog id {m['base_id']}) is gone; the lineage edge to it is lost")
        if stored is None or tuple(stored) != want:
            shown = tuple(stored) if stored is not None else None
            problems.append(f"{where}: catalog columns {shown} disagree with its manifest {want}")
        if sorted(cat.artifacts(set_id)) != sorted(set(listed)):
            problems.append(f"{where}: the catalog's artifact list differs from the manifest's")
        if [tuple(r) for r in cat.model_rows(set_id)] != want_models:
            problems.append(f"{where}: the catalog's model rows differ from the manifest's model index")
        problems += _ref_problems(objects, "sets", name, version, row.manifest_oid, where, present["sets"])
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
        problems += _ref_problems(objects, "candidates", name, version, oid, where, present["candidates"])
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


def _ref_problems(objects: ObjectArea, kind: str, name: str, version: int, oid: str, where: str,
                  present: set[tuple[str, int]]) -> list[str]:
    """A version's ref file, where there is one, must name its manifest: an emptied, truncated or
    flipped ref would mislead a catalog rebuild (refs settle which manifest holds a version). A
    missing ref is no problem: a writer killed after its commit leaves none, and gc writes it."""
    if (name, version) not in present:
        return []
    found = objects.read_ref(kind, name, version)
    if found is None:
        return [f"{where}: its ref file is empty or damaged; it should name manifest {oid[:12]}… "
                "(store.gc() rewrites it)"]
    if found != oid:
        return [f"{where}: refs/ names manifest {found[:12]}…, the catalog {oid[:12]}…"]
    return []


# -- gc ----------------------------------------------------------------------------------------
def gc(cat: Catalog, wait_s: float, features: bool = False) -> GcReport:
    objects = cat.objects
    cat.check_writable("nothing to collect")
    with cat.save_lock(True, wait_s, "cannot collect garbage"):
        lost = cat.lost_versions()
        if lost:
            raise IntegrityError(f"the catalog lacks acknowledged versions ({', '.join(lost[:5])}); "
                                 f"{cat.hint} before collecting garbage")
        live = set(cat.all_objects())
        missing_refs = []
        for raw in cat.raw_rows():  # never trust the artifact rows alone: a manifest lists its objects
            try:
                with decoding(f"the manifest of {raw[1]}@{raw[2]}"):
                    row = cat.set_row(raw)
                    live.update(o for _, o, _ in approaches.listed(objects, cat.manifest(row.manifest_oid)))
            except MMError as e:
                raise IntegrityError(f"gc refuses to run: {raw[1]}@{raw[2]}: {e}") from None
            if objects.read_ref("sets", row.name, row.version) != row.manifest_oid:  # missing or damaged
                missing_refs.append(("sets", row.name, row.version, row.manifest_oid))
        for _, name, version, oid, _, _ in cat.raw_candidates():
            try:
                live.update(o for _, o, _ in cat.manifest(oid)["artifacts"])
            except MMError as e:
                raise IntegrityError(f"gc refuses to run: candidate set {name}@{version}: {e}") from None
            if objects.read_ref("candidates", name, version) != oid:
                missing_refs.append(("candidates", name, version, oid))
        if features:  # kept search features are a cache: freed on request
            kept_features.drop_all(objects)
        else:
            live |= kept_features.live_objects(objects)
        with cat.transaction() as tx:
            pending = cat.delete_pending(tx)
        removed = freed = 0
        for oid, size in list(objects.scan()):
            if oid not in live and objects.delete(oid):
                removed += 1
                freed += size
        temps, temp_bytes = objects.clean_temp(exclusive=True)
        written = 0
        for kind, name, version, oid in missing_refs:
            try:
                objects.write_ref(kind, name, version, oid)
                written += 1
            except (OSError, StoreError):
                pass
        cat.compact()
    return GcReport(removed, freed + temp_bytes, pending, temps, written)


# -- rebuild -----------------------------------------------------------------------------------
Claims = dict[tuple[str, int], list[tuple[str, dict[str, Any], int]]]


def _choose(claims: Claims, objects: ObjectArea, kind: str) -> tuple[Manifests, int]:
    """Per (name, version) the manifest that holds it: the one its ref names, else the newest.
    Several claimants exist only when a save's transaction never committed and a later save took
    its number; that later save is the newer one."""
    chosen: Manifests = {}
    unreferenced = 0
    for (name, version), found in claims.items():
        ref = objects.read_ref(kind, name, version)
        pick = next((f for f in found if f[0] == ref), None) or max(found, key=lambda f: (f[1]["created"], f[0]))
        chosen[pick[0]] = (pick[1], pick[2])
        unreferenced += len(found) - 1
    return chosen, unreferenced


def _drop_id_conflicts(chosen: Manifests, objects: ObjectArea, kind: str) -> int:
    """Keep one manifest per catalog id — the ref-backed, else the newest; a manifest whose id a
    committed save took again never committed itself. Returns how many were dropped."""
    def rank(oid: str) -> tuple[bool, str, str]:
        m = chosen[oid][0]
        return (objects.read_ref(kind, m["name"], m["version"]) == oid, m["created"], oid)

    keep: dict[int, str] = {}
    for oid in list(chosen):
        other = keep.get(chosen[oid][0]["id"])
        if other is None or rank(oid) > rank(other):
            keep[chosen[oid][0]["id"]] = oid
    dropped = [o for o in chosen if keep[chosen[o][0]["id"]] != o]
    for oid in dropped:
        del chosen[oid]
    return len(dropped)


def rebuild(catalog: type[Catalog], location: str, objects: ObjectArea, wait_s: float) -> RebuildReport:
    """Recreate the catalog at ``location`` from the manifests in ``objects`` (see ARCHITECTURE.md)."""
    with catalog.rebuilding(location, objects, wait_s) as write:
        claims: dict[str, Claims] = {"set": defaultdict(list), "candidates": defaultdict(list)}
        problems = []
        set_objects: SetObjects = {}
        for oid, _ in objects.scan():
            try:
                if not manifests.is_manifest(objects.payload_prefix(oid, len(manifests.MAGIC))):
                    continue
                with decoding(f"manifest {oid[:12]}…"):
                    m = manifests.decode(objects.get(oid), oid)
                    if m["kind"] == "set":  # what writing its rows needs: read it now, skip it if it fails
                        set_objects[oid] = (approaches.listed(objects, m),
                                            approaches.get(m["approach"]).model_rows(objects, m["set"]))
                claims[m["kind"]][(m["name"], m["version"])].append((oid, m, objects.size(oid)))
            except (MMError, OSError) as e:
                problems.append(f"object {oid[:12]}… looks like a manifest but cannot be read: {e}")
        sets, orphan_sets = _choose(claims["set"], objects, "sets")
        cands, orphan_cands = _choose(claims["candidates"], objects, "candidates")
        orphan_sets += _drop_id_conflicts(sets, objects, "sets")
        orphan_cands += _drop_id_conflicts(cands, objects, "candidates")
        while True:  # a version whose base is not restored cannot be resolved: leave it out
            broken = [o for o, (m, _) in sets.items() if m["base"] is not None and (
                m["base"] not in sets or sets[m["base"]][0]["id"] != m["base_id"])]
            if not broken:
                break
            for o in broken:
                m, size = sets.pop(o)
                if m["chain"] == 0:  # self-contained: only its lineage edge depends on the parent
                    sets[o] = ({**m, "base_id": None, "base": None}, size)
                    problems.append(f"{m['name']}@{m['version']}: its parent's manifest {str(m['base'])[:12]}… is "
                                    "missing; restored without that lineage edge")
                    continue
                problems.append(f"{m['name']}@{m['version']}: its base manifest {str(m['base'])[:12]}… is missing; "
                                "not restored")
        write(sets, cands, set_objects)
        restored = {"sets": {(m["name"], m["version"]): o for o, (m, _) in sets.items()},
                    "candidates": {(m["name"], m["version"]): o for o, (m, _) in cands.items()}}
        for kind, versions in restored.items():
            for (name, version) in objects.ref_names(kind) - set(versions):
                problems.append(f"{'candidate set ' if kind == 'candidates' else ''}{name}@{version}: refs/ records "
                                "it but its manifest is missing or damaged; not restored")
                objects.remove_ref(kind, name, version)
            for (name, version), oid in versions.items():
                if objects.read_ref(kind, name, version) != oid:
                    objects.write_ref(kind, name, version, oid)
    return RebuildReport(len(sets), len(cands), orphan_sets + orphan_cands, problems)
