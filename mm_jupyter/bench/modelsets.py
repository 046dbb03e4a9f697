"""The Efficient Multi-Model Management experiment: save and recover evolving sets of models.

Workload (the paper's battery use case):

- **U1**: ``models`` freshly initialised models of one architecture (seeded).
- **U3** x ``steps``: each step retrains ``update_rate`` of the models, chosen by a seeded RNG; half
  of them fully (``scope="all"``), half only their last layer (``scope="last"``). The retraining is
  real: one ``mm.Provenance`` per step, ``prov.run`` produces the updated models.

Every approach saves exactly these model sets, each into its own fresh store:

- ``mmlib-base`` and ``baseline``: every step as a complete new version;
- ``update``: U1 in full (``approach="update"``, no base), each U3 step as a delta to the previous
  version;
- ``provenance``: U1 as ``baseline``, each U3 step as ``provenance`` (recovery retrains).

Metrics per approach and step: storage (bytes the version added to the store), time-to-save (TTS,
wall clock of ``save_set``) and time-to-recover (TTR, median over ``repeat`` runs of
``store.recover_set(ref).load()``, which verifies and maps every parameter; min and max kept). The
approaches run **interleaved** — per step each saves in turn, then each recovers once per round —
so load on a shared machine affects all of them alike instead of whichever happened to run then. The OS page cache is
not dropped between save and recovery, so TTR is a **warm-cache** number. A ``limit`` row per step
writes the same number of parameter bytes with one ``safetensors.torch.save_file`` + ``fsync``
(limit TTS) and reads them back with ``load_file`` + one pass over the bytes (limit TTR: an xor
over 64-bit words, no hashing, so it is a lower bound that verifies nothing). For reference the
limit row also records one ``save_file`` of every model's state dict (what a user would write with
safetensors) and the time to read the models' state without writing (``extract_states``: the walk
over thousands of modules that any save of ``nn.Module`` objects pays and the limit does not).
Each timed operation starts after ``os.sync()``, so its fsync writes back only its own data.
"""
from __future__ import annotations

import gc
import math
import os
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from ..store.environment import environment as store_environment
from ..store.files import fsync_path
from ..store.tensors import extract_states
from . import results as results_files

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from torch import nn

    from ..store import DatasetRef, ModelSet, Provenance

APPROACHES: tuple[str, ...] = ("mmlib-base", "baseline", "update", "provenance")
LIMIT = "limit"
DEFAULT_OUT = Path("bench_results") / "modelsets"
#: ``--quick``: a small run for tests and smoke checks.
QUICK: dict[str, int] = {"models": 500, "repeat": 1}
#: models per set by default: the paper's 5,000 with ``MM_JUPYTER_FULL=1``; 1,000 otherwise, so that the default
#: (every approach, three U3 steps, three recoveries, faithful MMlib-base) finishes in minutes on a 2-core machine.
#: The storage targets are per model, so they hold at either size.
DEFAULT_MODELS = 1000
FULL_MODELS = 5000
#: ``--scale``: (models per set, TTR repetitions); the paper's is 5,000 models and the median of five runs
SCALES: dict[str, tuple[int, int]] = {"quick": (QUICK["models"], QUICK["repeat"]), "cpu": (DEFAULT_MODELS, 3),
                                      "paper": (FULL_MODELS, 5)}


def default_models() -> int:
    """Models per set when ``--models`` is not given: ``FULL_MODELS`` under ``MM_JUPYTER_FULL=1``."""
    return FULL_MODELS if os.environ.get("MM_JUPYTER_FULL") == "1" else DEFAULT_MODELS


def default_out(arch: str, models: int, update_rate: float) -> Path:
    """The results folder of one configuration, so runs of other configurations are kept beside it."""
    return DEFAULT_OUT / f"{arch}-{models}-u{round(100 * update_rate)}"

Progress = Callable[[str], None]


def _silent(_: str) -> None:
    pass


