"""``Store``: a catalog and a content-addressed object area — one folder (SQLite + files), or a
team's PostgreSQL database and S3-compatible bucket (``backends.py`` picks them from the URLs)."""
from __future__ import annotations

import json
import os
import re
import time
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import numpy as np

from ..errors import ArchitectureError, IntegrityError, OutOfSpace, RefError, StoreError, a_type
from . import approaches, backends, inventory, maintenance, searchlog, trust
from .approaches.common import Saved, SaveInput
from .approaches.update import changed_mask
from .architectures import Architecture
from .basetypes import SetRow
from .catalog import now_iso
from .diff import diff_sets
from .environment import environment
from .limits import decoding
from .lineage import Lineage, build_lineage
from .manifest import seconds
from .modelset import ModelSet, Resolved, SetRef
from .statewalk import TAG, SetWalk
from .structure import module_state, with_attribute_states
from .structure_encode import json_clean
from .tensors import Layout, extract_set, extract_states, layout_mismatch, match_dtypes

if TYPE_CHECKING:
    import pandas as pd
    from torch import nn

    from .diff import SetDiff
    from .maintenance import GcReport, RebuildReport
    from .provenance import Provenance

APPROACH_CHOICES = (*approaches.APPROACHES, "auto")
_NAME = re.compile(r"^[A-Za-z0-9_.\-][A-Za-z0-9_.\- ]{0,199}$")

#: ``auto`` stores a derived version as ``update`` while at most this fraction of its parameter
#: bytes changed against the base; above it, a delta saves too little to be worth a longer chain.
AUTO_UPDATE_MAX_CHANGED = 0.5

#: Upper bound of ``max_chain``: chains are resolved iteratively, but time-to-recover grows with
#: the chain, and a bound keeps a typo (``max_chain=10**9``) from silently disabling full versions.
MAX_CHAIN = 10_000
#: How long a save waits while a garbage collection or rebuild holds the store (seconds).
LOCK_WAIT_S = 600.0
_DIGEST_CACHE = 8


def default_path(root: str | os.PathLike[str] | None = None) -> str | Path:
    """The store used when none is named: ``$MM_JUPYTER_STORE`` (a folder or a database URL), else
    ``.mm_store``; a relative folder is taken from ``root`` (default: the working directory). The one
    rule shared by ``Store()``, the magics (root: the kernel's folder) and the JupyterLab server
    extension (root: the notebook's folder)."""
    return backends.default_location(root)


