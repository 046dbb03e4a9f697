"""``provenance``: a derived version stores how it was trained, not its parameters.

Per set, once: the training code, config, seed and environment (one compressed JSON object).
Per updated model: its dataset reference and content hash, and the per-tensor digests of the
trained result (binary arrays), so recovery can prove it retrained exactly what was saved.

Only the digests of the trained weights are kept, so a version whose training does not reproduce
them could never be recovered. Saving therefore retrains a sample of the updated models exactly
as recovery will (``verify``: at least one, or ``"all"``) and refuses the version when a digest
differs. Cost: one training run per verified model added to the time-to-save.
"""
from __future__ import annotations

import copy
import json
import zlib
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from ...errors import IntegrityError, RecoveryError, StoreError
from .. import trust
from ..architectures import Architecture
from ..basetypes import SetRow
from ..limits import inflate, loads
from ..modelset import ModelSet, Resolved, SetRef, build_template, require_layout
from ..provenance import DatasetRef, check_trusted, dataset_hash, model_seed, resolve_train, train_one
from ..structure import load_module_state, module_state
from ..tensors import Layout, digest_rows, match_dtypes, pack_arrays, tensor_digest, unpack_arrays
from .common import (
    Saved,
    SaveInput,
    StoreContext,
    head,
    match_base,
    names_of,
    no_model_rows as model_rows,
    nothing_listed as listed,
)

if TYPE_CHECKING:
    import torch
    from torch import nn


NAME = "provenance"


def derived(manifest: dict[str, Any]) -> bool:
    """A provenance version is retrained from its base: always derived."""
    return True


def save(store: StoreContext, inp: SaveInput) -> Saved:
    prov = inp.provenance
    if prov is None:
        raise StoreError("approach 'provenance' needs provenance=mm.Provenance(train=..., datasets=...)")
    if inp.base is None:
        raise StoreError(f"provenance needs a base version to retrain from; set {inp.name!r} has none")
    require_layout(inp.layout, Layout.from_json(inp.base.manifest["layout"]), f"set {inp.name!r}")
    base_names, base_digests = store.version_digests(inp.base)
    src = match_base(inp.names, base_names)
    pos = {nm: i for i, nm in enumerate(inp.names)}
    for nm in prov.datasets:
        if nm not in pos:
            raise StoreError(f"provenance names dataset for model {nm!r}, which is not in the set")
    updated = np.array(sorted(pos[nm] for nm in prov.datasets), dtype=np.int64)
    is_updated = np.zeros(inp.n, dtype=bool)
    is_updated[updated] = True
    for i in np.flatnonzero(src < 0):
        raise StoreError(
            f"model {inp.names[i]!r} is not in the base; provenance only records retrained models "
            "(save new models with approach='update')"
        )
    rows = [inp.rows[i] for i in np.flatnonzero(~is_updated)]
    keep = digest_rows(rows, inp.layout)
    same = np.all(keep == base_digests[src[~is_updated]], axis=(1, 2))
    if not same.all():
        bad = inp.names[int(np.flatnonzero(~is_updated)[int(np.argmin(same))])]
        raise StoreError(f"model {bad!r} differs from its base but provenance has no dataset for it")

    digests = digest_rows([inp.rows[i] for i in updated], inp.layout)
    # only the tensors training changed get a digest; the others must equal the base's bytes
    changed = np.any(digests != base_digests[src[updated]], axis=2)
    refs = [prov.datasets[inp.names[i]] for i in updated]
    hashes = np.array([list(bytes.fromhex(r.sha256 or r.content_hash())) for r in refs], dtype=np.uint8)
    record = {
        "train": prov.train_record(),
        "config": prov.config,
        "configs": {nm: c for nm, c in prov.configs.items() if nm in pos},
        "seed": prov.seed,
        "environment": inp.env,
        "datasets": [r.to_json() for r in refs],
    }
    _verify_at_save(store, inp, record, src, updated, changed, digests, hashes)
    rec = store.objects.put(zlib.compress(json.dumps(record, separators=(",", ":")).encode(), 9))
    arrays: dict[str, np.ndarray] = {
        "updated": updated.astype(np.int32),
        "hashes": hashes.reshape(-1, 32),
        "changed": np.packbits(changed.reshape(-1)),
        "digests": digests[changed],
    }
    if not (len(src) == len(base_names) and np.array_equal(src, np.arange(len(src)))):
        arrays["src"] = src
    index = store.objects.put(pack_arrays(arrays))
    manifest = head(inp) | {"record": rec.oid, "index": index.oid}
    full = base_digests[src].copy()
    full[updated] = digests
    return Saved(NAME, manifest, [("record", rec), ("index", index)], chain=inp.base.chain + 1, base=inp.base,
                 digests=full)


