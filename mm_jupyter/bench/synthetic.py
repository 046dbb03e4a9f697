"""Synthetic candidate sets for model search (Alsatian's model-set generator) and data that fits them.

The paper builds its candidate sets from one base model: every further model copies a randomly
chosen existing one and re-initialises its last ``n`` blocks, ``n`` drawn from a truncated normal
whose mean is a fraction of the block count ``B``. Sets built that way have the block sharing of
real fine-tuned model zoos (many models share long prefixes), which is what the search exploits.
Weights are random (built from ``transformers`` configs), never downloaded; ``trained_zoo`` derives
the set from a base trained briefly on the synthetic task instead, so candidates differ in quality
systematically (as a zoo of pretrained models does). ``trained_candidates``
gives a small set of really trained fine-tunes (digits) for tests that need meaningful scores.
The model factories (``base_model``, ``digits_cnn``) live in ``mm_jupyter.usecases.candidates``,
where store records name them; they are re-exported here.
"""
from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import SearchError
from ..modelsearch.blocks import Split
from ..modelsearch.splitting import split_model
from ..usecases.candidates import (
    ARCHS,
    MLP_FEATURES,
    Shape,
    _check_arch,
    _seeded as _seeded,
    base_model,
    clone_module,
    digits,
    digits_cnn,
    hf_config,
    input_shape,
)

#: name -> (mean re-initialised fraction of B, standard deviation as a fraction of the mean)
DISTRIBUTIONS: dict[str, tuple[float, float]] = {
    "top-layers": (0.10, 1 / 2),
    "top-25": (0.25, 1 / 2),
    "top-50": (0.50, 1 / 4),
}

_BERT_CLS, _BERT_SEP, _BERT_FIRST_WORD = 101, 102, 200


# --------------------------------------------------------------------------------------------
# The generator


@dataclass(frozen=True)
class Derivation:
    """How one further model is made: copy model ``source``, re-initialise its last ``reinit``
    parameterised blocks (and its head) with torch seed ``seed``."""

    source: int
    reinit: int
    seed: int


def _draw_reinit(rng: np.random.Generator, mean: float, sd: float, blocks: int) -> int:
    """A normal truncated to [0.5, B + 0.5) by inverse-CDF sampling, rounded: every n in 1..B gets an
    equally wide interval, and the draw always terminates (no rejection loop)."""
    if sd <= 0:
        return int(min(max(round(mean), 1), blocks))
    dist = NormalDist(mean, sd)
    lo, hi = dist.cdf(0.5), dist.cdf(blocks + 0.5)
    u = float(rng.uniform(lo, hi))
    if not 0.0 < u < 1.0 or hi - lo < 1e-12:  # all mass beyond one bound
        return 1 if mean < 0.5 else blocks
    return int(min(max(round(dist.inv_cdf(u)), 1), blocks))


def generation_plan(n: int, blocks: int, distribution: str = "top-layers", *, seed: int = 0) -> list[Derivation]:
    """The derivations of models ``1..n-1`` (model 0 is the base), drawn with numpy's default_rng."""
    if distribution not in DISTRIBUTIONS:
        raise SearchError(f"unknown distribution {distribution!r}; expected one of {', '.join(DISTRIBUTIONS)}")
    if n < 1:
        raise SearchError(f"n must be at least 1, got {n}")
    if blocks < 1:
        raise SearchError(f"a model needs at least one block, got {blocks}")
    frac, sd_frac = DISTRIBUTIONS[distribution]
    mean = frac * blocks
    rng = np.random.default_rng(seed)
    plan = []
    for i in range(1, n):
        source = int(rng.integers(i))
        reinit = _draw_reinit(rng, mean, sd_frac * mean, blocks)
        plan.append(Derivation(source, reinit, int(rng.integers(2**62))))
    return plan


def parameterised(split: Split) -> list[int]:
    """Indices of the blocks that hold parameters: the ones the generator can re-initialise (a
    trailing parameter-free block, e.g. ResNet's pooling or BERT's CLS pick, has nothing to redraw)."""
    return [i for i, b in enumerate(split.blocks) if next(b.module.parameters(), None) is not None]