class Store:
    """A model store: one folder (created if missing), or a database URL with an object area.

    ``path``: a folder (SQLite catalog + object files), or ``"postgresql://..."`` (a team's shared
    catalog) together with ``objects="s3://bucket/prefix"`` (or ``$MM_JUPYTER_OBJECTS``); None reads
    ``$MM_JUPYTER_STORE``. ``objects`` may also put a folder store's objects in a bucket.

    Opening an existing store never writes (it works on a full disk and on a read-only mount); a
    store whose catalog is missing, empty or damaged while its objects hold saved versions raises
    a StoreError that says how to rebuild it. ``max_chain`` (1..MAX_CHAIN) bounds how many derived
    versions (update/provenance) may stack on a self-contained one; the next version is then
    stored in full, so time-to-recover stays bounded. ``trust_code``: whether code recorded in the
    store (classes defined in notebooks, provenance training code and dataset loaders) may run when
    recovering; like Hugging Face's ``trust_remote_code``, only for stores whose writers you trust.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *, objects: str | os.PathLike[str] | None = None,
                 max_chain: int = 8, trust_code: bool = False) -> None:
        self.trust_code = bool(trust_code)
        for what, value in (("path", path), ("objects", objects)):
            _check_location(what, value)
        if isinstance(max_chain, bool) or not isinstance(max_chain, int) or not 1 <= max_chain <= MAX_CHAIN:
            raise StoreError(f"max_chain must be an integer from 1 to {MAX_CHAIN}, not {max_chain!r}")
        self.max_chain = max_chain
        where = path if path is not None else backends.default_location()
        self._address = backends.portable(where, objects)
        opened = backends.open_store(where, objects)
        #: the folder of an embedded store (None for a database catalog)
        self.root: Path | None = opened.root
        #: where the store lives, for messages (a folder, or a URL without its password)
        self.location = opened.location
        self.objects = opened.objects
        self.catalog = opened.catalog
        lost = self.catalog.lost_versions()
        if lost:
            self.catalog.close()
            raise IntegrityError(
                f"the catalog of store {self.location!r} lacks {len(lost)} acknowledged version(s) that refs/ "
                f"records ({', '.join(lost[:5])}{', ...' if len(lost) > 5 else ''}); {self.catalog.hint}")
        self._prepared = False
        self._digests: OrderedDict[str, tuple[list[str], np.ndarray]] = OrderedDict()

    def __repr__(self) -> str:
        return f"Store({self.location!r})"

    def address(self) -> tuple[tuple[str], dict[str, Any]]:
        """``(args, kwargs)`` with which ``Store(*args, **kwargs)`` opens this same store again, in
        this process or another (a Ray worker): the catalog and the object area it was opened with
        (a PostgreSQL URL and its S3 area, or an absolute folder), ``max_chain`` and ``trust_code``.
        The arguments hold the catalog URL's password, as the caller gave it: never display them."""
        where, objects = self._address
        return (where,), {"objects": objects, "max_chain": self.max_chain, "trust_code": self.trust_code}

    def twin(self) -> "Store":
        """A second handle on the same store with its own connections (a server's watcher thread
        reads through one, so its reads never run inside a transaction of the caller's)."""
        args, kwargs = self.address()
        return Store(*args, **kwargs)

    def close(self) -> None:
        self.catalog.close()

    @contextmanager
    def writing(self, what: str) -> Iterator[None]:
        """Wrap code that writes objects and then commits them (a save, the search's block store):
        holds the store's save lock shared (garbage collection waits for it), creates
        the writer folders, removes temp files of writers that are gone, and names the save in
        an out-of-space error."""
        self.catalog.check_writable(f"cannot save {what}")
        try:
            with self.catalog.save_lock(False, LOCK_WAIT_S, f"cannot save {what}"):
                if not self._prepared:
                    self.objects.prepare()
                    self._prepared = True
                self.objects.clean_temp()
                yield
        except OutOfSpace as e:  # a plain StoreError for the caller, naming what was being saved
            raise StoreError(str(e.about(what))) from None

    # -- references -------------------------------------------------------------------------
    def row(self, ref: SetRef | str) -> SetRow:
        """The catalog row of ``ref`` (SetRef, "name" for the latest, or "name@version")."""
        if isinstance(ref, SetRef):
            if not (_valid_number(ref.version) and _valid_number(ref.id)):
                raise RefError(f"set {ref} is not in store {self.location!r}")
            row = self.catalog.find(ref.name, ref.version)
            if row is None or row.id != ref.id:
                raise RefError(f"set {ref} is not in store {self.location!r}")
            return row
        if not isinstance(ref, str):
            raise RefError(f"a set reference is a SetRef or 'name[@version]', not {type(ref).__name__}")
        name, at, version = ref.partition("@")
        if at and not (version.isascii() and version.isdigit()):
            raise RefError(f"bad set reference {ref!r}: the version after '@' must be a number")
        number = int(version) if version else None
        row = self.catalog.find(name, number) if number is None or _valid_number(number) else None
        if row is None:
            listing = self.catalog.listing()
            versions = [r[1] for r in listing if r[0] == name]
            if versions:
                raise RefError(f"no version {version} of set {name!r} in store {self.location!r}; "
                               f"its versions: {_numbers(versions)}")
            known = sorted({r[0] for r in listing})
            hint = f"; stored sets: {', '.join(known[:10])}" if known else "; the store is empty"
            raise RefError(f"no set {ref!r} in store {self.location!r}{hint}")
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
        verify: int | str = 1,
    ) -> SetRef:
        """Save a set of same-architecture models as a new version of ``name``.

        Validates everything before writing: mixed architectures, empty sets and non-modules
        raise StoreError and store nothing. ``verify`` (provenance only): how many updated models
        are retrained at save time exactly as recovery would retrain them (``"all"``: every one);
        a version whose retraining does not reproduce its weights is refused.
        """
        t0 = time.perf_counter()
        if not valid_name(name):
            raise StoreError(f"set name {name!r} must be 1-200 letters, digits, spaces, '_', '.', '-' (not only dots, "
                             "no trailing dot or space, no device name such as CON)")
        if approach not in APPROACH_CHOICES:
            raise StoreError(f"unknown approach {approach!r}; choose one of {', '.join(APPROACH_CHOICES)}")
        if provenance is not None and approach not in ("provenance", "auto"):
            raise StoreError(f"provenance was given but approach is {approach!r}; use 'provenance' or 'auto'")
        if verify != "all" and (isinstance(verify, bool) or not isinstance(verify, int) or verify < 1):
            raise StoreError(f"verify must be a number of models to retrain (at least 1) or 'all', not {verify!r}")
        names, mods, explicit = _normalise(models)
        if architecture is not None and not isinstance(architecture, Architecture):
            raise StoreError(f"architecture must be an mm.Architecture, not {type(architecture).__name__}")
        # one walk per model: its tensors and, for a structural or factory record, the check of its tree and
        # attributes against the first model's (a factory's: the first is then compared with what it builds)
        kind = architecture.kind if architecture is not None else Architecture.inferred_kind(mods[0])
        structural = kind == "factory" or architecture is None and kind == "structure"
        layout, rows, walk = extract_set(mods, names, structure=structural, factory=kind == "factory")
        arch, layout, rows = _settle_architecture(architecture, mods, names, layout, rows, walk)
        with (self.writing(f"set {name!r}"), trust.scope(self.trust_code),  # a base may be retrained
              self.objects.deferred_durability()):  # every object synced together before the commit
            parent = self.row(base) if base is not None else self.catalog.find(name, None)
            inp = SaveInput(name, names, explicit, layout, rows, arch, environment(),
                            parent if approach in (*approaches.DELTA, "auto") else None, provenance, verify)
            requested, why = approach, None
            if approach == "auto":
                approach, why = self._auto(inp)
            if approach in approaches.DELTA and parent is not None and parent.chain + 1 > self.max_chain:
                approach, inp.base = "update", None  # chain too long: this version is stored in full
                why = (f"{parent.name}@{parent.version} ends a chain of {parent.chain} derived version(s), "
                       f"max_chain={self.max_chain}: stored in full")
            saved = approaches.REGISTRY[approach].save(self, inp)
            if saved.base is None and parent is not None:
                saved.base = parent  # a lineage edge only: this version is self-contained
            return self._commit(inp, saved, requested, why, t0)

    def _auto(self, inp: SaveInput) -> tuple[str, str]:
        """The documented rule (ARCHITECTURE.md), and why it chose what it chose: provenance when
        given; no base, or a base of another architecture: baseline; else update when at most half
        of the parameter bytes changed."""
        if inp.base is None:
            return "baseline", f"the first version of {inp.name!r}"
        base = f"{inp.base.name}@{inp.base.version}"
        if inp.provenance is not None:
            return "provenance", "how the models were trained was given"
        if Layout.from_json(inp.base.manifest["layout"]).signature() != inp.layout.signature():
            return "baseline", f"the architecture differs from {base}'s"  # nothing to diff against
        _, changed = changed_mask(self, inp, inp.digests())
        sizes = np.array([s.nbytes for s in inp.layout.specs], dtype=np.float64)
        frac = float((changed * sizes).sum() / max(1.0, sizes.sum() * inp.n))
        models = f"{int(changed.any(axis=1).sum())} of {inp.n} models changed against {base}"
        limit = f"{AUTO_UPDATE_MAX_CHANGED:.0%}"
        if frac <= AUTO_UPDATE_MAX_CHANGED:
            return "update", f"{models}, {_percent(frac)} of the parameter bytes (at most {limit}): a delta saves space"
        return "baseline", (f"{models}, {_percent(frac)} of the parameter bytes (more than {limit}): "
                            "a delta would save little")

    def _commit(self, inp: SaveInput, saved: Saved, requested: str, why: str | None, t0: float) -> SetRef:
        """Make a version visible: inside one write transaction take the next version number,
        write the manifest object (durable) and insert the row; then checkpoint and write the ref."""
        nbytes = saved.new_bytes()
        base = saved.base
        oid = ""
        try:
            with self.catalog.transaction() as tx:
                sid = saved.set_id if saved.set_id is not None else self.catalog.next_id(tx)
                version = self.catalog.next_version(tx, inp.name)
                m = {
                    "kind": "set", "id": sid, "name": inp.name, "version": version, "approach": saved.approach,
                    "requested": requested, "base_id": base.id if base else None,
                    "base": base.manifest_oid if base else None, "chain": saved.chain, "n_models": inp.n,
                    "bytes": nbytes, "tts": seconds(time.perf_counter() - t0), "created": now_iso(),
                    "artifacts": [[r, p.oid, p.size] for r, p in saved.artifacts], "set": saved.manifest,
                }
                if why is not None:
                    m["why"] = why  # old manifests have none: the field is optional
                oid, size = self.catalog.put_manifest(m)
                self.objects.make_durable()  # the set's objects and manifest, before the commit
                self.catalog.insert_set(tx, m, oid, size)
                self.catalog.add_artifacts(tx, sid, [(r, p.oid, p.size) for r, p in saved.artifacts + saved.extra])
        except BaseException:
            if oid:
                self.catalog.drop_manifest(oid)
            raise
        self.catalog.checkpoint()
        try:
            self.objects.write_ref("sets", inp.name, version, oid)
        except (OSError, StoreError):
            pass  # committed and durable in its manifest; gc writes missing refs
        if saved.digests is not None:
            self._remember(oid, (list(inp.names), saved.digests))
        return SetRef(sid, inp.name, version)

    # -- recovery ----------------------------------------------------------------------------
    def recover_set(self, ref: SetRef | str, *, trust_code: bool | None = None) -> ModelSet:
        """A lazy ModelSet for ``ref``; nothing but the catalog and small index objects is read.

        ``trust_code`` (default: the store's) allows code recorded in the store to run: notebook
        classes when a model is built, provenance training code and dataset loaders now. Without it
        a ``TrustError`` shows the code and how to allow it, before anything runs.
        """
        row = self.row(ref)
        trusted = self.trust_code if trust_code is None else bool(trust_code)
        with trust.scope(trusted):
            resolved = self.resolve_row(row)
        return ModelSet(self._ref(row), row.approach, resolved, self.objects, trust_code=trusted)

    def resolve_row(self, row: SetRow, retrain: bool = True) -> Resolved:
        """Where every tensor of ``row`` lives: its chain is walked down to a self-contained
        version and resolved upwards, iteratively (any chain length up to MAX_CHAIN).
        ``retrain=False``: provenance versions leave their retrained models out."""
        with decoding(f"the records of {row.name}@{row.version}"):
            chain = [row]
            while approaches.derived(chain[-1]):
                chain.append(self._base(chain[-1], len(chain)))
            resolved = None
            for r in reversed(chain):
                resolved = approaches.get(r.approach).resolve(self, r, resolved, retrain)
            assert resolved is not None
            return resolved

    def _base(self, row: SetRow, depth: int) -> SetRow:
        """The base version of a derived ``row``, checked against its manifest."""
        if row.base_id is None or row.chain < 1 or depth > MAX_CHAIN + 1:
            raise IntegrityError(f"{row.name}@{row.version} is derived but its chain is broken")
        base = self.catalog.get(row.base_id)
        if base.manifest_oid != row.base_oid or base.chain != row.chain - 1:
            raise IntegrityError(f"the catalog's base of {row.name}@{row.version} is not the one its manifest "
                                 f"names; {self.catalog.hint}")
        return base

    def version_digests(self, row: SetRow) -> tuple[list[str], np.ndarray]:
        """(names, per-tensor digests) of a version, reading parameters only where no digests
        were recorded (baseline and mmlib-base versions). Iterative over the chain; recent
        results are cached (versions never change), so saving version n+1 after n reads no chain."""
        with decoding(f"the digests of {row.name}@{row.version}"):
            return self._version_digests(row)

    def _version_digests(self, row: SetRow) -> tuple[list[str], np.ndarray]:
        todo: list[SetRow] = []
        cur = row
        while True:
            hit = self._digests.get(cur.manifest_oid)
            if hit is not None:
                names, digests = hit
                break
            if not approaches.derived(cur):
                names, digests = approaches.get(cur.approach).digests(self, cur, None)
                break
            todo.append(cur)
            cur = self._base(cur, len(todo))
        for r in reversed(todo):
            names, digests = approaches.get(r.approach).digests(self, r, digests)
        self._remember(row.manifest_oid, (names, digests))
        return names, digests

    def _remember(self, oid: str, value: tuple[list[str], np.ndarray]) -> None:
        value[1].setflags(write=False)
        self._digests[oid] = value
        self._digests.move_to_end(oid)
        while len(self._digests) > _DIGEST_CACHE:
            self._digests.popitem(last=False)

    # -- listing -----------------------------------------------------------------------------
    def sets(self) -> "pd.DataFrame":
        """Every stored version: name, version, approach, models, bytes, created, tts_s."""
        import pandas as pd

        cols = ["name", "version", "approach", "models", "bytes", "created", "tts_s"]
        return pd.DataFrame(self.catalog.listing(), columns=cols)

    def models(self) -> "pd.DataFrame":
        """Every stored model, one row each (a model best on several datasets: one row per dataset):
        kind ("set" or "candidates"), set, version, name, family, arch_hash, params, parent,
        datasets, tags, best_on, score — from the catalog and manifests; nothing is built or read
        beyond them. ``best_on``: the datasets whose latest kept search this model won (see
        ``inventory.py``), so ``store.models().query("params < 20e6 and best_on == 'cifar'")`` works."""
        return inventory.models(self, self.catalog, self._kept())

    def searches(self) -> "pd.DataFrame":
        """Every kept search (``result.save(store, dataset=...)``), oldest first: id, dataset,
        created, approach, k, candidates, winner, score, top5, source, total_s. A store written
        before searches were kept has none; a malformed row is an IntegrityError naming it."""
        return searchlog.frame(self._kept())

    def kept_search(self, search_id: int) -> searchlog.KeptSearch:
        """One kept search with its whole ranking (``.frame``), checked."""
        for s in self._kept():
            if s.id == search_id:
                return s
        raise RefError(f"no kept search #{search_id!r} in store {self.location!r}")

    def _kept(self) -> list[searchlog.KeptSearch]:
        return [searchlog.decode(r) for r in self.catalog.raw_searches()]

    def keep_search(self, dataset: str, approach: str, k: int, ranking: Sequence[tuple[str, float, float, int]],
                    timings: Mapping[str, float], source: tuple[str, int] | None = None) -> int:
        """Keep a search's outcome (``SearchResult.save`` calls this); its id. ``source``: the stored
        candidate set (name, version) the candidates came from; it must exist and hold the
        ranked candidates, else StoreError and nothing is kept."""
        searchlog.check_dataset(dataset)
        if source is not None:
            found = self.catalog.find_candidates(source[0], source[1])
            names = {e.get("name") for e in found.record["candidates"]} if found is not None else set()
            missing = [m for m, *_ in ranking if m not in names]
            if found is None or missing:
                raise StoreError(f"candidate set {source[0]}@{source[1]} is not in store {self.location!r} or lacks "
                                 f"ranked candidates ({', '.join(map(str, missing[:3]))}); the search was not kept")
        winner, record = searchlog.encode(approach, k, ranking, timings, source)
        with self.writing(f"the search on {dataset!r}"):  # a catalog rebuild waits, then carries it over
            return self.catalog.insert_search(dataset, approach, winner, record).id

    def lineage(self, name: str) -> Lineage:
        """The version graph of ``name``: bases, approaches, models added/dropped, datasets."""
        rows = self.catalog.versions(name)
        if not rows:
            raise RefError(f"no set named {name!r} in store {self.location!r}")
        with decoding(f"the records of set {name!r}"):
            return build_lineage(self, rows)

    def diff(self, a: SetRef | str, b: SetRef | str) -> "SetDiff":
        """Models added, dropped and changed (with their changed tensors) from version ``a`` to ``b``."""
        return diff_sets(self.version_digests, self.row(a), self.row(b))

    def stats(self, ref: SetRef | str) -> dict[str, Any]:
        """Storage of one version by artifact, plus the time-to-save recorded when it was saved."""
        row = self.row(ref)
        arts = self.catalog.artifacts(row.id)
        by_role: dict[str, int] = {}
        for role, _, size in arts:
            by_role[role] = by_role.get(role, 0) + size
        by_role["manifest"] = self.objects.size(row.manifest_oid)
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
            "why": row.why,
        }

    def verify(self) -> list[str]:
        """Check catalog against objects: every visible version's manifest and every object it
        references verify by hash, catalog rows and artifact lists agree with the manifests, and
        no acknowledged version is missing, every kept search is well-formed. One line per problem
        (empty: intact)."""
        problems = maintenance.verify(self.catalog)
        for row in self.catalog.raw_searches():
            try:
                searchlog.decode(row)
            except IntegrityError as e:
                problems.append(str(e))
        return problems

    def gc(self, wait_s: float = LOCK_WAIT_S, *, features: bool = False) -> "GcReport":
        """Remove what no version references — objects of killed or failed saves, their pending
        catalog rows, temp files of writers that are gone — and write refs a killed writer left
        out. Waits for saves in flight and holds new ones back while it runs, so it is safe while
        other processes save. Kept search features (``mm.search(..., reuse=True)``) stay unless
        ``features=True``, which frees them all (later searches compute them again)."""
        return maintenance.gc(self.catalog, _wait(wait_s), features)

    @staticmethod
    def rebuild_catalog(path: str | os.PathLike[str], wait_s: float = LOCK_WAIT_S, *,
                        objects: str | os.PathLike[str] | None = None) -> "RebuildReport":
        """Recreate the catalog of the store at ``path`` (a folder, or a database URL with its
        ``objects``) from its objects alone — versions, lineage, names, mmlib-base model rows and
        candidate sets — as git can from its objects."""
        _check_location("path", path)
        _check_location("objects", objects)
        kind, location, area = backends.for_rebuild(path, objects)
        return maintenance.rebuild(kind, location, area, _wait(wait_s))


