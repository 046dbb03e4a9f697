"""Every way of getting recovered modules (``ms[i]`` before and after ``load()``, and ``list(ms)``
of a loaded set, which makes models a chunk at a time with the collector paused) gives models that
equal a constructed + ``load_state_dict`` one bit for bit, in parameter identity (tied weights),
types, ``requires_grad``, dtypes and strides; that own their storage; and that stay independent of
each other, of the store and of later recoveries."""
from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Callable

import pytest
import store_models as sm
import torch
from torch import nn

import mm_jupyter as mm

KINDS = ["bn", "mixed", "mlp", "noncontig", "tied", "zerodim"]


def _models(ms: mm.ModelSet, how: str) -> list[nn.Module]:
    if how == "item":
        return [ms[i] for i in range(len(ms))]
    ms.load()
    if how == "loaded item":
        return [ms[i] for i in range(len(ms))]
    return list(ms)


HOWS = ["item", "loaded item", "list"]


def _tensors(m: nn.Module) -> list[tuple]:
    """What a model's tensors look like (strides of dense layouts only: a strided slice of a larger
    tensor, as NonContigNet's ``ws``, is recovered contiguous: its gaps are not state)."""
    def layout(t: torch.Tensor) -> tuple[int, ...]:
        dense = t.untyped_storage().nbytes() == t.numel() * t.element_size()
        return t.stride() if dense else torch.empty(t.shape).stride()

    return [(n, type(t), t.requires_grad, t.dtype, t.device, t.shape, t.is_leaf, layout(t))
            for n, t in [*m.named_parameters(remove_duplicate=False), *m.named_buffers(remove_duplicate=False)]]


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("kind", KINDS)
def test_recovered_models_equal_constructed_and_loaded_ones(tmp_path: Path, kind: str, how: str):
    originals = [sm.make(kind, s) for s in (1, 2, 3)]
    store = mm.Store(tmp_path / "s")
    store.save_set(originals, "cells", approach="baseline")
    got = _models(store.recover_set("cells"), how)
    assert len(got) == 3
    for orig, m in zip(originals, got):
        ref = sm.make(kind, 0)
        ref.load_state_dict(orig.state_dict())
        ref.eval()
        assert sm.sd_digests(m.state_dict()) == sm.sd_digests(orig.state_dict())
        assert sm.ties(m) == sm.ties(ref)
        assert _tensors(m) == _tensors(ref)
        assert not m.training and all(not c.training for c in m.modules())
        assert sm.output_digest(m) == sm.output_digest(ref)
    ptrs = [t.data_ptr() for m in got for t in {id(t): t for t in [*m.parameters(), *m.buffers()]}.values()
            if t.numel()]
    assert len(ptrs) == len(set(ptrs))  # storage of their own: no two tensors of the set share memory


@pytest.mark.parametrize("how", HOWS)
def test_tied_weights_stay_one_parameter_and_train_together(tmp_path: Path, how: str):
    store = mm.Store(tmp_path / "s")
    store.save_set([sm.make("tied", 1), sm.make("tied", 2)], "cells", approach="baseline")
    ms = store.recover_set("cells")
    want = [sm.sd_digests(ms.state_dict(i)) for i in range(2)]
    a, b = _models(ms, how)
    assert a.a.weight is a.b.weight and a.emb.weight is a.dec.weight
    assert a.a.weight is not b.a.weight
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    a.train()
    a(a.example_input()).pow(2).sum().backward()
    opt.step()
    assert a.a.weight is a.b.weight and torch.equal(a.state_dict()["a.weight"], a.state_dict()["b.weight"])
    assert sm.sd_digests(a.state_dict()) != want[0]
    assert sm.sd_digests(b.state_dict()) == want[1]
    assert [sm.sd_digests(ms.state_dict(i)) for i in range(2)] == want
    assert [sm.sd_digests(m.state_dict()) for m in _models(ms, how)] == want


@pytest.mark.parametrize("how", HOWS)
def test_writes_reach_no_other_model_the_store_or_a_later_recovery(tmp_path: Path, how: str):
    first = sm.make("mlp", 1)
    other = sm.make("mlp", 2)
    other.fc2.load_state_dict(first.fc2.state_dict())  # fc2 equal in all three: one stored copy
    store = mm.Store(tmp_path / "s")
    store.save_set([first, sm.make("mlp", 1), other], "cells", approach="baseline")
    ms = store.recover_set("cells")
    want = [sm.sd_digests(ms.state_dict(i)) for i in range(3)]
    models = _models(ms, how)
    with torch.no_grad():
        models[0].fc2.weight.fill_(7)
        models[0].fc1.bias.add_(1)
        models[2].fc2.bias.zero_()
        models[2].fc1.weight.data.mul_(3)
    assert sm.sd_digests(models[1].state_dict()) == want[1]
    assert sm.sd_digests(models[0].state_dict())["fc2.bias"] == want[0]["fc2.bias"]
    assert sm.sd_digests(models[2].state_dict())["fc2.weight"] == want[2]["fc2.weight"]
    assert [sm.sd_digests(ms.state_dict(i)) for i in range(3)] == want
    assert [sm.sd_digests(m.state_dict()) for m in _models(ms, how)] == want
    assert [sm.sd_digests(sd) for sd in mm.Store(tmp_path / "s").recover_set("cells").state_dicts()] == want


