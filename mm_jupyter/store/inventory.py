"""``store.models()``: the model lake as a table, from the catalog and the manifests alone.

One row per stored model — every model of every visible set version and every candidate of every
stored candidate set — with what its records say: architecture family and a hash of the whole
architecture record, parameter count (from the tensor layout: state-dict elements, buffers
included; a block a candidate runs at several depths counts once), the version its set was derived
from, the datasets its provenance records, tags. No model is built and no weight is read.

``best_on`` comes from the kept searches (``searchlog.py``): a model is best on a dataset when it
is the winner of the *latest* kept search on that dataset and that search's candidates came from
the store (a candidate set: their identities are known; candidates held in memory are only names
and are never matched to stored models by name). A model best on several datasets gets one row per
dataset, so ``query("best_on == 'x'")`` works and each row carries its own ``score``; a model best
nowhere has one row with ``best_on`` missing (<NA>).
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from . import approaches
from .approaches.common import StoreContext, names_of
from .contracts import Catalog
from .limits import decoding
from .searchlog import KeptSearch
from .tensors import Layout

if TYPE_CHECKING:
    import pandas as pd

COLUMNS = ["kind", "set", "version", "name", "family", "arch_hash", "params", "parent", "datasets", "tags",
           "best_on", "score"]
_DTYPES = {"kind": "string", "set": "string", "version": "int64", "name": "string", "family": "string",
           "arch_hash": "string", "params": "int64", "parent": "string", "datasets": "object", "tags": "object",
           "best_on": "string", "score": "Float64"}


def family(record: Any) -> str:
    """A short architecture family: a Hugging Face ``model_type``, a factory's name, a class name."""
    if not isinstance(record, dict):
        return "?"
    kind, ref = record.get("kind"), str(record.get("ref", ""))
    config = record.get("config")
    if kind == "hf" and isinstance(config, dict) and isinstance(config.get("model_type"), str):
        return str(config["model_type"])
    return ref.rpartition(":")[2].rpartition(".")[2] or str(kind)


def arch_hash(record: Any) -> str:
    """The first 16 hex digits of the SHA-256 of the canonical architecture record: equal records
    (the same factory call, config or module tree) have equal hashes."""
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _params(layouts: Sequence[Any]) -> int:
    """State-dict elements of layouts read from a store (checked here: a candidate record's are not
    checked when its manifest is decoded)."""
    return sum(s.numel for lay in layouts for s in Layout.from_json(lay).specs)


def _checked_params(layout: dict[str, Any]) -> int:
    """The same for a set manifest's layout, which ``manifest.decode`` already checked."""
    return sum(math.prod(shape) for _, _, shape in layout["keys"])


def _set_rows(store: StoreContext, catalog: Catalog) -> Iterator[list[Any]]:
    raw = catalog.raw_rows()
    versions = {r.id: f"{r.name}@{r.version}" for r in raw}
    for r in raw:
        row = catalog.set_row(r)
        with decoding(f"the records of {row.name}@{row.version}"):
            m = row.manifest
            arch = m["architecture"]
            fam, ahash, params = family(arch), arch_hash(arch), _checked_params(m["layout"])
            by_model: dict[str, list[str]] = {}
            for model, loader, _ in approaches.get(row.approach).datasets(store, row):
                by_model.setdefault(model, []).append(loader)
            parent = versions.get(row.base_id) if row.base_id is not None else None
            tags = (row.approach, str(arch.get("kind", "?")))
            for name in names_of(m):
                yield ["set", row.name, row.version, name, fam, ahash, params, parent,
                       tuple(by_model.get(name, ())), tags]


def _candidate_rows(catalog: Catalog) -> Iterator[list[Any]]:
    for c in catalog.raw_candidates():
        found = catalog.find_candidates(c.name, c.version)
        if found is None:
            continue  # removed between the two reads
        with decoding(f"the records of candidate set {c.name}@{c.version}"):
            for e in found.record["candidates"]:
                blocks = {b["id"]: b["layout"] for b in e["blocks"]}
                head = [e["head"]["layout"]] if e.get("head") else []
                arch = e["architecture"]
                yield ["candidates", c.name, c.version, str(e["name"]), family(arch), arch_hash(arch),
                       _params([*blocks.values(), *head]), None, (), ("candidates", str(arch.get("kind", "?")))]


def best(kept: Sequence[KeptSearch]) -> dict[tuple[str, int, str], list[tuple[str, float | None]]]:
    """(candidate set, version, model) -> [(dataset, score)]: the winner of the latest kept search
    on each dataset, where that search's candidates were stored."""
    latest: dict[str, KeptSearch] = {}
    for s in kept:
        if s.dataset not in latest or s.id > latest[s.dataset].id:
            latest[s.dataset] = s
    out: dict[tuple[str, int, str], list[tuple[str, float | None]]] = {}
    for dataset, s in sorted(latest.items()):
        if s.source is not None:
            out.setdefault((*s.source, s.winner), []).append((dataset, s.ranking[0].score))
    return out


def models(store: StoreContext, catalog: Catalog, kept: Sequence[KeptSearch]) -> "pd.DataFrame":
    """The ``store.models()`` table (columns typed; an empty store gives the columns, no rows)."""
    import pandas as pd

    wins = best(kept)
    rows: list[list[Any]] = []
    for r in (*_set_rows(store, catalog), *_candidate_rows(catalog)):
        won: list[tuple[str | None, float | None]] = [*wins.get((r[1], r[2], r[3]), [])] if r[0] == "candidates" else []
        rows.extend([*r, dataset, score] for dataset, score in won or [(None, None)])
    columns = list(zip(*rows)) if rows else [()] * len(COLUMNS)
    return pd.DataFrame({c: pd.Series(list(v), dtype=_DTYPES[c]) for c, v in zip(COLUMNS, columns)}, columns=COLUMNS)
