"""``python -m mm_jupyter.bench lake``: searches that remember, against a fresh search.

Per round (rounds interleaved, medians reported with min-max and the load average):

* ``fresh``: a plain search (``reuse=False``) of the candidates on all items: the denominator;
* ``again``: the same search with ``reuse=True`` on a store that already holds its features;
* ``appended``: all items, on a store that holds the features of the first ``1/(1+append)`` of them;
* ``derived``: ``derived`` more candidates (copies of existing ones with their last block re-initialised)
  on a store holding the original candidates' features, against a fresh search of all of them;
* ``layers``: ``layers=3`` (every candidate's last three block boundaries as arms) against ``fresh``.

Round 1 also checks that every incremental ranking equals a fresh ``reuse=True`` search's on an
empty store (the claim the tests prove; a benchmark that got it wrong would say so), and counts how
many of the appended search's candidates per rung were in that rung in the first search too: only
those find their old chunks kept, a new one computes them (the reuse ``appended`` depends on).

The zoo (``zoo``): ``trained`` (the default: what users search) derives the candidates from a base
trained briefly on the task (``synthetic.trained_zoo``), so they differ in quality as pretrained
models do and fewer of a rung's survivors change when items are appended; ``random``
(``synthetic_candidates``) leaves every candidate about equally bad, so noise picks the survivors.
"""
from __future__ import annotations

import copy
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .modelsets import Target

Progress = Callable[[str], None]
GOALS = {"again": 0.10, "appended": 0.40, "derived": 0.25, "layers": 1.30}
ZOOS = ("trained", "random")
#: the search's time buckets (``SearchResult.timings``) the benchmark reports per step
PHASES = ("prepare data", "prepare model", "planning", "inference", "proxy")


@dataclass
class LakeBench:
    rows: list[dict[str, Any]]
    targets: list[Target]
    equal: dict[str, bool]
    loads: list[float] = field(default_factory=list)
    zoo: str = "trained"
    #: per rung from the second: (appended search's candidates there that the first search had there too, all)
    kept_survivors: list[tuple[int, int]] = field(default_factory=list)
    #: step -> search time bucket -> median seconds
    phases: dict[str, dict[str, float]] = field(default_factory=dict)
    #: seconds spent building the candidates (training the base included)
    build_s: float = 0.0
    #: bytes of kept features in round 1's stores: after ``keep``, after ``derived`` (same store), after ``appended``
    kept_bytes: dict[str, int] = field(default_factory=dict)


def _derive(cands: list[Any], n: int, seed: int) -> list[Any]:
    """``n`` copies of the first candidates with their last block drawn afresh."""
    import torch

    from ..modelsearch.splitting import split_model
    from .synthetic import reinitialise

    out = []
    torch.manual_seed(seed)
    for m in cands[:n]:
        d = copy.deepcopy(m)
        blocks = split_model(d).blocks
        reinitialise(blocks[-1].module)
        out.append(d)
    return out


