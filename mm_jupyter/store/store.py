"""``Store``: one folder holding a SQLite catalog and a content-addressed object area."""
from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from ..errors import RefError, StoreError
from . import approaches
from .approaches.common import SaveInput, Saved
from .architectures import Architecture
from .catalog import Catalog, SetRow
from .environment import environment
from .lineage import Lineage, build_lineage
from .modelset import ModelSet, Resolved, SetRef
from .tensors import Layout, digest_model_major, digest_rows, extract_states, tensor_digest

if TYPE_CHECKING:
    from .diff import SetDiff
    import pandas as pd
    from torch import nn

    from .provenance import Provenance

APPROACH_CHOICES = approaches.APPROACHES + ("auto",)
_NAME = re.compile(r"^[A-Za-z0-9_.\-][A-Za-z0-9_.\- ]{0,199}$")

#: ``auto`` stores a derived version as ``update`` while at most this fraction of its parameter
#: bytes changed against the base; above it, a delta saves too little to be worth a longer chain.
AUTO_UPDATE_MAX_CHANGED = 0.5


def default_path(root: str | os.PathLike[str] | None = None) -> Path:
    """The store used when none is named: ``$MM_JUPYTER_STORE``, else ``.mm_store``; a relative path
    is taken from ``root`` (default: the working directory). The one rule shared by ``Store()``, the
    magics (root: the kernel's folder) and the JupyterLab server extension (root: the notebook's folder)."""
    env = os.environ.get("MM_JUPYTER_STORE")
    path = Path(env).expanduser() if env else Path(".mm_store")
    return path if root is None or path.is_absolute() else Path(root).expanduser() / path


