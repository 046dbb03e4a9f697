"""The ``provenance`` approach: save how a set was trained, recover it by bit-exact retraining."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
import pytest
import torch
import zygote

import mm_jupyter as mm
from mm_jupyter.store.approaches.provenance import record
from mm_jupyter.usecases.battery import cell_arrays, cell_ref
from mm_jupyter.usecases.training import initial_models

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:  # the helper module must import as ``provenance_helpers`` everywhere
    sys.path.insert(0, str(HERE))

import provenance_helpers  # noqa: E402
from provenance_helpers import LOG_ENV, calls  # noqa: E402

TRAIN = "mm_jupyter.usecases.training:train"
Hashes = dict[str, dict[str, str]]


def tensor_hash(t: torch.Tensor) -> str:
    t = t.detach().contiguous()
    return hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode() + t.numpy().tobytes()).hexdigest()


def model_hashes(models: Mapping[str, torch.nn.Module]) -> Hashes:
    return {name: {k: tensor_hash(v) for k, v in m.state_dict().items()} for name, m in models.items()}


def named(models: list[torch.nn.Module]) -> dict[str, torch.nn.Module]:
    return {str(i): m for i, m in enumerate(models)}


RECOVER = r"""
import hashlib, json, os, sys
import mm_jupyter as mm
store = mm.Store(sys.argv[1], trust_code=os.environ.get("MM_TEST_TRUST") == "1")
out = {}
for ref in sys.argv[2:]:
    try:
        ms = store.recover_set(ref)
    except mm.TrustError as e:
        out[ref] = {"error": str(e)}
        continue
    ms.load()
    out[ref] = {"approach": ms.approach, "models": {
        name: {k: hashlib.sha256(f"{v.dtype}{tuple(v.shape)}".encode() + v.contiguous().numpy().tobytes()).hexdigest()
               for k, v in ms.state_dict(name).items()}
        for name in ms.names}}
    ms.close()
print(json.dumps(out))
"""


def run_python(code: str, *args: str, env: dict[str, str] | None = None) -> dict:
    """Run ``code`` in a fresh interpreter (helpers importable) and parse its last stdout line."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(ROOT), full_env.get("PYTHONPATH", "")])
    full_env.pop(LOG_ENV, None)
    full_env.update(env or {})
    res = zygote.run(code, *args, cwd=ROOT, env=full_env, timeout=300)
    assert res.returncode == 0, f"subprocess failed:\n{res.stdout}\n{res.stderr}"
    return json.loads(res.stdout.strip().splitlines()[-1])


def recover_fresh(store: mm.Store, *refs: str, trust: bool = False) -> dict:
    return run_python(RECOVER, str(store.root), *refs, env={"MM_TEST_TRUST": "1" if trust else "0"})


def object_files(store: mm.Store) -> list[str]:
    return sorted(str(p.relative_to(store.root)) for p in (store.root / "objects").rglob("*") if p.is_file())


@pytest.fixture
def store(tmp_path: Path) -> mm.Store:
    s = mm.Store(tmp_path / "store")
    yield s
    s.close()


@pytest.fixture
def train_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    log = tmp_path / "train_calls.log"
    monkeypatch.setenv(LOG_ENV, str(log))
    return log


# -- 1. save and recover a retrained set -------------------------------------------------------
@pytest.mark.slow
def test_provenance_set_recovers_bit_exactly_in_a_fresh_process(store: mm.Store):
    base = initial_models(6)
    r1 = store.save_set(base, "cells", approach="baseline")
    before = model_hashes(named(base))
    prov = mm.Provenance(train=TRAIN, config={"epochs": 2}, datasets={"1": cell_ref(1, 1), "4": cell_ref(4, 1)},
                         seed=7, configs={"4": {"scope": "last"}})
    new = prov.run(named(base))
    assert sorted(new) == ["1", "4"]
    assert model_hashes(named(base)) == before  # run trains copies
    trained = model_hashes(new)
    # model 1 trained every tensor, model 4 (scope "last" via configs) only the last layer
    assert all(trained["1"][k] != before["1"][k] for k in before["1"])
    assert {k for k in before["4"] if trained["4"][k] != before["4"][k]} == {"6.weight", "6.bias"}

    full = {name: new.get(name, m) for name, m in named(base).items()}
    r2 = store.save_set(full, "cells", approach="provenance", provenance=prov)
    assert (r2.name, r2.version) == ("cells", 2)
    expected = model_hashes(full)

    got = recover_fresh(store, str(r2), str(r1))
    assert got[str(r2)]["approach"] == "provenance"
    assert got[str(r2)]["models"] == expected
    assert got[str(r1)]["models"] == before

    stats = store.stats(r2)
    assert stats["approach"] == "provenance" and stats["models"] == 6
    assert stats["parameter_bytes"] == 6 * 4993 * 4
    assert stats["bytes"] < stats["parameter_bytes"] / 20, stats
    assert stats["bytes"] < store.stats(r1)["bytes"] / 20
    rec = record(store, store.row(r2))
    assert rec["train"] == {"ref": TRAIN} and rec["seed"] == 7 and rec["configs"] == {"4": {"scope": "last"}}


