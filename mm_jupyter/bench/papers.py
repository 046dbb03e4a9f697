"""The papers' own numbers (``paper_numbers.toml``), typed in once and read everywhere.

Every figure, table and report that puts a paper's value beside ours takes it from here by ``id``, so a
value is typed once and a typo is fixed once. The file is validated on load: a missing field, an
unknown unit or relation, a duplicate id or a value that is neither a number nor a range raises
``PaperNumbersError`` naming the entry.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

from ..errors import PaperNumbersError as PaperNumbersError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PAPERS = {"mmm": "Efficient Multi-Model Management", "alsatian": "Alsatian (SIGMOD 2025)"}
RELATIONS = {"=": "", "~": "~", "up to": "up to ", "more than": "> ", "less than": "< "}
SOURCES = ("text", "table", "lecture", "read from plot")
UNITS = frozenset({
    "x", "x faster", "%", "MB", "KB", "GB", "MB/s", "GHz", "ms", "h", "bytes", "parameters", "models", "items",
    "blocks", "layers", "runs", "epochs", "cores", "GPUs", "disks", "samples", "cycles", "references",
    "architectures", "datasets", "categories", "pages", "variants", "partitions", "workers", "intermediates",
    "cost units", "learning rate",
})
FIELDS = ("id", "paper", "artefact", "where", "series", "setting", "relation", "unit", "source", "claim")


@dataclass(frozen=True)
class PaperNumber:
    """One printed number: ``value`` (or the range ``low``-``high``), its unit and where it stands."""

    id: str
    paper: str
    artefact: str
    where: str
    series: str
    setting: str
    relation: str
    unit: str
    source: str
    claim: str
    value: float | None = None
    low: float | None = None
    high: float | None = None
    precision: float | None = None

    @property
    def is_range(self) -> bool:
        return self.value is None

    @property
    def centre(self) -> float:
        """The value, or the middle of a range (for drawing one marker)."""
        if self.value is not None:
            return self.value
        assert self.low is not None and self.high is not None
        return (self.low + self.high) / 2

    def text(self, short: bool = False) -> str:
        """As the paper qualifies it: ``~99.9 MB``, ``up to 10.7x``, ``3-4x``, ``> 13.8x``; ``short`` (figure
        labels): millions as ``306.5 M`` and counts without their unit."""
        def num(v: float) -> str:
            if short and abs(v) >= 1e6:
                return f"{v / 1e6:.4g} M"
            return f"{v:,.0f}" if float(v).is_integer() and abs(v) >= 1000 else f"{v:g}"

        body = f"{num(self.low)}-{num(self.high)}" if self.is_range else num(self.centre)  # type: ignore[arg-type]
        unit = self.unit if self.unit in ("x", "%", "x faster") else f" {self.unit}"
        if short and self.unit in ("parameters", "models", "items"):
            unit = ""
        return f"{RELATIONS[self.relation]}{body}{unit}"

    def matches(self, ours: float, tolerance: float = 0.0, absolute: bool = False) -> bool:
        """Whether ``ours`` reproduces the number as the paper qualifies it, ``tolerance`` relative (or in
        the number's unit with ``absolute``): ``=``, ``~`` and ``up to`` (a largest value seen) within the
        tolerance of the value or range; ``more than`` not below it, ``less than`` not above it."""
        lo = self.low if self.is_range else self.value
        hi = self.high if self.is_range else self.value
        assert lo is not None and hi is not None
        lo_w, hi_w = (lo - tolerance, hi + tolerance) if absolute else (lo * (1 - tolerance), hi * (1 + tolerance))
        if self.relation == "more than":
            return ours >= lo_w
        if self.relation == "less than":
            return ours <= hi_w
        return lo_w <= ours <= hi_w


def _number(raw: dict[str, Any], position: int) -> PaperNumber:
    name = raw.get("id", f"entry {position}")
    missing = [f for f in FIELDS if not isinstance(raw.get(f), str) or not raw[f].strip()]
    if missing:
        raise PaperNumbersError(f"paper number {name!r}: missing or empty {', '.join(missing)}")
    unknown = set(raw) - set(FIELDS) - {"value", "low", "high", "precision"}
    if unknown:
        raise PaperNumbersError(f"paper number {name!r}: unknown field(s) {', '.join(sorted(unknown))}")
    if raw["paper"] not in PAPERS:
        raise PaperNumbersError(f"paper number {name!r}: paper must be one of {', '.join(PAPERS)}")
    if not raw["id"].startswith(raw["paper"] + "."):
        raise PaperNumbersError(f"paper number {name!r}: its id must start with '{raw['paper']}.'")
    if raw["relation"] not in RELATIONS:
        raise PaperNumbersError(f"paper number {name!r}: relation {raw['relation']!r} is not one of "
                                + ", ".join(map(repr, RELATIONS)))
    if raw["unit"] not in UNITS:
        raise PaperNumbersError(f"paper number {name!r}: unknown unit {raw['unit']!r}")
    if raw["source"] not in SOURCES:
        raise PaperNumbersError(f"paper number {name!r}: source must be one of {', '.join(SOURCES)}")
    nums = {k: raw[k] for k in ("value", "low", "high", "precision") if k in raw}
    for k, v in nums.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise PaperNumbersError(f"paper number {name!r}: {k} must be a finite number, not {v!r}")
    has_value, has_range = "value" in nums, "low" in nums or "high" in nums
    if has_value == has_range or (has_range and not ("low" in nums and "high" in nums and nums["low"] < nums["high"])):
        raise PaperNumbersError(f"paper number {name!r}: give either value, or low < high")
    if (raw["source"] == "read from plot") != ("precision" in nums):
        raise PaperNumbersError(f"paper number {name!r}: a value read from a plot, and only such a value, "
                                "states its precision")
    return PaperNumber(**{k: raw[k] for k in FIELDS},
                       **{k: float(v) for k, v in nums.items()})  # type: ignore[arg-type]


def parse(text: str) -> dict[str, PaperNumber]:
    """The numbers of a ``paper_numbers.toml`` text by id (validated)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PaperNumbersError(f"paper_numbers.toml is not valid TOML: {e}") from None
    out: dict[str, PaperNumber] = {}
    for i, raw in enumerate(doc.get("number", [])):
        n = _number(raw, i)
        if n.id in out:
            raise PaperNumbersError(f"paper number {n.id!r} is defined twice")
        out[n.id] = n
    return out


@lru_cache(maxsize=1)
def _all() -> dict[str, PaperNumber]:
    return parse(resources.files(__package__).joinpath("paper_numbers.toml").read_text(encoding="utf-8"))


def numbers(paper: str | None = None, artefact: str | None = None) -> list[PaperNumber]:
    """The papers' numbers in file order, optionally of one paper and one artefact ("Fig. 10")."""
    return [n for n in _all().values()
            if (paper is None or n.paper == paper) and (artefact is None or n.artefact == artefact)]


def number(id: str) -> PaperNumber:
    """One number by id."""
    try:
        return _all()[id]
    except KeyError:
        raise PaperNumbersError(f"no paper number {id!r} in paper_numbers.toml") from None


def paper_info() -> dict[str, dict[str, str]]:
    """Per paper: title, file, software and hardware as the papers describe them."""
    text = resources.files(__package__).joinpath("paper_numbers.toml").read_text(encoding="utf-8")
    return {k: dict(v) for k, v in tomllib.loads(text).get("paper", {}).items()}
