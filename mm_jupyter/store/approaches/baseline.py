"""``baseline``: one architecture + layout record per set and every model's parameters in one object."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..catalog import SetRow
from ..modelset import Resolved
from .common import SaveInput, Saved, head, resolve_full, write_full

if TYPE_CHECKING:
    from ..store import Store

NAME = "baseline"


def save(store: "Store", inp: SaveInput) -> Saved:
    params = write_full(store, inp)
    manifest = head(inp) | {"params": params.oid}
    return Saved(NAME, manifest, [("params", params)])


def resolve(store: "Store", row: SetRow, base: Resolved | None = None) -> Resolved:
    return resolve_full(row.manifest, row.manifest["params"])
