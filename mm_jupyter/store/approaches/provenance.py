"""``provenance``: a derived version stores how it was trained, not its parameters.

Per set, once: the training code, config, seed and environment (one compressed JSON object).
Per updated model: its dataset reference and content hash, and the per-tensor digests of the
trained result (binary arrays), so recovery can prove it retrained exactly what was saved.
"""
from __future__ import annotations

import json
import zlib
from typing import TYPE_CHECKING

import numpy as np

from ...errors import RecoveryError, StoreError
from ..architectures import Architecture
from ..catalog import SetRow
from ..modelset import ModelSet, Resolved, SetRef, _match_dtypes, require_layout
from .. import trust
from ..provenance import DatasetRef, check_trusted, dataset_hash, model_seed, resolve_train, train_one
from ..tensors import Layout, digest_rows, pack_arrays, tensor_digest, unpack_arrays
from .common import SaveInput, Saved, head, match_base, names_of

if TYPE_CHECKING:
    from ..store import Store

NAME = "provenance"


def save(store: "Store", inp: SaveInput) -> Saved:
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
    rec = store.objects.put(zlib.compress(json.dumps(record, separators=(",", ":")).encode(), 9))
    arrays = {
        "updated": updated.astype(np.int32),
        "hashes": hashes.reshape(-1, 32),
        "changed": np.packbits(changed.reshape(-1)),
        "digests": digests[changed],
    }
    if not (len(src) == len(base_names) and np.array_equal(src, np.arange(len(src)))):
        arrays["src"] = src
    index = store.objects.put(pack_arrays(arrays))
    manifest = head(inp) | {"record": rec.oid, "index": index.oid}
    return Saved(NAME, manifest, [("record", rec), ("index", index)], chain=inp.base.chain + 1, base_id=inp.base.id)


def record(store: "Store", row: SetRow) -> dict:
    return json.loads(zlib.decompress(store.objects.get(row.manifest["record"])))


def _index(store: "Store", row: SetRow) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    arrays = unpack_arrays(store.objects.get(row.manifest["index"]))
    n, k = row.manifest["n"], len(row.manifest["layout"]["keys"])
    src = arrays["src"].astype(np.int64) if "src" in arrays else np.arange(n)
    u = len(arrays["updated"])
    arrays["changed"] = np.unpackbits(arrays["changed"], count=u * k).reshape(u, k).astype(bool)
    return src, arrays


def digests(store: "Store", row: SetRow) -> tuple[list[str], np.ndarray]:
    _, base_digests = store.version_digests(store.catalog.get(row.base_id))  # type: ignore[arg-type]
    src, arrays = _index(store, row)
    out = base_digests[src].copy()
    updated = arrays["updated"].astype(np.int64)
    block = out[updated]
    block[arrays["changed"]] = arrays["digests"]
    out[updated] = block
    return names_of(row.manifest), out


def resolve(store: "Store", row: SetRow) -> Resolved:
    """Check that the recorded code may run, rebuild the base, check every dataset, then retrain
    the updated models and verify them."""
    rec = record(store, row)
    subject = f"set '{row.name}@{row.version}'"
    check_trusted(rec, subject)
    base_row = store.catalog.get(row.base_id)  # type: ignore[arg-type]
    base = store.resolve_row(base_row)
    src, arrays = _index(store, row)
    m = row.manifest
    names = names_of(m)
    updated = arrays["updated"].astype(np.int64)

    datas = []
    for j, i in enumerate(updated):
        ref = DatasetRef.from_json(rec["datasets"][j])
        try:
            data = ref.load()
        except Exception as e:
            raise RecoveryError(f"dataset of model {names[i]!r} ({ref.loader}) cannot be loaded: {e}") from None
        want = bytes(arrays["hashes"][j]).hex()
        if dataset_hash(data) != want:
            raise RecoveryError(
                f"dataset of model {names[i]!r} changed since {row.name}@{row.version} was saved "
                f"({ref.loader} {ref.kwargs}); refusing to retrain"
            )
        datas.append(data)

    layout = Layout.from_json(m["layout"])
    arch = Architecture.from_json(m["architecture"])
    train = resolve_train(rec["train"], trusted=True)
    base_set = ModelSet(SetRef(base_row.id, base_row.name, base_row.version), base_row.approach, base, store.objects)
    template = arch.build(trusted=trust.current(), subject=subject)
    _match_dtypes(template, layout)
    import copy

    import torch

    memory = {int(i): base.memory[int(src[i])] for i in range(len(src)) if int(src[i]) in base.memory}
    changed = arrays["changed"]
    stored = iter(arrays["digests"])
    for j, i in enumerate(updated):
        name = names[i]
        model = copy.deepcopy(template)
        start = base_set.state_dict(int(src[i]))
        with torch.no_grad():
            model.load_state_dict(start, strict=True)
        config = rec["config"] | rec["configs"].get(name, {})
        model = train_one(train, model, datas[j], config, model_seed(rec["seed"], name))
        sd = model.state_dict()
        tensors = []
        for k, spec in enumerate(layout.specs):
            t = sd.get(spec.name)
            if t is None:
                raise RecoveryError(f"retrained model {name!r} has no tensor {spec.name!r}")
            t = t.detach().contiguous()
            if changed[j, k]:
                same = tensor_digest(t) == bytes(next(stored))
            else:
                same = t.dtype == start[spec.name].dtype and torch.equal(
                    t.reshape(-1).view(torch.uint8), start[spec.name].reshape(-1).view(torch.uint8))
            if not same:
                raise RecoveryError(
                    f"retraining model {name!r} did not reproduce tensor {spec.name!r} of "
                    f"{row.name}@{row.version} (environment then: {rec['environment']})"
                )
            tensors.append(t)
        memory[int(i)] = tensors
    n, kk = len(src), len(layout.specs)
    obj = base.obj[src].copy()
    off = base.off[src].copy()
    obj[updated] = -1
    off[updated] = 0
    dig = None
    if base.digests is not None:
        dig = base.digests[src].copy()
        block = dig[updated]
        block[changed] = arrays["digests"]
        dig[updated] = block
    assert obj.shape == (n, kk)
    return Resolved(names, layout, arch, list(base.objects), obj, off, memory, dig)
