"""The Alsatian paper's search experiment: base vs shift vs alsatian on a synthetic candidate set.

Per approach: end-to-end time (median of ``repeat`` runs, min–max kept), its breakdown, speedups
against base and shift, block inferences, cache peak, and whether the rankings match (alsatian
against shift on the same rungs, and the selected model against base). Also the planner's time for
a 500-candidate task tree.

**A noisy machine.** The approaches are *interleaved*: each of ``repeat`` rounds runs every approach
once, in an order rotated per round, so a burst of load hits all of them alike; the block costs
are calibrated again before every round and once after the last, so they see the same machine.

**The sharing bound.** A run's work is its ``items_per_depth``: how many items went through the
blocks at each depth. Sharing can make alsatian's inference at most

    bound = max_d shift_items[d] / alsatian_items[d]

times faster than shift's: its inference time is a sum over depths of items times a per-item cost
that both approaches pay alike (the same blocks, the same batches), and a ratio of two such sums
can never exceed the largest ratio of their terms, whatever the costs are. The bound comes from
counts alone, so no timing noise can move it; a measured ratio above it can only be noise or
work outside the blocks, and the benchmark says so (``bound_holds``, checked per round too).

The *estimate* prices the work with calibrated per-depth costs instead: the block costs are timed
once per round (interleaved with the runs, fastest of ``inner`` timings each, since the machine
can only slow a timing down) and their medians turn each run's work into a modelled inference
time. It is closer to what a quiet machine measures but carries no guarantee, so every run prints
its error against the measured ratio.
"""
from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import SearchError
from .modelsets import Target
from .results import save as save_results

APPROACHES = ("base", "shift", "alsatian")
DEFAULT_OUT = Path("bench_results") / "search"
QUICK = {"models": 8, "items": 400}
#: ``--scale paper``: the paper's Fig. 10 setting (35 candidates, 2,000 items; full widths at 224 px)
PAPER = {"models": 35, "items": 2000}
Progress = Callable[[str], None]


@dataclass
class SearchBench:
    """Rows per approach, targets, and where the results were written."""

    rows: list[dict[str, Any]]
    targets: list[Target]
    planning_500_s: float
    config: dict[str, Any]
    block_costs: list[float] = field(default_factory=list)   # median per-item seconds by depth
    cost_range: list[tuple[float, float]] = field(default_factory=list)  # (c_lo, c_hi) by depth
    files: list[str] = field(default_factory=list)


def plan_seconds(models: int = 500, blocks: int = 20, seed: int = 0) -> float:
    """Time to build the task tree of ``models`` synthetic candidates and plan it (DFS+)."""
    import numpy as np

    from ..modelsearch.planner import plan_tree
    from ..modelsearch.tree import TaskTree

    rng = np.random.default_rng(seed)
    paths = [[f"b0_{j}" for j in range(blocks)]]
    for m in range(1, models):
        src = paths[int(rng.integers(len(paths)))]
        n = int(np.clip(round(rng.normal(0.25 * blocks, 0.125 * blocks)), 1, blocks))
        paths.append(src[: blocks - n] + [f"b{m}_{j}" for j in range(n)])
    t0 = time.perf_counter()
    tree = TaskTree(3 * 32 * 32 * 4)
    for m, p in enumerate(paths):
        tree.add_model(m, p, [4096] * len(p))
    plan_tree(tree, 2000, budget=None)
    return time.perf_counter() - t0


def run_search_bench(arch: str = "resnet18", models: int = 35, distribution: str = "top-layers",
                     items: int = 2000, approaches: Sequence[str] = APPROACHES, budget: int | None = None,
                     reduced: bool = True, image_size: int | None = None, device: str = "auto",
                     batch_size: int = 64, seed: int = 0, budget_fraction: float | None = None,
                     repeat: int = 3, threads: int | None = None, out: str | os.PathLike[str] = DEFAULT_OUT,
                     progress: Progress = lambda m: None) -> SearchBench:
    """Run every approach ``repeat`` times, interleaved, on the same candidates and data; return
    rows (medians, with min and max) and targets.

    ``budget_fraction`` (needs alsatian among the approaches) adds a row ``alsatian-budget``: alsatian
    again with a cache budget of that fraction of the peak the unlimited run needed (its C_min), so
    the plan must chunk the data. ``threads`` sets torch's intra-op threads for the run (default:
    leave torch's setting)."""
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ValueError("threads must be at least 1")
        torch.set_num_threads(threads)
    try:
        return _run_search_bench(arch, models, distribution, items, approaches, budget, reduced, image_size, device,
                                 batch_size, seed, budget_fraction, repeat, out, progress)
    finally:
        torch.set_num_threads(before)