# -- architectures ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ArchSpec:
    """One model architecture of the experiment and how its models are built, fed and trained."""

    key: str
    description: str
    params: int
    train: str  # ``module:qualname`` of the training function recorded in provenance

    def initial_models(self, n: int, seed: int = 0) -> list["nn.Module"]:
        """``n`` seeded, freshly initialised models (model ``i`` from seed ``seed + i``)."""
        if self.key == "cnn":
            from ..usecases.training_cnn import initial_models as cnns

            return cnns(n, seed=seed)
        from ..usecases.training import initial_models as ffnns

        return ffnns(n, hidden=int(self.key.removeprefix("ffnn")), seed=seed)

    def dataset(self, model: int, version: int) -> "DatasetRef":
        """The training data of model ``model`` at U3 step ``version``."""
        if self.key == "cnn":
            from ..usecases.images import image_ref

            return image_ref(model, version)
        from ..usecases.battery import cell_ref

        return cell_ref(model, version=version)


ARCHS: dict[str, ArchSpec] = {
    "ffnn48": ArchSpec("ffnn48", "FFNN-48 battery-cell voltage model", 4_993, "mm_jupyter.usecases.training:train"),
    "ffnn69": ArchSpec("ffnn69", "FFNN-69 battery-cell voltage model", 10_075, "mm_jupyter.usecases.training:train"),
    "cnn": ArchSpec("cnn", "CIFAR-style CNN on synthetic images", 6_918, "mm_jupyter.usecases.training_cnn:train"),
}


# -- workload --------------------------------------------------------------------------------------
@dataclass
class Step:
    """One version of the set: U1 (``index`` 0) or the U3 step ``index``."""

    index: int
    models: list["nn.Module"]
    provenance: "Provenance | None" = None
    full: list[str] = field(default_factory=list)      # retrained with scope "all"
    partial: list[str] = field(default_factory=list)   # retrained with scope "last"
    build_s: float = 0.0                               # time to initialise (U1) or retrain (U3)

    @property
    def kind(self) -> str:
        return "U1" if self.index == 0 else "U3"


@dataclass
class Workload:
    """The model sets every approach saves: U1 followed by the U3 steps."""

    arch: str
    n: int
    update_rate: float
    seed: int
    steps: list[Step]

    @property
    def names(self) -> list[str]:
        return [str(i) for i in range(self.n)]