class Store:
    """An embedded model store in one folder (created if missing).

    ``max_chain`` bounds how many derived versions (update/provenance) may stack on a
    self-contained one; the next version is then stored in full, so time-to-recover stays bounded.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *, max_chain: int = 8) -> None:
        self.root = Path(path) if path is not None else default_path()
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"store path {str(self.root)!r} exists and is not a folder")
        self.root.mkdir(parents=True, exist_ok=True)
        if max_chain < 1:
            raise StoreError(f"max_chain must be at least 1, not {max_chain}")
        self.max_chain = max_chain
        from .objects import ObjectStore

        self.objects = ObjectStore(self.root)
        self.catalog = Catalog(self.root / "catalog.sqlite")
        self.objects.clean_temp()

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    def close(self) -> None:
        self.catalog.close()

    # -- references -------------------------------------------------------------------------
    def row(self, ref: SetRef | str) -> SetRow:
        """The catalog row of ``ref`` (SetRef, "name" for the latest, or "name@version")."""
        if isinstance(ref, SetRef):
            row = self.catalog.find(ref.name, ref.version)
            if row is None or row.id != ref.id:
                raise RefError(f"set {ref} is not in store {str(self.root)!r}")
            return row
        if not isinstance(ref, str):
            raise RefError(f"a set reference is a SetRef or 'name[@version]', not {type(ref).__name__}")
        name, at, version = ref.partition("@")
        if at and not (version.isascii() and version.isdigit()):
            raise RefError(f"bad set reference {ref!r}: the version after '@' must be a number")
        row = self.catalog.find(name, int(version) if version else None)
        if row is None:
            known = sorted({r[0] for r in self.catalog.listing()})
            hint = f"; stored sets: {', '.join(known[:10])}" if known else "; the store is empty"
            raise RefError(f"no set {ref!r} in store {str(self.root)!r}{hint}")
        return row

    @staticmethod
    def _ref(row: SetRow) -> SetRef:
        return SetRef(row.id, row.name, row.version)

    # -- saving ------------------------------------------------------------------------------
    def save_set(
        self,
        models: Sequence["nn.Module"] | Mapping[str, "nn.Module"],
        name: str,
        approach: str = "baseline",
        base: SetRef | str | None = None,
        provenance: "Provenance | None" = None,
        architecture: Architecture | None = None,
    ) -> SetRef:
        """Save a set of same-architecture models as a new version of ``name``.

        Validates everything before writing: mixed architectures, empty sets and non-modules
        raise StoreError and store nothing.
        """
        t0 = time.perf_counter()
        if not isinstance(name, str) or not _NAME.match(name):
            raise StoreError(f"set name {name!r} must be 1-200 letters, digits, spaces, '_', '.', '-'")
        if approach not in APPROACH_CHOICES:
            raise StoreError(f"unknown approach {approach!r}; choose one of {', '.join(APPROACH_CHOICES)}")
        if provenance is not None and approach not in ("provenance", "auto"):
            raise StoreError(f"provenance was given but approach is {approach!r}; use 'provenance' or 'auto'")
        names, mods, explicit = _normalise(models)
        arch = architecture if architecture is not None else Architecture.infer(mods[0])
        if not isinstance(arch, Architecture):
            raise StoreError(f"architecture must be an mm.Architecture, not {type(arch).__name__}")
        layout, rows = extract_states(mods, names)
        _check_architecture(arch, layout)
        base_row = self._base_row(name, approach, base)
        inp = SaveInput(name, names, explicit, layout, rows, arch, environment(), base_row, provenance)
        requested = approach
        if approach == "auto":
            approach = self._auto(inp)
        lineage_base = base_row
        if approach in ("update", "provenance") and base_row is not None and base_row.chain + 1 > self.max_chain:
            approach, inp.base = "update", None  # chain too long: this version is stored in full
        if approach == "mmlib-base":
            return self._save_mmlib(inp, requested, t0)
        saved = approaches.MODULES[approach].save(self, inp)
        if saved.base_id is None and lineage_base is not None:
            saved.base_id = lineage_base.id
        return self._commit(inp, saved, requested, t0)

    def _base_row(self, name: str, approach: str, base: SetRef | str | None) -> SetRow | None:
        if base is not None:
            return self.row(base)
        if approach in ("update", "provenance", "auto"):
            return self.catalog.find(name, None)
        return None

    def _auto(self, inp: SaveInput) -> str:
        """The documented rule (ARCHITECTURE.md): provenance when given and the chain allows;
        no base, or a base of another architecture: baseline; else update when at most half of
        the parameter bytes changed."""
        if inp.base is None:
            return "baseline"
        if inp.provenance is not None:
            return "provenance"
        if Layout.from_json(inp.base.manifest["layout"]).signature() != inp.layout.signature():
            return "baseline"  # another architecture (keys, shapes or dtypes): nothing to diff against
        from .approaches.update import changed_mask

        digests = digest_rows(inp.rows, inp.layout)
        _, changed = changed_mask(self, inp, digests)
        sizes = np.array([s.nbytes for s in inp.layout.specs], dtype=np.float64)
        frac = float((changed * sizes).sum() / max(1.0, sizes.sum() * inp.n))
        return "update" if frac <= AUTO_UPDATE_MAX_CHANGED else "baseline"

    def _commit(self, inp: SaveInput, saved: Saved, requested: str, t0: float) -> SetRef:
        nbytes = saved.new_bytes()
        with self.catalog.transaction() as db:
            tts = time.perf_counter() - t0
            set_id, version = self.catalog.insert_set(
                db, name=inp.name, approach=saved.approach, requested=requested, base_id=saved.base_id,
                chain=saved.chain, n_models=inp.n, manifest=saved.manifest, nbytes=nbytes, tts_s=tts,
            )
            self.catalog.add_artifacts(db, set_id, [(r, p.oid, p.size) for r, p in saved.artifacts])
        assert version is not None
        return SetRef(set_id, inp.name, version)

    def _save_mmlib(self, inp: SaveInput, requested: str, t0: float) -> SetRef:
        from .approaches import mmlib_base

        with self.catalog.transaction() as db:
            pending, _ = self.catalog.insert_set(
                db, name=inp.name, approach="mmlib-base", requested=requested, base_id=None, chain=0,
                n_models=inp.n, manifest={}, nbytes=0, tts_s=0.0, pending=True,
            )
        saved = mmlib_base.save(self, inp, pending)
        import json

        with self.catalog.transaction() as db:
            version = self.catalog.next_version(db, inp.name)
            tts = time.perf_counter() - t0
            db.execute(
                "UPDATE sets SET version=?, manifest=?, bytes=?, tts_s=? WHERE id=?",
                (version, json.dumps(saved.manifest, separators=(",", ":")), saved.new_bytes(), tts, pending),
            )
            self.catalog.add_artifacts(db, pending, [(r, p.oid, p.size) for r, p in saved.artifacts])
        return SetRef(pending, inp.name, version)

    # -- recovery ----------------------------------------------------------------------------
    def recover_set(self, ref: SetRef | str) -> ModelSet:
        """A lazy ModelSet for ``ref``; nothing but the catalog and small index objects is read."""
        row = self.row(ref)
        return ModelSet(self._ref(row), row.approach, self.resolve_row(row), self.objects)

    def resolve_row(self, row: SetRow) -> Resolved:
        return approaches.MODULES[row.approach].resolve(self, row)

    def version_digests(self, row: SetRow) -> tuple[list[str], np.ndarray]:
        """(names, per-tensor digests) of a version, reading parameters only where no digests
        were recorded (baseline and mmlib-base versions)."""
        if row.approach in ("update", "provenance"):
            return approaches.MODULES[row.approach].digests(self, row)
        resolved = self.resolve_row(row)
        if row.approach == "baseline":
            reader = self.objects.open(row.manifest["params"])
            digests = digest_model_major(reader.tensor(), resolved.layout, resolved.n)
            reader.close()
            return resolved.names, digests
        ms = ModelSet(self._ref(row), row.approach, resolved, self.objects)
        out = np.empty((resolved.n, len(resolved.layout.specs), 16), dtype=np.uint8)
        for i in range(resolved.n):
            for k, t in enumerate(ms.state_dict(i).values()):
                out[i, k] = np.frombuffer(tensor_digest(t), dtype=np.uint8)
        ms.close()
        return resolved.names, out

    # -- listing -----------------------------------------------------------------------------
    def sets(self) -> "pd.DataFrame":
        """Every stored version: name, version, approach, models, bytes, created, tts_s."""
        import pandas as pd

        cols = ["name", "version", "approach", "models", "bytes", "created", "tts_s"]
        return pd.DataFrame(self.catalog.listing(), columns=cols)

    def lineage(self, name: str) -> Lineage:
        """The version graph of ``name``: bases, approaches, models added/dropped, datasets."""
        rows = self.catalog.versions(name)
        if not rows:
            raise RefError(f"no set named {name!r} in store {str(self.root)!r}")
        return build_lineage(self, rows)

    def diff(self, a: SetRef | str, b: SetRef | str) -> "SetDiff":
        """Models added, dropped and changed (with their changed tensors) from version ``a`` to ``b``."""
        from .diff import diff_sets

        return diff_sets(self, a, b)

    def stats(self, ref: SetRef | str) -> dict[str, Any]:
        """Storage of one version by artifact, plus the time-to-save recorded when it was saved."""
        row = self.row(ref)
        arts = self.catalog.artifacts(row.id)
        by_role: dict[str, int] = {}
        for role, _, size in arts:
            by_role[role] = by_role.get(role, 0) + size
        import json

        manifest_bytes = len(json.dumps(row.manifest, separators=(",", ":")))
        by_role["manifest"] = manifest_bytes
        layout = Layout.from_json(row.manifest["layout"])
        return {
            "ref": f"{row.name}@{row.version}",
            "approach": row.approach,
            "requested": row.requested,
            "models": row.n_models,
            "chain": row.chain,
            "parameter_bytes": row.n_models * sum(s.nbytes for s in layout.specs),
            "bytes": row.bytes,
            "bytes_by_artifact": by_role,
            "objects": len(arts),
            "tts_s": row.tts_s,
            "created": row.created,
        }

    def verify(self) -> list[str]:
        """Hash every object of every visible set; returns one line per problem (empty: intact)."""
        from ..errors import IntegrityError

        problems = []
        for oid in self.catalog.all_objects():
            try:
                reader = self.objects.open(oid)
                reader.verify()
                reader.close()
            except IntegrityError as e:
                problems.append(str(e))
        return problems


def _normalise(models: Any) -> tuple[list[str], list[Any], bool]:
    import torch

    if isinstance(models, torch.nn.ModuleDict):
        models = dict(models.items())
    elif isinstance(models, torch.nn.ModuleList):
        models = list(models)
    if isinstance(models, Mapping):
        names = [str(k) for k in models.keys()]
        mods = list(models.values())
        explicit = names != [str(i) for i in range(len(names))]
    elif isinstance(models, (list, tuple)):
        mods = list(models)
        names = [str(i) for i in range(len(mods))]
        explicit = False
    else:
        if isinstance(models, torch.nn.Module):
            raise StoreError("save_set takes a list or dict of models; wrap a single model in a list")
        raise StoreError(f"models must be a list or dict of nn.Module, not {type(models).__name__}")
    if not mods:
        raise StoreError("cannot save an empty set: pass at least one model")
    for name, m in zip(names, mods):  # before inferring an architecture from the first item
        if not isinstance(m, torch.nn.Module):
            raise StoreError(f"model {name!r} is a {type(m).__name__}, not a torch.nn.Module")
    if len(set(names)) != len(names):
        dup = next(n for i, n in enumerate(names) if n in names[:i])
        raise StoreError(f"model name {dup!r} occurs twice (dict keys are compared as strings)")
    return names, mods, explicit


def check_rebuilds(arch: Architecture, model: "nn.Module") -> None:
    """StoreError unless ``arch`` builds a module with ``model``'s state-dict keys and shapes."""
    layout, _ = extract_states([model], ["model"])
    _check_architecture(arch, layout)


def _check_architecture(arch: Architecture, layout: Layout) -> None:
    """Build the architecture on the meta device and compare keys and shapes with the models."""
    try:
        probe = arch.build_meta().state_dict()
    except StoreError:
        raise
    except Exception as e:
        raise StoreError(f"architecture {arch.describe()} cannot be built: {type(e).__name__}: {e}") from None
    want = [(s.name, s.shape) for s in layout.specs]
    got = [(k, tuple(v.shape)) for k, v in probe.items()]
    if want != got:
        diff = next((g for g, w in zip(got, want) if g != w), None) or (got[len(want):] or want[len(got):])[0]
        raise StoreError(
            f"architecture {arch.describe()} does not rebuild these models: first difference at {diff[0]!r}"
        )
