"""Distributed model search: measured speed-up on Ray, and a planner-level simulation at scale.

``run_ray_bench``: one CPU-bound search (candidates stored in a temporary store, so the workers
read their blocks from it) run four ways on the same data: one process with 1 torch thread, one
process with ``workers`` threads, Ray with 1 worker and Ray with ``workers`` workers (1 thread
each), in interleaved rounds whose order rotates, so load from elsewhere on a shared machine hits
every run alike. Every run must produce the same ranking. Timed: the ``mm.search`` call (shipping
the candidates to the workers included); worker start-up and one small warm-up search per run
excluded alike. The speed-up is the median of per-round ratios (min-max shown), and every
measurement records the load average and the CPU share its workers (or threads) got.

``run_partition_sim``: no model runs. A mixed set of candidates (several real architectures, each
with its own derivation tree drawn like the paper's generator, ``top-layers``/``top-25``/``top-50``
mixed) gives one task tree whose edges carry the blocks' counted FLOPs and output bytes. For each
worker count it compares subtree partitioning with a shared queue of block steps (Renggli et al.):
duplicated block work, bytes moved between workers, load balance and modelled makespan. The cost
model (``modelsearch/partition.py``): a block step costs its FLOPs per item; moving an intermediate
costs its bytes per item times ``flops / bandwidth`` (FLOPs one worker could do meanwhile).
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .modelsets import Target

DEFAULT_OUT = Path("bench_results") / "distributed"
SIM_ARCHS = ("resnet18", "resnet152", "vit", "bert")
SIM_DISTRIBUTIONS = ("top-layers", "top-25", "top-50")
Progress = Callable[[str], None]


# -- measured: a search on Ray -------------------------------------------------------------------------
RAY_TARGET = 1.6  # the speed-up of 2 workers over 1 on this 2-core machine
WARMUP_ITEMS = 64


@dataclass
class RayBench:
    rows: list[dict[str, Any]]
    targets: list[Target]
    config: dict[str, Any]
    rounds: list[dict[str, Any]]  # per round and run: seconds, load average, CPU share, order
    ratios: list[float]  # per round: ray 1 worker / ray ``workers`` workers, the runs of the same round
    seconds: float  # wall time of the whole benchmark
    files: list[str] = field(default_factory=list)

    @property
    def quiet(self) -> bool:
        """Whether the machine looked free while timing: the load average stayed at most one
        above its CPUs, and the Ray workers got at least 90% of a CPU while running."""
        busy = max((r["load"] for r in self.rounds), default=0.0) > (self.config["cpus"] or 1) + 1
        starved = any(r["cpu_share"] is not None and r["cpu_share"] < 0.9 for r in self.rounds
                      if r["run"].startswith("ray"))
        return not busy and not starved


def run_ray_bench(arch: str = "resnet18", models: int = 35, distribution: str = "top-layers", items: int = 1500,
                  workers: int = 2, reduced: bool = False, image_size: int | None = 64, batch_size: int = 64,
                  seed: int = 0, repeat: int = 3, budget: int | None = None,
                  out: str | os.PathLike[str] = DEFAULT_OUT, progress: Progress = lambda m: None) -> RayBench:
    """Time the same alsatian search in one process (1 and ``workers`` threads) and on Ray (1 and
    ``workers`` workers, 1 thread each) in ``repeat`` interleaved rounds, the order rotating per
    round; medians and min-max per run, and the speed-up as the median of per-round ratios."""
    import torch

    from ..modelsearch.api import search
    from ..modelsearch.distributed import RayExecutor, start_local_ray
    from ..modelsearch.stored import add_candidates, load_candidates
    from ..store import Store
    from ..store.architectures import Architecture
    from .synthetic import base_model, sample_data, synthetic_candidates

    began = t0 = time.perf_counter()
    cands = synthetic_candidates(arch, models, distribution, seed=seed, reduced=reduced, image_size=image_size)
    data = sample_data(arch, items, seed=seed, reduced=reduced, image_size=image_size)
    progress(f"built {models} {arch} candidates ({distribution}) and {items} items in {time.perf_counter() - t0:.1f} s")
    store_dir = Path(tempfile.mkdtemp(prefix="mm_ray_bench_"))
    before = torch.get_num_threads()
    t0 = time.perf_counter()
    started = start_local_ray(workers + 1 if workers > 1 else 1)  # a slot per 1-thread worker of both executors
    progress(f"Ray {'started' if started else 'already running'} in {time.perf_counter() - t0:.1f} s")
    results: dict[str, Any] = {}
    rounds: list[dict[str, Any]] = []
    try:
        store = Store(store_dir)
        add_candidates(store, cands, "candidates", architectures={
            str(i): Architecture.factory(base_model, arch=arch, reduced=reduced, image_size=image_size)
            for i in range(len(cands))})
        stored = load_candidates(store, "candidates")
        del cands
        runs: list[tuple[str, Any, int]] = [("1 process, 1 thread", None, 1),
                                            (f"1 process, {workers} threads", None, workers)]
        for n in sorted({1, workers}):
            t1 = time.perf_counter()
            ex = RayExecutor(n, threads=1)
            ex.start()
            progress(f"started {n} Ray worker(s) in {time.perf_counter() - t1:.1f} s")
            runs.append((_ray_label(n), ex, 1))
        # warm-up, untimed and alike for every run: first-call costs of torch and the proxy in every
        # process, and the stored set opened by each worker (as the driver's `stored` is)
        t0 = time.perf_counter()
        for _, ex, threads in runs:
            torch.set_num_threads(threads)
            search(stored, (data[0][:WARMUP_ITEMS], data[1][:WARMUP_ITEMS]), k=1, approach="alsatian",
                   batch_size=batch_size, seed=seed, executor=ex)
        progress(f"warm-up searches ({WARMUP_ITEMS} items, every run) in {time.perf_counter() - t0:.1f} s")
        for r in range(repeat):
            for label, ex, threads in runs[r % len(runs):] + runs[: r % len(runs)]:
                torch.set_num_threads(threads)
                t1, c1 = time.perf_counter(), time.process_time()
                res = search(stored, data, k=1, approach="alsatian", batch_size=batch_size, seed=seed,
                             cache_budget=budget, executor=ex)
                took, cpu = time.perf_counter() - t1, time.process_time() - c1
                d: Any = res.stats.get("distributed")  # the distributed executor adds a dict of its own
                share = sum(d["worker_cpu_seconds"]) / sum(d["worker_seconds"]) if d else cpu / (took * threads)
                load = os.getloadavg()[0]
                rounds.append({"round": r + 1, "run": label, "seconds": took, "load": load, "cpu_share": share})
                results[label] = res
                progress(f"round {r + 1}/{repeat}: {label}: {took:.2f} s, CPU {100 * share:.0f}% of "
                         f"{'its workers' if d else 'its threads'}' time, load average {load:.2f}, best {res.best}")
        for _, ex, _ in runs:
            if ex is not None:
                ex.close()
    finally:
        torch.set_num_threads(before)
        if started:
            import ray

            ray.shutdown()
        shutil.rmtree(store_dir, ignore_errors=True)
    times = {label: [r["seconds"] for r in rounds if r["run"] == label] for label in results}
    one, many = _ray_label(1), _ray_label(workers)
    ratios = [a["seconds"] / b["seconds"] for a in rounds if a["run"] == one
              for b in rounds if b["run"] == many and b["round"] == a["round"]]
    ref = results["1 process, 1 thread"]
    rows = []
    for label, res in results.items():
        d = res.stats.get("distributed", {})
        rows.append({"run": label, "seconds": statistics.median(times[label]), "min_s": min(times[label]),
                     "max_s": max(times[label]), "t_inference": res.timings["inference"],
                     "t_proxy": res.timings["proxy"], "block_inferences": res.stats["block_inferences"],
                     "bytes_loaded": res.stats["bytes_loaded"], "transfer_bytes": d.get("transfer_bytes"),
                     "balance": max(d["modelled_balance"], default=None) if d else None,
                     "rung_balance": d.get("modelled_balance"), "worker_seconds": d.get("worker_seconds"),
                     "worker_cpu_seconds": d.get("worker_cpu_seconds"),
                     "item_split_rungs": d.get("item_split_rungs"), "trunk_blocks": d.get("trunk_blocks"),
                     "cpu_share": statistics.median(r["cpu_share"] for r in rounds if r["run"] == label),
                     "best": res.best,
                     "same_ranking": list(res.ranking["model"]) == list(ref.ranking["model"]),
                     "same_scores": res.ranking["score"].tolist() == ref.ranking["score"].tolist()})
    by = {r["run"]: r for r in rows}
    for row in rows:
        row["vs_ray_1"] = statistics.median(
            a["seconds"] / b["seconds"] for a in rounds if a["run"] == one
            for b in rounds if b["run"] == row["run"] and b["round"] == a["round"])
    loads = [r["load"] for r in rounds]
    spread = (f"median of {len(ratios)} interleaved round(s), min {min(ratios):.2f}x, max {max(ratios):.2f}x; "
              f"load average {min(loads):.2f}-{max(loads):.2f} on {os.cpu_count()} CPUs")
    targets = [
        Target(f"ray {workers} workers vs ray 1 worker", statistics.median(ratios), RAY_TARGET, ">=", "x faster",
               spread),
        Target(f"ray {workers} workers vs 1 process, 1 thread",
               by["1 process, 1 thread"]["seconds"] / by[many]["seconds"], RAY_TARGET, ">=", "x faster",
               "medians"),
        Target(f"ray {workers} workers vs 1 process, {workers} threads",
               by[f"1 process, {workers} threads"]["seconds"] / by[many]["seconds"], 1.0, ">=", "x faster",
               "medians; torch's own intra-op threads: the honest single-machine baseline"),
        Target("every run ranks like the single-process run", float(all(r["same_ranking"] for r in rows)), 1.0,
               ">=", "(1 = yes)"),
    ]
    config = {"arch": arch, "models": models, "distribution": distribution, "items": items, "workers": workers,
              "reduced": reduced, "image_size": image_size, "batch_size": batch_size, "seed": seed,
              "repeat": repeat, "budget": budget, "cpus": os.cpu_count(), "warmup_items": WARMUP_ITEMS}
    bench = RayBench(rows, targets, config, rounds, ratios, time.perf_counter() - began)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"ray-{arch}-{distribution}-{models}-w{workers}.json"
    path.write_text(json.dumps({"config": config, "rows": rows, "rounds": rounds, "ratios": ratios,
                                "quiet": bench.quiet, "seconds": bench.seconds,
                                "targets": [t.to_json() for t in targets]}, indent=2, default=str))
    bench.files.append(str(path))
    return bench


def _ray_label(workers: int) -> str:
    return f"ray, {workers} worker{'s' if workers > 1 else ''}"


# -- simulated: subtree partitioning vs a shared queue ------------------------------------------------
@dataclass
class Profile:
    """One architecture's blocks: counted FLOPs and output bytes per item, and which blocks hold
    parameters (the ones a derivation re-initialises)."""

    arch: str
    flops: list[float]
    item_bytes: list[int]
    parameterised: list[int]


def profile(arch: str, reduced: bool = False, image_size: int | None = 64) -> Profile:
    """Per-block costs of ``arch``'s base model on one item of its sample data."""
    from ..modelsearch.blocks import block_costs, output_sizes
    from ..modelsearch.splitting import split_model
    from .synthetic import base_model, parameterised, sample_data

    size = image_size if arch in ("resnet18", "resnet152", "vit") else None
    split = split_model(base_model(arch, reduced=reduced, image_size=size))
    x, _ = sample_data(arch, 2, reduced=reduced, image_size=size)
    return Profile(arch, block_costs(split, x), output_sizes(split, x), parameterised(split))