def _run_search_bench(arch: str, models: int, distribution: str, items: int, approaches: Sequence[str],
                      budget: int | None, reduced: bool, image_size: int | None, device: str, batch_size: int,
                      seed: int, budget_fraction: float | None, repeat: int, out: str | os.PathLike[str],
                      progress: Progress) -> SearchBench:
    from ..modelsearch.api import resolve_device, search
    from ..modelsearch.stored import add_candidates, load_candidates
    from ..store import Store
    from ..store.architectures import Architecture
    from .synthetic import base_model, sample_data, synthetic_candidates

    if repeat < 1:
        raise ValueError("repeat must be at least 1")
    if budget_fraction is not None and "alsatian" not in approaches:
        raise ValueError("budget_fraction needs the alsatian approach")
    t0 = time.perf_counter()
    cands = synthetic_candidates(arch, models, distribution, seed=seed, reduced=reduced, image_size=image_size)
    data = sample_data(arch, items, seed=seed, reduced=reduced, image_size=image_size)
    progress(f"built {models} {arch} candidates ({distribution}) and {items} items in {time.perf_counter() - t0:.1f} s")
    dev = resolve_device(device)
    calibrate = CostCalibration(cands[0], data[0], batch_size, dev)
    # the paper's setting: candidates live in a model store (blocks stored once, ids computed at
    # storage time); every approach loads what it needs from there
    store_dir = Path(tempfile.mkdtemp(prefix="mm_search_bench_"))
    store = None
    try:
        store = Store(store_dir)
        t0 = time.perf_counter()
        add_candidates(store, cands, "candidates", architectures={
            str(i): Architecture.factory(base_model, arch=arch, reduced=reduced, image_size=image_size)
            for i in range(len(cands))})
        progress(f"stored the candidates in {time.perf_counter() - t0:.1f} s")
        stored = load_candidates(store, "candidates")
        # warm-up (first-call costs of torch and the proxy), untimed, on a small slice
        search(cands[:2], (data[0][:128], data[1][:128]), k=1, approach="alsatian", device=device,
               batch_size=batch_size, seed=seed)
        runs: dict[str, list[Any]] = {a: [] for a in approaches}
        limited: int | None = None
        for rnd in range(repeat):
            calibrate.sample()
            order = list(approaches[rnd % len(approaches):]) + list(approaches[:rnd % len(approaches)])
            for a in order:
                runs[a].append(_run_one(stored, data, a, budget if a == "alsatian" else None, device, batch_size,
                                        seed, progress, rnd))
            if budget_fraction is not None:
                if limited is None:  # C_min: the cache peak of the unlimited alsatian run
                    limited = max(1, int(runs["alsatian"][0][1].stats["cache_peak_bytes"] * budget_fraction))
                runs.setdefault("alsatian-budget", []).append(
                    _run_one(stored, data, "alsatian", limited, device, batch_size, seed, progress, rnd,
                             label="alsatian-budget"))
        calibrate.sample()
    finally:
        if store is not None:
            store.close()
        shutil.rmtree(store_dir, ignore_errors=True)
    results = {a: rs[0][1] for a, rs in runs.items()}
    rows = [_row(a, rs) | ({"budget": limited} if a == "alsatian-budget" else {}) for a, rs in runs.items()]
    lo, med, hi = calibrate.ranges()
    for r in rows:
        r["modelled_inference_s"] = modelled_inference(r["items_per_depth"], med)
    by = {r["approach"]: r for r in rows}
    if "alsatian" in by and "shift" in by:
        _sharing(by["alsatian"], by["shift"], runs["alsatian"], runs["shift"])
    for r in rows:
        r["vs_base"] = by["base"]["seconds"] / r["seconds"] if "base" in by else None
        r["vs_shift"] = by["shift"]["seconds"] / r["seconds"] if "shift" in by else None
    for name in ("alsatian", "alsatian-budget"):
        if name in results and "shift" in results:
            a, s = results[name].ranking, results["shift"].ranking
            by[name]["ranking_matches_shift"] = list(a["model"]) == list(s["model"]) and bool(
                (abs(a["score"].values - s["score"].values) <= 1e-6).all())
    if "alsatian" in results and "base" in results:
        by["alsatian"]["best_matches_base"] = results["alsatian"].best == results["base"].best
    planning = plan_seconds(500)
    targets = _targets(by, distribution, planning, budget)
    config = {"arch": arch, "models": models, "distribution": distribution, "items": items, "budget": budget,
              "budget_fraction": budget_fraction, "repeat": repeat, "threads": _torch_threads(),
              "reduced": reduced, "image_size": image_size, "device": device, "device_used": dev,
              "batch_size": batch_size, "seed": seed}
    bench = SearchBench(rows, targets, planning, config, med, list(zip(lo, hi)))
    size = f"{image_size}px" if image_size else ("small" if reduced else "full")
    path = Path(out) / f"search-{arch}-{distribution}-{models}x{items}-{size}-{dev.split(':')[0]}.json"
    save_results(path, {"experiment": "search", "config": config, "environment": environment(dev), "rows": rows,
                        "planning_500_s": planning, "block_costs_s": med, "block_cost_range_s": bench.cost_range,
                        "cost_samples": calibrate.count, "targets": [t.to_json() for t in targets]}, config)
    bench.files.append(str(path))
    return bench


