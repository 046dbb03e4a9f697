"""Bad input raises a clear StoreError (or subclass) and stores nothing."""
from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import store_models as sm
import torch
from torch import nn

import mm_jupyter as mm


def snapshot(store: mm.Store) -> tuple:
    """Everything a failed save must leave untouched: listed sets, every catalog row (pending
    ones included), every object file, and no temp files."""
    root = Path(store.root)
    db = sqlite3.connect(root / "catalog.sqlite")
    try:
        rows = tuple(db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("sets", "artifacts", "models"))
    finally:
        db.close()
    objects = sorted(str(p.relative_to(root)) for p in (root / "objects").rglob("*") if p.is_file())
    temps = sorted(p.name for p in (root / "tmp").iterdir())
    return store.sets()[["name", "version", "approach"]].values.tolist(), rows, objects, temps


@pytest.fixture
def seeded(store):
    """A store holding one baseline, one update and one mmlib-base set already."""
    store.save_set([sm.make("mlp", i) for i in range(2)], "mlp")
    store.save_set({"a": sm.make("mlp", 5)}, "upd", approach="update")
    store.save_set([sm.make("bn", 1)], "mm", approach="mmlib-base")
    before = snapshot(store)
    assert before[3] == [] and len(before[0]) == 3
    yield store
    assert snapshot(store) == before, "a failed save left something behind"


def mlp_dict(**widths) -> dict[str, nn.Module]:
    out = {}
    for name, width in widths.items():
        m = sm.MLP()
        if width != 8:
            m.fc1 = nn.Linear(6, width)
            m.fc2 = nn.Linear(width, 3)
        out[name] = m
    return out


@pytest.mark.parametrize("approach", ["baseline", "update", "mmlib-base", "auto"])
def test_mixed_shapes_name_first_model_and_key(seeded, approach):
    models = mlp_dict(a=8, b=8, c=9, d=10)
    with pytest.raises(mm.StoreError) as e:
        seeded.save_set(models, "mlp", approach=approach)
    msg = str(e.value)
    assert "'c'" in msg and "'fc1.weight'" in msg and "'d'" not in msg, msg


def test_mixed_keys_and_dtypes(seeded):
    a, b = sm.MLP(), sm.MLP()
    b.fc2 = nn.Linear(8, 3, bias=False)
    with pytest.raises(mm.StoreError, match=r"'b'.*lacks key 'fc2.bias'"):
        seeded.save_set({"a": a, "b": b}, "mlp")
    c = sm.MLP()
    c.register_buffer("extra", torch.zeros(2))
    with pytest.raises(mm.StoreError, match=r"'c'.*extra key 'extra'"):
        seeded.save_set({"a": a, "c": c}, "mlp")
    with pytest.raises(mm.StoreError, match=r"'1'.*'fc1.weight'.*float16"):
        seeded.save_set([sm.MLP(), sm.MLP().half()], "mlp")
    d = sm.MLP()
    d.fc1, d.fc2 = d.fc2, d.fc1  # same keys and shapes would differ: fc1 is now (3, 8)
    with pytest.raises(mm.StoreError, match=r"'1'.*'fc1.weight'"):
        seeded.save_set([sm.MLP(), d], "mlp")


def test_update_against_a_base_of_another_architecture(seeded):
    other = {"a": sm.make("bn", 0)}
    with pytest.raises(mm.StoreError, match="base"):
        seeded.save_set(other, "upd", approach="update", architecture=None)


@pytest.mark.parametrize(
    "models,match",
    [
        ([], "empty"),
        ({}, "empty"),
        ([sm.MLP(), "not a model"], r"'1' is a str"),
        ([None], r"'0' is a NoneType"),
        ({"x": sm.MLP(), "y": 3}, r"'y' is an int"),
        (sm.MLP(), "wrap a single model in a list"),
        ("models", "list or dict"),
        (None, "list or dict"),
        ({1: sm.MLP(), "1": sm.MLP()}, "'1'.*twice"),
    ],
    ids=["empty-list", "empty-dict", "str-item", "none-item", "int-item", "single-module",
         "str", "none", "duplicate-names"],
)
def test_not_a_set_of_models(seeded, models, match):
    with pytest.raises(mm.StoreError, match=match):
        seeded.save_set(models, "mlp")


def test_module_containers_are_sets(tmp_path):
    store = mm.Store(tmp_path / "containers")
    ref = store.save_set(nn.ModuleList([sm.MLP(), sm.MLP()]), "as-list")
    assert store.recover_set(ref).names == ["0", "1"]
    ref = store.save_set(nn.ModuleDict({"a": sm.MLP(), "b": sm.MLP()}), "as-dict")
    assert store.recover_set(ref).names == ["a", "b"]


@pytest.mark.parametrize("name", ["", "a@b", "x/y", "../evil", "x" * 201, " lead", None, 3])
def test_bad_set_names(seeded, name):
    with pytest.raises(mm.StoreError, match="set name"):
        seeded.save_set([sm.MLP()], name)


def test_unknown_approach(seeded):
    with pytest.raises(mm.StoreError, match="unknown approach 'full'.*baseline"):
        seeded.save_set([sm.MLP()], "mlp", approach="full")
    with pytest.raises(mm.StoreError, match="unknown approach"):
        seeded.save_set([sm.MLP()], "mlp", approach="Baseline")