# -- 2. a changed dataset is refused before any training ---------------------------------------
def test_changed_dataset_raises_before_any_training(store: mm.Store, tmp_path: Path, train_log: Path):
    paths = {}
    for name in ("2", "5"):
        x, y = cell_arrays(int(name), 1)
        paths[name] = tmp_path / f"cell{name}.npy"
        np.save(paths[name], np.concatenate([x, y], axis=1))
    base = initial_models(6, seed=20)
    store.save_set(base, "cells", approach="baseline")
    prov = mm.Provenance(train=provenance_helpers.counting_train, config={"epochs": 1},
                         datasets={"2": mm.DatasetRef.file(paths["2"]), "5": str(paths["5"])}, seed=3)
    new = prov.run(named(base))
    assert calls(train_log) == ["counting_train"] * 2
    full = {name: new.get(name, m) for name, m in named(base).items()}
    ref = store.save_set(full, "cells", approach="provenance", provenance=prov)
    assert record(store, store.row(ref))["train"] == {"ref": "provenance_helpers:counting_train"}

    # intact data: recovery retrains both models, once each, and reproduces them
    train_log.unlink()
    ms = store.recover_set(ref)
    assert calls(train_log) == ["counting_train"] * 2
    assert model_hashes({n: ms[n] for n in ms.names}) == model_hashes(full)

    # one value of the *last* updated model's data changes: nothing may be retrained
    train_log.unlink()
    arr = np.load(paths["5"])
    arr[17, 5] = np.nextafter(arr[17, 5], np.float32(np.inf))
    np.save(paths["5"], arr)
    with pytest.raises(mm.RecoveryError, match=r"model '5'.*changed") as err:
        store.recover_set(ref)
    assert calls(train_log) == []  # model '2' (data intact, checked first) was not trained either
    assert "cells@2" in str(err.value)
    # the base version is unaffected
    v1 = store.recover_set("cells@1")
    assert model_hashes({n: v1[n] for n in v1.names}) == model_hashes(named(base))

    # a dataset that is gone is named too, also without training
    paths["2"].unlink()
    with pytest.raises(mm.RecoveryError, match=r"model '2'.*cannot be loaded") as gone:
        store.recover_set(ref)
    assert calls(train_log) == []
    assert "is gone" in str(gone.value.__cause__)  # the loader's own error, chained


def test_training_error_at_save_keeps_the_users_traceback(store: mm.Store, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch):
    """Training code that fails while a save verifies the provenance is one StoreError, chained to
    the user's own exception (its traceback kept)."""
    x, y = cell_arrays(2, 1)
    path = tmp_path / "cell2.npy"
    np.save(path, np.concatenate([x, y], axis=1))
    base = initial_models(3, seed=21)
    store.save_set(base, "cells", approach="baseline")
    prov = mm.Provenance(train=provenance_helpers.failing_when_asked, config={"epochs": 1},
                         datasets={"2": mm.DatasetRef.file(path)}, seed=3)
    full = named(base) | prov.run(named(base))
    monkeypatch.setenv(provenance_helpers.FAIL_ENV, "1")
    with pytest.raises(mm.StoreError, match=r"retraining model '2' to verify its provenance failed") as failed:
        store.save_set(full, "cells", approach="provenance", provenance=prov)
    assert isinstance(failed.value.__cause__, ValueError)
    assert failed.value.__cause__.__traceback__ is not None
    assert "failing_when_asked" in "".join(traceback.format_tb(failed.value.__cause__.__traceback__))
    assert len(store.sets()) == 1  # nothing was stored


# -- 3. non-deterministic training is refused at save, and caught at recovery -------------------
def test_nondeterministic_training_is_refused_at_save_naming_model_and_tensor(store: mm.Store, train_log: Path):
    base = initial_models(4, seed=30)
    store.save_set(base, "cells", approach="baseline")
    before = store.sets().values.tolist()
    prov = mm.Provenance(train=provenance_helpers.noisy_train, config={"epochs": 1},
                         datasets={"2": cell_ref(2, 1)}, seed=1)
    new = prov.run(named(base))
    with pytest.raises(mm.StoreError, match=r"model '2'.*tensor '6\.bias'.*nothing was stored") as err:
        store.save_set({n: new.get(n, m) for n, m in named(base).items()}, "cells", approach="provenance",
                       provenance=prov)
    # the deterministic part of the training did reproduce: only the noisy tensor is named
    assert "0.weight" not in str(err.value)
    assert store.sets().values.tolist() == before
    assert calls(train_log) == ["noisy_train"] * 2  # once by the user, once by the save's verification


