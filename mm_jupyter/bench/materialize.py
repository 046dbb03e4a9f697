"""Materialising every module of a stored set: ``list(ms)`` against what a user would write.

The reference is the plain loop a user writes without a store: construct the model, then
``load_state_dict`` with its tensors. ``list(ms)`` must be no slower. Two sets are measured, both
N FFNN-48 models saved as ``baseline``: one built by the ``@mm.architecture`` factory (factory
record) and one of plain ``nn.Sequential`` models (structural record). For reference the old
path, ``copy.deepcopy`` of a template plus ``load_state_dict``, is timed too. Every timing is the
median of ``repeat`` interleaved runs, each on a freshly recovered (and fully loaded) ModelSet, so
all variants read the same verified, mapped tensors.
"""
from __future__ import annotations

import copy
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable

from .modelsets import Target, environment

Progress = Callable[[str], None]


def _silent(_: str) -> None:
    pass


@dataclass
class MaterializeResult:
    """Seconds per variant and record kind (median of the repeats) and the target."""

    models: int
    repeat: int
    rows: list[dict[str, Any]]
    targets: list[Target]
    environment: dict[str, Any]


def _plain_ffnn(hidden: int = 48, inputs: int = 5, layers: int = 3) -> Any:
    """The FFNN-48 layers as a plain ``nn.Sequential`` (no factory tag: a structural record)."""
    from torch import nn

    mods: list[nn.Module] = [nn.Linear(inputs, hidden, bias=False), nn.ReLU()]
    for _ in range(layers - 1):
        mods += [nn.Linear(hidden, hidden), nn.ReLU()]
    mods.append(nn.Linear(hidden, 1))
    return nn.Sequential(*mods)


def run_materialize(models: int = 5000, repeat: int = 3, progress: Progress = _silent) -> MaterializeResult:
    """Save two N-model sets, then time ``list(ms)``, the construct-and-load loop and the
    deepcopy-and-load loop, interleaved, ``repeat`` times each."""
    import torch

    from mm_jupyter.usecases.models import ffnn

    from ..store import Store

    builders: dict[str, Callable[[], Any]] = {"factory": ffnn, "structure": _plain_ffnn}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="mm-bench-materialize-") as tmp:
        store = Store(tmp)
        for kind, build in builders.items():
            progress(f"saving {models} {kind} models")
            torch.manual_seed(0)
            store.save_set([build() for _ in range(models)], kind)
        for kind, build in builders.items():
            times: dict[str, list[float]] = {"list(ms)": [], "construct + load_state_dict": [],
                                             "deepcopy + load_state_dict": []}

            def fresh() -> Any:
                return store.recover_set(kind).load()

            def listing(ms: Any) -> None:
                list(ms)

            def construct(ms: Any) -> None:
                for i in range(len(ms)):
                    m = build()
                    m.load_state_dict(ms.state_dict(i))

            def deep(ms: Any) -> None:
                template = build()
                for i in range(len(ms)):
                    m = copy.deepcopy(template)
                    m.load_state_dict(ms.state_dict(i))

            variants = {"list(ms)": listing, "construct + load_state_dict": construct,
                        "deepcopy + load_state_dict": deep}
            for r in range(repeat):
                for name, fn in variants.items():
                    progress(f"{kind}: {name} ({r + 1}/{repeat})")
                    ms = fresh()
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        fn(ms)
                    times[name].append(time.perf_counter() - t0)
                    ms.close()
            ref = statistics.median(times["construct + load_state_dict"])
            for name, ts in times.items():
                med = statistics.median(ts)
                rows.append({"record": kind, "variant": name, "s": med, "min_s": min(ts), "max_s": max(ts),
                             "vs_construct": med / ref, "per_model_us": 1e6 * med / models})
        store.close()
    targets = []
    for kind in builders:
        ratio = next(r["vs_construct"] for r in rows if r["record"] == kind and r["variant"] == "list(ms)")
        targets.append(Target(f"list(ms) vs construct + load_state_dict ({kind} record)", ratio, 1.0, "<=", "x",
                              "median of interleaved runs; the ModelSet is fully loaded before timing"))
    return MaterializeResult(models, repeat, rows, targets, environment())
