"""``update``: per-tensor digests per set; a derived version stores only the tensors whose digest
changed against its base, in one key-major object, and recovery resolves the chain.

Models are matched to the base by name, so a version may add models (stored in full) or drop some.
The digests of a version are one (models, keys, 16) array; a derived version stores only the
digests of its changed tensors and inherits the rest, exactly like the tensors themselves.
"""
from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from ...errors import IntegrityError
from ..architectures import Architecture
from ..basetypes import SetRow
from ..modelset import ObjectShape, Resolved, require_layout
from ..tensors import Layout, fill_key_major, key_major_size, pack_arrays, unpack_arrays
from .common import (
    Saved,
    SaveInput,
    StoreContext,
    head,
    match_base,
    names_of,
    no_datasets as datasets,
    no_model_rows as model_rows,
    nothing_listed as listed,
    payload_size,
    resolve_full,
    write_full,
)

NAME = "update"


def derived(manifest: dict[str, Any]) -> bool:
    """A delta (no parameter object of its own) needs its base."""
    return "params" not in manifest


def changed_mask(store: StoreContext, inp: SaveInput, digests: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(src, changed): base index per model and which (model, key) tensors differ from the base."""
    assert inp.base is not None
    base_names, base_digests = store.version_digests(inp.base)
    src = match_base(inp.names, base_names)
    changed = np.ones((inp.n, len(inp.layout.specs)), dtype=bool)
    have = src >= 0
    changed[have] = np.any(digests[have] != base_digests[src[have]], axis=2)
    return src, changed


def save(store: StoreContext, inp: SaveInput) -> Saved:
    digests = inp.digests()
    if inp.base is None:
        params = write_full(store, inp)
        dig = store.objects.put(pack_arrays({"digests": digests}))
        manifest = head(inp) | {"params": params.oid, "digests": dig.oid}
        return Saved(NAME, manifest, [("params", params), ("digests", dig)], digests=digests)

    require_layout(inp.layout, Layout.from_json(inp.base.manifest["layout"]), f"set {inp.name!r}")
    src, changed = changed_mask(store, inp, digests)
    lay = inp.layout
    counts = [int(changed[:, k].sum()) for k in range(len(lay.specs))]
    starts = np.concatenate([[0], np.cumsum([c * s.nbytes for c, s in zip(counts, lay.specs)])[:-1]]).tolist()
    size = key_major_size(lay, changed)
    arrays = {
        "changed": np.packbits(changed.reshape(-1)),
        "digests": digests.transpose(1, 0, 2)[changed.T],
    }
    if not (len(src) == len(names_of(inp.base.manifest)) and np.array_equal(src, np.arange(len(src)))):
        arrays["src"] = src
    index = store.objects.put(pack_arrays(arrays))
    artifacts = [("index", index)]
    manifest = head(inp) | {"index": index.oid, "starts": starts, "counts": counts, "delta": None}
    if changed.any():
        delta = store.objects.put_filled(size, lambda dst, _: fill_key_major(dst, lay, inp.rows, changed))
        manifest["delta"] = delta.oid
        artifacts.append(("delta", delta))
    return Saved(NAME, manifest, artifacts, chain=inp.base.chain + 1, base=inp.base, digests=digests)


def _index(store: StoreContext, row: SetRow) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(src, changed, digests) of a delta, checked against the counts they imply before anything
    of that size is allocated."""
    m = row.manifest
    n, k = m["n"], len(m["layout"]["keys"])
    arrays = unpack_arrays(store.objects.get(m["index"]))
    bits, src, digests = arrays.get("changed"), arrays.get("src"), arrays.get("digests")
    if bits is None or bits.ndim != 1 or len(bits) != -(-n * k // 8) or (src is not None and src.shape != (n,)):
        raise IntegrityError(f"the index of {row.name}@{row.version} does not match its {n} models and {k} keys")
    changed = np.unpackbits(bits, count=n * k).reshape(n, k).astype(bool)
    if digests is None or digests.shape != (int(changed.sum()), 16):
        raise IntegrityError(f"the index of {row.name}@{row.version} holds no digest per changed tensor")
    return (np.arange(n) if src is None else src).astype(np.int64), changed, digests


def digests(store: StoreContext, row: SetRow, base_digests: np.ndarray | None) -> tuple[list[str], np.ndarray]:
    """(names, digests) of a version without reading any parameters; a derived version's are
    its base's (``base_digests``) overlaid with the ones it stored."""
    m = row.manifest
    if "params" in m:
        found = unpack_arrays(store.objects.get(m["digests"]))["digests"]
        if found.shape != (m["n"], len(m["layout"]["keys"]), 16):
            raise IntegrityError(f"the digests of {row.name}@{row.version} do not match its models and keys")
        return names_of(m), found
    assert base_digests is not None
    src, changed, stored = _index(store, row)
    return names_of(m), overlay_digests(base_digests, src, changed, stored)


def overlay_digests(base: np.ndarray, src: np.ndarray, changed: np.ndarray, stored: np.ndarray) -> np.ndarray:
    out = np.zeros((len(src), changed.shape[1], base.shape[2]), dtype=np.uint8)
    have = src >= 0
    out[have] = base[src[have]]
    view = out.transpose(1, 0, 2)
    view[changed.T] = stored
    return out


def changed(store: StoreContext, row: SetRow) -> int | None:
    """How many models have at least one tensor changed against the base (deltas only)."""
    if not derived(row.manifest):
        return None
    return int(_index(store, row)[1].any(axis=1).sum())


def resolve(store: StoreContext, row: SetRow, base: Resolved | None, retrain: bool = True) -> Resolved:
    m = row.manifest
    if "params" in m:
        r = resolve_full(m, m["params"], store.objects)
        r.digests = unpack_arrays(store.objects.get(m["digests"]))["digests"]
        if r.digests.shape != (r.n, len(r.layout.specs), 16):
            raise IntegrityError(f"the digests of {row.name}@{row.version} do not match its models and keys")
        return r
    assert base is not None
    src, changed, stored = _index(store, row)
    layout = Layout.from_json(m["layout"])
    n, k = len(src), len(layout.specs)
    if base.obj.shape[1] != k or not np.all((src >= -1) & (src < base.n)):
        raise IntegrityError(f"{row.name}@{row.version} refers to models or keys its base does not have")
    counts = changed.sum(axis=0).tolist()
    sizes = [c * s.nbytes for c, s in zip(counts, layout.specs)]
    starts = [0, *itertools.accumulate(sizes)][:k]
    if k and (m["counts"] != counts or m["starts"] != starts):
        raise IntegrityError(f"the delta layout of {row.name}@{row.version} does not match its index")
    if m["delta"] is not None and payload_size(store.objects, m["delta"]) != sum(sizes):
        raise IntegrityError(f"the delta object of {row.name}@{row.version} does not hold the changed tensors")
    obj = np.full((n, k), -1, dtype=np.int32)
    off = np.zeros((n, k), dtype=np.int64)
    have = src >= 0
    obj[have] = base.obj[src[have]]
    off[have] = base.off[src[have]]
    memory = {int(i): base.memory[int(src[i])] for i in np.flatnonzero(have) if int(src[i]) in base.memory}
    objects = list(base.objects)
    if m["delta"] is not None:
        d = len(objects)
        objects.append(ObjectShape(m["delta"], "blocks", starts=m["starts"], counts=m["counts"]))
        for kk, spec in enumerate(layout.specs):
            sel = np.flatnonzero(changed[:, kk])
            obj[sel, kk] = d
            off[sel, kk] = m["starts"][kk] + np.arange(len(sel), dtype=np.int64) * spec.nbytes
    digests_ = overlay_digests(base.digests, src, changed, stored) if base.digests is not None else None
    return Resolved(names_of(m), layout, Architecture.from_json(m["architecture"]), objects, obj, off, memory, digests_)


__all__ = ["NAME", "changed", "changed_mask", "datasets", "derived", "digests", "listed", "model_rows", "resolve",
           "save"]