def environment(device: str) -> dict[str, Any]:
    """Where the numbers were taken: CPUs, torch, and the GPU's name when the search ran on one."""
    import platform

    import torch

    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else None
    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


class CostCalibration:
    """Per-item seconds of each feature-extractor block of ``model``, calibrated again and again.

    Each ``sample()`` (one per benchmark round, interleaved with the runs) times every block
    ``inner`` times on one batch of ``x`` and keeps the fastest timing per depth (a timing can only
    be slowed by the machine, never sped up). ``ranges()`` gives per depth the lowest, median and
    highest of these samples: the spread shows how noisy the machine was."""

    def __init__(self, model: Any, x: Any, batch_size: int = 64, device: str = "cpu", inner: int = 3) -> None:
        import torch

        from ..modelsearch.splitting import split_model

        self.device, self.inner = device, inner
        split = split_model(model)
        self.blocks = split.blocks
        batch = x[:batch_size].to(device)
        self.ctx = {k: v.to(device) for k, v in split.context(batch).items()}
        self.inputs = []
        with torch.inference_mode():  # the input of every depth, computed once (warms every block up)
            h = batch
            for block in self.blocks:
                block.module.to(device).eval()
                self.inputs.append(h)
                h = block(h, self.ctx)
        self.samples: list[list[float]] = [[] for _ in self.blocks]

    @property
    def count(self) -> int:
        return len(self.samples[0]) if self.blocks else 0

    def sample(self) -> None:
        import torch

        sync: Callable[[], None] = torch.cuda.synchronize if self.device != "cpu" else (lambda: None)
        with torch.inference_mode():
            for block, h, got in zip(self.blocks, self.inputs, self.samples):
                best = float("inf")
                for _ in range(self.inner):
                    sync()
                    t0 = time.perf_counter()
                    block(h, self.ctx)
                    sync()
                    best = min(best, time.perf_counter() - t0)
                got.append(best / len(h))

    def ranges(self) -> tuple[list[float], list[float], list[float]]:
        """(lowest, median, highest) per-item seconds by depth."""
        return ([min(s) for s in self.samples], [statistics.median(s) for s in self.samples],
                [max(s) for s in self.samples])


def sharing_bound(shift_items: Sequence[int], alsatian_items: Sequence[int]) -> float:
    """The largest speedup over shift that alsatian's inference can reach with this work: the
    largest per-depth ratio of items (a ratio of sums of non-negative terms never exceeds it)."""
    ratios = [s / a for s, a in zip(shift_items, alsatian_items) if a > 0]
    if any(s > 0 and a == 0 for s, a in zip(shift_items, alsatian_items)):
        return float("inf")
    return max(ratios, default=1.0)


def block_costs(model: Any, x: Any, batch_size: int = 64, device: str = "cpu", repeat: int = 3) -> list[float]:
    """Median seconds per item of each feature-extractor block of ``model`` over ``repeat``
    calibration rounds (see :class:`CostCalibration`)."""
    cal = CostCalibration(model, x, batch_size, device)
    for _ in range(repeat):
        cal.sample()
    return cal.ranges()[1]


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def modelled_inference(items_per_depth: Sequence[int], costs: Sequence[float]) -> float:
    """Inference seconds the work of a run would take at the given per-item block costs."""
    return float(sum(n * c for n, c in zip(items_per_depth, costs)))


