"""``mmlib-base``: the reference point, stored the way MMlib's baseline stores models.

Every model of every version is saved in full and on its own, with nothing shared:

* a **parameter object** — the model's tensors followed by a random 16-byte model id. The id makes
  the payload unique, so the content-addressed object area cannot merge it with an earlier
  version's (or another model's) identical parameters: MMlib has no deduplication. Recovery
  checks the id against the model's architecture record and ignores it otherwise;
* an **architecture record** — the architecture, the model's code (the source file of its factory
  or classes, as MMlib stores the model's code file), its layer names and the tensor layout;
* an **environment record** — what MMlib tracks: Python and PyTorch versions, processor, GPU types,
  PyTorch's build report, the platform details and the installed package list (pip freeze);
* a **catalog row** (MMlib's per-model document), each model in its own transaction.

Recovery reads them back model by model, verifying every object's digests.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import json
import os
import platform
import struct
import sys
import uuid
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import IntegrityError
from ..architectures import Architecture
from ..basetypes import SetRow
from ..limits import loads
from ..modelset import ObjectShape, Resolved
from ..tensors import Layout, fill_model_major, pack_arrays, unpack_arrays
from .common import (
    Saved,
    SaveInput,
    StoreContext,
    digests_from_bytes,
    head,
    names_of,
    no_datasets as datasets,
    not_recorded as changed,
    self_contained as derived,
)

if TYPE_CHECKING:
    from ..basetypes import Listed
    from ..contracts import ObjectArea

NAME = "mmlib-base"
ROLES = ("params", "architecture", "environment")
#: bytes of the random model id after a model's parameters (makes every parameter object unique)
MODEL_ID_BYTES = 16
#: library code is not model code: MMlib records the installed libraries in the environment instead
_LIBRARIES = ("torch", "transformers", "builtins")


def _record(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


@functools.lru_cache(maxsize=1)
def _torch_report() -> dict[str, Any]:
    """PyTorch's build and threading report, standing in for ``torch.utils.collect_env``'s (which
    MMlib records, but which runs system commands for seconds); taken once per process."""
    import torch

    return {"config": torch.__config__.show(), "parallel": torch.__config__.parallel_info(),
            "cuda": torch.version.cuda, "debug": bool(torch.version.debug)}


def _environment(env: dict[str, Any]) -> dict[str, Any]:
    """MMlib's environment record: versions, processor, GPU types, PyTorch's report, the platform
    details and the installed packages (``pip freeze``), plus the store's own environment fields."""
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    return {"python_version": platform.python_version(), "pytorch_version": torch.__version__,
            "processor_info": platform.processor(), "gpu_types": gpus, "pytorch_info": _torch_report(),
            "python_platform_info": _platform(), "pip_freeze": list(_packages(_site_state())),
            "store": env}


@functools.lru_cache(maxsize=1)
def _platform() -> dict[str, Any]:
    """The ``platform`` details MMlib records (``architecture`` as pointer bits: the
    ``platform.architecture()`` call runs the ``file`` command, ~0.3 s per process)."""
    return {
        "architecture": [f"{struct.calcsize('P') * 8}bit"], "machine": platform.machine(),
        "platform": platform.platform(), "processor": platform.processor(),
        "python_build": list(platform.python_build()), "python_compiler": platform.python_compiler(),
        "python_branch": platform.python_branch(), "python_implementation": platform.python_implementation(),
        "python_revision": platform.python_revision(), "python_version": platform.python_version(),
        "release": platform.release(), "system": platform.system(), "version": platform.version(),
        "libc_ver": list(platform.libc_ver()),
    }


def _site_state() -> tuple[tuple[str, int], ...]:
    """The import path's folders and their modification times: installing or removing a package
    changes them, so the package list is read again only then (reading it takes ~0.3 s)."""
    out = []
    for p in sys.path:
        try:
            out.append((p, os.stat(p or ".").st_mtime_ns))
        except OSError:
            continue
    return tuple(out)


@functools.lru_cache(maxsize=4)
def _packages(state: tuple[tuple[str, int], ...]) -> tuple[str, ...]:
    """``pip freeze``: every installed distribution as ``name==version``, from the names of the
    ``*.dist-info`` / ``*.egg-info`` folders on the import path (parsing every package's metadata
    would cost ~0.3 s per process)."""
    found = set()
    for folder, _ in state:
        try:
            entries = os.listdir(folder or ".")
        except OSError:
            continue
        for entry in entries:
            stem, dot, suffix = entry.rpartition(".")
            if dot and suffix in ("dist-info", "egg-info"):
                name, _, version = stem.partition("-")
                found.add(f"{name}=={version}" if version else name)
    return tuple(sorted(found, key=str.lower))


def _module_source(module: str) -> str | None:
    """Source of a (non-library) module's file, or None where there is none to read."""
    if module.split(".")[0] in _LIBRARIES or module == "__main__":
        return None
    try:
        return inspect.getsource(importlib.import_module(module))
    except (ImportError, OSError, TypeError):
        return None


def _model_code(arch: Architecture) -> dict[str, str]:
    """The model's code, as MMlib keeps it: the source file of the factory or of every class of
    the model that is not library code (keyed by module), or the captured notebook source."""
    if arch.kind == "source":
        return {"__source__": arch.source or ""}
    if arch.kind == "hf":
        module, _, qualname = arch.ref.partition(":")
        try:
            klass = getattr(importlib.import_module(module), qualname)
            return {arch.ref: inspect.getsource(klass)}
        except (ImportError, AttributeError, OSError, TypeError):
            return {}
    if arch.kind == "factory":
        refs = [arch.ref]
    else:
        refs = [c for c in (arch.structure or {}).get("classes", []) if not c.startswith("@")]
    code = {m: src for m in dict.fromkeys(r.partition(":")[0] for r in refs)
            if (src := _module_source(m)) is not None}
    notebook = (arch.structure or {}).get("source")
    if notebook:
        code["__source__"] = notebook["code"]
    return code