#: Names Windows reserves for devices (also with an extension): a ref file cannot be named so there.
_RESERVED = re.compile(r"^(CON|PRN|AUX|NUL|COM[0-9]|LPT[0-9])(\..*)?$", re.IGNORECASE)


def _numbers(values: list[int]) -> str:
    """Version numbers as runs: [1, 2, 3, 5] -> '1-3, 5' (a set may have thousands of versions)."""
    runs: list[list[int]] = []
    for v in sorted(set(values)):
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _percent(frac: float) -> str:
    """A share as a percentage with a digit where it matters: 0.3%, 12%, not 0% for a little."""
    return f"{100 * frac:.1f}%" if frac < 0.1 else f"{100 * frac:.0f}%"


def valid_name(name: Any) -> bool:
    """1-200 letters, digits, spaces, '_', '.', '-' (also the name of its ref file): not only dots
    (``.``, ``..``), no trailing dot or space, no reserved device name (``CON``, ``nul.txt``)."""
    return (isinstance(name, str) and _NAME.match(name) is not None and name.strip(".") != ""
            and not name.endswith((".", " ")) and _RESERVED.match(name) is None)


def _check_location(what: str, value: Any) -> None:
    """StoreError unless ``value`` is None, a string or a path without NUL bytes."""
    if value is None:
        return
    if not isinstance(value, (str, os.PathLike)):
        raise StoreError(f"store {what} must be a folder path or URL (str or Path), not {type(value).__name__}")
    text = os.fspath(value)
    if not isinstance(text, str) or "\x00" in text or not text.strip():
        raise StoreError(f"store {what} {text!r} is not a usable location (empty, bytes or a NUL character)")