def choose_updates(n: int, update_rate: float, step: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """(fully, partially) retrained model indices of U3 step ``step``, from a seeded RNG.

    ``round(n * update_rate)`` models are chosen; the first half (rounded up) is retrained fully.
    """
    count = min(n, max(0, int(round(n * update_rate))))
    rng = np.random.default_rng([int(seed), int(step)])
    chosen = rng.permutation(n)[:count]
    n_full = count - count // 2
    return sorted(int(i) for i in chosen[:n_full]), sorted(int(i) for i in chosen[n_full:])


def build_workload(arch: str = "ffnn48", models: int = 5000, steps: int = 3, update_rate: float = 0.10,
                   seed: int = 0, epochs: int = 2, progress: Progress = _silent) -> Workload:
    """Initialise U1 and run ``steps`` real U3 retraining steps (one ``mm.Provenance`` each)."""
    from ..store import Provenance

    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    if models < 1 or steps < 0 or not 0.0 <= update_rate <= 1.0:
        raise ValueError("models must be >= 1, steps >= 0 and update_rate in [0, 1]")
    spec = ARCHS[arch]
    t0 = time.perf_counter()
    initial = spec.initial_models(models, seed=seed)
    out = [Step(0, initial, build_s=time.perf_counter() - t0)]
    progress(f"U1: {models} x {arch} initialised in {out[0].build_s:.1f} s")
    names = [str(i) for i in range(models)]
    for s in range(1, steps + 1):
        full, partial = choose_updates(models, update_rate, s, seed)
        updated = sorted(full + partial)
        prov = Provenance(
            train=spec.train,
            config={"epochs": int(epochs)},
            datasets={names[i]: spec.dataset(i, s) for i in updated},
            seed=seed + s,
            configs={names[i]: {"scope": "last"} for i in partial},
        )
        current = dict(zip(names, out[-1].models))
        t0 = time.perf_counter()
        trained = prov.run(current, [names[i] for i in updated])
        took = time.perf_counter() - t0
        step_models = [trained.get(nm, current[nm]) for nm in names]
        out.append(Step(s, step_models, prov, [names[i] for i in full], [names[i] for i in partial], took))
        progress(f"U3 step {s}: retrained {len(full)} fully + {len(partial)} last-layer in {took:.1f} s")
    return Workload(arch, models, update_rate, seed, out)


# -- measuring ---------------------------------------------------------------------------------------
def save_kwargs(approach: str, step: Step) -> dict[str, Any]:
    """``store.save_set`` keyword arguments of ``approach`` for one step of the workload."""
    if approach in ("mmlib-base", "baseline"):
        return {"approach": approach}
    if approach == "update":
        return {"approach": "update"}
    if approach == "provenance":
        if step.index == 0:
            return {"approach": "baseline"}
        return {"approach": "provenance", "provenance": step.provenance}
    raise ValueError(f"unknown approach {approach!r}; choose from {', '.join(APPROACHES)}")


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall clock of ``fn``, started with no garbage pending and no dirty pages left by earlier
    work, so an fsync inside ``fn`` writes back only ``fn``'s own data. What survives the collection
    (the workload, modules torch imports lazily, kept results) is frozen, so the next step's collection
    scans only what came after it (49 full scans of everything cost a sixth of a run)."""
    gc.collect()
    gc.freeze()
    os.sync()
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def _recover(store: Any, ref: Any) -> "ModelSet":
    ms: ModelSet = store.recover_set(ref)
    ms.load()
    return ms


def flat_states(models: Sequence["nn.Module"]) -> tuple[list[str], list["torch.Tensor"]]:
    """(keys, per-key stacked tensors (models, *shape)) of in-memory models' state dicts."""
    import torch

    sds = [m.state_dict() for m in models]
    keys = list(sds[0])
    return keys, [torch.stack([sd[k].detach() for sd in sds]) for k in keys]


def _bytes(t: "torch.Tensor") -> "torch.Tensor":
    import torch

    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def verify_recovered(ms: "ModelSet", models: Sequence["nn.Module"], names: Sequence[str]) -> str | None:
    """None when ``ms`` holds exactly ``models`` (names, keys, dtypes, every byte), else why not."""
    import torch

    if ms.names != list(names):
        return f"names differ ({len(ms)} recovered, {len(names)} expected)"
    keys, stacked = flat_states(models)
    if ms.layout.keys != keys:
        return f"keys differ: {ms.layout.keys} != {keys}"
    for k, (key, want) in enumerate(zip(keys, stacked)):
        got = ms.stacked(k)
        if got.dtype != want.dtype or got.shape != want.shape:
            return f"{key}: {got.dtype}{list(got.shape)} != {want.dtype}{list(want.shape)}"
        if not torch.equal(_bytes(got), _bytes(want)):
            bad = int((got != want).reshape(len(want), -1).any(1).nonzero()[0, 0])
            return f"{key}: model {names[bad]!r} differs"
    last = len(ms) - 1
    for key, t in ms[last].state_dict().items():  # one module built from the recovered set
        if not torch.equal(_bytes(t), _bytes(stacked[keys.index(key)][last])):
            return f"ms[{last}] tensor {key} differs"
    return None


def run_approaches(approaches: Sequence[str], workload: Workload, out: Path, repeat: int = 3, check: bool = False,
                   keep: bool = False, progress: Progress = _silent) -> list[dict[str, Any]]:
    """Save every step of ``workload`` with each approach into its own fresh store at
    ``out/<approach>``; one row per step and approach with storage, TTS and TTR.

    The approaches are **interleaved** so that a burst of load on a shared machine hits all of them
    alike: per step every approach saves (in an order rotated per step), then ``repeat`` rounds
    recover every approach's version once each (the order rotated per round). TTR is the median of
    the rounds, with min and max kept; TTS is one save per step (a save changes the store, so it
    cannot be repeated on the same state; the steps give the spread)."""
    from ..store import Store

    out = Path(out)
    stores: dict[str, Any] = {}
    rows = []
    name = workload.arch
    try:
        for a in approaches:
            shutil.rmtree(out / a, ignore_errors=True)
            stores[a] = Store(out / a)
        for step in workload.steps:
            k = step.index % len(approaches)
            order = list(approaches[k:]) + list(approaches[:k])
            saved: dict[str, tuple[float, Any]] = {}
            for a in order:
                kwargs = save_kwargs(a, step)
                saved[a] = _timed(lambda: stores[a].save_set(step.models, name, **kwargs))
            ttrs: dict[str, list[float]] = {a: [] for a in approaches}
            last: dict[str, Any] = {}
            for r in range(max(1, repeat)):
                j = r % len(order)
                for a in order[j:] + order[:j]:
                    if a in last:
                        last.pop(a).close()
                    took, last[a] = _timed(lambda: _recover(stores[a], saved[a][1]))
                    ttrs[a].append(took)
            for a in approaches:
                ms = last.pop(a)
                problem = verify_recovered(ms, step.models, workload.names) if check else None
                ms.close()
                del ms
                tts, ref = saved[a]
                rows.append(_row(workload, step, a, stores[a].stats(ref), tts, ttrs[a], check, problem))
                progress(f"{a:>10} step {step.index}: {rows[-1]['bytes']:,} B  TTS {tts:.3f} s  TTR "
                         f"{rows[-1]['ttr_s']:.3f} s ({rows[-1]['ttr_min_s']:.3f}-{rows[-1]['ttr_max_s']:.3f})"
                         + (f"  verified={rows[-1]['verified']}" if check else ""))
    finally:
        for a, store in stores.items():
            store.close()
            if not keep:
                shutil.rmtree(out / a, ignore_errors=True)
    return rows


def _row(workload: Workload, step: Step, approach: str, stats: dict[str, Any], tts: float, ttrs: list[float],
         check: bool, problem: str | None) -> dict[str, Any]:
    return {
        "arch": workload.arch,
        "models": workload.n,
        "step": step.index,
        "kind": step.kind,
        "approach": approach,
        "stored_as": stats["approach"],
        "ref": stats["ref"],
        "chain": stats["chain"],
        "updated": len(step.full) + len(step.partial),
        "bytes": int(stats["bytes"]),
        "parameter_bytes": int(stats["parameter_bytes"]),
        "tts_s": tts,
        "tts_store_s": float(stats["tts_s"]),
        "ttr_s": statistics.median(ttrs),
        "ttr_min_s": min(ttrs),
        "ttr_max_s": max(ttrs),
        "ttr_runs_s": ttrs,
        "verified": (problem is None) if check else None,
        "problem": problem,
        "note": "TTR includes retraining" if stats["approach"] == "provenance" else "",
    }


def _flat_bytes(models: Sequence["nn.Module"]) -> "torch.Tensor":
    import torch

    parts = [t.detach().contiguous().reshape(-1).view(torch.uint8) for m in models for t in m.state_dict().values()]
    return torch.cat(parts)


def touch(t: "torch.Tensor") -> int:
    """One pass over every byte of ``t`` (xor of its 64-bit words, then of the tail bytes): the
    cheapest read that makes all of a loaded tensor's bytes resident and used."""
    raw = _bytes(t).numpy()
    words = len(raw) // 8
    acc = int(np.bitwise_xor.reduce(raw[: words * 8].view(np.uint64))) if words else 0
    for b in raw[words * 8 :].tolist():
        acc ^= b
    return acc




def run_limit(workload: Workload, folder: Path, repeat: int = 3, keep: bool = False,
              progress: Progress = _silent) -> list[dict[str, Any]]:
    """The limit rows: per step, one safetensors file holding the step's parameter bytes as one
    flat tensor. TTS = ``save_file`` + ``fsync``; TTR = ``load_file`` + one pass over the bytes."""
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for step in workload.steps:
            flat = _flat_bytes(step.models)
            path = folder / f"step{step.index}.safetensors"
            tts_runs, ttr_runs = [], []
            for _ in range(max(1, repeat)):
                path.unlink(missing_ok=True)

                def write() -> None:
                    save_file({"params": flat}, str(path))
                    fsync_path(path)

                tts_runs.append(_timed(write)[0])
            # for reference, what a user would write with safetensors: every state dict, one file
            named_path = folder / f"step{step.index}-state-dicts.safetensors"
            named_runs = []
            for _ in range(max(1, repeat)):
                named_path.unlink(missing_ok=True)

                def write_named() -> None:
                    save_file({f"{i}.{k}": t.detach().contiguous() for i, m in enumerate(step.models)
                               for k, t in m.state_dict().items()}, str(named_path))
                    fsync_path(named_path)

                named_runs.append(_timed(write_named)[0])
            named_path.unlink(missing_ok=True)
            # what any save of these nn.Modules must do before it writes a byte: visit every model
            walk_runs = [_timed(lambda: extract_states(step.models, workload.names))[0]
                         for _ in range(max(1, repeat))]

            def read() -> int:
                return touch(load_file(str(path))["params"])

            for _ in range(max(1, repeat)):
                took, total = _timed(read)
                ttr_runs.append(took)
            assert total == touch(flat)
            row = {
                "arch": workload.arch, "models": workload.n, "step": step.index, "kind": step.kind,
                "approach": LIMIT, "stored_as": "safetensors file", "ref": path.name, "chain": 0,
                "updated": len(step.full) + len(step.partial), "bytes": path.stat().st_size,
                "parameter_bytes": int(flat.numel()), "tts_s": statistics.median(tts_runs),
                "tts_store_s": None, "ttr_s": statistics.median(ttr_runs), "ttr_min_s": min(ttr_runs),
                "ttr_max_s": max(ttr_runs), "ttr_runs_s": ttr_runs,
                "verified": None, "problem": None, "note": "save_file+fsync / load_file+xor pass",
                "tts_state_dicts_s": statistics.median(named_runs),
                "state_walk_s": statistics.median(walk_runs),
            }
            rows.append(row)
            progress(f"{LIMIT:>10} step {step.index}: {row['bytes']:,} B  TTS {row['tts_s']:.3f} s  "
                     f"TTR {row['ttr_s']:.3f} s  (all state dicts in one safetensors file: TTS "
                     f"{row['tts_state_dicts_s']:.3f} s; reading the models' state, no writes: "
                     f"{row['state_walk_s']:.3f} s)")
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
    return rows


# -- ratios and targets ---------------------------------------------------------------------------------
def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or (isinstance(b, float) and math.isnan(b)):
        return None
    return a / b


def add_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per row: TTS / limit TTS, mmlib-base TTS / TTS, mmlib-base TTR / TTR, bytes / baseline bytes
    (each against the same step; None where the reference approach was not run)."""
    by = {(r["step"], r["approach"]): r for r in rows}
    for r in rows:
        lim, mm, base = by.get((r["step"], LIMIT)), by.get((r["step"], "mmlib-base")), by.get((r["step"], "baseline"))
        r["tts_vs_limit"] = _ratio(r["tts_s"], lim["tts_s"]) if lim else None
        r["mmlib_tts_speedup"] = _ratio(mm["tts_s"], r["tts_s"]) if mm else None
        r["mmlib_ttr_speedup"] = _ratio(mm["ttr_s"], r["ttr_s"]) if mm else None
        r["storage_vs_baseline"] = _ratio(r["bytes"], base["bytes"]) if base else None
    return rows


@dataclass
class Target:
    """One of the issue's targets, evaluated on this run's rows."""

    name: str
    measured: float | None
    threshold: float
    comparison: str   # "<=" or ">="
    unit: str
    detail: str = ""

    @property
    def passed(self) -> bool | None:
        if self.measured is None:
            return None
        return self.measured <= self.threshold if self.comparison == "<=" else self.measured >= self.threshold

    @property
    def status(self) -> str:
        return {True: "PASS", False: "FAIL", None: "SKIP"}[self.passed]

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"passed": self.passed, "status": self.status}


#: the paper's MMlib-base for FFNN-48: ~140.3 MB per version of 5,000 models (~8 KB of metadata per model)
PAPER_MMLIB_BYTES_PER_MODEL = 140.3e6 / 5000


def evaluate_targets(rows: list[dict[str, Any]]) -> list[Target]:
    """The issue's targets from this run's rows (worst step where a target holds for every step)."""
    by = {(r["step"], r["approach"]): r for r in rows}
    steps = sorted({r["step"] for r in rows})
    u3 = [s for s in steps if s > 0]

    def pairs(a: str, b: str, which: list[int]) -> list[tuple[int, dict[str, Any], dict[str, Any]]]:
        return [(s, by[(s, a)], by[(s, b)]) for s in which if (s, a) in by and (s, b) in by]

    def worst(values: list[tuple[int, float]], pick: Callable[..., Any]) -> tuple[float | None, str]:
        if not values:
            return None, "not measured (approach not run)"
        s, v = pick(values, key=lambda x: x[1])
        return v, f"worst at step {s}; per step: " + ", ".join(f"{st}: {val:.4g}" for st, val in values)

    out = []
    v, d = worst([(s, b["tts_s"] / lim["tts_s"]) for s, b, lim in pairs("baseline", LIMIT, steps)], max)
    named = [(s, b["tts_s"] / lim["tts_state_dicts_s"]) for s, b, lim in pairs("baseline", LIMIT, steps)
             if lim.get("tts_state_dicts_s")]
    if named:
        d += "; against one safetensors file of all state dicts: " + ", ".join(f"{st}: {val:.3g}x" for st, val in named)
    walks = [(s, lim["state_walk_s"] / lim["tts_s"]) for s, _, lim in pairs("baseline", LIMIT, steps)
             if lim.get("state_walk_s")]
    if walks:
        d += ("; reading the models' state alone takes " + ", ".join(f"{st}: {val:.3g}x" for st, val in walks)
              + " the limit")
    out.append(Target("Baseline TTS <= 1.5x limit write", v, 1.5, "<=", "x limit", d))
    v, d = worst([(s, m["tts_s"] / b["tts_s"]) for s, m, b in pairs("mmlib-base", "baseline", steps)], min)
    out.append(Target("Baseline TTS >= 15x faster than mmlib-base", v, 15.0, ">=", "x faster", d))
    v, d = worst([(s, m["ttr_s"] / b["ttr_s"]) for s, m, b in pairs("mmlib-base", "baseline", steps)], min)
    out.append(Target("Baseline TTR >= 30x faster than mmlib-base", v, 30.0, ">=", "x faster", d))
    v, d = worst([(s, float(b["bytes"] - b["parameter_bytes"])) for s, b, _ in pairs("baseline", "baseline", steps)],
                 max)
    out.append(Target("Baseline storage <= parameter bytes + 4 KiB per set", v, 4096.0, "<=", "bytes overhead", d))
    v, d = worst([(s, 100.0 * u["bytes"] / b["bytes"]) for s, u, b in pairs("update", "baseline", u3)], max)
    out.append(Target("Update storage per U3 step <= 11% of Baseline's", v, 11.0, "<=", "% of baseline", d))
    v, d = worst([(s, 100.0 * p["bytes"] / b["bytes"]) for s, p, b in pairs("provenance", "baseline", u3)], max)
    out.append(Target("Provenance storage per U3 step <= 0.1% of Baseline's", v, 0.1, "<=", "% of baseline", d))
    # the paper's MMlib-base (FFNN-48: ~140.3 MB per version of 5,000 models) and Baseline's saving
    # against it (29%), per model so any set size compares
    ffnn48 = [(s, m) for s, m, _ in pairs("mmlib-base", "baseline", steps) if m.get("arch", "ffnn48") == "ffnn48"]
    v, d = worst([(s, 100.0 * abs(m["bytes"] / m["models"] / PAPER_MMLIB_BYTES_PER_MODEL - 1)) for s, m in ffnn48],
                 max)
    out.append(Target("MMlib-base storage per version within 15% of the paper's (FFNN-48)", v, 15.0, "<=",
                      "% off", d + f"; paper: {PAPER_MMLIB_BYTES_PER_MODEL:,.0f} B per model" if v is not None else d))
    v, d = worst([(s, abs(100.0 * (1 - b["bytes"] / m["bytes"]) - 30.0))
                  for s, m, b in pairs("mmlib-base", "baseline", steps)
                  if m.get("arch", "ffnn48") == "ffnn48"], max)
    if v is not None:
        d += "; savings per step: " + ", ".join(f"{st}: {100 * (1 - b['bytes'] / m['bytes']):.1f}%"
                                                for st, m, b in pairs("mmlib-base", "baseline", steps))
    out.append(Target("Baseline saving vs MMlib-base within 25-35% (FFNN-48)", v, 5.0, "<=", "points off 30%", d))
    last = u3[-1:] if u3 else []
    got = pairs("update", "baseline", last)
    v = got[0][1]["ttr_s"] / got[0][2]["ttr_s"] if got else None
    d = (f"step {last[0]}: update {got[0][1]['ttr_s']:.4f} s vs baseline {got[0][2]['ttr_s']:.4f} s"
         if got else "not measured (approach not run or no U3 step)")
    out.append(Target(f"Update TTR after {len(u3)} U3 steps <= 3x Baseline's", v, 3.0, "<=", "x baseline", d))
    return out


# -- the whole experiment ---------------------------------------------------------------------------
@dataclass
class ModelsetsResult:
    """Rows (one per step and approach, plus the limit), targets and the run's environment."""

    rows: list[dict[str, Any]]
    targets: list[Target]
    config: dict[str, Any]
    environment: dict[str, Any]
    timings: dict[str, float]
    files: list[str] = field(default_factory=list)

    def frame(self) -> "pd.DataFrame":
        import pandas as pd

        return pd.DataFrame(self.rows)

    def to_json(self) -> dict[str, Any]:
        return {
            "experiment": "modelsets",
            "config": self.config,
            "environment": self.environment,
            "timings": self.timings,
            "rows": self.rows,
            "targets": [t.to_json() for t in self.targets],
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any], files: Sequence[str] = ()) -> "ModelsetsResult":
        """A result read back from its ``results.json``."""
        fields = ("name", "measured", "threshold", "comparison", "unit", "detail")
        targets = [Target(**{k: t[k] for k in fields}) for t in doc["targets"]]
        return cls(doc["rows"], targets, doc["config"], doc["environment"], doc["timings"], list(files))


