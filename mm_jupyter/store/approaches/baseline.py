"""``baseline``: one architecture + layout record per set and every model's parameters in one object."""
from __future__ import annotations

import numpy as np

from ..basetypes import SetRow
from ..modelset import Resolved
from ..tensors import digest_model_major
from .common import (
    Saved,
    SaveInput,
    StoreContext,
    head,
    no_datasets as datasets,
    no_model_rows as model_rows,
    not_recorded as changed,
    nothing_listed as listed,
    resolve_full,
    self_contained as derived,
    write_full,
)

NAME = "baseline"


def save(store: StoreContext, inp: SaveInput) -> Saved:
    params = write_full(store, inp)
    manifest = head(inp) | {"params": params.oid}
    return Saved(NAME, manifest, [("params", params)])


def resolve(store: StoreContext, row: SetRow, base: Resolved | None = None, retrain: bool = True) -> Resolved:
    return resolve_full(row.manifest, row.manifest["params"], store.objects)


def digests(store: StoreContext, row: SetRow, base: np.ndarray | None = None) -> tuple[list[str], np.ndarray]:
    """Hashed from the parameter object (baseline records no digests)."""
    resolved = resolve(store, row)
    reader = store.objects.open(row.manifest["params"])
    try:
        return resolved.names, digest_model_major(reader.tensor(), resolved.layout, resolved.n)
    finally:
        reader.close()


__all__ = ["NAME", "changed", "datasets", "derived", "digests", "listed", "model_rows", "resolve", "save"]