def test_weights_not_from_this_training_are_refused(store: mm.Store):
    base = named(initial_models(3, seed=31))
    store.save_set(base, "cells", approach="baseline")
    prov = mm.Provenance(train=TRAIN, config={"epochs": 1}, datasets={"1": cell_ref(1, 1)}, seed=2)
    other = mm.Provenance(train=TRAIN, config={"epochs": 1}, datasets={"1": cell_ref(1, 1)}, seed=3)
    trained_elsewhere = base | other.run(base)  # same code and data, another seed
    with pytest.raises(mm.StoreError, match=r"does not reproduce model '1'"):
        store.save_set(trained_elsewhere, "cells", approach="provenance", provenance=prov)
    assert store.sets()["version"].tolist() == [1]
    for bad in (0, -1, "some", 1.5, True):
        with pytest.raises(mm.StoreError, match="verify must be"):
            store.save_set(base | prov.run(base), "cells", approach="provenance", provenance=prov, verify=bad)


def test_a_sample_is_verified_at_save_and_all_on_request(store: mm.Store, train_log: Path):
    """verify=1 retrains one of the updated models; a noisy one outside the sample still fails at
    recovery (naming it), and verify="all" refuses the same save."""
    base = initial_models(4, seed=32)
    store.save_set(base, "cells", approach="baseline")
    prov = mm.Provenance(train=provenance_helpers.noisy_when_asked, config={"epochs": 1},
                         configs={"3": {"noisy": True}}, datasets={"0": cell_ref(0, 1), "3": cell_ref(3, 1)}, seed=1)
    new = named(base) | prov.run(named(base))
    with pytest.raises(mm.StoreError, match=r"model '3'.*tensor '6\.bias'"):
        store.save_set(new, "cells", approach="provenance", provenance=prov, verify="all")
    assert calls(train_log) == ["train", "noisy_train", "train", "noisy_train"]
    ref = store.save_set(new, "cells", approach="provenance", provenance=prov, verify=1)
    assert calls(train_log)[4:] == ["train"]  # the sample: the first updated model
    with pytest.raises(mm.RecoveryError, match=r"model '3'.*tensor '6\.bias'"):
        store.recover_set(ref)


def test_verification_prefers_start_states_that_need_no_training(store: mm.Store, train_log: Path):
    """On a provenance base, a model the base retrained would have to be retrained first to get its
    start state; the sample takes a model whose start state is stored, unless all are asked for."""
    base = named(initial_models(3, seed=33))
    store.save_set(base, "cells", approach="baseline")
    p2 = mm.Provenance(train=provenance_helpers.noisy_when_asked, config={"epochs": 1},
                       datasets={"1": cell_ref(1, 1)}, seed=1)
    v2 = base | p2.run(base)
    store.save_set(v2, "cells", approach="provenance", provenance=p2)
    p3 = mm.Provenance(train=provenance_helpers.noisy_when_asked, config={"epochs": 1},
                       datasets={"0": cell_ref(0, 2), "1": cell_ref(1, 2)}, seed=2)
    v3 = v2 | p3.run(v2)
    start = len(calls(train_log))
    store.save_set(v3, "cells", approach="provenance", provenance=p3)
    assert len(calls(train_log)) - start == 1  # model '0' only: its start state is stored
    start = len(calls(train_log))
    ref = store.save_set(v3, "cells", approach="provenance", provenance=p3, base="cells@2", verify="all")
    assert len(calls(train_log)) - start == 3  # v2's model '1' (a start state), then both models
    assert [model_hashes({n: store.recover_set(ref)[n]})[n] for n in "01"] == [
        model_hashes(v3)[n] for n in "01"]


