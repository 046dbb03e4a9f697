"""Transfer learning on scikit-learn's digits (the course's Exercise 2), as library functions.

The exercise: a small CNN is *pre-trained* on one part of the classes (digits 0-4, all their
examples) and then adapted to a *target task* on the other classes (digits 5-9) from only a few
labelled examples per class. Five strategies are compared on accuracy and training time:

* ``scratch``: a fresh CNN trained on the few target examples only (no transfer);
* ``finetune``: the pre-trained CNN with a new head, every parameter trained;
* ``freeze-early``: the first block frozen (generic edge detectors), the rest trained;
* ``freeze-most``: every block but the last frozen;
* ``probe``: every block frozen, only the new head trained (a linear probe on fixed features).

Everything is built from code and the digits bundled with scikit-learn (no download). Training
runs on one intra-op thread under a forked, seeded RNG, so a seed gives the same bytes and the
same accuracies on the same software environment, and the caller's RNG state is left untouched.
``model_zoo`` derives further pre-trained candidates from the pre-trained CNN (frozen prefixes, so
they share blocks) for the model-search part of the exercise.
"""
from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from ..modelsearch.blocks import Block
from ..modelsearch.hashing import block_id
from ..modelsearch.splitting import split_model
from ..store.approaches.provenance import record
from ..store.architectures import Architecture
from ..store.provenance import DatasetRef, Provenance
from ..store.trust import trusted
from .candidates import clone_module, digits, digits_cnn

if TYPE_CHECKING:
    import pandas as pd

SOURCE_CLASSES: tuple[int, ...] = (0, 1, 2, 3, 4)
TARGET_CLASSES: tuple[int, ...] = (5, 6, 7, 8, 9)
STRATEGIES: tuple[str, ...] = ("scratch", "finetune", "freeze-early", "freeze-most", "probe")
#: Training defaults: Adam on mini-batches; few-shot runs are short, so epochs are many.
PRETRAIN_EPOCHS = 8
TARGET_EPOCHS = 40
LR = 3e-3
BATCH_SIZE = 32

Data = tuple[Tensor, Tensor]
M = TypeVar("M", bound=nn.Module)


