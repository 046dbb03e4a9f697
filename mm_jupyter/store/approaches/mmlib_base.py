"""``mmlib-base``: the reference point. Every model is saved on its own, as MMlib does: its own
parameter file, architecture record, environment record and catalog row, in its own transaction.
Recovery reads them back model by model."""
from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import IntegrityError
from ..architectures import Architecture
from ..catalog import SetRow
from ..modelset import ObjectShape, Resolved
from ..tensors import Layout, fill_model_major, pack_arrays, unpack_arrays
from .common import (
    Saved,
    SaveInput,
    digests_from_bytes,
    head,
    names_of,
    no_datasets as datasets,
    not_recorded as changed,
    self_contained as derived,
)

if TYPE_CHECKING:
    from ..contracts import Listed, ObjectArea
    from ..store import Store

NAME = "mmlib-base"
ROLES = ("params", "architecture", "environment")


def _record(payload: dict) -> bytes:
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


def save(store: "Store", inp: SaveInput) -> Saved:
    """A pending (invisible) set row first; then model by model, each in its own transaction; the
    store makes the set visible in its final transaction."""
    with store.catalog.transaction() as tx:
        pending = store.catalog.insert_pending(tx, inp.name, NAME, inp.n)
    saved = save_models(store, inp, pending)
    saved.set_id = pending
    return saved


def save_models(store: "Store", inp: SaveInput, pending_id: int) -> Saved:
    lay = inp.layout
    arch = inp.architecture.to_json()
    saved = Saved(NAME, head(inp) | {"names": inp.names})
    ids = np.zeros((inp.n, 3, 32), dtype=np.uint8)
    sizes = np.zeros((inp.n, 3), dtype=np.int64)
    for i, name in enumerate(inp.names):
        model_id = uuid.uuid4().hex
        params = store.objects.put_filled(lay.stride, lambda dst, _, i=i: fill_model_major(dst, lay, [inp.rows[i]]))
        arch_rec = store.objects.put(_record({"model": model_id, "name": name, "architecture": arch,
                                              "layout": lay.to_json()}))
        env_rec = store.objects.put(_record({"model": model_id, "name": name, "environment": inp.env}))
        with store.catalog.transaction() as tx:
            store.catalog.add_model(tx, pending_id, i, name, params.oid, arch_rec.oid, env_rec.oid)
        for j, put in enumerate((params, arch_rec, env_rec)):
            ids[i, j] = np.frombuffer(bytes.fromhex(put.oid), dtype=np.uint8)
            sizes[i, j] = put.size
        saved.extra += [(role, put) for role, put in zip(ROLES, (params, arch_rec, env_rec))]
    # the per-model documents' ids in one object: a catalog rebuild recreates the model rows from it
    index = store.objects.put(pack_arrays({"objects": ids, "sizes": sizes}))
    saved.manifest["models"] = index.oid
    saved.artifacts.append(("models", index))
    return saved


def model_index(store: "Store", row: SetRow) -> tuple[list[list[str]], np.ndarray]:
    """Per model its (params, architecture, environment) object ids and their sizes."""
    return _model_index(store.objects, row.manifest)


def _model_index(objects: "ObjectArea", manifest: dict[str, Any]) -> tuple[list[list[str]], np.ndarray]:
    arrays = unpack_arrays(objects.get(manifest["models"]))
    ids = [[bytes(x).hex() for x in model] for model in arrays["objects"]]
    return ids, arrays["sizes"]


def listed(objects: "ObjectArea", manifest: dict[str, Any]) -> list["Listed"]:
    """The per-model documents (the model index object lists them; the manifest stays small)."""
    ids, sizes = _model_index(objects, manifest)
    return [(role, oid, int(size)) for model, row in zip(ids, sizes) for role, oid, size in zip(ROLES, model, row)]


def model_rows(objects: "ObjectArea", manifest: dict[str, Any]) -> list[tuple[int, str, str, str, str]]:
    """The per-model catalog rows, as a rebuild restores them."""
    ids, _ = _model_index(objects, manifest)
    return [(i, name, ids[i][0], ids[i][1], ids[i][2]) for i, name in enumerate(names_of(manifest))]


def digests(store: "Store", row: SetRow, base: np.ndarray | None = None) -> tuple[list[str], np.ndarray]:
    """Hashed from the per-model parameter objects (MMlib records no digests)."""
    return digests_from_bytes(store, row)


def resolve(store: "Store", row: SetRow, base: Resolved | None = None, retrain: bool = True) -> Resolved:
    """Model by model: its catalog row, architecture and environment records, parameter file.
    Each catalog row must name the objects the (verified) model index lists."""
    lay = Layout.from_json(row.manifest["layout"])
    rows = store.catalog.model_rows(row.id)
    want, _ = model_index(store, row)
    names = names_of(row.manifest)
    if len(rows) != len(want):
        raise IntegrityError(f"catalog lists {len(rows)} models of {row.name}@{row.version}, its manifest {len(want)}")
    objects, arch = [], None
    for i, ((idx, name, params, arch_oid, env_oid), ids) in enumerate(zip(rows, want)):
        if [params, arch_oid, env_oid] != ids or (idx, name) != (i, names[i]):
            raise IntegrityError(f"catalog row of model {i} of {row.name}@{row.version} does not match its "
                                 "manifest's model index; rebuild the catalog")
        rec = json.loads(store.objects.get(arch_oid))
        json.loads(store.objects.get(env_oid))
        if rec["name"] != name:
            raise IntegrityError(f"architecture record of model {name!r} belongs to {rec['name']!r}")
        arch = arch or Architecture.from_json(rec["architecture"])
        objects.append(ObjectShape(params, "rows", stride=lay.stride, rows=1))
    n, k = len(rows), len(lay.specs)
    obj = np.repeat(np.arange(n, dtype=np.int32)[:, None], k, axis=1)
    off = np.repeat(np.asarray(lay.offsets, dtype=np.int64)[None, :], n, axis=0)
    return Resolved(names, lay, arch or Architecture.from_json(row.manifest["architecture"]),
                    objects, obj, off)


__all__ = ["NAME", "changed", "datasets", "derived", "digests", "listed", "model_rows", "resolve", "save"]
