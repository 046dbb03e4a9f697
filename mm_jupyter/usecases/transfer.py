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

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from ..search.blocks import split_model
from ..search.synthetic import clone_module, digits, digits_cnn

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
def fit(model: nn.Module, data: Data, *, epochs: int, lr: float = LR, batch_size: int = BATCH_SIZE,
        seed: int = 0) -> nn.Module:
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
        if not isinstance(split.head, nn.Linear):
            raise TypeError("the pre-trained model needs a final nn.Linear head")
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
        idx = np.flatnonzero(np.isin(y.numpy(), group))
        idx = torch.from_numpy(np.sort(rng.permutation(idx)[: int(len(idx) * rng.uniform(0.3, 0.6))]))
        model_seed = seed * 1000 + i
        model = prepare(strategy, pretrained, len(group), seed=model_seed)
        fit(model, (x[idx], _remap(y[idx], group)), epochs=epochs, seed=model_seed)
        model.requires_grad_(True)
        tag = strategy.removeprefix("freeze-")
        zoo[f"ft{i:02d}-{tag}-{'.'.join(map(str, group))}"] = model
    return zoo


__all__ = [
    "BATCH_SIZE",
    "LR",
    "PRETRAIN_EPOCHS",
    "SOURCE_CLASSES",
    "STRATEGIES",
    "TARGET_CLASSES",
    "TARGET_EPOCHS",
    "ZOO_FREEZES",
    "Exercise",
    "StrategyResult",
    "TransferTask",
    "accuracy",
    "fit",
    "frozen_blocks",
    "model_zoo",
    "prepare",
    "pretrain",
    "run_exercise",
    "run_strategy",
    "transfer_task",
]