def environment() -> dict[str, Any]:
    """Where the numbers were taken (and that recovery ran against a warm page cache)."""
    import torch

    return store_environment() | {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cache": "warm: the OS page cache is not dropped between save and recovery (TTR is warm-cache)",
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def run_modelsets(arch: str = "ffnn48", models: int = 5000, steps: int = 3, update_rate: float = 0.10,
                  approaches: Sequence[str] = APPROACHES, out: str | os.PathLike[str] = DEFAULT_OUT,
                  repeat: int = 3, keep: bool = False, check: bool = False, seed: int = 0, epochs: int = 2,
                  threads: int | None = None, write: bool = True, reuse: bool = False,
                  progress: Progress | None = None) -> ModelsetsResult:
    """Run the experiment; returns rows, targets and environment, and (``write``) stores
    ``results.csv`` and ``results.json`` in ``out``. ``check`` verifies every recovered set bit for
    bit against the in-memory models (rows get ``verified``). ``threads`` sets torch's intra-op
    threads for the run (default: leave torch's setting; on a busy machine 1 gives steadier TTRs).
    With ``reuse``, the ``results.json`` in ``out`` of the same code and arguments is returned instead
    of running again (``results.py``: the tests and notebook 03 share one run)."""
    import torch

    args = {"arch": arch, "models": models, "steps": steps, "update_rate": update_rate,
            "approaches": list(approaches), "repeat": repeat, "check": check, "seed": seed, "epochs": epochs}
    if reuse and write:
        path = Path(out) / "results.json"
        doc = results_files.load(path, args)
        if doc is not None:
            (progress or _silent)(f"{arch}: the results of the same code and arguments in {path}")
            return ModelsetsResult.from_json(doc, [str(Path(out) / "results.csv"), str(path)])

    before = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ValueError("threads must be at least 1")
        torch.set_num_threads(threads)
    # every timed step starts with a full collection (_timed) and freezes what survives it, so each one
    # scans only what the previous step left; objects older than the run are frozen out of the first one.
    # The run unfreezes at its end, unless its caller had frozen objects of its own (the test suite does):
    # those stay frozen, and so do the run's survivors (freed by reference counting as usual)
    ours = gc.get_freeze_count() == 0
    if ours:
        gc.collect()
        gc.freeze()
    try:
        result = _run_modelsets(arch, models, steps, update_rate, approaches, out, repeat, keep, check, seed,
                                epochs, progress)
    finally:
        if ours:
            gc.unfreeze()
        torch.set_num_threads(before)
    if write:
        result.files = write_results(result, out, args)
    return result


def _run_modelsets(arch: str, models: int, steps: int, update_rate: float, approaches: Sequence[str],
                   out: str | os.PathLike[str], repeat: int, keep: bool, check: bool, seed: int, epochs: int,
                   progress: Progress | None) -> ModelsetsResult:
    say = progress or _silent
    unknown = [a for a in approaches if a not in APPROACHES]
    if unknown:
        raise ValueError(f"unknown approach(es) {unknown}; choose from {', '.join(APPROACHES)}")
    if repeat < 1:
        raise ValueError("repeat must be at least 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {"arch": arch, "models": models, "steps": steps, "update_rate": update_rate,
              "approaches": list(approaches), "repeat": repeat, "seed": seed, "epochs": epochs,
              "check": check, "out": str(out)}
    env = environment()
    t_start = time.perf_counter()
    workload = build_workload(arch, models, steps, update_rate, seed, epochs, say)
    timings = {"initialise_s": workload.steps[0].build_s,
               "retrain_s": sum(s.build_s for s in workload.steps[1:])}
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    rows += run_limit(workload, out / LIMIT, repeat, keep, say)
    timings[f"{LIMIT}_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    asked = [a for a in APPROACHES if a in approaches]  # the fixed order, whatever order they were asked in
    rows += run_approaches(asked, workload, out, repeat, check, keep, say)
    timings["approaches_s"] = time.perf_counter() - t0
    order = {a: i for i, a in enumerate((*APPROACHES, LIMIT))}
    rows.sort(key=lambda r: (r["step"], order[r["approach"]]))
    add_ratios(rows)
    timings["total_s"] = time.perf_counter() - t_start
    return ModelsetsResult(rows, evaluate_targets(rows), config, env, timings)


def write_results(result: ModelsetsResult, out: str | os.PathLike[str], args: dict[str, Any] | None = None
                  ) -> list[str]:
    """``results.csv`` (one row per step and approach) and ``results.json`` (rows, environment,
    config, timings, targets; with the arguments and code fingerprint ``results.save`` adds) in ``out``;
    returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    frame = result.frame()
    frame["ttr_runs_s"] = frame["ttr_runs_s"].map(lambda v: ";".join(f"{x:.6f}" for x in v))
    csv = out / "results.csv"
    frame.to_csv(csv, index=False)
    js = results_files.save(out / "results.json", result.to_json(), args or result.config)
    return [str(csv), str(js)]