def reinitialise(module: nn.Module) -> None:
    """Draw fresh weights: ``reset_parameters()`` where a module has one (torch's own init, resets
    batch-norm statistics too); other parameters (e.g. ViT's CLS token) from a truncated normal."""
    covered: set[int] = set()
    with torch.no_grad():
        for m in module.modules():
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
                covered.update(id(p) for p in m.parameters(recurse=False))
        for m in module.modules():
            for p in m.parameters(recurse=False):
                if id(p) not in covered:
                    nn.init.trunc_normal_(p, std=0.02)
                    covered.add(id(p))


def synthetic_candidates(arch: str, n: int, distribution: str = "top-layers", *, seed: int = 0,
                         reduced: bool = True, classes: int = 10, image_size: int | None = None) -> list[nn.Module]:
    """``n`` candidates: the base model, then copies of random earlier candidates with their last
    blocks (and head) re-initialised per ``generation_plan`` (B = parameterised blocks)."""
    base = base_model(arch, reduced=reduced, classes=classes, seed=seed, image_size=image_size)
    return derived_candidates(base, n, distribution, seed=seed)


# --------------------------------------------------------------------------------------------
# Data


def _labels(rng: np.random.Generator, n: int, classes: int) -> np.ndarray:
    return rng.permutation(np.arange(n) % classes).astype(np.int64)