def mixed_tree(profiles: Sequence[Profile], models: int, seed: int = 0) -> tuple[Any, dict[int, float]]:
    """Task tree of ``models`` candidates spread over the architectures and distributions; per
    architecture all distributions derive from one base model, so their trees share it."""
    from ..modelsearch.tree import TaskTree
    from .synthetic import generation_plan

    tree = TaskTree(0)
    cost: dict[int, float] = {}
    groups = [(p, d) for p in profiles for d in SIM_DISTRIBUTIONS]
    fresh = iter(range(1 << 62))
    for g, (prof, dist) in enumerate(groups):
        n = models // len(groups) + (g < models % len(groups))
        base = [f"{prof.arch}/{j}" for j in range(len(prof.flops))]
        paths = [base]
        for step in generation_plan(n, len(prof.parameterised), dist, seed=seed + g)[: max(0, n - 1)]:
            first = prof.parameterised[-step.reinit]
            src = paths[step.source]
            paths.append(src[:first] + [f"{prof.arch}/{j}#{next(fresh)}" for j in range(first, len(src))])
        for i, path in enumerate(paths[:n]):
            name = f"{prof.arch}-{dist}-{i}"
            tree.add_model(name, path, prof.item_bytes)
            for depth, nid in enumerate(tree.path(name)[1:]):
                cost[nid] = prof.flops[depth]
    return tree, cost