def _sample(count: int, verify: int | str) -> list[int]:
    """Which updated models a save retrains: evenly spread over the set, first one included."""
    if verify == "all" or int(verify) >= count:
        return list(range(count))
    return sorted({int(round(x)) for x in np.linspace(0, count - 1, int(verify))})


def _verify_at_save(store: StoreContext, inp: SaveInput, record: dict[str, Any], src: np.ndarray, updated: np.ndarray,
                    changed: np.ndarray, digests: np.ndarray, hashes: np.ndarray) -> None:
    """Retrain a sample of the updated models from what is about to be recorded — the JSON record,
    the architecture record, the base version's stored weights — exactly as recovery will, and
    refuse the save (StoreError naming model and tensor) when a result differs."""
    if not len(updated):
        return
    assert inp.base is not None
    rec = json.loads(json.dumps(record))  # what recovery will read back
    base_row = inp.base
    # start states are the base's stored weights; a base model that is itself the result of
    # provenance training must be retrained first, so prefer models whose start needs no training
    base = store.resolve_row(base_row, retrain=False)
    pool = [j for j in range(len(updated)) if (base.obj[src[updated[j]]] >= 0).all()]
    if len(pool) < (len(updated) if inp.verify == "all" else min(int(inp.verify), len(updated))):
        base, pool = store.resolve_row(base_row), list(range(len(updated)))
    base_set = ModelSet(SetRef(base_row.id, base_row.name, base_row.version), base_row.approach, base, store.objects)
    try:
        # the code being recorded is the saving user's own: it runs here like Provenance.run did
        template = Architecture.from_json(inp.architecture.to_json()).build(trusted=True)
        match_dtypes(template, inp.layout)
        train = resolve_train(rec["train"], trusted=True)
        for j in [pool[x] for x in _sample(len(pool), inp.verify)]:
            i = int(updated[j])
            name = inp.names[i]
            ref = DatasetRef.from_json(rec["datasets"][j])
            try:
                data = ref.load()
                same_data = dataset_hash(data) == bytes(hashes[j]).hex()
            except Exception as e:
                raise StoreError(f"dataset of model {name!r} ({ref.loader}) cannot be loaded: {e}") from e
            if not same_data:
                raise StoreError(f"dataset of model {name!r} ({ref.loader}) loads different data than was hashed")
            start = base_set.state_dict(int(src[i]))
            try:
                model = retrain_model(train, template, start, data, rec["config"] | rec["configs"].get(name, {}),
                                model_seed(rec["seed"], name))
            except Exception as e:
                raise StoreError(f"retraining model {name!r} to verify its provenance failed: "
                                 f"{type(e).__name__}: {e}") from e
            _, bad = compare(model, inp.layout, changed[j], iter(digests[j][changed[j]]), start)
            if bad is not None:
                raise StoreError(
                    f"provenance does not reproduce model {name!r}: retrained as recovery would retrain it, "
                    f"tensor {bad!r} differs from the one given (training is not deterministic, or these "
                    "weights did not come from this training code, data, config and seed); nothing was "
                    "stored — save these weights with approach='update'")
    finally:
        base_set.close()


