"""Small display objects the magics return: deterministic text (nbval compares it) plus HTML.

Timings are kept as attributes but left out of the text, which must not change between runs.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any


def human_bytes(n: float, short: bool = False) -> str:
    """1234567 -> '1.2 MB' (decimal units, as the benchmark tables use; every view of sizes uses them).
    ``short``: at most three significant digits, no trailing zeros (axis ticks: '1 kB', '2.5 MB')."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            if short:
                return f"{n:.3g} {unit}"
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class SavedSet:
    """What ``%%modelset save`` stored: the reference, how (and why, when ``auto`` chose), how many
    bytes, and the version it follows in the lineage."""

    ref: Any
    approach: str
    requested: str
    models: int
    bytes: int
    base: str | None
    tts_s: float
    why: str | None = None

    @classmethod
    def of(cls, store: Any, ref: Any) -> "SavedSet":
        stats = store.stats(ref)
        row = store.row(ref)
        base = store.catalog.get(row.base_id) if row.base_id is not None else None
        return cls(ref, stats["approach"], stats["requested"], stats["models"], stats["bytes"],
                   f"{base.name}@{base.version}" if base is not None else None, stats["tts_s"], stats["why"])

    def __repr__(self) -> str:
        how = self.approach if self.approach == self.requested else f"{self.approach} (asked: {self.requested})"
        if self.why:
            how = f"{self.approach} ({self.why})" if self.approach == self.requested else \
                f"{self.approach} ({self.requested}: {self.why})"
        parent = f", parent {self.base}" if self.base else ""
        return f"saved {self.ref}: {how}, {self.models} models, {human_bytes(self.bytes)}{parent}"


@dataclass(frozen=True)
class SetInfo:
    """``%modelset show``: approach, models, chain and bytes by artifact of one version."""

    stats: dict[str, Any]
    names: tuple[str, ...]
    architecture: str

    @classmethod
    def of(cls, store: Any, ref: Any) -> "SetInfo":
        from ..store.approaches.common import names_of
        from ..store.architectures import Architecture

        row = store.row(ref)
        arch = Architecture.from_json(row.manifest["architecture"])
        return cls(store.stats(ref), tuple(names_of(row.manifest)), _describe(arch))

    def lines(self) -> list[str]:
        s = self.stats
        names = ", ".join(self.names[:8]) + (f", ... (+{len(self.names) - 8})" if len(self.names) > 8 else "")
        out = [
            f"{s['ref']}: {s['approach']}" + (f" (asked: {s['requested']})" if s["requested"] != s["approach"] else ""),
            f"  models: {s['models']} ({names})",
            f"  architecture: {self.architecture}",
            f"  chain: {s['chain']}",
            f"  stored: {human_bytes(s['bytes'])} of {human_bytes(s['parameter_bytes'])} parameters "
            f"in {s['objects']} object(s)",
        ]
        out += [f"    {role}: {human_bytes(size)}" for role, size in sorted(s["bytes_by_artifact"].items())]
        return out

    def __repr__(self) -> str:
        return "\n".join(self.lines())

    def _repr_html_(self) -> str:
        return "<pre>" + html.escape(repr(self)) + "</pre>"


def _describe(arch: Any) -> str:
    """One line saying how the set's modules are rebuilt."""
    if arch.kind == "factory":
        args = ", ".join(f"{k}={v!r}" for k, v in arch.kwargs.items())
        return f"factory {arch.ref}({args})"
    if arch.kind == "structure":
        src = (arch.structure or {}).get("source")
        return f"module tree of {arch.ref}" + (f" (notebook source: {', '.join(src['names'])})" if src else "")
    return f"{arch.kind} {arch.ref}".strip()


class _OneLine:
    """A display object that is one line of text: the notebook shows it in italics."""

    def _repr_html_(self) -> str:
        return f"<p><i>{html.escape(repr(self))}</i></p>"


@dataclass(frozen=True)
class EmptyStore(_OneLine):
    """``%modelset list`` of a store that holds nothing (or does not exist yet): one clear line."""

    path: str
    exists: bool

    def __repr__(self) -> str:
        where = "the store" if self.exists else "no store yet at"
        return f"no model sets: {where} {self.path!r}; save one with %%modelset save NAME"


@dataclass(frozen=True)
class NoMatch(_OneLine):
    """``%modelset find`` that selects no stored model: one line."""

    query: str
    models: int

    def __repr__(self) -> str:
        return f"no stored model matches {self.query!r} ({self.models} stored)"


@dataclass(frozen=True)
class NoSearches(_OneLine):
    """``%modelset searches`` of a store that kept none: what to do."""

    path: str

    def __repr__(self) -> str:
        return (f"no kept searches in {self.path!r}; keep one with result.save(store, dataset='name') "
                "after mm.search or %modelsearch")


@dataclass(frozen=True)
class StoreInfo:
    """The store a kernel uses, as JSON (``application/json``) for the JupyterLab sidebar."""

    store: str  # the id the kernel registered for the server (see jupyter/locations.py)
    exists: bool
    display: str = ""  # the location, its password masked

    def _repr_json_(self) -> dict[str, Any]:
        return {"store": self.store, "exists": self.exists, "display": self.display}


class ServerMetrics(dict[str, Any]):
    """``%modelserve metrics``: the server's metrics dict, shown rounded with its window named (the
    same ``WindowStats`` line a ``LoadResult`` and the serving widget show for that window)."""

    def lines(self) -> list[str]:
        from ..serving.metrics import WindowStats

        hit = self.get("cache_hit_rate")
        mean = self.get("mean_batch")
        return [
            f"{self['set']} -> {self['version']}, {self['batching']} batching, {self['models']:,} models",
            "  " + WindowStats(**self["window"]).describe(),
            f"  since the start: {self['answered']:,} answered ({self['cached']:,} from the cache), "
            f"{self['rejected']:,} rejected, {self['failed']:,} failed; {self['batches']:,} model calls"
            + (f", {mean:.1f} requests per call" if mean is not None else "")
            + f"; queue {self['queue_depth']:,} (peak {self['queue_peak']:,})"
            + (f"; cache hit rate {hit:.0%}" if hit is not None else ""),
        ]

    def __repr__(self) -> str:
        return "\n".join(self.lines())

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:
        p.text(repr(self))
