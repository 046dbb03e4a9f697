"""The Alsatian paper's search experiment: base vs shift vs alsatian on a synthetic candidate set.

Per approach: end-to-end time, its breakdown, speedups against base and shift, block inferences,
cache peak, and whether the rankings match (alsatian against shift on the same rungs, and the
selected model against base). Also the planner's time for a 500-candidate task tree.

The limit for sharing: every candidate has the base model's architecture, so a block at depth
``d`` costs about the same per item in every candidate. The benchmark times each depth once on one
batch (``block_costs``) and turns each run's ``items_per_depth`` into a modelled inference time.
The ratio of two approaches' modelled times is the speedup their *work* allows, whatever the code
around it does: for alsatian against shift it is the bound that sharing exactly the unique task
tree edges can reach, and measured inference over modelled shows how close the engine gets.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .modelsets import Target

APPROACHES = ("base", "shift", "alsatian")
DEFAULT_OUT = Path("bench_results") / "search"
QUICK = {"models": 8, "items": 400}
Progress = Callable[[str], None]


@dataclass
class SearchBench:
    """Rows per approach, targets, and where the results were written."""

    rows: list[dict[str, Any]]
    targets: list[Target]
    planning_500_s: float
    config: dict[str, Any]
    block_costs: list[float] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


def plan_seconds(models: int = 500, blocks: int = 20, seed: int = 0) -> float:
    """Time to build the task tree of ``models`` synthetic candidates and plan it (DFS+)."""
    import numpy as np

    from ..search.planner import plan_tree
    from ..search.tree import TaskTree

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
                     out: str | os.PathLike[str] = DEFAULT_OUT, progress: Progress = lambda m: None) -> SearchBench:
    """Run every approach once on the same candidates and data; return rows and targets.

    ``budget_fraction`` (needs alsatian among the approaches) adds a row ``alsatian-budget``: alsatian
    again with a cache budget of that fraction of the peak the unlimited run needed (its C_min), so
    the plan must chunk the data."""
    import mm_jupyter as mm

    from ..search.api import resolve_device
    from ..search.stored import add_candidates, load_candidates
    from ..search.synthetic import base_model, sample_data, synthetic_candidates
    from ..store.architectures import Architecture

    t0 = time.perf_counter()
    cands = synthetic_candidates(arch, models, distribution, seed=seed, reduced=reduced, image_size=image_size)
    data = sample_data(arch, items, seed=seed, reduced=reduced, image_size=image_size)
    progress(f"built {models} {arch} candidates ({distribution}) and {items} items in {time.perf_counter() - t0:.1f} s")
    # the paper's setting: candidates live in a model store (blocks stored once, ids computed at
    # storage time); every approach loads what it needs from there
    store_dir = Path(tempfile.mkdtemp(prefix="mm_search_bench_"))
    try:
        store = mm.Store(store_dir)
        t0 = time.perf_counter()
        add_candidates(store, cands, "candidates", architectures={
            str(i): Architecture.factory(base_model, arch=arch, reduced=reduced, image_size=image_size)
            for i in range(len(cands))})
        progress(f"stored the candidates in {time.perf_counter() - t0:.1f} s")
        stored = load_candidates(store, "candidates")
        # warm-up (first-call costs of torch and the proxy), untimed, on a small slice
        mm.search(cands[:2], (data[0][:128], data[1][:128]), k=1, approach="alsatian", device=device,
                  batch_size=batch_size, seed=seed)
        results, rows = _run_all(stored, data, approaches, budget, device, batch_size, seed, progress)
        costs = block_costs(cands[0], data[0], batch_size, resolve_device(device))
        if budget_fraction is not None:
            if "alsatian" not in results:
                raise ValueError("budget_fraction needs the alsatian approach")
            limited = max(1, int(results["alsatian"].stats["cache_peak_bytes"] * budget_fraction))
            more, extra = _run_all(stored, data, ["alsatian"], limited, device, batch_size, seed, progress)
            results["alsatian-budget"] = more["alsatian"]
            rows.append(extra[0] | {"approach": "alsatian-budget", "budget": limited})
    finally:
        shutil.rmtree(store_dir, ignore_errors=True)
    for r in rows:
        r["modelled_inference_s"] = modelled_inference(r["items_per_depth"], costs)
    by = {r["approach"]: r for r in rows}
    if "alsatian" in by and "shift" in by:
        al, sh = by["alsatian"], by["shift"]
        al["sharing_bound_vs_shift"] = sh["modelled_inference_s"] / al["modelled_inference_s"]
        al["inference_vs_shift"] = sh["t_inference"] / al["t_inference"]
    for r in rows:
        r["speedup_vs_base"] = by["base"]["seconds"] / r["seconds"] if "base" in by else None
        r["speedup_vs_shift"] = by["shift"]["seconds"] / r["seconds"] if "shift" in by else None
    if "alsatian" in results and "shift" in results:
        a, s = results["alsatian"].ranking, results["shift"].ranking
        same = list(a["model"]) == list(s["model"]) and bool(
            (abs(a["score"].values - s["score"].values) <= 1e-6).all())
        by["alsatian"]["ranking_matches_shift"] = same
    if "alsatian-budget" in results and "shift" in results:
        a, s = results["alsatian-budget"].ranking, results["shift"].ranking
        by["alsatian-budget"]["ranking_matches_shift"] = list(a["model"]) == list(s["model"]) and bool(
            (abs(a["score"].values - s["score"].values) <= 1e-6).all())
    if "alsatian" in results and "base" in results:
        by["alsatian"]["best_matches_base"] = results["alsatian"].best == results["base"].best
    planning = plan_seconds(500)
    targets = _targets(by, distribution, planning, budget)
    config = {"arch": arch, "models": models, "distribution": distribution, "items": items, "budget": budget,
              "budget_fraction": budget_fraction,
              "reduced": reduced, "image_size": image_size, "device": device, "batch_size": batch_size, "seed": seed}
    bench = SearchBench(rows, targets, planning, config, costs)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"search-{arch}-{distribution}-{models}.json"
    path.write_text(json.dumps({"config": config, "rows": rows, "planning_500_s": planning, "block_costs_s": costs,
                                "targets": [t.to_json() for t in targets]}, indent=2, default=str))
    bench.files.append(str(path))
    return bench


def block_costs(model: Any, x: Any, batch_size: int = 64, device: str = "cpu", repeat: int = 3) -> list[float]:
    """Seconds per item of each feature-extractor block of ``model`` (min over ``repeat`` runs on
    one batch of ``x``, after a warm-up run)."""
    import torch

    from ..search.blocks import split_model

    split = split_model(model)
    batch = x[:batch_size].to(device)
    ctx = {k: v.to(device) for k, v in split.context(batch).items()}
    costs, h = [], batch
    with torch.inference_mode():
        for block in split.blocks:
            block.module.to(device).eval()
            out = block(h, ctx)
            best = float("inf")
            for _ in range(repeat):
                if device != "cpu":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                block(h, ctx)
                if device != "cpu":
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t0)
            costs.append(best / len(batch))
            h = out
    return costs


def modelled_inference(items_per_depth: Sequence[int], costs: Sequence[float]) -> float:
    """Inference seconds the work of a run would take at the calibrated per-item block costs."""
    return float(sum(n * c for n, c in zip(items_per_depth, costs)))


def _run_all(candidates: Any, data: Any, approaches: Sequence[str], budget: int | None, device: str,
             batch_size: int, seed: int, progress: Progress) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    import mm_jupyter as mm

    results, rows = {}, []
    for a in approaches:
        t1 = time.perf_counter()
        res = mm.search(candidates, data, k=1, approach=a, cache_budget=budget if a == "alsatian" else None,
                        device=device, batch_size=batch_size, seed=seed)
        took = time.perf_counter() - t1
        results[a] = res
        rows.append({"approach": a, "seconds": took, **{f"t_{k}": v for k, v in res.timings.items()},
                     **res.stats, "best": res.best, "rungs": len(res.rungs)})
        progress(f"{a}: {took:.2f} s, best {res.best}, {res.stats['block_inferences']} block inferences, "
                 f"{res.stats['bytes_loaded']:,} bytes loaded")
    return results, rows


def _targets(by: dict[str, dict[str, Any]], distribution: str, planning: float, budget: int | None) -> list[Target]:
    need = {"top-layers": (10.0, 6.0), "top-25": (5.0, None), "top-50": (3.0, None)}.get(distribution, (None, None))
    out = []
    al = by.get("alsatian")
    if al is not None and need[0] is not None and budget is None:
        out.append(Target(f"{distribution}: alsatian vs base", al.get("speedup_vs_base"), need[0], ">=", "x faster"))
    if al is not None and need[1] is not None and budget is None:
        out.append(Target(f"{distribution}: alsatian vs shift", al.get("speedup_vs_shift"), need[1], ">=", "x faster"))
    if al is not None and budget is not None:
        out.append(Target("limited budget: alsatian vs shift", al.get("speedup_vs_shift"), 1.0, ">=", "x faster"))
    if al is not None and budget is None:
        out.append(Target("block inferences == unique edges", float(al["block_inferences"] - al["unique_edges"]),
                          0.0, "<=", "extra inferences"))
    if al is not None and "ranking_matches_shift" in al:
        out.append(Target("alsatian ranking == shift ranking", float(al["ranking_matches_shift"]), 1.0, ">=",
                          "(1 = yes)"))
    lim = by.get("alsatian-budget")
    if lim is not None:
        c_min = al["cache_peak_bytes"] if al is not None else None
        out.append(Target("budget < C_min: alsatian vs shift", lim.get("speedup_vs_shift"), 1.0, ">=", "x faster",
                          f"budget {lim['budget']:,} B of C_min {c_min:,} B, {lim['chunks']} chunks"))
        if "ranking_matches_shift" in lim:
            out.append(Target("budget < C_min: ranking == shift ranking", float(lim["ranking_matches_shift"]), 1.0,
                              ">=", "(1 = yes)"))
    out.append(Target("planning 500 candidates", planning, 1.0, "<=", "s"))
    return out
