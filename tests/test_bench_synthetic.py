"""Synthetic candidate sets (the paper's generator), their data, and the trained digits set."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from mm_jupyter.bench.synthetic import (
    ARCHS,
    DISTRIBUTIONS,
    base_model,
    clone_module,
    frozen_prefix,
    generation_plan,
    input_shape,
    parameterised,
    sample_data,
    synthetic_candidates,
    trained_candidates,
)
from mm_jupyter.errors import SearchError
from mm_jupyter.modelsearch.hashing import block_ids
from mm_jupyter.modelsearch.splitting import split_model


def _all_ids(models: list[nn.Module]) -> list[list[str]]:
    return [block_ids(split_model(m).blocks) for m in models]


@pytest.mark.parametrize("arch", ["mlp", "vit"])
def test_same_seed_same_candidates(arch: str) -> None:
    pytest.importorskip("transformers")
    a = _all_ids(synthetic_candidates(arch, 6, "top-50", seed=3))
    b = _all_ids(synthetic_candidates(arch, 6, "top-50", seed=3))
    c = _all_ids(synthetic_candidates(arch, 6, "top-50", seed=4))
    assert a == b
    assert a[0] != c[0]


def test_generation_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    synthetic_candidates("mlp", 4, seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_base_model_is_the_first_candidate() -> None:
    base = base_model("mlp", seed=9)
    models = synthetic_candidates("mlp", 3, seed=9)
    assert _all_ids([base]) == _all_ids(models[:1])
    assert not models[0].training


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_distribution_mean_fraction(name: str) -> None:
    frac, sd_frac = DISTRIBUTIONS[name]
    blocks = 60
    plan = generation_plan(3001, blocks, name, seed=0)
    reinit = np.array([d.reinit for d in plan]) / blocks
    assert abs(reinit.mean() - frac) < 0.02
    assert 0.75 * sd_frac < reinit.std() / reinit.mean() < 1.25 * sd_frac
    assert all(0 <= d.source < i for i, d in enumerate(plan, start=1))


def test_distributions_are_ordered_on_real_block_counts() -> None:
    means = [np.mean([d.reinit for d in generation_plan(400, 52, name, seed=1)])
             for name in ("top-layers", "top-25", "top-50")]
    assert means[0] < means[1] < means[2]


@pytest.mark.parametrize("blocks", [1, 2, 3, 5, 9])
@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_reinit_count_within_bounds(blocks: int, name: str) -> None:
    plan = generation_plan(500, blocks, name, seed=blocks)
    counts = {d.reinit for d in plan}
    assert counts <= set(range(1, blocks + 1))


def test_bad_arguments() -> None:
    with pytest.raises(SearchError, match="distribution"):
        generation_plan(3, 4, "top-99")
    with pytest.raises(SearchError, match="architecture"):
        base_model("alexnet")
    with pytest.raises(SearchError):
        sample_data("mlp", 0)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_builds_and_its_data_fits(arch: str) -> None:
    pytest.importorskip("transformers")
    model = base_model(arch, classes=4)
    x, y = sample_data(arch, 12, classes=4, seed=2)
    assert y.dtype == torch.int64 and y.shape == (12,) and sorted(torch.bincount(y).tolist()) == [3, 3, 3, 3]
    shape = input_shape(arch)
    if shape.image:
        assert x.dtype == torch.float32 and x.shape == (12, 3, shape.image, shape.image)
    elif arch == "bert":
        assert x.dtype == torch.int64 and x.shape == (12, shape.seq_len)
        assert (x[:, 0] == 101).all() and (x == 0).any() and int(x.max()) < shape.vocab
    else:
        assert x.shape == (12, 16)
    split = split_model(model)
    feats = split.features(x)
    assert feats.shape[0] == 12 and torch.isfinite(feats).all()
    logits = split.head(feats)
    assert logits.shape == (12, 4)
    x2, y2 = sample_data(arch, 12, classes=4, seed=2)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, sample_data(arch, 12, classes=4, seed=3)[0])


def test_images_carry_class_structure() -> None:
    x, y = sample_data("resnet18", 200, seed=0)
    means = torch.stack([x[y == c].mean(0) for c in range(10)]).flatten(1)
    within = torch.stack([(x[y == c] - means[c].view(3, 32, 32)).pow(2).mean() for c in range(10)]).mean()
    between = means.var(0).mean()
    assert between > 0.1 * within  # class prototypes stand out from the noise


def test_clone_module_is_a_deep_copy() -> None:
    tf = pytest.importorskip("transformers")
    model = base_model("bert")
    clone = clone_module(model)
    assert block_ids(split_model(clone).blocks) == block_ids(split_model(model).blocks)
    assert all(a is not b for a, b in zip(clone.parameters(), model.parameters()))
    assert clone.config is not model.config and clone.bert.config is clone.config
    with torch.no_grad():
        next(clone.parameters()).add_(1.0)
    assert block_ids(split_model(clone).blocks)[0] != block_ids(split_model(model).blocks)[0]
    assert isinstance(clone, tf.BertForSequenceClassification)

    tied = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    tied[1].weight = tied[0].weight
    copied = clone_module(tied)
    assert copied[1].weight is copied[0].weight and copied[0].weight is not tied[0].weight
    assert torch.equal(copied[0].weight, copy.deepcopy(tied)[0].weight)


@pytest.mark.slow
def test_trained_candidates_are_fine_tunes_and_learn() -> None:
    pytest.importorskip("sklearn")
    n = 7
    models, (x, y) = trained_candidates(n, seed=0)
    assert len(models) == n and x.shape == (1797, 1, 8, 8) and y.dtype == torch.int64
    ids = _all_ids(models)
    blocks = len(ids[0])
    heads = [split_model(m).head for m in models]
    for i in range(1, n):
        k = frozen_prefix(i, blocks)
        assert ids[i][:k] == ids[0][:k]  # frozen prefix: bit-identical to the base
        assert all(a != b for a, b in zip(ids[i][k:], ids[0][k:]))  # the rest was trained
        assert not torch.equal(heads[i].weight, heads[0].weight)
    assert {frozen_prefix(i, blocks) for i in range(1, n)} == {1, blocks - 1, blocks}
    with torch.no_grad():
        accuracy = [(m(x).argmax(1) == y).float().mean().item() for m in models]
    assert min(accuracy) > 0.2  # chance is 0.1
    assert accuracy[0] > 0.6
    again, _ = trained_candidates(3, seed=0)
    assert _all_ids(again) == ids[:3]


def test_parameterised_blocks() -> None:
    pytest.importorskip("transformers")
    assert parameterised(split_model(base_model("mlp"))) == [0, 1, 2]
    split = split_model(base_model("resnet18"))
    assert parameterised(split) == list(range(len(split.blocks) - 1))  # the pooling block has no parameters
