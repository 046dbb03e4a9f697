"""Candidates kept in a store as deduplicated blocks, loaded block by block during a search.

``add_candidates(store, models, name)`` splits every model into blocks and writes each distinct
block (by content id) once into the store's object area — the same area the model sets use, so a
parameter blob that already exists is never written twice (a layer that ALBERT runs at every depth
is one block, stored once). ``load_candidates(store, name)`` gives an object ``mm.search`` accepts;
it reads a block's bytes only when a plan step needs that block, so Alsatian reads each shared block
once while ``base``/``shift`` read every model whole.

Splits are proven on both sides: ``add_candidates`` verifies each split on ``probe`` (Hugging Face
models on one made from their config when none is given) and records each block's structure (its
id without the tensor bytes); a search verifies the split of the skeleton it rebuilds from the
architecture record on its own data, and the skeleton's blocks must have the recorded structures,
so the stored tensors go into the very blocks they came from.
"""
from __future__ import annotations

import copy
import hashlib
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..errors import RefError, SearchError
from ..store.architectures import Architecture
from ..store.store import check_rebuilds, valid_name
from ..store.tensors import Layout, extract_states, fill_model_major, view_tensor
from .engine import Candidate

if TYPE_CHECKING:
    import torch
    from torch import nn

    from ..store import Store
    from .engine import Candidate


@dataclass(frozen=True)
class CandidateSetRef:
    """A stored candidate set version."""

    name: str
    version: int

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"


def _write_module(store: "Store", module: "nn.Module") -> tuple[str, int, dict[str, Any], bool]:
    """One module's state as a model-major object of one row; (object id, size, layout, new)."""
    layout, rows = extract_states([module], ["block"])
    put = store.objects.put_filled(layout.stride, lambda dst, _: fill_model_major(dst, layout, rows))
    return put.oid, put.size, layout.to_json(), put.written


def add_candidates(
    store: "Store",
    models: Sequence["nn.Module"] | Mapping[str, "nn.Module"],
    name: str,
    architectures: Mapping[str, Architecture] | None = None,
    probe: "torch.Tensor | None" = None,
) -> CandidateSetRef:
    """Store candidates block by block; identical blocks (same content id) are stored once.
    ``probe``: a few input items on which every split is verified before anything is written
    (Hugging Face models are verified on one made from their config without it)."""
    if not valid_name(name):
        raise SearchError(f"candidate set name {name!r} must be 1-200 letters, digits, spaces, '_', '.', '-'")
    with store.writing(f"candidate set {name!r}"):  # gc waits until the set is committed
        return _add_candidates(store, models, name, architectures, probe)


def _add_candidates(store: "Store", models: Sequence["nn.Module"] | Mapping[str, "nn.Module"], name: str,
                    architectures: Mapping[str, Architecture] | None, probe: "torch.Tensor | None") -> CandidateSetRef:
    from .hashing import block_id, block_structure
    from .splitting import split_model

    named = {str(k): v for k, v in models.items()} if isinstance(models, Mapping) else {
        str(i): m for i, m in enumerate(models)}
    if not named:
        raise SearchError("no candidates to store")
    written: dict[str, tuple[str, int, dict[str, Any]]] = {}
    objects: list[tuple[str, str, int]] = []
    new_bytes = 0
    entries = []
    for cname, model in named.items():
        arch = (architectures or {}).get(cname) or Architecture.infer(model)
        check_rebuilds(arch, model)
        try:
            split = split_model(model.eval(), probe)
        except SearchError as e:
            raise SearchError(f"candidate {cname!r}: {e}") from None
        blocks = []
        ids: dict[int, tuple[str, str]] = {}  # a block run at several depths is hashed once
        for b in split.blocks:
            if id(b.module) not in ids:
                ids[id(b.module)] = block_id(b), block_structure(b)
            bid, structure = ids[id(b.module)]
            if bid not in written:
                oid, size, layout, new = _write_module(store, b.module)
                written[bid] = (oid, size, layout)
                objects.append(("block", oid, size))
                new_bytes += size if new else 0
            oid, size, layout = written[bid]
            blocks.append({"id": bid, "structure": structure, "object": oid, "bytes": size, "layout": layout})
        head = None
        if split.head is not None:
            oid, size, layout, new = _write_module(store, split.head)
            objects.append(("head", oid, size))
            new_bytes += size if new else 0
            head = {"object": oid, "bytes": size, "layout": layout}
        entries.append({"name": cname, "architecture": arch.to_json(), "kind": split.kind, "blocks": blocks,
                        "head": head})
    _, version = store.catalog.insert_candidates(name, {"candidates": entries}, new_bytes, objects)
    return CandidateSetRef(name, version)


def _probe_key(probe: "torch.Tensor") -> bytes:
    import torch

    flat = probe.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(f"{probe.dtype}{tuple(probe.shape)}".encode() + flat.numpy().tobytes()).digest()


