"""Kept search results: what ``result.save(store, dataset=...)`` writes and how it is read back.

A kept search is one catalog row (dataset, date, approach, winner) plus a JSON record: k, the whole
ranking with scores, the timings, and where the candidates came from — a stored candidate set
(``name@version``: its models are then stored models that ``store.models()`` can mark as best on
the dataset) or, for candidates held in memory, nothing but their names. Rows may have been written
by someone else (any process that can write the catalog): every field is bounded and checked when
read, and a row that fails names itself in one IntegrityError instead of crashing a listing or
steering ``best_on`` to a model that never won.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..errors import IntegrityError, StoreError
from .basetypes import SearchRow
from .limits import loads

if TYPE_CHECKING:
    import pandas as pd

FORMAT = 1
#: Most ranked candidates one kept search may hold (the paper's searches rank at most thousands).
MAX_RANKING = 100_000
#: Longest record a catalog row may hold (a full ranking of MAX_RANKING names fits well below).
MAX_RECORD_CHARS = 32 * 1024 * 1024
MAX_NAME = 1000
MAX_DATASET = 200
#: How many of the best a kept search lists as its top (the sidebar shows them).
TOP = 5
#: the search approaches a kept row may name (``modelsearch.api.APPROACHES``; store never imports it)
APPROACHES = ("alsatian", "shift", "base")
_TIMINGS = 32
_TIMING_NAME = 100
_RUNGS = 1000
_COLUMNS = ["id", "dataset", "created", "approach", "k", "candidates", "winner", "score", "top5", "source",
            "total_s"]


@dataclass(frozen=True)
class Ranked:
    """One ranked candidate of a kept search."""

    model: str
    score: float | None
    loss: float | None
    rung: int


@dataclass(frozen=True)
class KeptSearch:
    """A kept search, checked: ``ranking`` best first; ``source`` the stored candidate set
    (``name@version``) its candidates came from, None when they were held in memory."""

    id: int
    dataset: str
    created: str
    approach: str
    k: int
    ranking: tuple[Ranked, ...]
    timings: dict[str, float]
    source: tuple[str, int] | None

    @property
    def winner(self) -> str:
        return self.ranking[0].model

    @property
    def top(self) -> list[str]:
        return [r.model for r in self.ranking[:TOP]]

    @property
    def frame(self) -> "pd.DataFrame":
        """The ranking as a table (rank, model, score, loss, rung)."""
        import pandas as pd

        return pd.DataFrame({
            "rank": pd.Series(range(1, len(self.ranking) + 1), dtype="int64"),
            "model": pd.Series([r.model for r in self.ranking], dtype="string"),
            "score": pd.Series([r.score for r in self.ranking], dtype="Float64"),
            "loss": pd.Series([r.loss for r in self.ranking], dtype="Float64"),
            "rung": pd.Series([r.rung for r in self.ranking], dtype="int64"),
        })


def check_dataset(dataset: Any) -> str:
    """StoreError unless ``dataset`` is a name a listing can show: 1-200 printable characters."""
    if not isinstance(dataset, str) or not 0 < len(dataset) <= MAX_DATASET or not dataset.isprintable() \
            or dataset.strip() != dataset:
        raise StoreError(f"dataset must be a name of 1-{MAX_DATASET} printable characters without leading or "
                         f"trailing spaces, not {str(dataset)[:60]!r}")
    return dataset


def encode(approach: str, k: int, ranking: Sequence[tuple[str, float, float, int]],
           timings: Mapping[str, float], source: tuple[str, int] | None) -> tuple[str, str]:
    """(winner, record JSON) of a search; StoreError when it cannot be kept as it is."""
    if approach not in APPROACHES:
        raise StoreError(f"unknown search approach {approach!r}")
    if not ranking or len(ranking) > MAX_RANKING:
        raise StoreError(f"a kept search ranks 1 to {MAX_RANKING} candidates, this one {len(ranking)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(ranking):
        raise StoreError(f"k must be 1 to {len(ranking)}, not {k!r}")
    rows = []
    for model, score, loss, rung in ranking:
        if not isinstance(model, str) or not 0 < len(model) <= MAX_NAME:
            raise StoreError(f"candidate name {str(model)[:60]!r} cannot be kept (1-{MAX_NAME} characters)")
        if isinstance(rung, bool) or not isinstance(rung, int) or not 0 <= rung < _RUNGS:
            raise StoreError(f"rung {rung!r} of candidate {model!r} is not a rung number")
        rows.append([model, _finite(score), _finite(loss), rung])
    if len({r[0] for r in rows}) != len(rows):
        raise StoreError("the ranking names a candidate twice")
    times = {str(key)[:_TIMING_NAME]: float(v) for key, v in list(timings.items())[:_TIMINGS]
             if _finite(v) is not None}
    record = {"format": FORMAT, "k": k, "ranking": rows, "timings": times,
              "source": None if source is None else {"kind": "candidates", "name": source[0], "version": source[1]}}
    text = json.dumps(record, separators=(",", ":"), allow_nan=False)
    if len(text) > MAX_RECORD_CHARS:  # what could not be read back is never written
        raise StoreError(f"the search's record takes {len(text)} characters, more than {MAX_RECORD_CHARS}")
    return str(rows[0][0]), text


def _finite(x: Any) -> float | None:
    """A score as JSON can hold it: a finite float, else None (a proxy may give NaN)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def decode(row: SearchRow) -> KeptSearch:
    """A row checked field by field; IntegrityError naming the search and what is wrong."""
    try:
        return _decode(row)
    except IntegrityError as e:
        raise IntegrityError(f"kept search {_name(row)} is malformed: {e}") from None