# -- 4. a chain of approaches ------------------------------------------------------------------
@pytest.mark.slow
def test_chain_baseline_provenance_update_provenance(store: mm.Store):
    v1 = named(initial_models(6, seed=40))
    r1 = store.save_set(v1, "cells", approach="baseline")

    p2 = mm.Provenance(train=TRAIN, config={"epochs": 2}, datasets={"1": cell_ref(1, 1), "4": cell_ref(4, 1)},
                       seed=7, configs={"4": {"scope": "last"}})
    v2 = v1 | p2.run(v1)
    r2 = store.save_set(v2, "cells", approach="provenance", provenance=p2)

    v3 = dict(v2)
    for name, key in (("0", "2.weight"), ("5", "6.bias")):  # changed by hand
        v3[name] = copy.deepcopy(v2[name])
        with torch.no_grad():
            v3[name].state_dict()[key].add_(0.01)
    r3 = store.save_set(v3, "cells", approach="update")

    p4 = mm.Provenance(train=TRAIN, config={"epochs": 2, "lr": 3e-3},
                       datasets={"1": cell_ref(1, 2), "3": cell_ref(3, 2), "5": cell_ref(5, 2)}, seed=11)
    v4 = v3 | p4.run(v3)
    r4 = store.save_set(v4, "cells", approach="provenance", provenance=p4)
    assert [r.version for r in (r1, r2, r3, r4)] == [1, 2, 3, 4]

    expected = {str(r): model_hashes(v) for r, v in ((r2, v2), (r3, v3), (r4, v4))}
    # the versions really differ where they should
    assert expected[str(r3)]["0"] != expected[str(r2)]["0"] and expected[str(r3)]["1"] == expected[str(r2)]["1"]
    assert expected[str(r4)]["5"] != expected[str(r3)]["5"] and expected[str(r4)]["0"] == expected[str(r3)]["0"]

    got = recover_fresh(store, str(r4), str(r2), str(r3))
    for ref, want in expected.items():
        assert got[ref]["models"] == want, ref
    assert [got[str(r)]["approach"] for r in (r2, r3, r4)] == ["provenance", "update", "provenance"]

    lineage = store.lineage("cells")
    frame = lineage.frame
    assert frame["version"].tolist() == [1, 2, 3, 4]
    assert frame["approach"].tolist() == ["baseline", "provenance", "update", "provenance"]
    assert frame["datasets"].tolist() == [0, 2, 0, 3]
    assert frame["base"].tolist() == [pd.NA, 1, 2, 3]
    assert frame["changed"].tolist()[1:] == [2, 2, 3]
    assert lineage.edges == [(1, 2), (2, 3), (3, 4)]
    v4_datasets = lineage.versions[3].datasets
    assert [d[0] for d in v4_datasets] == ["1", "3", "5"]
    assert all("load_cell" in d[1] and "version=2" in d[1] for d in v4_datasets)
    assert v4_datasets[0][2] == cell_ref(1, 2).content_hash()
    assert "3 datasets" in repr(lineage)


# -- 5. bad input stores nothing ---------------------------------------------------------------
def test_bad_provenance_input_stores_nothing(store: mm.Store):
    base = named(initial_models(4, seed=50))
    store.save_set(base, "cells", approach="baseline")
    sets_before, objects_before = store.sets(), object_files(store)

    def unchanged() -> None:
        pd.testing.assert_frame_equal(store.sets(), sets_before)
        assert object_files(store) == objects_before

    x, y = cell_arrays(1, 1)
    for data in ((torch.from_numpy(x), torch.from_numpy(y)), torch.from_numpy(x), x):
        with pytest.raises(mm.StoreError, match=r"model '1'.*in-memory"):
            mm.Provenance(train=TRAIN, datasets={"1": data})
    unchanged()

    prov = mm.Provenance(train=TRAIN, config={"epochs": 1}, datasets={"1": cell_ref(1, 1)})
    trained = base | prov.run(base)

    # a model that differs from the base but has no dataset
    sneaky = dict(trained)
    sneaky["2"] = copy.deepcopy(base["2"])
    with torch.no_grad():
        sneaky["2"][0].weight[0, 0] += 1e-3
    with pytest.raises(mm.StoreError, match=r"model '2' differs from its base"):
        store.save_set(sneaky, "cells", approach="provenance", provenance=prov)
    unchanged()

    # a dataset for a model that is not in the set
    stray = mm.Provenance(train=TRAIN, datasets={"1": cell_ref(1, 1), "9": cell_ref(9, 1)})
    with pytest.raises(mm.StoreError, match=r"model '9'.*not in the set"):
        store.save_set(trained, "cells", approach="provenance", provenance=stray)
    unchanged()

    # no base version to retrain from
    with pytest.raises(mm.StoreError, match="base"):
        store.save_set(trained, "fresh", approach="provenance", provenance=prov)
    unchanged()

    # provenance with another approach, and an approach without provenance
    with pytest.raises(mm.StoreError):
        store.save_set(trained, "cells", approach="update", provenance=prov)
    with pytest.raises(mm.StoreError):
        store.save_set(trained, "cells", approach="provenance")
    unchanged()

    # the valid save still works afterwards
    ref = store.save_set(trained, "cells", approach="provenance", provenance=prov)
    assert ref.version == 2 and len(store.sets()) == 2