@pytest.mark.parametrize("ref", ["nope", "nope@1", "mlp@2", "mlp@0", "mlp@x", "mlp@1.0", "mlp@", "mlp@-1",
                                 "mlp@\u00b2", "mlp@ 1", "@1", "", 3, None])
def test_unknown_or_malformed_refs(seeded, ref):
    with pytest.raises(mm.RefError):
        seeded.recover_set(ref)
    with pytest.raises(mm.RefError):
        seeded.stats(ref)
    if ref is not None:  # base=None means "the latest version": not a bad base
        with pytest.raises(mm.RefError):  # a bad base stores nothing either
            seeded.save_set([sm.make("mlp", 0)], "mlp", approach="update", base=ref)
    assert issubclass(mm.RefError, mm.StoreError)


def test_setref_from_another_store(seeded, tmp_path):
    other = mm.Store(tmp_path / "other")
    ref = other.save_set([sm.MLP()], "x")
    other.save_set([sm.MLP()], "mlp")
    with pytest.raises(mm.RefError):
        seeded.recover_set(mm.SetRef(ref.id + 100, "mlp", 1))
    with pytest.raises(mm.RefError):
        seeded.lineage("x")
    other.close()


def test_architecture_that_does_not_rebuild_the_models(seeded):
    models = [sm.mlp(width=8) for _ in range(2)]
    with pytest.raises(mm.StoreError, match="does not rebuild.*'0.weight'"):
        seeded.save_set(models, "mlp", architecture=mm.Architecture.factory("store_models:mlp", width=9))
    with pytest.raises(mm.StoreError, match="does not rebuild"):
        seeded.save_set(models, "mlp", architecture=mm.Architecture.factory(sm.MLP))
    with pytest.raises(mm.StoreError, match="does not rebuild"):  # one layer too many
        seeded.save_set(models, "mlp", architecture=mm.Architecture.factory(sm.mlp, width=8, depth=3))
    with pytest.raises(mm.StoreError, match="cannot be built"):
        seeded.save_set(models, "mlp", architecture=mm.Architecture.factory(sm.mlp, widht=8))
    with pytest.raises(mm.StoreError, match="architecture must be"):
        seeded.save_set(models, "mlp", architecture="store_models:mlp")
    # models built by one factory call cannot be stored under another's record
    with pytest.raises(mm.ArchitectureError, match=r"model '1' was built by store_models:mlp"):
        seeded.save_set([sm.tagged_mlp(width=8), sm.mlp(width=8, depth=1)], "mlp")  # same shapes, other call


def test_constructor_arguments_need_no_architecture(store):
    models = [sm.fill_(sm.NeedsArgs(4), i) for i in range(2)]
    ref = store.save_set(models, "needs")  # recorded structurally: no constructor call to guess
    assert store.row(ref).manifest["architecture"]["kind"] == "structure"
    ms = store.recover_set(ref)
    assert [sm.sd_digests(ms[i].state_dict()) for i in range(2)] == sm.model_digests(models)


def test_constructor_arguments_given_explicitly(store):
    models = [sm.fill_(sm.NeedsArgs(4), i) for i in range(2)]
    ref = store.save_set(models, "needs", architecture=mm.Architecture.factory(sm.NeedsArgs, width=4))
    ms = store.recover_set(ref)
    assert [sm.sd_digests(ms[i].state_dict()) for i in range(2)] == sm.model_digests(models)


def test_unstorable_tensors(seeded):
    class Extra(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def get_extra_state(self):
            return {"note": 1}

        def set_extra_state(self, state):
            pass

    with pytest.raises(mm.StoreError, match="not a tensor"):
        seeded.save_set([Extra()], "mlp", architecture=mm.Architecture.factory(sm.MLP))
    with torch.device("meta"):
        meta = sm.MLP()
    with pytest.raises(mm.StoreError, match="meta"):
        seeded.save_set([meta], "mlp")
    sparse = sm.MLP()
    sparse.register_buffer("s", torch.eye(3).to_sparse())
    with pytest.raises(mm.StoreError, match="dense"):
        seeded.save_set([sparse], "mlp")


def test_nan_weights_are_allowed_and_preserved(store):
    models = [sm.MLP() for _ in range(2)]
    with torch.no_grad():
        for m in models:
            m.fc1.weight.fill_(float("nan"))
            m.fc2.bias.fill_(float("-inf"))
    ref = store.save_set(models, "nan", approach="update")
    ms = store.recover_set(ref)
    assert [sm.sd_digests(sd) for sd in ms.state_dicts()] == sm.model_digests(models)
    assert torch.isnan(ms[1].fc1.weight).all()


def test_store_folder_arguments(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(mm.StoreError, match="not a folder"):
        mm.Store(tmp_path / "file")
    with pytest.raises(mm.StoreError, match="max_chain"):
        mm.Store(tmp_path / "s", max_chain=0)
    monkeypatch.setenv("MM_JUPYTER_STORE", str(tmp_path / "from-env"))
    store = mm.Store()
    store.save_set([sm.MLP()], "env")
    store.close()
    assert mm.Store(tmp_path / "from-env").sets()["name"].tolist() == ["env"]