@contextmanager
def _deterministic(seed: int) -> Iterator[None]:
    """Seeded torch RNG (forked: the caller's state is restored) and one intra-op thread, because
    multi-threaded CPU reductions may sum in another order and change the trained bytes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(threads)


# -- the task -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TransferTask:
    """Source data (pre-training), the few labelled target examples, a labelled target pool (for
    model search) and a held-out target test set. Target labels are remapped to ``0..C-1``."""

    source: Data
    target_train: Data
    target_pool: Data
    target_test: Data
    source_classes: tuple[int, ...]
    target_classes: tuple[int, ...]
    shots: int

    @property
    def source_n_classes(self) -> int:
        return len(self.source_classes)

    @property
    def target_n_classes(self) -> int:
        return len(self.target_classes)


def _remap(y: Tensor, classes: Sequence[int]) -> Tensor:
    lookup = torch.full((10,), -1, dtype=torch.int64)
    lookup[torch.tensor(list(classes))] = torch.arange(len(classes))
    return lookup[y]


def transfer_task(shots: int = 10, *, source_classes: Sequence[int] = SOURCE_CLASSES,
                  target_classes: Sequence[int] = TARGET_CLASSES, test_fraction: float = 0.5,
                  seed: int = 0) -> TransferTask:
    """Split the digits: all source-class items for pre-training; the target classes' items into a
    test set (``test_fraction``) and a pool, of which ``shots`` per class form the training set."""
    source_classes, target_classes = tuple(int(c) for c in source_classes), tuple(int(c) for c in target_classes)
    if set(source_classes) & set(target_classes):
        raise ValueError("source and target classes must not overlap")
    if len(target_classes) < 2 or not source_classes:
        raise ValueError("need at least one source class and two target classes")
    if not all(0 <= c <= 9 for c in (*source_classes, *target_classes)):
        raise ValueError("classes are digits 0-9")
    if shots < 1 or not 0 < test_fraction < 1:
        raise ValueError("shots must be >= 1 and test_fraction in (0, 1)")
    x, y = digits()
    rng = np.random.default_rng([seed, 5])
    src = torch.from_numpy(np.flatnonzero(np.isin(y.numpy(), source_classes)))
    test_idx, pool_idx, train_idx = [], [], []
    for c in target_classes:
        idx = rng.permutation(np.flatnonzero(y.numpy() == c))
        n_test = round(len(idx) * test_fraction)
        if len(idx) - n_test < shots:
            raise ValueError(f"digit {c} has only {len(idx) - n_test} items outside the test set, fewer than {shots}")
        test_idx.append(idx[:n_test])
        pool_idx.append(idx[n_test:])
        train_idx.append(idx[n_test:n_test + shots])
    # interleave classes deterministically (sorted indices), so no split is ordered by class
    test, pool, train = (torch.from_numpy(np.sort(np.concatenate(p))) for p in (test_idx, pool_idx, train_idx))
    return TransferTask(
        source=(x[src], _remap(y[src], source_classes)),
        target_train=(x[train], _remap(y[train], target_classes)),
        target_pool=(x[pool], _remap(y[pool], target_classes)),
        target_test=(x[test], _remap(y[test], target_classes)),
        source_classes=source_classes, target_classes=target_classes, shots=shots,
    )


# -- training -----------------------------------------------------------------------------------------
def fit(model: M, data: Data, *, epochs: int, lr: float = LR, batch_size: int = BATCH_SIZE,
        seed: int = 0) -> M:
    """Train the parameters of ``model`` that require grad (Adam, cross-entropy) in place and
    return it in eval mode. Parameters without grad are not given to the optimizer, so they stay
    bit-identical (the CNN has no batch-norm statistics that could drift)."""
    x, y = data
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    with _deterministic(seed):
        opt = torch.optim.Adam(params, lr=lr)
        gen = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for start in range(0, len(x), batch_size):
                idx = order[start:start + batch_size]
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data: Data) -> float:
    """Fraction of ``data`` classified correctly (eval mode)."""
    x, y = data
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def pretrain(task: TransferTask, *, epochs: int = PRETRAIN_EPOCHS, seed: int = 0) -> nn.Sequential:
    """The source model: ``digits_cnn`` with a head for the source classes, trained on all source data."""
    with _deterministic(seed):
        model = digits_cnn(task.source_n_classes)
    return fit(model, task.source, epochs=epochs, seed=seed)


def frozen_blocks(strategy: str, blocks: int) -> int:
    """How many leading blocks ``strategy`` keeps frozen at the pre-trained weights."""
    table = {"scratch": 0, "finetune": 0, "freeze-early": 1, "freeze-most": blocks - 1, "probe": blocks}
    if strategy not in table:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    return table[strategy]


def prepare(strategy: str, pretrained: nn.Module, classes: int, *, seed: int = 0) -> nn.Module:
    """The model ``strategy`` starts from: a fresh CNN (scratch) or a copy of ``pretrained`` with a
    new head for ``classes`` and its first ``frozen_blocks`` blocks set to ``requires_grad=False``.
    The pre-trained model itself is never modified."""
    with _deterministic(seed):
        if strategy == "scratch":
            frozen_blocks(strategy, 0)  # validates the name
            return digits_cnn(classes)
        model = clone_module(pretrained)
        split = split_model(model)
        if not isinstance(model, nn.Sequential) or not isinstance(split.head, nn.Linear):
            raise TypeError("the pre-trained model needs a final nn.Linear head (as digits_cnn's Sequential)")
        head = nn.Linear(split.head.in_features, classes)
        model[-1] = head  # digits_cnn is a Sequential whose last module is the head
        for block in split.blocks[:frozen_blocks(strategy, len(split.blocks))]:
            block.module.requires_grad_(False)
    return model


@dataclass(frozen=True)
class StrategyResult:
    """One strategy's outcome: test accuracy, training wall time and what it trained."""

    strategy: str
    accuracy: float
    seconds: float
    trainable: int          # parameters trained
    frozen: int             # leading blocks kept at the pre-trained weights
    model: nn.Module = field(repr=False, compare=False)