def test_dataset_ref_forms(tmp_path: Path):
    loader = "mm_jupyter.usecases.battery:load_cell"
    by_keywords = mm.DatasetRef(loader, cell=2, version=1)
    assert by_keywords == mm.DatasetRef(loader, {"cell": 2, "version": 1})
    assert by_keywords == mm.DatasetRef(loader, {"cell": 2}, version=1)
    assert by_keywords.kwargs == {"cell": 2, "version": 1} and by_keywords.sha256 is None
    assert mm.DatasetRef.from_json(json.loads(json.dumps(by_keywords.to_json()))) == by_keywords
    # kwargs are kept as recovery will see them (after the JSON round trip of the record)
    assert mm.DatasetRef("m:f", shape=(2, 3)).kwargs == {"shape": [2, 3]}
    with pytest.raises(mm.StoreError, match="twice"):
        mm.DatasetRef(loader, {"cell": 2}, cell=3)
    with pytest.raises(mm.StoreError, match="JSON"):
        mm.DatasetRef(loader, cell=object())
    with pytest.raises(mm.StoreError, match="does not exist"):
        mm.DatasetRef.file(tmp_path / "missing.npy")


# -- 6. a training function defined in a notebook cell ------------------------------------------
NOTEBOOK_CELLS = [
    '''
import torch
from mm_jupyter.usecases.training import train as fit

LR_SCALE = 0.5

def scaled(config):
    return dict(config, lr=config.get("lr", 1e-3) * LR_SCALE)

def my_train(model, data, config):
    fit(model, data, scaled(config))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.999)
''',
    '''
import mm_jupyter as mm
from mm_jupyter.usecases.battery import cell_ref
from mm_jupyter.usecases.training import initial_models

store = mm.Store(STORE_PATH)
base = {str(i): m for i, m in enumerate(initial_models(4, seed=60))}
store.save_set(base, "nb", approach="baseline")
prov = mm.Provenance(train=my_train, config={"epochs": 2}, datasets={"2": cell_ref(2, 1)}, seed=5)
new = base | prov.run(base)
ref = store.save_set(new, "nb", approach="provenance", provenance=prov)
RESULT = {"ref": str(ref), "base": model_hashes(base), "new": model_hashes(new)}
''',
]

IPYTHON_DRIVER = r"""
import hashlib, json, sys
from IPython.core.interactiveshell import InteractiveShell

def model_hashes(models):
    def one(v):
        v = v.detach().contiguous()
        return hashlib.sha256(f"{v.dtype}{tuple(v.shape)}".encode() + v.numpy().tobytes()).hexdigest()
    return {name: {k: one(v) for k, v in m.state_dict().items()} for name, m in models.items()}

shell = InteractiveShell.instance()
shell.user_ns.update(STORE_PATH=sys.argv[1], model_hashes=model_hashes)
for cell in json.loads(sys.argv[2]):
    result = shell.run_cell(cell)
    if not result.success:
        raise SystemExit(f"cell failed: {result.error_before_exec or result.error_in_exec!r}")
print(json.dumps(shell.user_ns["RESULT"]))
"""


@pytest.mark.slow
def test_training_function_from_a_notebook_cell_is_recorded_as_source(tmp_path: Path):
    path = tmp_path / "store"
    saved = run_python(IPYTHON_DRIVER, str(path), json.dumps(NOTEBOOK_CELLS))
    assert saved["ref"] == "nb@2"
    assert saved["new"]["2"] != saved["base"]["2"] and saved["new"]["1"] == saved["base"]["1"]

    store = mm.Store(path)
    try:
        train = record(store, store.row("nb@2"))["train"]
        assert "ref" not in train and train["name"] == "my_train"
        src = train["source"]
        for needed in ("def my_train(", "def scaled(", "LR_SCALE = 0.5", "import torch",
                       "from mm_jupyter.usecases.training import train as fit"):
            assert needed in src, needed
    finally:
        store.close()

    # plain python: no IPython, no notebook namespace. The recorded cell code is shown, not run ...
    refused = recover_fresh(mm.Store(path), "nb@2")["nb@2"]["error"]
    assert "set 'nb@2' would run code recorded in the store" in refused and "def my_train(" in refused
    assert "--trust-code" in refused
    # ... until the store is trusted
    got = recover_fresh(mm.Store(path), "nb@2", trust=True)
    assert got["nb@2"]["models"] == saved["new"]