def _wait(wait_s: Any) -> float:
    """A lock wait in seconds: a finite number from 0 (StoreError otherwise)."""
    if isinstance(wait_s, bool) or not isinstance(wait_s, (int, float)) or not 0 <= wait_s < float("inf"):
        raise StoreError(f"wait_s must be a number of seconds from 0, not {wait_s!r}")
    return float(wait_s)


def _valid_number(n: Any) -> bool:
    """A catalog id or version: a positive integer SQLite can hold."""
    return isinstance(n, int) and not isinstance(n, bool) and 0 < n < 2**63


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
            raise StoreError(f"model {name!r} is {a_type(m)}, not a torch.nn.Module")
    if len(set(names)) != len(names):
        dup = next(n for i, n in enumerate(names) if n in names[:i])
        raise StoreError(f"model name {dup!r} occurs twice (dict keys are compared as strings)")
    return names, mods, explicit


def check_rebuilds(arch: Architecture, model: "nn.Module") -> None:
    """StoreError unless ``arch`` builds a module with ``model``'s state-dict keys, shapes and dtypes."""
    layout, _ = extract_states([model], ["model"])
    _check_architecture(arch, layout)


def _check_architecture(arch: Architecture, layout: Layout) -> None:
    """StoreError unless the record rebuilds modules with the models' keys, shapes and dtypes."""
    diff, _ = _probe(arch, layout)
    if diff is not None:
        raise StoreError(f"architecture {arch.describe()} does not rebuild these models: it builds {diff}")


