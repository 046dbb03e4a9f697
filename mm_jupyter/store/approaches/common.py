"""What every approach receives when saving and returns to the store."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ...errors import IntegrityError
from ..architectures import Architecture
from ..basetypes import Listed, PutResult, SetRow
from ..contracts import ObjectArea, VersionCatalog
from ..modelset import ModelSet, ObjectShape, Resolved, SetRef, default_names
from ..tensors import Layout, digest_rows, fill_model_major, tensor_digest

if TYPE_CHECKING:
    import torch

    from ..provenance import Provenance


class StoreContext(Protocol):
    """What an approach uses of the store: its object area and catalog, and the resolution and
    digests of other versions (a derived version's base). ``Store`` provides it; an approach never
    sees the rest of the store."""

    @property
    def objects(self) -> ObjectArea: ...

    @property
    def catalog(self) -> VersionCatalog: ...

    def resolve_row(self, row: SetRow, retrain: bool = True) -> Resolved:
        """Where every tensor of ``row`` lives (its chain resolved)."""

    def version_digests(self, row: SetRow) -> tuple[list[str], np.ndarray]:
        """(names, per-tensor digests) of a version."""


@dataclass
class SaveInput:
    """A validated set, ready to be written."""

    name: str
    names: list[str]
    explicit_names: bool
    layout: Layout
    rows: list[list["torch.Tensor"]]
    architecture: Architecture
    env: dict[str, Any]
    base: SetRow | None
    provenance: "Provenance | None"
    verify: int | str = 1
    _digests: np.ndarray | None = field(default=None, repr=False)

    @property
    def n(self) -> int:
        return len(self.names)

    def digests(self) -> np.ndarray:
        """Per-tensor digests of every model, hashed once per save (``auto`` and ``update`` share them)."""
        if self._digests is None:
            self._digests = digest_rows(self.rows, self.layout)
        return self._digests


@dataclass
class Saved:
    """What an approach wrote: its part of the manifest and the objects it references.

    ``artifacts`` are listed in the manifest; ``extra`` are per-model objects an index object
    (itself an artifact) already lists, so the manifest stays small for 5,000 mmlib-base models.
    ``digests`` (all models' per-tensor digests, when the save computed them) are cached so the
    next derived version needs no chain walk.
    """

    approach: str
    manifest: dict[str, Any]
    artifacts: list[tuple[str, PutResult]] = field(default_factory=list)
    chain: int = 0
    base: SetRow | None = None
    extra: list[tuple[str, PutResult]] = field(default_factory=list)
    digests: np.ndarray | None = None
    #: the catalog row the save already created (mmlib-base: pending until the commit)
    set_id: int | None = None

    def new_bytes(self) -> int:
        """Bytes of the objects this save wrote (objects that already existed cost nothing)."""
        return sum(p.size for _, p in self.artifacts + self.extra if p.written)


class Approach(Protocol):
    """One multi-model management approach; the modules in ``approaches/`` implement it and
    ``approaches.REGISTRY`` lists them (the only place their names are spelled out)."""

    NAME: str

    def save(self, store: StoreContext, inp: SaveInput) -> Saved:
        """Write the set's objects; the store makes them durable (``make_durable``) and commits them."""

    def resolve(self, store: StoreContext, row: SetRow, base: Resolved | None, retrain: bool = True) -> Resolved:
        """Where every tensor of ``row`` lives, given its resolved base (derived versions)."""

    def derived(self, manifest: dict[str, Any]) -> bool:
        """True when a version needs its base to be resolved."""

    def digests(self, store: StoreContext, row: SetRow, base: np.ndarray | None
                ) -> tuple[list[str], np.ndarray]:
        """(names, per-tensor digests) of the version: the recorded ones, hashed from its stored
        tensors when it recorded none, or its base's (``base``) overlaid with its own."""

    def listed(self, objects: ObjectArea, manifest: dict[str, Any]) -> list[Listed]:
        """Objects the version references beyond its manifest's artifacts (per-model documents)."""

    def model_rows(self, objects: ObjectArea, manifest: dict[str, Any]) -> list[tuple[int, str, str, str, str]]:
        """Per-model catalog rows (idx, name, params, architecture, environment) a rebuild restores."""

    def changed(self, store: StoreContext, row: SetRow) -> int | None:
        """How many models this version changed against its base (None: not recorded)."""

    def datasets(self, store: StoreContext, row: SetRow) -> tuple[tuple[str, str, str], ...]:
        """(model, dataset loader, content hash) of every model it retrained."""


def head(inp: SaveInput) -> dict[str, Any]:
    """Manifest fields shared by all approaches."""
    return {
        "architecture": inp.architecture.to_json(),
        "environment": inp.env,
        "layout": inp.layout.to_json(),
        "names": inp.names if inp.explicit_names else None,
        "n": inp.n,
    }


def names_of(manifest: dict[str, Any]) -> list[str]:
    return manifest["names"] if manifest.get("names") is not None else default_names(manifest["n"])


def write_full(store: StoreContext, inp: SaveInput) -> PutResult:
    """All models' parameters, model-major, in one object written straight into the page cache."""
    lay = inp.layout
    return store.objects.put_filled(inp.n * lay.stride,
                                    lambda dst, progress: fill_model_major(dst, lay, inp.rows, progress))


def payload_size(objects: ObjectArea, oid: str) -> int:
    """Payload bytes of an object (reads its header only)."""
    reader = objects.open(oid)
    try:
        return reader.size
    finally:
        reader.close()


#: Index entries (model, key) a version may declare beyond its stored bytes: small sets of
#: parameter-free or tiny models need no more than this.
MIN_INDEX_ENTRIES = 2**24


def check_index_size(n: int, k: int, stored: int, what: str) -> None:
    """IntegrityError when ``n`` models of ``k`` keys would need index arrays out of proportion to
    the ``stored`` bytes (a hostile manifest declaring a billion models of a small object)."""
    if n * k > max(stored, MIN_INDEX_ENTRIES):
        raise IntegrityError(f"{what} declares {n} models of {k} tensors for {stored} stored bytes; refused")


def resolve_full(manifest: dict[str, Any], oid: str, objects: ObjectArea) -> Resolved:
    """Resolution of a self-contained model-major version; the object must hold exactly the
    ``n * stride`` bytes the manifest declares."""
    layout = Layout.from_json(manifest["layout"])
    n = manifest["n"]
    k = len(layout.specs)
    size = payload_size(objects, oid)
    if size != n * layout.stride:
        raise IntegrityError(f"parameter object {oid[:12]}… holds {size} bytes, its manifest declares {n} models "
                             f"of {layout.stride} bytes")
    check_index_size(n, k, size, f"parameter object {oid[:12]}…")
    off = np.arange(n, dtype=np.int64)[:, None] * layout.stride + np.asarray(layout.offsets, dtype=np.int64)[None, :]
    return Resolved(
        names=names_of(manifest),
        layout=layout,
        architecture=Architecture.from_json(manifest["architecture"]),
        objects=[ObjectShape(oid, "rows", stride=layout.stride, rows=n)],
        obj=np.zeros((n, k), dtype=np.int32),
        off=off.reshape(n, k),
    )


def match_base(names: list[str], base_names: list[str]) -> np.ndarray:
    """For each model, the index of the same-named model in the base (-1: new model)."""
    where = {nm: i for i, nm in enumerate(base_names)}
    return np.array([where.get(nm, -1) for nm in names], dtype=np.int64)


def digests_from_bytes(store: StoreContext, row: SetRow) -> tuple[list[str], np.ndarray]:
    """Per-tensor digests of a version that recorded none, hashed from its stored tensors."""
    resolved = store.resolve_row(row)
    ms = ModelSet(SetRef(row.id, row.name, row.version), row.approach, resolved, store.objects)
    out = np.empty((resolved.n, len(resolved.layout.specs), 16), dtype=np.uint8)
    try:
        for i in range(resolved.n):
            for k, t in enumerate(ms.state_dict(i).values()):
                out[i, k] = np.frombuffer(tensor_digest(t), dtype=np.uint8)
    finally:
        ms.close()
    return resolved.names, out


# -- defaults of the Approach protocol for approaches that record nothing of that kind ----------
def self_contained(manifest: dict[str, Any]) -> bool:
    """``derived`` of an approach whose versions never need their base."""
    return False


def nothing_listed(objects: ObjectArea, manifest: dict[str, Any]) -> list[Listed]:
    """``listed``: the manifest's artifacts are all the objects."""
    return []


def no_model_rows(objects: ObjectArea, manifest: dict[str, Any]) -> list[tuple[int, str, str, str, str]]:
    """``model_rows``: no per-model catalog rows."""
    return []


def not_recorded(store: StoreContext, row: SetRow) -> None:
    """``changed``: the approach does not record which models changed."""
    return None


def no_datasets(store: StoreContext, row: SetRow) -> tuple[tuple[str, str, str], ...]:
    """``datasets``: nothing was retrained."""
    return ()