def _name(row: Any) -> str:
    ident = row[0] if isinstance(row, tuple) and row else "?"
    dataset = row[1] if isinstance(row, tuple) and len(row) > 1 else "?"
    return f"#{str(ident)[:20]} (dataset {str(dataset)[:60]!r})"


def _decode(row: SearchRow) -> KeptSearch:
    ident, dataset, created, approach, winner, text = row
    if isinstance(ident, bool) or not isinstance(ident, int) or ident < 1:
        raise IntegrityError(f"id {str(ident)[:20]!r}")
    try:
        check_dataset(dataset)
    except StoreError:
        raise IntegrityError(f"dataset {str(dataset)[:60]!r}") from None
    if not isinstance(created, str) or len(created) > 64:
        raise IntegrityError("created is not a timestamp")
    if approach not in APPROACHES:
        raise IntegrityError(f"approach {str(approach)[:40]!r}")
    if not isinstance(text, str) or len(text) > MAX_RECORD_CHARS:
        raise IntegrityError(f"its record is not text of at most {MAX_RECORD_CHARS} characters")
    rec = loads(text, "its record", limit=8)
    if not isinstance(rec, dict) or rec.get("format") != FORMAT:
        raise IntegrityError(f"its record is not a format-{FORMAT} search record")
    ranking = rec.get("ranking")
    if not isinstance(ranking, list) or not 0 < len(ranking) <= MAX_RANKING:
        raise IntegrityError(f"its ranking is not a list of 1 to {MAX_RANKING} candidates")
    ranked = tuple(_ranked(r, i) for i, r in enumerate(ranking))
    if len({r.model for r in ranked}) != len(ranked):
        raise IntegrityError("its ranking names a candidate twice")
    if winner != ranked[0].model:
        raise IntegrityError(f"its winner {str(winner)[:60]!r} is not the first of its ranking")
    k = rec.get("k")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= len(ranked):
        raise IntegrityError(f"k {str(k)[:20]!r}")
    timings = rec.get("timings")
    if not isinstance(timings, dict) or len(timings) > _TIMINGS or not all(
            isinstance(key, str) and len(key) <= _TIMING_NAME and _number(v) for key, v in timings.items()):
        raise IntegrityError("its timings are not a few named numbers")
    return KeptSearch(ident, dataset, created, approach, k, ranked, {key: float(v) for key, v in timings.items()},
                      _source(rec.get("source")))


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _ranked(r: Any, i: int) -> Ranked:
    if not (isinstance(r, list) and len(r) == 4 and isinstance(r[0], str) and 0 < len(r[0]) <= MAX_NAME
            and all(x is None or _number(x) for x in r[1:3])
            and isinstance(r[3], int) and not isinstance(r[3], bool) and 0 <= r[3] < _RUNGS):
        raise IntegrityError(f"ranking entry {i} is not [model, score, loss, rung]")
    return Ranked(r[0], None if r[1] is None else float(r[1]), None if r[2] is None else float(r[2]), r[3])


def _source(s: Any) -> tuple[str, int] | None:
    if s is None:
        return None
    if not (isinstance(s, dict) and s.get("kind") == "candidates" and isinstance(s.get("name"), str)
            and 0 < len(s["name"]) <= 200 and isinstance(s.get("version"), int)
            and not isinstance(s["version"], bool) and 1 <= s["version"] < 2**63):
        raise IntegrityError("its source is not a stored candidate set (name and version)")
    return s["name"], s["version"]


def frame(kept: Sequence[KeptSearch]) -> "pd.DataFrame":
    """``store.searches()``: one row per kept search, oldest first, typed columns."""
    import pandas as pd

    return pd.DataFrame({
        "id": pd.Series([s.id for s in kept], dtype="int64"),
        "dataset": pd.Series([s.dataset for s in kept], dtype="string"),
        "created": pd.Series([s.created for s in kept], dtype="string"),
        "approach": pd.Series([s.approach for s in kept], dtype="string"),
        "k": pd.Series([s.k for s in kept], dtype="int64"),
        "candidates": pd.Series([len(s.ranking) for s in kept], dtype="int64"),
        "winner": pd.Series([s.winner for s in kept], dtype="string"),
        "score": pd.Series([s.ranking[0].score for s in kept], dtype="Float64"),
        "top5": pd.Series([tuple(s.top) for s in kept], dtype="object"),
        "source": pd.Series([None if s.source is None else f"{s.source[0]}@{s.source[1]}" for s in kept],
                            dtype="string"),
        "total_s": pd.Series([sum(s.timings.values()) for s in kept], dtype="float64"),
    }, columns=_COLUMNS)