@pytest.mark.parametrize("how", HOWS)
def test_hooks_attributes_and_containers_are_not_shared(tmp_path: Path, how: str):
    store = mm.Store(tmp_path / "s")
    store.save_set([sm.make("bn", 1), sm.make("bn", 2)], "cells", approach="baseline")
    ms = store.recover_set("cells")
    a, b = _models(ms, how)
    calls: list[str] = []
    a.fc.register_forward_hook(lambda *_: calls.append("hook"))
    a.bn.momentum = 0.5
    a.bn.note = "mine"
    a.bn.register_buffer("extra", torch.ones(1))
    a.conv.register_parameter("p", nn.Parameter(torch.ones(1)))
    a.add_module("more", nn.ReLU())
    a.train()
    b(b.example_input())
    assert calls == []
    assert b.bn.momentum == 0.1 and not hasattr(b.bn, "note") and "extra" not in b.bn._buffers
    assert "p" not in b.conv._parameters and "more" not in b._modules and not b.training
    for m in (b, *_models(ms, how)):
        assert all(not c._forward_hooks for c in m.modules())
        assert "extra" not in dict(m.named_buffers()) and "more" not in dict(m.named_children())
    before = sm.sd_digests(b.state_dict())
    a(a.example_input())  # a training forward pass updates a's running stats only
    assert calls == ["hook"] and sm.sd_digests(b.state_dict()) == before


def test_models_made_with_grad_enabled_are_leaves_that_train(tmp_path: Path):
    store = mm.Store(tmp_path / "s")
    store.save_set([sm.make("mlp", s) for s in range(4)], "cells", approach="baseline")
    with torch.enable_grad():
        models = list(store.recover_set("cells").load())
    for m in models:
        assert all(p.is_leaf and p.grad_fn is None and p.requires_grad for p in m.parameters())
        m.train()
        opt = torch.optim.Adam(m.parameters(), lr=0.01)
        loss = m(m.example_input()).pow(2).sum()
        loss.backward()
        opt.step()
        assert m(m.example_input()).pow(2).sum() < loss


@pytest.mark.parametrize("stop", [0, 1, 300])
def test_iteration_restores_the_collector_whatever_its_state(tmp_path: Path, stop: int):
    store = mm.Store(tmp_path / "s")
    base = [sm.make("mlp", s % 5) for s in range(301)]  # more than one chunk
    store.save_set(base, "cells", approach="baseline")
    ms = store.recover_set("cells").load()
    was = gc.isenabled()
    try:
        for enabled in (True, False):
            (gc.enable if enabled else gc.disable)()
            it = iter(ms)
            got = [next(it) for _ in range(stop)]
            del it
            assert gc.isenabled() is enabled
            assert [sm.sd_digests(m.state_dict()) for m in got] == [sm.sd_digests(m.state_dict()) for m in base[:stop]]
        gc.enable()
        assert [sm.sd_digests(m.state_dict()) for m in ms] == [sm.sd_digests(m.state_dict()) for m in base]
    finally:
        (gc.enable if was else gc.disable)()


def _fresh_digests(path: Path) -> Callable[[str], list]:
    def run(how: str) -> list:
        code = ("import json, sys, store_models as sm, mm_jupyter as mm\n"
                "ms = mm.Store(sys.argv[1]).recover_set('cells')\n"
                "models = list(ms.load()) if sys.argv[2] == 'list' else [ms[i] for i in range(len(ms))]\n"
                "print(json.dumps([[sm.sd_digests(m.state_dict()), sm.ties(m), sm.output_digest(m)] "
                "for m in models]))\n")
        return json.loads(sm.run_python(code, str(path), how).stdout)
    return run


def test_a_fresh_process_recovers_bit_exact_models(tmp_path: Path):
    originals = [sm.make("tied", s) for s in range(3)]
    store = mm.Store(tmp_path / "s")
    store.save_set(originals, "cells", approach="baseline")
    store.close()
    want = [[sm.sd_digests(m.state_dict()), sm.ties(m), sm.output_digest(m.eval())] for m in originals]
    run = _fresh_digests(tmp_path / "s")
    assert run("list") == want
    assert run("item") == want