def sample_data(arch: str, n: int, *, seed: int = 0, reduced: bool = True,
                classes: int = 10, image_size: int | None = None) -> tuple[Tensor, Tensor]:
    """``n`` deterministic inputs for ``arch`` and balanced int64 labels. Each class has a fixed
    prototype (images: a coarse colour pattern; tokens: a preferred vocabulary; mlp: a centre), so a
    linear proxy on good features can separate the classes; ``seed`` draws the samples, the task
    (prototypes) stays the same across seeds."""
    _check_arch(arch)
    if n < 1 or classes < 2:
        raise SearchError(f"need n >= 1 and classes >= 2, got n={n}, classes={classes}")
    shape = input_shape(arch, reduced=reduced, image_size=image_size)
    task = np.random.default_rng([classes, ARCHS.index(arch), 7])
    rng = np.random.default_rng([seed, 11])
    y = _labels(rng, n, classes)
    if shape.image:
        coarse = 8
        protos = task.normal(size=(classes, 3, coarse, coarse)).astype(np.float32)
        up = np.kron(protos, np.ones((1, 1, shape.image // coarse, shape.image // coarse), np.float32))
        gain = rng.uniform(0.7, 1.3, size=(n, 1, 1, 1)).astype(np.float32)
        x = up[y] * gain + 2.0 * rng.standard_normal((n, 3, shape.image, shape.image), dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)
    if arch == "bert":
        words = np.arange(_BERT_FIRST_WORD, shape.vocab)
        topics = np.stack([task.choice(words, size=24, replace=False) for _ in range(classes)])
        ids = np.zeros((n, shape.seq_len), dtype=np.int64)  # 0 = [PAD]
        lengths = rng.integers(shape.seq_len // 2, shape.seq_len + 1, size=n)
        topical = rng.random((n, shape.seq_len)) < 0.25
        from_topic = topics[y][np.arange(n)[:, None], rng.integers(24, size=(n, shape.seq_len))]
        random_words = rng.integers(_BERT_FIRST_WORD, shape.vocab, size=(n, shape.seq_len))
        body = np.where(topical, from_topic, random_words)
        pos = np.arange(shape.seq_len)[None, :]
        ids = np.where(pos < lengths[:, None] - 1, body, ids)
        ids[:, 0] = _BERT_CLS
        ids[np.arange(n), lengths - 1] = _BERT_SEP
        return torch.from_numpy(ids), torch.from_numpy(y)
    centres = 0.8 * task.normal(size=(classes, MLP_FEATURES)).astype(np.float32)
    x = centres[y] + rng.standard_normal((n, MLP_FEATURES), dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)


# --------------------------------------------------------------------------------------------
# Trained candidates (digits)

#: Fine-tune ``i`` (1-based) freezes ``FREEZES[(i - 1) % 3]``: the first block, all blocks but the
#: last, or every block (a linear probe: only the head is trained).
FREEZES = ("early", "most", "probe")


def frozen_prefix(i: int, blocks: int) -> int:
    """How many leading blocks fine-tune ``i`` (1-based) keeps frozen at the base's weights."""
    return {"early": 1, "most": blocks - 1, "probe": blocks}[FREEZES[(i - 1) % len(FREEZES)]]


def _train(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int, lr: float, gen: torch.Generator) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), 64):
            idx = order[start:start + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()


def trained_candidates(n: int, *, seed: int = 0) -> tuple[list[nn.Module], tuple[Tensor, Tensor]]:
    """A base CNN trained briefly on half of the digits, then ``n - 1`` fine-tunes of it on random
    subsets (10-50%) with a new head and a frozen block prefix per ``FREEZES``; returns the models
    and the full digits ``(X, y)``. Trained on one thread, so the same seed gives the same bytes."""
    if n < 1:
        raise SearchError(f"n must be at least 1, got {n}")
    x, y = digits()
    rng = np.random.default_rng([seed, 23])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _seeded(seed):
            gen = torch.Generator().manual_seed(seed)
            base = digits_cnn()
            half = torch.from_numpy(rng.permutation(len(x))[: len(x) // 2])
            _train(base, x[half], y[half], epochs=3, lr=3e-3, gen=gen)
            blocks = len(split_model(base).blocks)
            models: list[nn.Module] = [base]
            for i in range(1, n):
                model = clone_module(base)
                split = split_model(model)
                assert split.head is not None  # digits_cnn has a Linear head
                reinitialise(split.head)
                frozen = frozen_prefix(i, blocks)
                for block in split.blocks[:frozen]:
                    block.module.requires_grad_(False)
                subset = torch.from_numpy(rng.permutation(len(x))[: int(len(x) * rng.uniform(0.1, 0.5))])
                _train(model, x[subset], y[subset], epochs=3, lr=2e-3, gen=gen)
                model.requires_grad_(True)
                models.append(model)
    finally:
        torch.set_num_threads(threads)
    return models, (x, y)


# --------------------------------------------------------------------------------------------
# A zoo with quality differences: a trained base, candidates derived from it

#: Added to a zoo's ``seed`` for the data its base is trained on: disjoint from the seeds of search
#: data drawn with ``sample_data`` (small integers), so a search never scores the training items.
TRAIN_DATA_SEED = 1 << 40


def trained_base(arch: str = "resnet18", *, seed: int = 0, image_size: int | None = None, items: int | None = None,
                 epochs: int = 3, reduced: bool = True, classes: int = 10) -> nn.Module:
    """``base_model(arch)`` trained briefly on ``sample_data``'s task (items drawn with seed
    ``TRAIN_DATA_SEED + seed``, never a search's): a stand-in for a pretrained model, built from code.
    ``items``: default 1024 at 32 px, fewer at larger image sides (the same pixels, at least 256) --
    at 32 px about 2 s on one core. Trained on one thread with a seeded generator, so the same
    arguments give the same bytes."""
    shape = input_shape(arch, reduced=reduced, image_size=image_size)
    if items is None:
        items = max(256, 1024 * 32 * 32 // shape.image ** 2) if shape.image else 1024
    if items < 2 or epochs < 1:
        raise SearchError(f"need items >= 2 and epochs >= 1 to train a base, got items={items}, epochs={epochs}")
    x, y = sample_data(arch, items, seed=TRAIN_DATA_SEED + seed, reduced=reduced, classes=classes,
                       image_size=image_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _seeded(seed):
            base = base_model(arch, reduced=reduced, classes=classes, seed=seed, image_size=image_size)
            _train(_Logits(base), x, y, epochs=epochs, lr=3e-3, gen=torch.Generator().manual_seed(seed))
    finally:
        torch.set_num_threads(threads)
    return base.eval()


def trained_zoo(arch: str, n: int, distribution: str = "top-layers", *, seed: int = 0, reduced: bool = True,
                classes: int = 10, image_size: int | None = None, train_items: int | None = None,
                epochs: int = 3) -> list[nn.Module]:
    """``synthetic_candidates`` from a trained base (``trained_base`` with ``train_items`` and
    ``epochs``): a candidate re-initialised in fewer of its last blocks keeps more trained ones and is
    better, so quality differs systematically, as in a zoo of pretrained models (random weights leave
    every candidate about equally bad, and which survive a halving rung is then decided by noise)."""
    base = trained_base(arch, seed=seed, reduced=reduced, classes=classes, image_size=image_size,
                        items=train_items, epochs=epochs)
    return derived_candidates(base, n, distribution, seed=seed)


# --------------------------------------------------------------------------------------------
# Any base model, and trained text candidates (the Alsatian evaluation, mm_jupyter.bench.alsatian)


def derived_candidates(base: nn.Module, n: int, distribution: str = "top-layers", *,
                       seed: int = 0) -> list[nn.Module]:
    """``synthetic_candidates`` for a given base model (any architecture ``split_model`` splits, e.g.
    a Hugging Face model built from a config): ``base`` itself, then ``n - 1`` copies of random
    earlier candidates with their last parameterised blocks (and head) re-initialised."""
    base = base.eval()
    plan = generation_plan(n, len(parameterised(split_model(base))), distribution, seed=seed)
    models: list[nn.Module] = [base]
    for step in plan:
        model = clone_module(models[step.source])  # far cheaper than building from the config again
        split = split_model(model)
        with _seeded(step.seed):
            for i in parameterised(split)[-step.reinit:]:
                reinitialise(split.blocks[i].module)
            if split.head is not None:
                reinitialise(split.head)
        models.append(model.eval())
    return models


def trained_text_candidates(n: int, *, items: int = 1200, seed: int = 0) -> tuple[list[nn.Module],
                                                                                    tuple[Tensor, Tensor]]:
    """The text counterpart of ``trained_candidates``: a small BERT (``base_model("bert")``) trained
    for a few steps on the generated topic task of ``sample_data("bert")``, then ``n - 1`` fine-tunes
    of it on random subsets (10-50%) with a new head and a frozen block prefix per ``FREEZES``.
    Returns the models and ``items`` fresh labelled sequences of the same task (the search data)."""
    if n < 1:
        raise SearchError(f"n must be at least 1, got {n}")
    x, y = sample_data("bert", 2 * items, seed=seed + 1)
    rng = np.random.default_rng([seed, 29])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _seeded(seed):
            gen = torch.Generator().manual_seed(seed)
            base = base_model("bert", seed=seed).train()
            half = torch.from_numpy(rng.permutation(len(x))[: len(x) // 2])
            _train(_Logits(base), x[half], y[half], epochs=1, lr=3e-3, gen=gen)
            base.eval()
            blocks = len(split_model(base).blocks)
            models: list[nn.Module] = [base]
            for i in range(1, n):
                model = clone_module(base)
                split = split_model(model)
                assert split.head is not None  # BERT's classifier
                reinitialise(split.head)
                for block in split.blocks[:frozen_prefix(i, blocks)]:
                    block.module.requires_grad_(False)
                subset = torch.from_numpy(rng.permutation(len(x))[: int(len(x) * rng.uniform(0.1, 0.5))])
                _train(_Logits(model), x[subset], y[subset], epochs=1, lr=2e-3, gen=gen)
                model.requires_grad_(True)
                models.append(model.eval())
    finally:
        torch.set_num_threads(threads)
    return models, sample_data("bert", items, seed=seed + 2)


class _Logits(nn.Module):
    """A classifier seen as a plain ``inputs -> logits`` module (what ``_train`` calls): Hugging Face
    outputs carry the logits as ``.logits``, plain modules (the mlp) return them."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        logits: Tensor = getattr(out, "logits", out)
        return logits


__all__ = [
    "ARCHS", "DISTRIBUTIONS", "FREEZES", "MLP_FEATURES", "Derivation", "Shape", "base_model", "clone_module",
    "derived_candidates", "digits", "digits_cnn", "frozen_prefix", "generation_plan", "hf_config", "input_shape",
    "parameterised", "reinitialise", "sample_data", "synthetic_candidates", "TRAIN_DATA_SEED", "trained_base",
    "trained_candidates", "trained_text_candidates", "trained_zoo",
]