def run_lake_bench(arch: str = "resnet18", models: int = 35, items: int = 2000, derived: int = 5,
                   append: float = 0.25, rounds: int = 3, layers: int = 3, device: str = "cpu",
                   batch_size: int = 64, seed: int = 0, threads: int | None = 1, size: int | None = None,
                   zoo: str = "trained", progress: Progress = lambda m: None) -> LakeBench:
    """``size``: the image side of image architectures (None: the reduced default, 32 px; 224 is the
    papers' resolution, where inference outweighs a search's fixed preparation). ``zoo``: ``trained``
    or ``random`` (see the module docstring)."""
    import torch

    from ..errors import SearchError
    from ..modelsearch.api import search
    from ..store import Store
    from .synthetic import sample_data, synthetic_candidates, trained_zoo

    if zoo not in ZOOS:
        raise SearchError(f"unknown zoo {zoo!r}; expected one of {', '.join(ZOOS)}")

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    tmp = tempfile.mkdtemp(prefix="mm_lake_bench_")
    try:
        t0 = time.perf_counter()
        build = trained_zoo if zoo == "trained" else synthetic_candidates
        base = build(arch, models, seed=seed, image_size=size)
        more = base + _derive(base, derived, seed + 1)
        build_s = time.perf_counter() - t0
        x, y = sample_data(arch, items, seed=seed, image_size=size)
        first = int(round(items / (1 + append)))
        progress(f"built {models}+{derived} {arch} candidates ({zoo} zoo) and {items} items in "
                 f"{time.perf_counter() - t0:.1f} s")

        work: dict[str, int] = {}
        phases: dict[str, dict[str, list[float]]] = {}

        def timed(cands: Any, xy: Any, step: str | None = None, **kw: Any) -> tuple[float, Any]:
            t = time.perf_counter()
            r = search(cands, xy, k=1, device=device, batch_size=batch_size, seed=seed, **kw)
            if step is not None:  # block work: items through blocks, all depths (the same every round)
                depths: Any = r.stats["items_per_depth"]  # SearchResult.stats is typed as counts
                work[step] = sum(depths)
                for phase in PHASES:
                    phases.setdefault(step, {}).setdefault(phase, []).append(r.timings.get(phase, 0.0))
            return time.perf_counter() - t, r

        timed(more, (x, y))  # warm-up: the split verdicts and allocator are then as in every later round
        times: dict[str, list[float]] = {k: [] for k in ("fresh", "fresh+", "keep", "again", "appended", "derived",
                                                          "layers")}
        equal: dict[str, bool] = {}
        kept_survivors: list[tuple[int, int]] = []
        kept_bytes: dict[str, int] = {}
        loads = []
        for r in range(rounds):
            loads.append(os.getloadavg()[0])
            progress(f"round {r + 1}/{rounds} (load average {loads[-1]:.1f})")
            s1 = Store(os.path.join(tmp, f"r{r}-a"))
            s2 = Store(os.path.join(tmp, f"r{r}-b"))
            times["fresh"].append(timed(base, (x, y), "fresh")[0])
            times["fresh+"].append(timed(more, (x, y), "fresh+")[0])
            t, keep = timed(base, (x, y), "keep", store=s1, reuse=True)
            times["keep"].append(t)
            kept_bytes.setdefault("keep", _kept_bytes(s1))
            t, again = timed(base, (x, y), "again", store=s1, reuse=True)
            times["again"].append(t)
            t, grown = timed(more, (x, y), "derived", store=s1, reuse=True)
            times["derived"].append(t)
            kept_bytes.setdefault("derived", _kept_bytes(s1))
            earlier = timed(base, (x[:first], y[:first]), store=s2, reuse=True)[1]
            t, appended = timed(base, (x, y), "appended", store=s2, reuse=True)
            times["appended"].append(t)
            kept_bytes.setdefault("appended", _kept_bytes(s2))
            times["layers"].append(timed(base, (x, y), "layers", layers=layers)[0])
            if r == 0:
                progress("checking rankings against fresh searches on empty stores")
                fresh_more = timed(more, (x, y), store=Store(os.path.join(tmp, "check")), reuse=True)[1]
                equal = {"again": again.ranking.equals(keep.ranking), "appended": appended.ranking.equals(keep.ranking),
                         "derived": grown.ranking.equals(fresh_more.ranking)}
                kept_survivors = survivors_kept(earlier.ranking, appended.ranking)
            for s in (s1, s2):
                s.close()
            shutil.rmtree(os.path.join(tmp, f"r{r}-a"), ignore_errors=True)
            shutil.rmtree(os.path.join(tmp, f"r{r}-b"), ignore_errors=True)
    finally:
        torch.set_num_threads(before)
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for name, versus in (("fresh", None), ("keep", "fresh"), ("again", "fresh"), ("appended", "fresh"),
                         ("fresh+", None), ("derived", "fresh+"), ("layers", "fresh")):
        rows.append({"step": name, "median_s": med[name], "min_s": min(times[name]), "max_s": max(times[name]),
                     "ratio": None if versus is None else med[name] / med[versus], "versus": versus or "-",
                     "work": None if versus is None else work[name] / max(1, work[versus]),
                     "goal": GOALS.get(name)})
    targets = [Target(f"{name} / {versus} (rankings equal: {equal.get(name, 'n/a')})", med[name] / med[versus],
                      GOALS[name], "<=", "x") for name, versus in (("again", "fresh"), ("appended", "fresh"),
                                                                   ("derived", "fresh+"), ("layers", "fresh"))]
    return LakeBench(rows, targets, equal, loads, zoo, kept_survivors,
                     {step: {p: statistics.median(v) for p, v in by.items()} for step, by in phases.items()}, build_s,
                     kept_bytes)


def _kept_bytes(store: Any) -> int:
    """Bytes of the features a store keeps (their index entries)."""
    from ..store.features import load_index

    return sum(e.nbytes for e in load_index(store.objects).values())


def survivors_kept(first: Any, then: Any) -> list[tuple[int, int]]:
    """Per rung from the second: how many of the candidates ``then`` scored on that rung ``first``
    scored on it too, and how many ``then`` scored (from the rankings' ``rung`` column: the last rung
    a candidate reached)."""
    def reached(ranking: Any, rung: int) -> set[str]:
        return {str(m) for m, r in zip(ranking["model"], ranking["rung"]) if int(r) >= rung}

    last = int(then["rung"].max()) if len(then) else 0
    return [(len(reached(then, r) & reached(first, r)), len(reached(then, r))) for r in range(1, last + 1)]


__all__ = ["GOALS", "PHASES", "ZOOS", "LakeBench", "run_lake_bench", "survivors_kept"]