#: Verdicts of the save-time probe, by everything that decides one (see ``_verdict_key``): the difference, the
#: rebuilt config, and for a factory record its rebuilt module (what the saved models are compared with)
_VERDICTS: "OrderedDict[tuple[Any, ...], tuple[str | None, Any, nn.Module | None]]" = OrderedDict()
_VERDICTS_KEPT = 64


def _verdict_key(arch: Architecture, layout: Layout) -> tuple[Any, ...] | None:
    """What decides a factory or Hugging Face record's probe: the record, the layout and the very
    object the record calls (a redefined or reloaded factory or class is another key). Saving the
    same kind of set again (a notebook saving after every epoch, a small set's fixed cost) then skips
    the meta-device rebuild. Structural and source records resolve many objects and are probed every
    time."""
    if arch.kind not in ("factory", "hf"):
        return None
    try:
        target = trust.lookup(arch.ref, "the probe's target", True)
    except (StoreError, ArchitectureError):
        return None

    return (target, json.dumps(arch.to_json(), sort_keys=True), json.dumps(layout.to_json(), sort_keys=True))


def _probe(arch: Architecture, layout: Layout, model: "nn.Module | None" = None, name: str = ""
           ) -> tuple[str | None, Any]:
    """The record's first difference from ``layout`` when rebuilt on the meta device (None: it
    rebuilds these models; the saving session's own code may run: it is the user's), and the config
    the rebuilt module carries (Hugging Face records, as JSON; else None). A factory record's rebuilt
    module is also compared with ``model`` (named ``name``): tree, classes, attribute values, hooks in
    number. The state cannot show an activation swapped or a flag set after the factory ran, and
    recovery would silently build the model without it."""
    key = _verdict_key(arch, layout)
    if key is not None and key in _VERDICTS:
        _VERDICTS.move_to_end(key)
        diff, config, rebuilt = _VERDICTS[key]
    else:
        module = _build_meta(arch, layout)
        try:
            diff = layout_mismatch(module_state(module, layout.keys), layout)
            hf_config: Any = getattr(module, "config", None) if arch.kind == "hf" else None
            config = None if hf_config is None else json_clean(hf_config.to_dict(), "the rebuilt config")
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001 - the user's class or config failed: name it, one line
            raise StoreError(f"architecture {arch.describe()} cannot be built: {type(e).__name__}: {e}") from None
        rebuilt = module if arch.kind == "factory" else None
        if key is not None:
            _VERDICTS[key] = (diff, config, rebuilt)
            while len(_VERDICTS) > _VERDICTS_KEPT:
                _VERDICTS.popitem(last=False)
    if diff is not None or model is None or rebuilt is None:
        return diff, config
    walk = SetWalk(rebuilt, "built by the record", structure=True, factory=True)
    walk.walk(model, name)  # (a SetWalk per save: it remembers the last model it walked)
    if walk.why is None:
        return diff, config
    return (f"another model than {name!r}: {walk.why} (was {name!r} changed after it was built? "
            "architecture=mm.Architecture.structural(model) records it as it is)", config)