class StoredCandidates:
    """A stored candidate set as ``mm.search`` input; blocks are read on first use."""

    def __init__(self, store: "Store", name: str, version: int | None = None, trust_code: bool | None = None) -> None:
        found = store.catalog.find_candidates(name, version)
        if found is None:
            raise RefError(f"no candidate set {name!r}" + (f" version {version}" if version else "")
                           + f" in store {store.location!r}")
        _, v, manifest = found
        self.store = store
        self.ref = CandidateSetRef(name, v)
        self.entries: list[dict[str, Any]] = manifest["candidates"]
        self.trust_code = store.trust_code if trust_code is None else bool(trust_code)
        self._skeletons: dict[tuple[str, bytes], Any] = {}
        self._alive: weakref.WeakValueDictionary[str, nn.Module] = weakref.WeakValueDictionary()

    def _build(self, entry: dict[str, Any]) -> "nn.Module":
        """A module of the entry's architecture (recorded code runs only when trusted)."""
        arch = Architecture.from_json(entry["architecture"])
        return arch.build(trusted=self.trust_code, subject=f"candidate set '{self.ref}'").eval()

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def names(self) -> list[str]:
        return [e["name"] for e in self.entries]

    def __repr__(self) -> str:
        return f"StoredCandidates({self.ref}, {len(self)} candidates)"

    def _skeleton(self, entry: dict[str, Any], probe: "torch.Tensor") -> Any:
        """A built (randomly initialised) model of the entry's architecture, split and verified on
        ``probe``; built once per distinct architecture and only used for structure: parameters come
        from the store. Its blocks must have the structures recorded when the candidate was stored."""
        from .hashing import block_structure
        from .splitting import split_model

        key = (repr(sorted(entry["architecture"].items())), _probe_key(probe))
        if key not in self._skeletons:
            try:
                self._skeletons[key] = split_model(self._build(entry), probe)
            except SearchError as e:
                raise SearchError(f"stored candidate {entry['name']!r}: {e}") from None
        skel = self._skeletons[key]
        recorded = [b.get("structure") for b in entry["blocks"]]
        if len(skel.blocks) != len(recorded) or (None not in recorded and recorded != [
                block_structure(b) for b in skel.blocks]):
            raise SearchError(f"stored candidate {entry['name']!r} no longer splits like it did when stored "
                              f"({len(recorded)} blocks then, {len(skel.blocks)} verified blocks now); add it again")
        return skel

    def _load(self, skeleton_module: "nn.Module", record: dict[str, Any]) -> "nn.Module":
        """A block module whose stored tensors are verified zero-copy views of the object (a
        private copy-on-write mapping): the structure is copied from the skeleton without copying
        its parameters, which the stored ones replace."""
        import torch

        shared = {id(t): t for t in list(skeleton_module.parameters()) + list(skeleton_module.buffers())}
        module = copy.deepcopy(skeleton_module, memo=shared)
        layout = Layout.from_json(record["layout"])
        reader = self.store.objects.open(record["object"])
        try:
            state = {s.name: view_tensor(reader.tensor(off, s.nbytes), s)
                     for s, off in zip(layout.specs, layout.offsets)}
        finally:
            reader.close()
        with torch.no_grad():
            module.load_state_dict(state, strict=True, assign=True)
        return module.eval()

    def model(self, name: str) -> "nn.Module":
        """Rebuild one whole candidate (all blocks and the head) from the store."""
        entry = next((e for e in self.entries if e["name"] == name), None)
        if entry is None:
            raise RefError(f"candidate set {self.ref} has no candidate {name!r}")
        model = self._build(entry)
        from .splitting import split_model

        split = split_model(model)
        for b, rec in zip(split.blocks, entry["blocks"]):
            b.module.load_state_dict(self._load(b.module, rec).state_dict())
        if split.head is not None and entry["head"] is not None:
            split.head.load_state_dict(self._load(split.head, entry["head"]).state_dict())
        return model

    def engine_candidates(self, sample: "torch.Tensor", shared: bool, device: str,
                          costs: bool = False) -> list["Candidate"]:
        """Engine view: ids and output sizes from the manifest and a skeleton verified on ``sample``
        (the probe: no parameter bytes read; the skeleton's one-item forward checks that the data
        fits); a block's bytes are read when the engine asks for that block, once while a loaded
        copy is in use. ``costs``: also count each block's work on the skeleton (the same for every
        candidate of an architecture)."""
        from .blocks import Block, block_costs, output_sizes

        out = []
        sizes_of: dict[int, list[int]] = {}
        costs_of: dict[int, list[float]] = {}
        for entry in self.entries:
            skel = self._skeleton(entry, sample)
            if id(skel) not in sizes_of:  # also the check that the data fits this architecture
                sizes_of[id(skel)] = output_sizes(skel, sample[:1], entry["name"])
                if costs:
                    costs_of[id(skel)] = block_costs(skel, sample[:1])

            def block(i: int, entry: dict[str, Any] = entry, skel: Any = skel) -> Block:
                record = entry["blocks"][i]
                module = self._alive.get(record["id"])
                if module is None:  # a block still in use at another depth (ALBERT) is not loaded again
                    module = self._load(skel.blocks[i].module, record).to(device)
                    self._alive[record["id"]] = module
                return Block(module, skel.blocks[i].call, skel.blocks[i].inputs)

            def nbytes(i: int, entry: dict[str, Any] = entry) -> int:
                record = entry["blocks"][i]
                return 0 if record["id"] in self._alive else int(record["bytes"])

            ids = [b["id"] for b in entry["blocks"]] if shared else None
            out.append(Candidate(entry["name"], block, len(entry["blocks"]), skel.context, ids,
                                 sizes_of.get(id(skel)) if shared else None, nbytes, costs_of.get(id(skel))))
        return out


def load_candidates(store: "Store", name: str, version: int | None = None, *,
                    trust_code: bool | None = None) -> StoredCandidates:
    """A stored candidate set, ready for ``mm.search``; ``trust_code`` (default: the store's) lets
    classes recorded as notebook source run when their blocks are rebuilt."""
    return StoredCandidates(store, name, version, trust_code)