def _layers(lay: Layout) -> list[list[Any]]:
    """Layer names with their tensors, in state-dict order: ``[[layer, [tensor, ...]], ...]``."""
    layers: dict[str, list[str]] = {}
    for key in lay.keys:
        layer, _, tensor = key.rpartition(".")
        layers.setdefault(layer, []).append(tensor)
    return [[k, v] for k, v in layers.items()]


def save(store: StoreContext, inp: SaveInput) -> Saved:
    """A pending (invisible) set row first; then model by model, each in its own transaction; the
    store makes the set visible in its final transaction."""
    with store.catalog.transaction() as tx:
        pending = store.catalog.insert_pending(tx, inp.name, NAME, inp.n)
    saved = save_models(store, inp, pending)
    saved.set_id = pending
    return saved


def save_models(store: StoreContext, inp: SaveInput, pending_id: int) -> Saved:
    lay = inp.layout
    arch = inp.architecture.to_json()
    code, layers, env = _model_code(inp.architecture), _layers(lay), _environment(inp.env)
    saved = Saved(NAME, head(inp) | {"names": inp.names})
    ids = np.zeros((inp.n, 3, 32), dtype=np.uint8)
    sizes = np.zeros((inp.n, 3), dtype=np.int64)
    for i, name in enumerate(inp.names):
        model_id = uuid.uuid4()

        def fill(dst: Any, _: Any, i: int = i, tag: bytes = model_id.bytes) -> None:
            fill_model_major(dst, lay, [inp.rows[i]])
            dst[lay.stride:] = dst.new_tensor(list(tag))

        params = store.objects.put_filled(lay.stride + MODEL_ID_BYTES, fill)
        arch_rec = store.objects.put(_record({"model": model_id.hex, "name": name, "architecture": arch,
                                              "code": code, "layers": layers, "layout": lay.to_json()}))
        env_rec = store.objects.put(_record({"model": model_id.hex, "name": name, "environment": env}))
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


def model_index(store: StoreContext, row: SetRow) -> tuple[list[list[str]], np.ndarray]:
    """Per model its (params, architecture, environment) object ids and their sizes."""
    return _model_index(store.objects, row.manifest)


def _model_index(objects: "ObjectArea", manifest: dict[str, Any]) -> tuple[list[list[str]], np.ndarray]:
    arrays = unpack_arrays(objects.get(manifest["models"]))
    ids = [[bytes(x).hex() for x in model] for model in arrays["objects"]]
    return ids, arrays["sizes"]


def _model_id(store: StoreContext, params: str, stride: int, name: str) -> str:
    """The model id after a parameter object's tensors (reading it verifies the object's digests)."""
    reader = store.objects.open(params)
    try:
        if reader.size != stride + MODEL_ID_BYTES:
            raise IntegrityError(f"parameter object of model {name!r} holds {reader.size} bytes, "
                                 f"expected {stride + MODEL_ID_BYTES}")
        return reader.read(stride, MODEL_ID_BYTES).hex()
    finally:
        reader.close()


def listed(objects: "ObjectArea", manifest: dict[str, Any]) -> list["Listed"]:
    """The per-model documents (the model index object lists them; the manifest stays small)."""
    ids, sizes = _model_index(objects, manifest)
    return [(role, oid, int(size)) for model, row in zip(ids, sizes) for role, oid, size in zip(ROLES, model, row)]


def model_rows(objects: "ObjectArea", manifest: dict[str, Any]) -> list[tuple[int, str, str, str, str]]:
    """The per-model catalog rows, as a rebuild restores them."""
    ids, _ = _model_index(objects, manifest)
    return [(i, name, ids[i][0], ids[i][1], ids[i][2]) for i, name in enumerate(names_of(manifest))]


def digests(store: StoreContext, row: SetRow, base: np.ndarray | None = None) -> tuple[list[str], np.ndarray]:
    """Hashed from the per-model parameter objects (MMlib records no digests)."""
    return digests_from_bytes(store, row)


def resolve(store: StoreContext, row: SetRow, base: Resolved | None = None, retrain: bool = True) -> Resolved:
    """Model by model: its catalog row, architecture and environment records, parameter file.
    Each catalog row must name the objects the (verified) model index lists, and each parameter
    object must carry the model id its architecture record names."""
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
        rec = loads(store.objects.get(arch_oid), f"architecture record of model {i}")
        env = loads(store.objects.get(env_oid), f"environment record of model {i}")
        if rec["name"] != name or env["name"] != name:
            raise IntegrityError(f"records of model {name!r} belong to {rec['name']!r} / {env['name']!r}")
        if not rec["model"] == env["model"] == _model_id(store, params, lay.stride, name):
            raise IntegrityError(f"parameter, architecture and environment records of model {name!r} "
                                 "belong to different saved models")
        arch = arch or Architecture.from_json(rec["architecture"])
        objects.append(ObjectShape(params, "rows", stride=lay.stride, rows=1))
    n, k = len(rows), len(lay.specs)
    obj = np.repeat(np.arange(n, dtype=np.int32)[:, None], k, axis=1)
    off = np.repeat(np.asarray(lay.offsets, dtype=np.int64)[None, :], n, axis=0)
    return Resolved(names, lay, arch or Architecture.from_json(row.manifest["architecture"]),
                    objects, obj, off)


__all__ = ["NAME", "changed", "datasets", "derived", "digests", "listed", "model_rows", "resolve", "save"]