def _build_meta(arch: Architecture, layout: Layout) -> "nn.Module":
    try:
        module = arch.build_meta(trusted=True, subject="the models being saved")
        match_dtypes(module, layout)
    except StoreError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's factory or class failed: name it, one line
        raise StoreError(f"architecture {arch.describe()} cannot be built: {type(e).__name__}: {e}") from None
    return module


def _settle_architecture(architecture: Architecture | None, mods: Sequence["nn.Module"], names: Sequence[str],
                         layout: Layout, rows: list[list[Any]], walk: SetWalk
                         ) -> tuple[Architecture, Layout, list[list[Any]]]:
    """The record a set is saved with, and its layout and rows (plus the tensors its models hold in
    plain attributes, stored per model). An inferred Hugging Face record must be idempotent: built
    again on the meta device (the check every save makes), it must give the same config and tensors.
    A constructor that edits its config (LevitModel appends to ``config.down_ops``) fails that, and
    the models are recorded structurally instead — tree, attributes and config exactly as they are."""
    def prepared(arch: Architecture) -> tuple[Layout, list[list[Any]], str | None, Any]:
        if architecture is None:
            check_same_architecture(arch, mods, names, walk)
        full_layout, full_rows = (with_attribute_states(arch.structure or {}, layout, rows, mods, names)
                                  if arch.kind == "structure" else (layout, rows))
        return (full_layout, full_rows, *_probe(arch, full_layout, mods[0], names[0]))

    arch = architecture if architecture is not None else Architecture.infer(mods[0])
    full_layout, full_rows, diff, config = prepared(arch)
    if architecture is None and arch.kind == "hf" and (diff is not None or config is None or config != arch.config):
        arch = Architecture.structural(mods[0])
        full_layout, full_rows, diff, config = prepared(arch)
    if diff is not None:
        raise StoreError(f"architecture {arch.describe()} does not rebuild these models: it builds {diff}")
    if arch.kind == "factory" and walk.difference is not None:  # (the first model was compared with the factory's)
        raise ArchitectureError(walk.difference)
    return arch, full_layout, full_rows