def retrain_model(train: Any, template: "nn.Module", start: dict[str, "torch.Tensor"], data: Any,
            config: dict[str, Any], seed: int) -> "nn.Module":
    """One model retrained from its base weights, as at save time so at recovery."""
    import torch

    model = copy.deepcopy(template)
    with torch.no_grad():
        load_module_state(model, start)
    return train_one(train, model, data, config, seed)


def compare(model: "nn.Module", layout: Layout, changed: np.ndarray, expected: Iterator[np.ndarray],
            start: dict[str, "torch.Tensor"]) -> tuple[list["torch.Tensor"], str | None]:
    """(tensors, first key that differs or None): a changed tensor must match its recorded digest
    (``expected`` yields them in key order), an unchanged one must equal its base bytes."""
    import torch

    sd = module_state(model, layout.keys)
    tensors: list[torch.Tensor] = []
    for k, spec in enumerate(layout.specs):
        t = sd.get(spec.name)
        if t is None:
            return tensors, spec.name
        t = t.detach().contiguous()
        if changed[k]:
            same = tensor_digest(t) == bytes(next(expected))
        else:
            same = t.dtype == start[spec.name].dtype and torch.equal(
                t.reshape(-1).view(torch.uint8), start[spec.name].reshape(-1).view(torch.uint8))
        if not same:
            return tensors, spec.name
        tensors.append(t)
    return tensors, None


#: Largest provenance record (training code, configs, dataset references) a version may hold.
MAX_RECORD_BYTES = 64 * 2**20


def record(store: StoreContext, row: SetRow) -> dict[str, Any]:
    what = f"the provenance record of {row.name}@{row.version}"
    out = loads(inflate(store.objects.get(row.manifest["record"]), MAX_RECORD_BYTES, what), what)
    if not isinstance(out, dict):
        raise IntegrityError(f"{what} is not a JSON object")
    return out


