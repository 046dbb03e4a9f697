"""Issue 20's save-speed benchmark over the model zoo (``python -m mm_jupyter.bench zoo``).

For each architecture of :mod:`mm_jupyter.bench.zoo`, three models (seeds 0, 1, 2; random weights,
tiny configs) are saved as one set into a fresh store (``approach="baseline"``) and, as the limit,
their three state dicts are written with one ``torch.save`` and fsynced, in the same folder (same
disk). Rounds interleave the two (the order alternates) after one untimed warm-up of each (imports,
first-call caches); every timed operation starts after ``os.sync()`` with no garbage pending, so its
fsyncs write back only its own data. Per architecture: the median (min-max) of each and the ratio of
the medians; over the zoo: the median ratio against the goal.
"""
from __future__ import annotations

import os
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

#: the issue's goal: saving a set of 3 zoo models takes at most this many times one torch.save
GOAL = 1.5

#: the default subset (about 1 min on a loaded 2-core machine): every domain, encoders, decoders with
#: rotary positions and ALiBi, convolutional, windowed and hierarchical vision models, and both hand-built
#: timm patterns
QUICK = ("bert", "distilbert", "albert", "t5-encoder", "gpt2", "llama", "mistral", "qwen2", "phi", "bloom", "opt",
         "vit", "dinov2", "beit", "swin", "convnext", "resnet", "efficientnet", "levit", "wav2vec2", "hubert",
         "whisper-encoder", "timm-enum-attribute", "timm-tensor-cache")


@dataclass
class ZooRow:
    """One architecture's measurements (seconds per round), or why it could not be saved."""

    name: str
    domain: str
    state_bytes: int = 0
    store_s: list[float] = field(default_factory=list)
    torch_s: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def ratio(self) -> float | None:
        if self.error or not self.store_s or not self.torch_s:
            return None
        return statistics.median(self.store_s) / statistics.median(self.torch_s)


@dataclass
class ZooResult:
    rows: list[ZooRow]
    rounds: int
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]

    @property
    def median_ratio(self) -> float | None:
        ratios = [r.ratio for r in self.rows if r.ratio is not None]
        return statistics.median(ratios) if ratios else None

    @property
    def passed(self) -> bool:
        ratio = self.median_ratio
        return ratio is not None and ratio <= GOAL and not any(r.error for r in self.rows)


def _torch_save(models: Sequence[Any], path: Path) -> None:
    """The limit: one torch.save of the models' state dicts, then fsync."""
    import torch

    with open(path, "wb") as f:
        torch.save({f"m{i}": m.state_dict() for i, m in enumerate(models)}, f)
        f.flush()
        os.fsync(f.fileno())


def measure(name: str, rounds: int, folder: Path) -> ZooRow:
    """Interleaved rounds of saving entry ``name``'s three models into a fresh store and of one
    ``torch.save`` of their state dicts, both under ``folder``."""
    from ..errors import MMError
    from ..store import Store
    from .modelsets import _timed
    from .zoo import ZOO, build

    row = ZooRow(name, ZOO[name].domain)
    models = [build(name, seed) for seed in (0, 1, 2)]
    row.state_bytes = sum(t.numel() * t.element_size() for m in models for t in m.state_dict().values())
    counter = iter(range(10**6))

    def store_save() -> float:
        store = Store(folder / f"store-{next(counter)}")  # fresh: nothing to deduplicate against
        try:
            seconds, _ = _timed(lambda: store.save_set(models, name))
        finally:
            store.close()
        return seconds

    def torch_save() -> float:
        seconds, _ = _timed(lambda: _torch_save(models, folder / f"torch-{next(counter)}.pt"))
        return seconds

    try:
        store_save(), torch_save()  # warm-up, untimed
        for r in range(rounds):
            pair: list[Callable[[], float]] = [store_save, torch_save] if r % 2 == 0 else [torch_save, store_save]
            for fn in pair:
                (row.store_s if fn is store_save else row.torch_s).append(fn())
    except MMError as e:
        row.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return row


def run_zoo(names: Sequence[str], rounds: int = 3, folder: str | os.PathLike[str] | None = None,
            progress: Callable[[str], None] | None = None) -> ZooResult:
    """Measure every architecture of ``names``; the stores and files live in a temporary folder
    below ``folder`` (default: the system's temporary folder) and are removed afterwards."""
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(dir=folder, prefix="mm-zoo-bench-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, name in enumerate(names):
            if progress is not None:
                progress(f"{name} ({i + 1}/{len(names)})")
            sub = Path(tmp) / name
            sub.mkdir()
            rows.append(measure(name, rounds, sub))
    return ZooResult(rows, rounds, load_before, os.getloadavg())


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{1e3 * statistics.median(values):.1f} ({1e3 * min(values):.1f}-{1e3 * max(values):.1f})"


def format_zoo(result: ZooResult) -> str:
    """The table (milliseconds: median (min-max) over the rounds), the median ratio and its verdict."""
    header = ("architecture", "domain", "state KiB", "save_set ms", "torch.save ms", "ratio")
    cells = [header]
    for r in result.rows:
        shown = f"{r.ratio:.2f}x" if r.ratio is not None else f"error: {r.error}"
        cells.append((r.name, r.domain, f"{r.state_bytes / 1024:.0f}", _ms(r.store_s), _ms(r.torch_s), shown))
    widths = [max(len(c[i]) for c in cells if i < 5 or c is header) for i in range(len(header))]
    lines = []
    for j, c in enumerate(cells):
        lines.append("  ".join(v.ljust(w) if i < 2 else v.rjust(w) if i < 5 else v for i, (v, w) in
                               enumerate(zip(c, widths))).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    ratio = result.median_ratio
    measured = [r for r in result.rows if r.ratio is not None]
    failed = [r.name for r in result.rows if r.error]
    lines.append("")
    lines.append(f"median ratio over {len(measured)} architectures: "
                 f"{'-' if ratio is None else f'{ratio:.2f}x'} (goal <= {GOAL:g}x): "
                 f"{'PASS' if result.passed else 'FAIL'}" + (f"; not saved: {', '.join(failed)}" if failed else ""))
    lines.append("load average before: " + ", ".join(f"{v:.2f}" for v in result.load_before)
                 + "; after: " + ", ".join(f"{v:.2f}" for v in result.load_after))
    return "\n".join(lines)

