"""Recovered models are independent objects: nothing one of them does reaches another, the store,
or a later ``ms[i]`` -- also when their tensors were deduplicated in the store -- and they train like
models constructed and loaded by hand."""
from __future__ import annotations

from pathlib import Path

import store_models as sm
import torch
from torch import nn

import mm_jupyter as mm


def _saved(tmp_path: Path, models: list[nn.Module]) -> mm.Store:
    store = mm.Store(tmp_path / "store")
    store.save_set(models, "cells", approach="baseline")
    return store


def test_models_sharing_a_deduplicated_tensor_stay_independent(tmp_path: Path):
    twin = sm.make("mlp", 1)
    other = sm.make("mlp", 2)
    other.fc2.load_state_dict(twin.fc2.state_dict())  # fc2 equal across all three: stored once
    store = _saved(tmp_path, [twin, sm.make("mlp", 1), other])
    ms = store.recover_set("cells")
    want = [sm.sd_digests(ms.state_dict(i)) for i in range(3)]
    assert want[0] == want[1] and want[0]["fc2.weight"] == want[2]["fc2.weight"]
    a, b, c = ms[0], ms[1], ms[2]
    assert a.fc2.weight.data_ptr() != b.fc2.weight.data_ptr() != c.fc2.weight.data_ptr()
    with torch.no_grad():
        a.fc2.weight.fill_(9)
        a.fc1.bias.add_(1)
    assert sm.sd_digests(b.state_dict()) == want[1]
    assert sm.sd_digests(c.state_dict()) == want[2]
    assert [sm.sd_digests(ms.state_dict(i)) for i in range(3)] == want
    assert sm.sd_digests(ms[0].state_dict()) == want[0]
    fresh = mm.Store(tmp_path / "store").recover_set("cells")
    assert [sm.sd_digests(sd) for sd in fresh.state_dicts()] == want


def test_hooks_attributes_and_submodules_are_not_shared(tmp_path: Path):
    store = _saved(tmp_path, [sm.make("mlp", 1), sm.make("mlp", 2)])
    ms = store.recover_set("cells")
    a, b = ms[0], ms[0]
    assert a is not b and a.fc1 is not b.fc1
    calls: list[str] = []
    a.fc1.register_forward_hook(lambda *_: calls.append("a"))
    a.register_forward_pre_hook(lambda *_: calls.append("pre"))
    a.fc1.note = "mine"
    a.train()
    replaced = a.fc2
    a.fc2 = nn.Linear(8, 3)
    x = sm.MLP().example_input()
    b(x)
    assert calls == []
    assert not hasattr(b.fc1, "note") and not b.training and not b.fc1.training
    assert b.fc2 is not a.fc2 and b.fc2 is not replaced
    assert sm.sd_digests(b.state_dict()) == sm.sd_digests(ms.state_dict(0))
    assert not b.fc1._forward_hooks and not b._forward_pre_hooks
    a(x)
    assert calls == ["pre", "a"]
    c = ms[0]
    assert not c.fc1._forward_hooks and not hasattr(c.fc1, "note")
    assert sm.sd_digests(c.state_dict()) == sm.sd_digests(ms.state_dict(0))


def test_a_recovered_model_trains_like_a_constructed_one(tmp_path: Path):
    orig = sm.make("mlp", 3)
    store = _saved(tmp_path, [orig])
    ms = store.recover_set("cells")
    want = sm.sd_digests(ms.state_dict(0))
    m = ms[0]
    ref = sm.MLP()
    ref.load_state_dict(ms.state_dict(0))
    assert [(n, p.requires_grad, p.dtype, p.device, type(p)) for n, p in m.named_parameters()] == \
        [(n, p.requires_grad, p.dtype, p.device, type(p)) for n, p in ref.named_parameters()]
    x = sm.MLP().example_input()
    for model in (m, ref):
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model(x).pow(2).sum().backward()
        assert all(p.grad is not None for p in model.parameters())
        opt.step()
    # the same step from the same state gives the same weights, and the store is untouched
    assert sm.sd_digests(m.state_dict()) == sm.sd_digests(ref.state_dict())
    assert sm.sd_digests(m.state_dict()) != want
    assert sm.sd_digests(ms.state_dict(0)) == want
    assert sm.sd_digests(ms[0].state_dict()) == want
