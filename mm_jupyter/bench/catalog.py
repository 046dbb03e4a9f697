"""Catalog scale: list and recover sets in a store whose catalog holds 100,000 models.

The store is filled with tiny models (``nn.Linear(2, 1)``, recorded with
``mm.Architecture.factory``): ~5% of the models as one ``mmlib-base`` set (a catalog row per
model) and the rest as ``baseline`` sets of ``set_size`` models, each set with distinct
parameters. Then it measures, from a freshly opened store, ``store.sets()`` and recovering one
set (``recover_set(ref).load()`` plus building ``ms[0]``), for a baseline set (target < 1 s) and,
for reference, the mmlib-base set (no target: it reads every model's records one by one).
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .modelsets import Target, environment

DEFAULT_OUT = Path("bench_results") / "catalog"
TARGET_S = 1.0

Progress = Callable[[str], None]


def _silent(_: str) -> None:
    pass


def plan_sets(models: int, set_size: int = 1000, mmlib_fraction: float = 0.05) -> tuple[int, list[int]]:
    """(mmlib-base set size, baseline set sizes) adding up to ``models``.

    100,000 models -> one mmlib-base set of 5,000 and 95 baseline sets of 1,000.
    """
    if models < 2:
        raise ValueError("the catalog benchmark needs at least 2 models")
    mmlib = max(1, int(round(models * mmlib_fraction)))
    rest = models - mmlib
    sizes = [set_size] * (rest // set_size)
    if rest % set_size:
        sizes.append(rest % set_size)
    return mmlib, sizes


@dataclass
class CatalogResult:
    """Build time, listing and recovery timings, and the < 1 s targets."""

    models: int
    sets: int
    build_s: float
    build_by_approach_s: dict[str, float]
    sets_s: float
    listed_rows: int
    recover: dict[str, dict[str, Any]]  # approach -> {"ref", "models", "recover_s", "first_model_s", "total_s"}
    targets: list[Target]
    environment: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "experiment": "catalog", "config": self.config, "environment": self.environment,
            "models": self.models, "sets": self.sets, "build_s": self.build_s,
            "build_by_approach_s": self.build_by_approach_s, "sets_s": self.sets_s,
            "listed_rows": self.listed_rows, "recover": self.recover,
            "targets": [t.to_json() for t in self.targets],
        }


def _tiny_models(n: int) -> list[Any]:
    import torch
    from torch import nn

    out = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for _ in range(n):
            out.append(nn.Linear(2, 1))
    return out


def run_catalog(models: int = 100_000, out: str | os.PathLike[str] = DEFAULT_OUT, set_size: int = 1000,
                mmlib_fraction: float = 0.05, repeat: int = 3, keep: bool = False, write: bool = True,
                progress: Progress | None = None) -> CatalogResult:
    """Build the store (in ``out``/store, replaced if present) and time listing and recovery
    (median of ``repeat``). The store is deleted afterwards unless ``keep``; ``write`` stores
    ``results.json`` in ``out``."""
    import torch

    from ..store import Architecture, Store

    say = progress or _silent
    mmlib_n, sizes = plan_sets(models, set_size, mmlib_fraction)
    folder = Path(out) / "store"
    shutil.rmtree(folder, ignore_errors=True)
    arch = Architecture.factory(torch.nn.Linear, in_features=2, out_features=1)
    pool = _tiny_models(max([mmlib_n, *sizes]))
    env = environment()
    build: dict[str, float] = {"baseline": 0.0, "mmlib-base": 0.0}
    refs: dict[str, Any] = {}
    try:
        store = Store(folder)
        t_build = time.perf_counter()
        with torch.no_grad():
            for j, size in enumerate(sizes):
                for m in pool[:size]:  # distinct parameters per set: no object is deduplicated
                    m.bias.add_(1.0)
                t0 = time.perf_counter()
                ref = store.save_set(pool[:size], f"linear-{j:03d}", approach="baseline", architecture=arch)
                build["baseline"] += time.perf_counter() - t0
                if j == len(sizes) // 2:
                    refs["baseline"] = ref
                if (j + 1) % 10 == 0 or j + 1 == len(sizes):
                    say(f"baseline sets: {j + 1}/{len(sizes)} saved ({build['baseline']:.1f} s)")
            for m in pool[:mmlib_n]:
                m.bias.add_(1.0)
        t0 = time.perf_counter()
        refs["mmlib-base"] = store.save_set(pool[:mmlib_n], "linear-mmlib", approach="mmlib-base",
                                            architecture=arch)
        build["mmlib-base"] = time.perf_counter() - t0
        say(f"mmlib-base set of {mmlib_n} saved ({build['mmlib-base']:.1f} s)")
        build_s = time.perf_counter() - t_build
        store.close()

        fresh = Store(folder)  # a new session: nothing cached in memory
        sets_runs, listed = [], 0
        for _ in range(max(1, repeat)):
            t0 = time.perf_counter()
            frame = fresh.sets()
            sets_runs.append(time.perf_counter() - t0)
            listed = len(frame)
        total_models = int(frame["models"].sum())
        recover: dict[str, dict[str, Any]] = {}
        for approach, ref in refs.items():
            runs = []
            for _ in range(max(1, repeat)):
                t0 = time.perf_counter()
                ms = fresh.recover_set(ref)
                ms.load()
                t1 = time.perf_counter()
                first = ms[0]
                t2 = time.perf_counter()
                assert isinstance(first, torch.nn.Linear)
                runs.append((t1 - t0, t2 - t1, t2 - t0))
                ms.close()
            best = sorted(runs, key=lambda r: r[2])[len(runs) // 2]
            recover[approach] = {"ref": str(ref), "models": len(ms), "recover_s": best[0],
                                 "first_model_s": best[1], "total_s": best[2]}
        fresh.close()
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
    sets_s = statistics.median(sets_runs)
    targets = [
        Target(f"store.sets() with {total_models:,} models in the catalog < 1 s", sets_s, TARGET_S, "<=", "s"),
    ]
    for approach, rec in recover.items():
        if approach == "mmlib-base":
            continue  # the reference approach: reported, no target
        targets.append(Target(
            f"recover_set({rec['ref']}).load() + ms[0] ({approach}, {rec['models']:,} models) < 1 s",
            rec["total_s"], TARGET_S, "<=", "s",
            f"load {rec['recover_s']:.4f} s + ms[0] {rec['first_model_s']:.4f} s",
        ))
    config = {"models": models, "set_size": set_size, "mmlib_fraction": mmlib_fraction, "repeat": repeat,
              "out": str(out), "plan": {"mmlib-base": mmlib_n, "baseline": sizes}}
    result = CatalogResult(total_models, listed, build_s, build, sets_s, listed, recover, targets, env, config)
    if write:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "results.json").write_text(json.dumps(result.to_json(), indent=2, default=str) + "\n")
    return result
