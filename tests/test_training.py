"""The use case's training function: scopes, determinism, reproducible initial models."""
from __future__ import annotations

import copy

import pytest
import torch

from mm_jupyter.store.provenance import deterministic
from mm_jupyter.usecases.battery import cell_dataset
from mm_jupyter.usecases.models import last_layer_prefix
from mm_jupyter.usecases.training import initial_models, last_linear, train


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> set[str]:
    return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


DATA = cell_dataset(1, 1)


def test_scope_last_changes_only_the_last_layer():
    model = initial_models(1)[0]
    before = snapshot(model)
    with deterministic(1):
        train(model, DATA, {"epochs": 2, "scope": "last"})
    prefix = last_layer_prefix(model)
    assert prefix == "6."
    assert changed(before, model) == {"6.weight", "6.bias"}
    assert all(p.requires_grad for p in model.parameters())  # freezing was undone
    assert all(p.grad is None for p in model.parameters())
    assert last_linear(model) is model[6]


def test_scope_all_changes_every_tensor_and_keeps_frozen_params_frozen():
    model = initial_models(1, seed=3)[0]
    before = snapshot(model)
    with deterministic(1):
        train(model, DATA, {"epochs": 1})
    assert changed(before, model) == set(before)

    model = initial_models(1, seed=3)[0]
    model[0].weight.requires_grad_(False)  # the caller's own freezing is respected and kept
    with deterministic(1):
        train(model, DATA, {"epochs": 1})
    assert changed(before, model) == set(before) - {"0.weight"}
    assert not model[0].weight.requires_grad and model[2].weight.requires_grad


def test_training_is_bit_identical_under_the_same_seed():
    base = initial_models(1, seed=2)[0]
    runs = []
    for seed in (5, 5, 6):
        model = copy.deepcopy(base)
        with deterministic(seed):
            train(model, DATA, {"epochs": 3, "batch_size": 32})
        runs.append(snapshot(model))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    # the shuffle follows torch's global RNG: another seed, another result
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_deterministic_kernels_are_enforced_while_training():
    seen = []

    class Probe(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(5, 1)

        def forward(self, x):
            seen.append(torch.are_deterministic_algorithms_enabled())
            return self.lin(x)

    with deterministic(0):
        train(Probe(), DATA, {"epochs": 1})
    assert seen and all(seen)


def test_config_defaults_and_validation():
    model = initial_models(1)[0]
    before = snapshot(model)
    with deterministic(0):
        train(model, DATA, {"epochs": 0})
    assert changed(before, model) == set()
    for bad in ({"scope": "first"}, {"epoch": 3}, {"batch_size": 0}):
        with pytest.raises(ValueError):
            train(model, DATA, bad)
    # defaults: 3 epochs of all parameters
    a, b = initial_models(2, seed=7)[0], initial_models(1, seed=7)[0]
    with deterministic(0):
        train(a, DATA, {})
    with deterministic(0):
        train(b, DATA, {"epochs": 3, "lr": 1e-3, "batch_size": 64, "scope": "all"})
    assert changed(snapshot(a), b) == set()


def test_initial_models_are_reproducible_and_leave_the_rng_alone():
    state = torch.random.get_rng_state()
    ms = initial_models(3, seed=10)
    assert torch.equal(state, torch.random.get_rng_state())
    again = initial_models(2, seed=11)
    assert changed(snapshot(ms[1]), again[0]) == set()  # model i is seeded by seed + i
    assert changed(snapshot(ms[0]), ms[1]) == set(snapshot(ms[0]))
    assert sum(p.numel() for p in ms[0].parameters()) == 4993  # FFNN-48
    assert initial_models(1, hidden=69)[0][0].weight.shape == (69, 5)