def _sharing(al: dict[str, Any], sh: dict[str, Any], al_runs: list[Any], sh_runs: list[Any]) -> None:
    """Alsatian's inference speedup over shift: measured (median of the rounds' times, and each
    round's ratio), the bound its work allows and the calibrated estimate with its error."""
    ratios = [s[1].timings["inference"] / a[1].timings["inference"] for a, s in zip(al_runs, sh_runs)]
    al["inference_vs_shift"] = sh["t_inference"] / al["t_inference"]
    al["inference_vs_shift_runs"] = ratios
    al["sharing_bound_vs_shift"] = sharing_bound(sh["items_per_depth"], al["items_per_depth"])
    al["sharing_estimate_vs_shift"] = sh["modelled_inference_s"] / al["modelled_inference_s"]
    al["sharing_estimate_error"] = al["inference_vs_shift"] / al["sharing_estimate_vs_shift"] - 1.0
    al["bound_holds"] = al["inference_vs_shift"] <= al["sharing_bound_vs_shift"]
    al["bound_holds_every_round"] = max(ratios) <= al["sharing_bound_vs_shift"]


def _run_one(candidates: Any, data: Any, approach: str, budget: int | None, device: str, batch_size: int,
             seed: int, progress: Progress, round_: int, label: str | None = None) -> tuple[float, Any]:
    from ..modelsearch.api import search

    t1 = time.perf_counter()
    res = search(candidates, data, k=1, approach=approach, cache_budget=budget, device=device,
                 batch_size=batch_size, seed=seed)
    took = time.perf_counter() - t1
    progress(f"round {round_ + 1}, {label or approach}: {took:.2f} s, best {res.best}, "
             f"{res.stats['block_inferences']} block inferences, {res.stats['bytes_loaded']:,} bytes loaded")
    return took, res


def _row(approach: str, runs: list[tuple[float, Any]]) -> dict[str, Any]:
    """One approach's row: medians of the rounds' times (min and max of the total kept), the
    statistics of its first run (the same in every round: the work is deterministic)."""
    first = runs[0][1]
    for _, res in runs[1:]:
        if res.stats["items_per_depth"] != first.stats["items_per_depth"] or res.best != first.best:
            raise SearchError(f"{approach}: repeated runs of the benchmark did different work")
    seconds = [took for took, _ in runs]
    timings = {f"t_{k}": statistics.median(res.timings[k] for _, res in runs) for k in first.timings}
    return {"approach": approach, "seconds": statistics.median(seconds), "min_s": min(seconds),
            "max_s": max(seconds), "seconds_runs": seconds, **timings, **first.stats, "best": first.best,
            "rungs": len(first.rungs)}


def _targets(by: dict[str, dict[str, Any]], distribution: str, planning: float, budget: int | None) -> list[Target]:
    need = {"top-layers": (10.0, 6.0), "top-25": (5.0, None), "top-50": (3.0, None)}.get(distribution, (None, None))
    out = []
    al = by.get("alsatian")
    if al is not None and need[0] is not None and budget is None:
        out.append(Target(f"{distribution}: alsatian vs base", al.get("vs_base"), need[0], ">=", "x faster"))
    if al is not None and need[1] is not None and budget is None:
        out.append(Target(f"{distribution}: alsatian vs shift", al.get("vs_shift"), need[1], ">=", "x faster"))
    if al is not None and budget is not None:
        out.append(Target("limited budget: alsatian vs shift", al.get("vs_shift"), 1.0, ">=", "x faster"))
    if al is not None and budget is None:
        out.append(Target("block inferences == unique edges", float(al["block_inferences"] - al["unique_edges"]),
                          0.0, "<=", "extra inferences"))
    if al is not None and "sharing_bound_vs_shift" in al:
        out.append(Target("alsatian inference vs shift <= sharing bound", al["inference_vs_shift"],
                          al["sharing_bound_vs_shift"], "<=", "x faster",
                          f"rounds {', '.join(f'{r:.2f}x' for r in al['inference_vs_shift_runs'])}; calibrated "
                          f"estimate {al['sharing_estimate_vs_shift']:.2f}x "
                          f"(error {100 * al['sharing_estimate_error']:+.0f}%)"))
    if al is not None and "ranking_matches_shift" in al:
        out.append(Target("alsatian ranking == shift ranking", float(al["ranking_matches_shift"]), 1.0, ">=",
                          "(1 = yes)"))
    lim = by.get("alsatian-budget")
    if lim is not None:
        c_min = al["cache_peak_bytes"] if al is not None else None
        out.append(Target("budget < C_min: alsatian vs shift", lim.get("vs_shift"), 1.0, ">=", "x faster",
                          f"budget {lim['budget']:,} B of C_min {c_min:,} B, {lim['chunks']} chunks"))
        if "ranking_matches_shift" in lim:
            out.append(Target("budget < C_min: ranking == shift ranking", float(lim["ranking_matches_shift"]), 1.0,
                              ">=", "(1 = yes)"))
    out.append(Target("planning 500 candidates", planning, 1.0, "<=", "s"))
    return out