def run_strategy(strategy: str, task: TransferTask, pretrained: nn.Module, *, epochs: int = TARGET_EPOCHS,
                 lr: float = LR, seed: int = 0) -> StrategyResult:
    """Prepare ``strategy``'s model, train it on the few target examples, test it on the target
    test set. ``seconds`` is the training wall time (what freezing saves)."""
    model = prepare(strategy, pretrained, task.target_n_classes, seed=seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    t0 = time.perf_counter()
    fit(model, task.target_train, epochs=epochs, lr=lr, seed=seed)
    seconds = time.perf_counter() - t0
    frozen = 0 if strategy == "scratch" else frozen_blocks(strategy, len(split_model(model).blocks))
    model.requires_grad_(True)
    return StrategyResult(strategy, accuracy(model, task.target_test), seconds, trainable, frozen, model)


@dataclass
class Exercise:
    """The pre-trained source model, its source accuracy and one result per strategy."""

    task: TransferTask
    pretrained: nn.Module
    pretrain_seconds: float
    results: list[StrategyResult]

    def frame(self) -> pd.DataFrame:
        """One row per strategy: accuracy, seconds, trainable parameters, frozen blocks."""
        import pandas as pd

        return pd.DataFrame([{"strategy": r.strategy, "accuracy": r.accuracy, "seconds": r.seconds,
                              "trainable": r.trainable, "frozen_blocks": r.frozen} for r in self.results])

    def by(self, strategy: str) -> StrategyResult:
        """The result of ``strategy``."""
        for r in self.results:
            if r.strategy == strategy:
                return r
        raise KeyError(strategy)


def run_exercise(task: TransferTask | None = None, *, strategies: Sequence[str] = STRATEGIES, shots: int = 10,
                 pretrain_epochs: int = PRETRAIN_EPOCHS, epochs: int = TARGET_EPOCHS, seed: int = 0) -> Exercise:
    """The whole exercise: build the task (unless given), pre-train once, run every strategy."""
    task = task or transfer_task(shots, seed=seed)
    t0 = time.perf_counter()
    pretrained = pretrain(task, epochs=pretrain_epochs, seed=seed)
    took = time.perf_counter() - t0
    results = [run_strategy(s, task, pretrained, epochs=epochs, seed=seed) for s in strategies]
    return Exercise(task, pretrained, took, results)


# -- candidates for model search ------------------------------------------------------------------------
#: Derived candidate ``i`` (1-based) keeps this many leading blocks frozen, cycling.
ZOO_FREEZES: tuple[str, ...] = ("freeze-early", "freeze-most", "probe")


def model_zoo(n: int, task: TransferTask, pretrained: nn.Module, *, epochs: int = 3,
              seed: int = 0) -> dict[str, nn.Module]:
    """``n`` pre-trained candidates for the target task: ``pretrained`` (named "src-0-4" for the
    default source digits) and ``n - 1`` copies fine-tuned on a random group of 3-5 digits (30-60%
    of their items) with a new head and a frozen block prefix (``ZOO_FREEZES`` cycling). Frozen
    prefixes are shared bit for bit with the source model: that is the block sharing model search
    exploits. Groups may include target digits, so the candidates differ in how well their
    features fit the target. Only source data and the target *pool* are used, never the target
    test set. Names say what each model saw, e.g. ``"ft03-probe-2.5.8"``."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    x = torch.cat([task.source[0], task.target_pool[0]])
    y = torch.cat([torch.tensor(task.source_classes)[task.source[1]],
                   torch.tensor(task.target_classes)[task.target_pool[1]]])
    rng = np.random.default_rng([seed, 31])
    zoo: dict[str, nn.Module] = {f"src-{'.'.join(map(str, task.source_classes))}": pretrained}
    for i in range(1, n):
        strategy = ZOO_FREEZES[(i - 1) % len(ZOO_FREEZES)]
        group = tuple(sorted(int(c) for c in rng.choice(10, size=int(rng.integers(3, 6)), replace=False)))
        members = np.flatnonzero(np.isin(y.numpy(), group))
        idx = torch.from_numpy(np.sort(rng.permutation(members)[: int(len(members) * rng.uniform(0.3, 0.6))]))
        model_seed = seed * 1000 + i
        model = prepare(strategy, pretrained, len(group), seed=model_seed)
        fit(model, (x[idx], _remap(y[idx], group)), epochs=epochs, seed=model_seed)
        model.requires_grad_(True)
        tag = strategy.removeprefix("freeze-")
        zoo[f"ft{i:02d}-{tag}-{'.'.join(map(str, group))}"] = model
    return zoo


# -- Exercise 2's optimisation task -------------------------------------------------------------------
#: What ``train_run`` can do differently from the plain loop of ``fit``.
OPTIMISATIONS: tuple[str, ...] = ("none", "cached-features", "bf16", "channels-last", "compile")
RUN_LOADER = "mm_jupyter.usecases.transfer:load_target_train"


class FeatureCache:
    """Outputs of frozen block prefixes, keyed by the prefix's block ids (content hashes, as Alsatian
    keys its cached intermediates) and a digest of the input: computed once, then reused by every
    epoch and every run that trains on top of the same frozen prefix and data."""

    def __init__(self) -> None:
        self._items: dict[tuple[tuple[str, ...], str], Tensor] = {}
        self.computed = 0
        self.reused = 0

    def features(self, blocks: Sequence[nn.Module], x: Tensor) -> Tensor:
        """``blocks`` applied to ``x`` (no gradients), from the cache when seen before."""


        key = (tuple(block_id(Block(b)) for b in blocks),
               hashlib.sha256(x.detach().contiguous().numpy().tobytes()).hexdigest() + str(tuple(x.shape)))
        if key in self._items:
            self.reused += 1
            return self._items[key]
        with torch.no_grad():
            h = x
            for b in blocks:
                h = b(h)
        self._items[key] = h
        self.computed += 1
        return h

    def clear(self) -> None:
        """Forget every cached output and the counts."""
        self._items.clear()
        self.computed = self.reused = 0


#: The cache ``train_run`` uses (module level, so separate runs — and recovery — share it).
FEATURES = FeatureCache()


@trusted
def load_target_train(shots: int = 10, seed: int = 0) -> Data:
    """Dataset loader recorded in provenance: the few labelled target images of ``transfer_task``."""
    return transfer_task(shots, seed=seed).target_train


@trusted
def train_run(model: nn.Module, data: Data, config: dict[str, Any]) -> nn.Module:
    """Train a prepared model (``prepare``) the way ``fit`` does, with one optimisation; the training
    function recorded for every run in the store. ``config``: ``strategy`` (re-applies its frozen
    prefix), ``optimisation`` (one of ``OPTIMISATIONS``), ``epochs``, ``lr``, ``batch_size``,
    ``seed``; ``measured`` (what the run measured) is a record and does not change training.

    Every variant draws the same mini-batches in the same order as ``fit``. ``cached-features``
    runs the frozen prefix once (``FEATURES``) and trains the rest on its output: the same
    arithmetic as ``fit``, since a frozen prefix gets no gradients and its output does not change.
    ``bf16`` runs forward passes under CPU autocast (bfloat16 matmuls and convolutions);
    ``channels-last`` stores activations and weights channels-last; ``compile`` trains a
    ``torch.compile``-d model."""
    strategy, optimisation = config["strategy"], config.get("optimisation", "none")
    if optimisation not in OPTIMISATIONS:
        raise ValueError(f"unknown optimisation {optimisation!r}; choose one of {', '.join(OPTIMISATIONS)}")
    epochs, lr = int(config.get("epochs", TARGET_EPOCHS)), float(config.get("lr", LR))
    batch_size, seed = int(config.get("batch_size", BATCH_SIZE)), int(config.get("seed", 0))
    x, y = data
    blocks = split_model(model).blocks
    frozen = 0 if strategy == "scratch" else frozen_blocks(strategy, len(blocks))
    model.requires_grad_(True)
    for block in blocks[:frozen]:
        block.module.requires_grad_(False)
    net: nn.Module = model
    if optimisation == "cached-features" and frozen:
        if not isinstance(model, nn.Sequential):
            raise TypeError("cached-features trains a Sequential whose last module is the head (digits_cnn)")
        prefix = [b.module.eval() for b in blocks[:frozen]]
        x = FEATURES.features(prefix, x)
        net = nn.Sequential(*[b.module for b in blocks[frozen:]], model[-1])
    elif optimisation == "channels-last":
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stubs omit it
        x = x.contiguous(memory_format=torch.channels_last)
    elif optimisation == "compile":
        net = torch.compile(model)  # type: ignore[assignment]  # an OptimizedModule; stubs say Callable
    params = [p for p in net.parameters() if p.requires_grad]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=optimisation == "bf16")
    with _deterministic(seed):
        opt = torch.optim.Adam(params, lr=lr)
        gen = torch.Generator().manual_seed(seed)
        net.train()
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for start in range(0, len(x), batch_size):
                idx = order[start:start + batch_size]
                opt.zero_grad()
                with autocast:
                    logits = net(x[idx])
                nn.functional.cross_entropy(logits.float(), y[idx]).backward()
                opt.step()
    model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]  # torch's stubs omit it
    model.requires_grad_(True)  # the frozen prefix was frozen for this run only
    return model.eval()


@dataclass(frozen=True)
class OptimisationRun:
    """One training run of the optimisation task: what was run, how well and how fast it trained."""

    run: str                 # "strategy/optimisation/lr=…"
    strategy: str
    optimisation: str
    config: dict[str, Any]
    accuracy: float
    seconds: float           # training wall time, feature extraction included
    model: nn.Module = field(repr=False, compare=False)


def optimisation_runs(task: TransferTask, pretrained: nn.Module, *,
                      strategies: Sequence[str] = ("freeze-most", "probe"),
                      optimisations: Sequence[str] = OPTIMISATIONS[:-1], lrs: Sequence[float] = (LR,),
                      epochs: int = TARGET_EPOCHS, seed: int = 0) -> list[OptimisationRun]:
    """Every (strategy, optimisation, learning rate) trained from the same prepared model on the
    few target images, tested on the target test set. The feature cache starts empty, so the first
    ``cached-features`` run of a strategy pays for extracting the features and later ones reuse them.
    One untimed epoch per (strategy, optimisation) first warms torch's kernels, so no run's time holds
    first-call costs (except ``compile``, whose compilation is its cost)."""
    runs = []
    for strategy in strategies:
        for optimisation in optimisations:
            if optimisation not in ("cached-features", "compile"):
                warm = {"strategy": strategy, "optimisation": optimisation, "epochs": 1, "seed": seed}
                train_run(prepare(strategy, pretrained, task.target_n_classes, seed=seed), task.target_train, warm)
    FEATURES.clear()
    for strategy in strategies:
        for optimisation in optimisations:
            for lr in lrs:
                config = {"strategy": strategy, "optimisation": optimisation, "epochs": epochs, "lr": lr,
                          "batch_size": BATCH_SIZE, "seed": seed}
                model = prepare(strategy, pretrained, task.target_n_classes, seed=seed)
                t0 = time.perf_counter()
                train_run(model, task.target_train, config)
                seconds = time.perf_counter() - t0
                runs.append(OptimisationRun(f"{strategy}/{optimisation}/lr={lr:g}", strategy, optimisation, config,
                                            accuracy(model, task.target_test), seconds, model))
    return runs


def runs_frame(runs: Sequence[OptimisationRun]) -> pd.DataFrame:
    """One row per run, with its speed-up and accuracy change against the unoptimised run of the
    same strategy and learning rate."""
    import pandas as pd

    frame = pd.DataFrame([{"run": r.run, "strategy": r.strategy, "optimisation": r.optimisation,
                           "lr": r.config["lr"], "accuracy": r.accuracy, "seconds": r.seconds} for r in runs])
    plain = frame[frame["optimisation"] == "none"].set_index(["strategy", "lr"])
    key = list(zip(frame["strategy"], frame["lr"]))
    frame["speedup"] = [plain.loc[k, "seconds"] / s if k in plain.index else float("nan")
                        for k, s in zip(key, frame["seconds"])]
    frame["accuracy_change"] = [a - plain.loc[k, "accuracy"] if k in plain.index else float("nan")
                                for k, a in zip(key, frame["accuracy"])]
    return frame


def record_runs(store: Any, runs: Sequence[OptimisationRun], task: TransferTask, pretrained: nn.Module,
                name: str = "ex2-runs", seed: int = 0) -> Any:
    """Record the runs in the store, as Exercise 1's registry records trainings: version 1 (baseline)
    holds every run's starting model, version 2 (provenance) the trained models with how each was
    trained — ``train_run``, its configuration plus what it measured, and the content hash of the
    training data. Recovering version 2 retrains every run and checks it bit for bit."""

    arch = Architecture.factory(digits_cnn, classes=task.target_n_classes)
    start = {r.run: prepare(r.strategy, pretrained, task.target_n_classes, seed=seed) for r in runs}
    base = store.save_set(start, name, approach="baseline", architecture=arch)
    data = DatasetRef(RUN_LOADER, {"shots": task.shots, "seed": seed})
    configs = {r.run: {**r.config, "measured": {"accuracy": r.accuracy, "seconds": round(r.seconds, 4)}}
               for r in runs}
    prov = Provenance(train=f"{__name__}:train_run", datasets={r.run: data for r in runs}, configs=configs,
                      seed=seed)
    return store.save_set({r.run: r.model for r in runs}, name, approach="provenance", base=base, provenance=prov,
                          architecture=arch)


def recorded_runs(store: Any, ref: Any) -> pd.DataFrame:
    """The runs of a version saved by ``record_runs``, read back from the store: configuration and
    measured results per run."""
    import pandas as pd


    rec = record(store, store.row(ref))
    rows = [{"run": run, **{k: v for k, v in cfg.items() if k != "measured"}, **cfg.get("measured", {})}
            for run, cfg in rec["configs"].items()]
    return pd.DataFrame(rows)


__all__ = [
    "BATCH_SIZE",
    "FEATURES",
    "LR",
    "OPTIMISATIONS",
    "PRETRAIN_EPOCHS",
    "SOURCE_CLASSES",
    "STRATEGIES",
    "TARGET_CLASSES",
    "TARGET_EPOCHS",
    "ZOO_FREEZES",
    "Exercise",
    "FeatureCache",
    "OptimisationRun",
    "StrategyResult",
    "TransferTask",
    "accuracy",
    "fit",
    "frozen_blocks",
    "load_target_train",
    "model_zoo",
    "optimisation_runs",
    "prepare",
    "pretrain",
    "record_runs",
    "recorded_runs",
    "run_exercise",
    "run_strategy",
    "runs_frame",
    "train_run",
    "transfer_task",
]