def check_same_architecture(arch: Architecture, models: Sequence["nn.Module"], names: Sequence[str],
                            walk: SetWalk) -> None:
    """ArchitectureError unless every model is described by the record inferred from the first:
    the same factory call, Hugging Face config, or module tree with the same attribute values
    (e.g. an activation that differs between models, which the state dicts cannot show). The tree
    was compared by ``walk`` while the tensors were read, unless the record only now became
    structural (a Hugging Face record that does not rebuild its models): then it is walked now."""
    if arch.kind == "structure":
        if not walk.structure:
            walk = SetWalk(models[0], names[0], structure=True)
            for model, name in zip(models[1:], names[1:]):
                if walk.walk(model, name) is None and walk.difference is not None:
                    break
        if walk.difference is not None:
            raise ArchitectureError(walk.difference)
        return
    for model, name in zip(models[1:], names[1:]):
        if arch.kind == "factory":
            other = getattr(model, TAG, None)
            if other != arch:
                raise ArchitectureError(
                    f"all models of a set must share one architecture: model {name!r} was built by "
                    f"{other.ref if other else 'no @mm.architecture factory'} {other.kwargs if other else ''}, model "
                    f"{names[0]!r} by {arch.ref} {arch.kwargs}")
        elif arch.kind == "hf" and not _same_hf_config(model, models[0], arch):
            raise ArchitectureError(
                f"all models of a set must share one architecture: model {name!r} has another Hugging Face config "
                f"than model {names[0]!r}")


def _same_hf_config(model: Any, first: Any, arch: Architecture) -> bool:
    """True when transformers model ``model`` shares ``first``'s config or has an equal one (typed
    Any: torch's stubs type every module attribute as ``Tensor | Module``)."""
    return bool(model.config is first.config
                or json_clean(model.config.to_dict(), "the model config") == arch.config)