def _index(store: StoreContext, row: SetRow) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(src, arrays) of a provenance version's index, every array checked against the counts it
    implies before anything of that size is allocated."""
    arrays = unpack_arrays(store.objects.get(row.manifest["index"]))
    n, k = row.manifest["n"], len(row.manifest["layout"]["keys"])
    src = arrays["src"].astype(np.int64) if "src" in arrays else np.arange(n)
    updated = arrays.get("updated")
    u = len(updated) if updated is not None and updated.ndim == 1 else -1
    changed, hashes, digests = arrays.get("changed"), arrays.get("hashes"), arrays.get("digests")
    if (updated is None or u < 0 or len(src) != n or changed is None or changed.ndim != 1
            or len(changed) != -(-u * k // 8) or hashes is None or hashes.shape != (u, 32)
            or digests is None or digests.ndim != 2
            or not np.all((updated >= 0) & (updated < n))):
        raise IntegrityError(f"the index of {row.name}@{row.version} does not match its {n} models and {k} keys")
    arrays["changed"] = np.unpackbits(changed, count=u * k).reshape(u, k).astype(bool)
    if digests.shape != (int(arrays["changed"].sum()), 16):
        raise IntegrityError(f"the index of {row.name}@{row.version} holds {len(digests)} digests for "
                             f"{int(arrays['changed'].sum())} retrained tensors")
    return src, arrays


def digests(store: StoreContext, row: SetRow, base_digests: np.ndarray) -> tuple[list[str], np.ndarray]:
    src, arrays = _index(store, row)
    out = base_digests[src].copy()
    updated = arrays["updated"].astype(np.int64)
    block = out[updated]
    block[arrays["changed"]] = arrays["digests"]
    out[updated] = block
    return names_of(row.manifest), out


def changed(store: StoreContext, row: SetRow) -> int | None:
    """How many models this version retrained."""
    return int(len(unpack_arrays(store.objects.get(row.manifest["index"]))["updated"]))


def datasets(store: StoreContext, row: SetRow) -> tuple[tuple[str, str, str], ...]:
    """(model, dataset loader call, content hash) of every retrained model."""
    rec = record(store, row)
    arrays = unpack_arrays(store.objects.get(row.manifest["index"]))
    names = names_of(row.manifest)
    return tuple(
        (names[int(i)], f"{ref[0]}({', '.join(f'{k}={v!r}' for k, v in ref[1].items())})", bytes(h).hex())
        for i, ref, h in zip(arrays["updated"], rec["datasets"], arrays["hashes"])
    )


def resolve(store: StoreContext, row: SetRow, base: Resolved | None, retrain: bool = True) -> Resolved:
    """From the resolved base: check that the recorded code may run (trust gate, before anything
    runs), check every dataset, then retrain the updated models and verify them.
    ``retrain=False`` leaves the updated models out (``obj`` -1, nothing in memory): where the
    other models' tensors live, for a save that needs some of them as training start states."""
    assert base is not None
    src, arrays = _index(store, row)
    m = row.manifest
    names = names_of(m)
    updated = arrays["updated"].astype(np.int64)
    layout = Layout.from_json(m["layout"])
    arch = Architecture.from_json(m["architecture"])
    memory = {int(i): base.memory[int(src[i])] for i in range(len(src)) if int(src[i]) in base.memory}
    if not retrain:
        for i in updated:
            memory.pop(int(i), None)
        return _assemble(names, layout, arch, base, src, updated, arrays, memory)
    if row.base_id is None:
        raise IntegrityError(f"{row.name}@{row.version} is a provenance version without a base")
    base_row = store.catalog.get(row.base_id)
    rec = record(store, row)
    subject = f"set '{row.name}@{row.version}'"
    check_trusted(rec, subject)

    datas = []
    for j, i in enumerate(updated):
        ref = DatasetRef.from_json(rec["datasets"][j])
        try:
            data = ref.load()
        except Exception as e:
            raise RecoveryError(f"dataset of model {names[i]!r} ({ref.loader}) cannot be loaded: {e}") from e
        want = bytes(arrays["hashes"][j]).hex()
        if dataset_hash(data) != want:
            raise RecoveryError(
                f"dataset of model {names[i]!r} changed since {row.name}@{row.version} was saved "
                f"({ref.loader} {ref.kwargs}); refusing to retrain"
            )
        datas.append(data)

    train = resolve_train(rec["train"], trusted=True)  # allowed by check_trusted above
    base_set = ModelSet(SetRef(base_row.id, base_row.name, base_row.version), base_row.approach, base, store.objects)
    template = build_template(arch, layout, trust.current(), subject, "the models to retrain")
    changed = arrays["changed"]
    stored = iter(arrays["digests"])
    for j, i in enumerate(updated):
        name = names[i]
        start = base_set.state_dict(int(src[i]))
        config = rec["config"] | rec["configs"].get(name, {})
        model = retrain_model(train, template, start, datas[j], config, model_seed(rec["seed"], name))
        tensors, bad = compare(model, layout, changed[j], stored, start)
        if bad is not None:
            raise RecoveryError(
                f"retraining model {name!r} did not reproduce tensor {bad!r} of "
                f"{row.name}@{row.version} (environment then: {rec['environment']})"
            )
        memory[int(i)] = tensors
    return _assemble(names, layout, arch, base, src, updated, arrays, memory)


def _assemble(names: list[str], layout: Layout, arch: Architecture, base: Resolved, src: np.ndarray,
              updated: np.ndarray, arrays: dict[str, np.ndarray], memory: dict[int, list[torch.Tensor]]) -> Resolved:
    obj = base.obj[src].copy()
    off = base.off[src].copy()
    obj[updated] = -1
    off[updated] = 0
    dig = None
    if base.digests is not None:
        dig = base.digests[src].copy()
        block = dig[updated]
        block[arrays["changed"]] = arrays["digests"]
        dig[updated] = block
    return Resolved(names, layout, arch, list(base.objects), obj, off, memory, dig)


__all__ = ["NAME", "changed", "compare", "datasets", "derived", "digests", "listed", "model_rows", "record",
           "resolve", "retrain_model", "save"]
