"""``mmlib-base``: the reference point. Every model is saved on its own, as MMlib does: its own
parameter file, architecture record, environment record and catalog row, in its own transaction.
Recovery reads them back model by model."""
from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING

import numpy as np

from ...errors import IntegrityError
from ..architectures import Architecture
from ..catalog import SetRow
from ..modelset import ObjectShape, Resolved
from ..tensors import Layout, fill_model_major
from .common import SaveInput, Saved, head, names_of

if TYPE_CHECKING:
    from ..store import Store

NAME = "mmlib-base"


def _record(payload: dict) -> bytes:
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


def save(store: "Store", inp: SaveInput, pending_id: int) -> Saved:
    lay = inp.layout
    arch = inp.architecture.to_json()
    saved = Saved(NAME, head(inp) | {"names": inp.names})
    for i, name in enumerate(inp.names):
        model_id = uuid.uuid4().hex
        params = store.objects.put_filled(lay.stride, lambda dst, _, i=i: fill_model_major(dst, lay, [inp.rows[i]]))
        arch_rec = store.objects.put(_record({"model": model_id, "name": name, "architecture": arch,
                                              "layout": lay.to_json()}))
        env_rec = store.objects.put(_record({"model": model_id, "name": name, "environment": inp.env}))
        with store.catalog.transaction() as db:
            db.execute(
                "INSERT INTO models(set_id, idx, name, params, architecture, environment) VALUES (?,?,?,?,?,?)",
                (pending_id, i, name, params.oid, arch_rec.oid, env_rec.oid),
            )
        saved.artifacts += [("params", params), ("architecture", arch_rec), ("environment", env_rec)]
    return saved


def resolve(store: "Store", row: SetRow) -> Resolved:
    """Model by model: its catalog row, architecture and environment records, parameter file."""
    lay = Layout.from_json(row.manifest["layout"])
    rows = store.catalog.model_rows(row.id)
    objects, arch = [], None
    for idx, name, params, arch_oid, env_oid in rows:
        rec = json.loads(store.objects.get(arch_oid))
        json.loads(store.objects.get(env_oid))
        if rec["name"] != name:
            raise IntegrityError(f"architecture record of model {name!r} belongs to {rec['name']!r}")
        arch = arch or Architecture.from_json(rec["architecture"])
        objects.append(ObjectShape(params, "rows", stride=lay.stride, rows=1))
    n, k = len(rows), len(lay.specs)
    obj = np.repeat(np.arange(n, dtype=np.int32)[:, None], k, axis=1)
    off = np.repeat(np.asarray(lay.offsets, dtype=np.int64)[None, :], n, axis=0)
    return Resolved(names_of(row.manifest), lay, arch or Architecture.from_json(row.manifest["architecture"]),
                    objects, obj, off)