@dataclass
class SimBench:
    rows: list[dict[str, Any]]
    targets: list[Target]
    config: dict[str, Any]
    tree: dict[str, Any]
    files: list[str] = field(default_factory=list)


def run_partition_sim(models: int = 500, workers: Sequence[int] = (8, 64, 512), archs: Sequence[str] = SIM_ARCHS,
                      flops: float = 1e13, bandwidth: float = 1e10, seed: int = 0,
                      out: str | os.PathLike[str] = DEFAULT_OUT, progress: Progress = lambda m: None) -> SimBench:
    """Subtree partitioning vs a shared queue of block steps on a mixed ``models``-candidate tree,
    per worker count. ``flops`` (per second, one worker) and ``bandwidth`` (bytes per second
    between workers) set what moving a byte costs in block work: ``flops / bandwidth`` FLOPs."""
    from ..modelsearch.partition import partition_tree
    from .queue import dfs_order, simulate_queue

    t0 = time.perf_counter()
    profiles = [profile(a) for a in archs]
    tree, cost = mixed_tree(profiles, models, seed)
    progress(f"task tree of {models} candidates ({', '.join(archs)}): {tree.edges} edges, "
             f"built in {time.perf_counter() - t0:.1f} s")
    unique = sum(cost.values())
    byte_cost = flops / bandwidth
    order = dfs_order(tree)
    rows = []
    for w in workers:
        t1 = time.perf_counter()
        part = partition_tree(tree, cost, w)
        t_part = time.perf_counter() - t1
        redo = simulate_queue(tree, cost, w, order, "recompute")
        move = simulate_queue(tree, cost, w, order, "transfer", byte_cost)
        cheap = simulate_queue(tree, cost, w, order, "cheaper", byte_cost)
        moved = part.transfer_bytes(tree)
        ours_overhead = moved * byte_cost
        rows.append({
            "workers": w, "partition_s": t_part, "trunk_blocks": len(part.trunk),
            "subtrees": sum(len(b) for b in part.bins), "busy_workers": sum(1 for b in part.bins if b),
            "ours_dup": 0.0, "ours_bytes": moved, "ours_balance": part.balance,
            "ours_speedup": unique / (part.makespan + ours_overhead),
            "queue_dup": redo.duplicated / unique, "queue_recompute_balance": redo.balance,
            "queue_recompute_speedup": unique / redo.makespan,
            "queue_bytes": move.transfer_bytes, "queue_transfer_speedup": unique / move.makespan,
            "queue_cheaper_dup": cheap.duplicated / unique, "queue_cheaper_bytes": cheap.transfer_bytes,
            "queue_cheaper_speedup": unique / cheap.makespan, "queue_cheaper_balance": cheap.balance,
            "overhead_ratio": _ratio(cheap.duplicated + cheap.transfer_bytes * byte_cost, ours_overhead),
            "bytes_ratio": _ratio(move.transfer_bytes, moved),
        })
        progress(f"{w} workers: partitioned in {t_part:.2f} s")
    targets = []
    for r in rows:
        targets.append(Target(f"{r['workers']} workers: duplicated work (recomputed + moved), queue / subtrees",
                              r["overhead_ratio"], 1.0, ">=", "x",
                              f"recomputed: subtrees 0%, queue {100 * r['queue_dup']:.2f}% of the unique work "
                              f"(recompute policy), {100 * r['queue_cheaper_dup']:.2f}% (cheaper policy)"))
        targets.append(Target(f"{r['workers']} workers: bytes moved, queue (transfer policy) / subtrees",
                              r["bytes_ratio"], 1.0, ">=", "x"))
    config = {"models": models, "workers": list(workers), "archs": list(archs), "flops": flops,
              "bandwidth": bandwidth, "seed": seed}
    info = {"edges": tree.edges, "unique_gflop_per_item": unique / 1e9,
            "candidates": len(tree.root.models)}
    bench = SimBench(rows, targets, config, info)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"partition-{models}.json"
    path.write_text(json.dumps({"config": config, "tree": info, "rows": rows,
                                "targets": [t.to_json() for t in targets]}, indent=2, default=str))
    bench.files.append(str(path))
    return bench


def _ratio(a: float, b: float) -> float:
    """``a / b``; infinite when only ``b`` is 0 (the other side did none of it), 1 when both are."""
    if b:
        return a / b
    return float("inf") if a else 1.0
