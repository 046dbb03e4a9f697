"""A reusable conformance kit for store backends, as zarr-python's ``StoreTests``: subclass
``ObjectAreaTests`` or ``CatalogTests`` in a test module, say how to make a fresh backend and how
to damage one stored byte, and pytest runs every check of the contract against it.

    class TestMyObjects(ObjectAreaTests):
        def make_objects(self, tmp_path): return MyObjects(...)
        def corrupt(self, objects, oid, offset): ...  # flip one stored byte, bypassing the contract

The checks use only the contracts (``contracts.ObjectArea``, ``contracts.Catalog``), so a backend
that passes them can stand in for the folder, S3, SQLite or PostgreSQL ones. What needs a whole
store (crash safety, two processes at once, gc while saving) is ``tests/test_store_conformance.py``.
Importing this module needs pytest; the store itself never imports it.
"""
from __future__ import annotations

import hashlib
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Iterator

import pytest

from ..errors import IntegrityError, StoreError
from .basetypes import PutResult, SearchRow, SetRow
from .catalog import now_iso
from .contracts import Catalog, ObjectArea
from .tensors import Layout, TensorSpec

#: big enough for several verified chunks (objects.py: at least 64 KiB per chunk)
_LARGE = 3 * 1024 * 1024 + 123


def _payload(n: int, seed: int = 0) -> bytes:
    """``n`` deterministic, incompressible bytes."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:n])


class ObjectAreaTests:
    """Checks of the ``ObjectArea`` contract: content-addressed, immutable, verified on read, refs."""

    def make_objects(self, tmp_path: Path) -> ObjectArea:
        """A fresh, empty object area (``prepare()`` is called by the kit)."""
        raise NotImplementedError

    def corrupt(self, objects: ObjectArea, oid: str, offset: int) -> None:
        """Flip the byte at ``offset`` of the *stored* object (header included), bypassing the area."""
        raise NotImplementedError

    @pytest.fixture
    def objects(self, tmp_path: Path) -> Iterator[ObjectArea]:
        area = self.make_objects(tmp_path)
        area.prepare()
        yield area

    def test_put_and_get_round_trip(self, objects: ObjectArea) -> None:
        for n in (0, 1, 4096, _LARGE):
            data = _payload(n, n)
            put = objects.put(data)
            assert isinstance(put, PutResult) and put.written
            assert len(put.oid) == 64 and all(c in "0123456789abcdef" for c in put.oid)
            assert objects.exists(put.oid)
            assert objects.get(put.oid) == data
            assert objects.size(put.oid) == put.size >= n

    def test_identical_bytes_are_one_object(self, objects: ObjectArea) -> None:
        data = _payload(10_000)
        first, again = objects.put(data), objects.put(bytearray(data))
        assert again.oid == first.oid and not again.written
        assert objects.put(data[:-1]).oid != first.oid
        assert sorted(o for o, _ in objects.scan()).count(first.oid) == 1

    def test_put_filled_stores_what_put_stores(self, objects: ObjectArea) -> None:
        import torch

        data = _payload(_LARGE, 7)
        seen: list[int] = []

        def fill(dst: torch.Tensor, progress: Any) -> None:
            dst.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
            progress(len(data))
            seen.append(dst.numel())

        filled = objects.put_filled(len(data), fill)
        assert seen == [len(data)]
        assert filled.oid == objects.put(data).oid
        assert objects.get(filled.oid) == data

    def test_partial_reads_are_verified_and_exact(self, objects: ObjectArea) -> None:
        data = _payload(_LARGE, 3)
        oid = objects.put(data).oid
        reader = objects.open(oid)
        try:
            assert reader.size == len(data)
            assert reader.read(100_000, 5000) == data[100_000:105_000]
            assert bytes(reader.tensor(len(data) - 10).numpy()) == data[-10:]
            reader.verify()
            with pytest.raises(IntegrityError):
                reader.read(len(data) - 1, 2)  # outside the object
        finally:
            reader.close()
        assert objects.payload_prefix(oid, 16) == data[:16]

    @pytest.mark.parametrize("where", ["payload", "header"])
    def test_a_damaged_byte_is_an_integrity_error(self, objects: ObjectArea, where: str) -> None:
        data = _payload(_LARGE, 5)
        put = objects.put(data)
        # the header is at most ~2 KiB; the last stored byte is payload
        self.corrupt(objects, put.oid, put.size - 1 if where == "payload" else 12)
        with pytest.raises(IntegrityError):
            objects.get(put.oid)
        with pytest.raises(IntegrityError):
            reader = objects.open(put.oid)
            try:
                reader.verify()
            finally:
                reader.close()

    def test_missing_and_deleted_objects(self, objects: ObjectArea) -> None:
        missing = hashlib.sha256(b"never stored").hexdigest()
        assert not objects.exists(missing)
        with pytest.raises(IntegrityError):
            objects.get(missing)
        oid = objects.put(b"short-lived").oid
        assert objects.delete(oid)
        assert not objects.exists(oid)
        assert oid not in {o for o, _ in objects.scan()}
        with pytest.raises(IntegrityError):
            objects.get(oid)

    def test_scan_lists_every_object_with_its_size(self, objects: ObjectArea) -> None:
        puts = [objects.put(_payload(n, n)) for n in (10, 70_000, 1)]
        scanned = dict(objects.scan())
        assert set(scanned) == {p.oid for p in puts}
        assert all(scanned[p.oid] >= p.size > 0 for p in puts)

    def test_refs(self, objects: ObjectArea) -> None:
        a, b = objects.put(b"a").oid, objects.put(b"b").oid
        assert objects.any_refs() == 0 and objects.ref_names("sets") == set()
        objects.write_ref("sets", "cells", 1, a)
        objects.write_ref("sets", "cells", 2, b)
        objects.write_ref("candidates", "zoo", 1, b)
        assert objects.ref_names("sets") == {("cells", 1), ("cells", 2)}
        assert objects.ref_names("candidates") == {("zoo", 1)}
        assert objects.read_ref("sets", "cells", 2) == b
        assert objects.read_ref("sets", "cells", 3) is None
        assert objects.any_refs() == 3
        objects.remove_ref("sets", "cells", 1)
        assert objects.ref_names("sets") == {("cells", 2)}

    def test_clean_temp_keeps_objects(self, objects: ObjectArea) -> None:
        oid = objects.put(b"kept").oid
        items, nbytes = objects.clean_temp(exclusive=True)
        assert items >= 0 and nbytes >= 0
        assert objects.get(oid) == b"kept"


class CatalogTests:
    """Checks of the ``Catalog`` contract: gapless versions in one transaction, rows checked against
    their manifests, pending rows invisible, candidate sets, kept searches, and a rebuild from
    manifests (which keeps the searches)."""

    def make_catalog(self, tmp_path: Path) -> Catalog:
        """A fresh, empty catalog over a fresh object area (``catalog.objects``)."""
        raise NotImplementedError

    def reopen(self, catalog: Catalog) -> Catalog:
        """The same catalog opened again (a new connection, no cached manifests)."""
        raise NotImplementedError

    def corrupt(self, objects: ObjectArea, oid: str, offset: int) -> None:
        """Flip the byte at ``offset`` of the stored object, bypassing the object area."""
        raise NotImplementedError

    @pytest.fixture
    def catalog(self, tmp_path: Path) -> Iterator[Catalog]:
        with ExitStack() as stack:
            cat = self.make_catalog(tmp_path)
            stack.callback(cat.close)
            cat.objects.prepare()  # what a store does before its first save
            yield cat

    # -- helpers ----------------------------------------------------------------------------------
    @staticmethod
    def manifest(catalog: Catalog, set_id: int, name: str, version: int, n: int = 2) -> dict[str, Any]:
        """A valid baseline manifest over a real parameter object of ``n`` models."""
        layout = Layout.of([TensorSpec("w", "float32", (3,))])
        params = catalog.objects.put(_payload(n * layout.stride, set_id))
        return {
            "kind": "set", "id": set_id, "name": name, "version": version, "approach": "baseline",
            "requested": "baseline", "base_id": None, "base": None, "chain": 0, "n_models": n,
            "bytes": params.size, "tts": "0.010000", "created": now_iso(),
            "artifacts": [["params", params.oid, params.size]],
            "set": {"architecture": {"kind": "factory"}, "environment": {}, "layout": layout.to_json(),
                    "names": None, "n": n, "params": params.oid},
        }

    def commit(self, catalog: Catalog, name: str) -> tuple[SetRow, str]:
        """One visible version of ``name`` as a store commits it; (its row, its manifest id)."""
        with catalog.transaction() as tx:
            set_id = catalog.next_id(tx)
            version = catalog.next_version(tx, name)
            m = self.manifest(catalog, set_id, name, version)
            oid, size = catalog.put_manifest(m)
            catalog.insert_set(tx, m, oid, size)
            catalog.add_artifacts(tx, set_id, [(r, o, s) for r, o, s in m["artifacts"]])
        row = catalog.find(name, version)
        assert row is not None
        return row, oid

    # -- checks -----------------------------------------------------------------------------------
    def test_an_empty_catalog(self, catalog: Catalog) -> None:
        assert catalog.listing() == [] and catalog.raw_rows() == [] and catalog.raw_candidates() == []
        assert catalog.find("cells", None) is None and catalog.versions("cells") == []
        assert catalog.visible_versions() == (set(), set())
        assert catalog.all_objects() == [] and catalog.lost_versions() == []
        assert catalog.find_candidates("zoo") is None
        assert catalog.raw_searches() == []

    def test_versions_are_gapless_rows_match_their_manifests(self, catalog: Catalog) -> None:
        rows = [self.commit(catalog, n)[0] for n in ("cells", "cells", "other", "cells")]
        assert [(r.name, r.version) for r in rows] == [("cells", 1), ("cells", 2), ("other", 1), ("cells", 3)]
        latest = catalog.find("cells", None)
        assert latest is not None and latest == rows[-1] == catalog.get(rows[-1].id)
        assert [r.version for r in catalog.versions("cells")] == [1, 2, 3]
        assert latest.approach == "baseline" and latest.n_models == 2 and latest.manifest["params"]
        assert [(n, v) for n, v, *_ in catalog.listing()] == [("cells", 1), ("cells", 2), ("cells", 3), ("other", 1)]
        columns = catalog.columns(latest.id)
        assert columns is not None and catalog.columns(10**9) is None
        assert (columns.approach, columns.requested, columns.chain, columns.n_models) == ("baseline", "baseline", 0, 2)
        assert columns.bytes == latest.bytes
        assert catalog.visible_versions()[0] == {("cells", 1), ("cells", 2), ("cells", 3), ("other", 1)}
        # seen by another connection too (committed, not only cached)
        other = self.reopen(catalog)
        try:
            assert [r.version for r in other.versions("cells")] == [1, 2, 3]
        finally:
            other.close()

    def test_a_failed_transaction_leaves_nothing(self, catalog: Catalog) -> None:
        self.commit(catalog, "cells")
        with pytest.raises(RuntimeError, match="abort"), catalog.transaction() as tx:
            set_id, version = catalog.next_id(tx), catalog.next_version(tx, "cells")
            m = self.manifest(catalog, set_id, "cells", version)
            oid, size = catalog.put_manifest(m)
            catalog.insert_set(tx, m, oid, size)
            raise RuntimeError("abort")
        assert [r.version for r in catalog.versions("cells")] == [1]
        assert self.commit(catalog, "cells")[0].version == 2  # the aborted number is taken again

    def test_a_damaged_manifest_is_an_integrity_error(self, catalog: Catalog) -> None:
        row, oid = self.commit(catalog, "cells")
        self.corrupt(catalog.objects, oid, catalog.objects.size(oid) - 1)
        fresh = self.reopen(catalog)
        try:
            with pytest.raises(IntegrityError):
                fresh.find("cells", 1)
            with pytest.raises(IntegrityError):
                fresh.get(row.id)
        finally:
            fresh.close()

    def test_a_row_that_disagrees_with_its_manifest_is_refused(self, catalog: Catalog) -> None:
        row, _ = self.commit(catalog, "cells")
        _, other_oid = self.commit(catalog, "other")
        raw = next(r for r in catalog.raw_rows() if r.id == row.id)
        with pytest.raises(IntegrityError):
            catalog.set_row(raw._replace(manifest=other_oid))
        with pytest.raises(IntegrityError):
            catalog.set_row(raw._replace(manifest=""))

    def test_artifacts_models_and_all_objects(self, catalog: Catalog) -> None:
        row, oid = self.commit(catalog, "cells")
        extra = [catalog.objects.put(_payload(50, i)) for i in range(3)]
        with catalog.transaction() as tx:
            catalog.add_model(tx, row.id, 0, "m0", extra[0].oid, extra[1].oid, extra[2].oid)
        params = row.manifest["params"]
        assert [(r, o) for r, o, _ in catalog.artifacts(row.id)] == [("params", params)]
        assert [tuple(r) for r in catalog.model_rows(row.id)] == [(0, "m0", extra[0].oid, extra[1].oid, extra[2].oid)]
        assert [tuple(r) for r in catalog.model_rows(row.id, 0)] == [(0, "m0", extra[0].oid, extra[1].oid,
                                                                        extra[2].oid)]
        assert catalog.model_rows(row.id, 1) == []
        assert catalog.all_objects() == sorted({oid, params, *(p.oid for p in extra)})

    def test_pending_rows_are_invisible(self, catalog: Catalog) -> None:
        with catalog.transaction() as tx:
            pending = catalog.insert_pending(tx, "models", "mmlib-base", 3)
        assert isinstance(pending, int)
        assert catalog.find("models", None) is None and catalog.listing() == []
        assert catalog.visible_versions() == (set(), set())
        with catalog.transaction() as tx:
            assert catalog.delete_pending(tx) == 1
        assert self.commit(catalog, "models")[0].version == 1

    def test_candidate_sets(self, catalog: Catalog) -> None:
        blobs = [catalog.objects.put(_payload(100, i)) for i in range(2)]
        listed = [("block", blobs[0].oid, blobs[0].size), ("block", blobs[1].oid, blobs[1].size)]
        manifest = {"candidates": [{"name": "a"}, {"name": "b"}]}
        first = catalog.insert_candidates("zoo", manifest, 200, listed)
        second = catalog.insert_candidates("zoo", {"candidates": [{"name": "c"}]}, 100, listed[:1])
        assert (first[1], second[1]) == (1, 2)
        found = catalog.find_candidates("zoo")
        assert found is not None and found[:2] == second and found[2] == {"candidates": [{"name": "c"}]}
        older = catalog.find_candidates("zoo", 1)
        assert older is not None and older[2] == manifest
        assert sorted(catalog.candidate_objects(first[0])) == sorted(listed)
        assert [(r[1], r[2]) for r in catalog.raw_candidates()] == [("zoo", 1), ("zoo", 2)]
        assert catalog.visible_versions()[1] == {("zoo", 1), ("zoo", 2)}
        assert {b.oid for b in blobs} <= set(catalog.all_objects())

    def test_kept_searches(self, catalog: Catalog) -> None:
        """Rows kept in order with gapless ids, the record text exactly as given, seen by another
        connection; a search needs no set."""
        first = catalog.insert_search("cifar-subset", "alsatian", "m1", '{"format":1}')
        second = catalog.insert_search("cifar-subset", "shift", "m2", "\u00e9" * 10_000)
        assert isinstance(first, SearchRow) and (first.id, second.id) == (1, 2)
        assert (first.dataset, first.approach, first.winner, first.record) == ("cifar-subset", "alsatian", "m1",
                                                                               '{"format":1}')
        assert catalog.raw_searches() == [first, second] and first.created <= second.created
        other = self.reopen(catalog)
        try:
            assert other.raw_searches() == [first, second]
        finally:
            other.close()
        assert catalog.listing() == [] and catalog.all_objects() == []

    def test_lost_versions_are_named(self, catalog: Catalog) -> None:
        _, oid = self.commit(catalog, "cells")
        catalog.objects.write_ref("sets", "cells", 1, oid)
        assert catalog.lost_versions() == []
        catalog.objects.write_ref("sets", "gone", 4, oid)
        catalog.objects.write_ref("candidates", "zoo", 2, oid)
        assert catalog.lost_versions() == ["gone@4", "candidates zoo@2"]

    def test_save_lock_is_shared_by_saves_and_exclusive_for_gc(self, catalog: Catalog) -> None:
        """Between two openings of the catalog (two processes, two connections): saves share the
        lock, gc waits for them (bounded: a StoreError naming what it could not do), and then runs."""
        other = self.reopen(catalog)
        try:
            with catalog.save_lock(False, 5.0, "cannot save"), other.save_lock(False, 5.0, "cannot save"):
                pass
            with catalog.save_lock(False, 5.0, "cannot save"):
                with pytest.raises(StoreError, match="cannot collect garbage"), \
                        other.save_lock(True, 0.3, "cannot collect garbage"):
                    pass
            with other.save_lock(True, 5.0, "cannot collect garbage"):
                with pytest.raises(StoreError, match="cannot save"), catalog.save_lock(False, 0.3, "cannot save"):
                    pass
            with catalog.save_lock(True, 5.0, "cannot collect garbage"):
                pass
        finally:
            other.close()

    def test_a_rebuild_replaces_every_row(self, catalog: Catalog) -> None:
        keep, keep_oid = self.commit(catalog, "cells")
        self.commit(catalog, "dropped")
        kept = catalog.insert_search("cifar-subset", "alsatian", "m1", "{}")
        m = catalog.manifest(keep_oid)
        location = self.location(catalog)
        kind, objects = type(catalog), catalog.objects
        catalog.close()
        with kind.rebuilding(location, objects, 5.0) as write:
            write({keep_oid: (m, objects.size(keep_oid))}, {},
                  {keep_oid: ([(r, o, s) for r, o, s in m["artifacts"]], [])})
        fresh = self.reopen(catalog)
        try:
            assert fresh.find("dropped", None) is None
            again = fresh.find("cells", 1)
            assert again is not None and again.manifest_oid == keep_oid and again.manifest == keep.manifest
            assert [(r, o) for r, o, _ in fresh.artifacts(again.id)] == [("params", m["set"]["params"])]
            assert fresh.raw_searches() == [kept]  # no object holds them: carried over
        finally:
            fresh.close()

    def location(self, catalog: Catalog) -> str:
        """Where ``rebuilding`` recreates this catalog (default: its ``location``)."""
        return os.fspath(catalog.location)


__all__ = ["CatalogTests", "ObjectAreaTests"]
