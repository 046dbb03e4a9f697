"""Lineage of a named set: its versions, what each was derived from, and what changed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import approaches
from .approaches.common import StoreContext, names_of
from .basetypes import SetRow

if TYPE_CHECKING:
    import pandas as pd



@dataclass(frozen=True)
class Version:
    """One node of the lineage graph."""

    version: int
    approach: str
    requested: str
    base: int | None
    chain: int
    models: int
    added: tuple[str, ...]
    dropped: tuple[str, ...]
    changed: int | None
    datasets: tuple[tuple[str, str, str], ...]  # (model, loader, content hash)
    bytes: int
    tts_s: float
    created: str


@dataclass(frozen=True)
class Lineage:
    """Versions of one set name and their base edges. ``frame`` is the table view."""

    name: str
    versions: tuple[Version, ...]

    @property
    def edges(self) -> list[tuple[int, int]]:
        """(base version, derived version) pairs."""
        return [(v.base, v.version) for v in self.versions if v.base is not None]

    @property
    def frame(self) -> "pd.DataFrame":
        import pandas as pd

        rows = [
            {
                "version": v.version, "approach": v.approach, "requested": v.requested, "base": v.base,
                "chain": v.chain, "models": v.models, "added": len(v.added), "dropped": len(v.dropped),
                "changed": v.changed, "datasets": len(v.datasets), "bytes": v.bytes, "tts_s": v.tts_s,
                "created": v.created,
            }
            for v in self.versions
        ]
        frame = pd.DataFrame(rows)
        frame["base"] = frame["base"].astype("Int64")
        frame["changed"] = frame["changed"].astype("Int64")
        return frame

    def __repr__(self) -> str:
        lines = [f"Lineage of {self.name!r}: {len(self.versions)} version(s)"]
        for v in self.versions:
            via = f" <- v{v.base}" if v.base is not None else ""
            extra = []
            if v.added:
                extra.append(f"+{len(v.added)} models")
            if v.dropped:
                extra.append(f"-{len(v.dropped)} models")
            if v.changed is not None:
                extra.append(f"{v.changed} changed")
            if v.datasets:
                extra.append(f"{len(v.datasets)} datasets")
            lines.append(f"  v{v.version} [{v.approach}]{via}: {v.models} models, {v.bytes} bytes"
                         + (f" ({', '.join(extra)})" if extra else ""))
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        return self.frame.to_html(index=False)


def build_lineage(store: StoreContext, rows: list[SetRow]) -> Lineage:
    by_id: dict[int, SetRow] = {r.id: r for r in rows}
    versions = []
    for r in rows:
        approach = approaches.get(r.approach)
        base = by_id.get(r.base_id) if r.base_id is not None else None
        if base is None and r.base_id is not None:
            base = store.catalog.get(r.base_id)
        names = names_of(r.manifest)
        added: tuple[str, ...] = ()
        dropped: tuple[str, ...] = ()
        if base is not None:
            before = set(names_of(base.manifest))
            now = set(names)
            added = tuple(n for n in names if n not in before)
            dropped = tuple(n for n in names_of(base.manifest) if n not in now)
        versions.append(Version(
            r.version, r.approach, r.requested, base.version if base is not None and base.name == r.name else None,
            r.chain, r.n_models, added, dropped, approach.changed(store, r), approach.datasets(store, r), r.bytes,
            r.tts_s, r.created,
        ))
    return Lineage(rows[0].name, tuple(versions))
