"""Bit-exact round trips for every approach and many kinds of odd models, recovered in a fresh
process (which never saw the models) and in this one."""
from __future__ import annotations

import itertools
from typing import Any

import pytest
import store_models as sm
import torch

import mm_jupyter as mm

pytestmark = pytest.mark.xdist_group("store-roundtrip")  # its module-scoped fixture is built once

#: "update-derived"/"auto-derived": a first version differing in some tensors (and with one model
#: more, one less) is saved first, then the real models as the next version of the same name.
APPROACHES = ["baseline", "update", "update-derived", "mmlib-base", "auto", "auto-derived"]
CONTAINERS = ["list", "dict"]
COMBOS = list(itertools.product(sm.KINDS, APPROACHES, CONTAINERS))
N = 3


def _names(container: str, n: int = N) -> list[str]:
    return [str(i) for i in range(n)] if container == "list" else [f"model-{i}" for i in range(n)]


def _pack(models: list[torch.nn.Module], container: str, names: list[str] | None = None) -> Any:
    if container == "list":
        return models
    return dict(zip(names or _names(container, len(models)), models))


def _base_version(kind: str, container: str) -> Any:
    """The earlier version of a derived set: models 1 and 2 differ in their first tensor, model 0
    is identical, model 2 is missing (added later) and an extra model exists (dropped later)."""
    models = [sm.make(kind, s) for s in range(N)] + [sm.make(kind, 99)]
    for m in models[1:2]:
        first = next(iter(m.state_dict()))
        sm.fill_(m, 1234, only=[first])
    if container == "list":
        return models  # names 0..3: model 3 is dropped later
    names = _names(container) + ["gone"]
    del names[2], models[2]
    return dict(zip(names, models))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple, dict[str, Any]]:
    """Every combination saved into one store, then recovered by one fresh process."""
    root = tmp_path_factory.mktemp("roundtrip") / "store"
    store = mm.Store(root)
    out: dict[tuple, dict[str, Any]] = {}
    for kind, approach, container in COMBOS:
        name = f"{kind}-{approach}-{container}"
        models = [sm.make(kind, s) for s in range(N)]
        info: dict[str, Any] = {
            "names": _names(container),
            "digests": sm.model_digests(models),
            "outputs": [sm.output_digest(m) for m in models],
            "ties": [sm.ties(m) for m in models],
            "models": models,
        }
        try:
            if approach.endswith("-derived"):
                real = approach.removesuffix("-derived")
                store.save_set(_base_version(kind, container), name, approach=real)
                ref = store.save_set(_pack(models, container), name, approach=real)
                assert ref.version == 2
            else:
                ref = store.save_set(_pack(models, container), name, approach=approach)
            info["ref"] = str(ref)
            info["after_save"] = sm.model_digests(models)
        except Exception as e:  # noqa: BLE001 - raised by the tests of this combination
            info["error"] = e
        out[(kind, approach, container)] = info
    refs = [i["ref"] for i in out.values() if "ref" in i]
    report = sm.fresh_report(root, refs)
    for info in out.values():
        if "ref" in info:
            info["fresh"] = report[info["ref"]]
    out[("store",)] = {"store": store, "root": root}
    yield out
    store.close()


@pytest.mark.slow
@pytest.mark.parametrize("kind,approach,container", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_fresh_process_recovers_bit_exactly(saved, kind, approach, container):
    info = saved[(kind, approach, container)]
    if "error" in info:
        raise info["error"]
    assert info["after_save"] == info["digests"], "saving changed the caller's models"
    got = info["fresh"]
    assert "error" not in got, got.get("error")
    assert got["len"] == N
    assert got["names"] == info["names"]
    assert got["state_dict"] == info["digests"]
    assert got["by_name"] == info["digests"]
    assert got["state_dicts"] == info["digests"]
    assert got["module"] == info["digests"]
    for key, per_model in got["stacked"].items():
        assert per_model == [d[key] for d in info["digests"]], key
    assert got["ties"] == info["ties"]
    assert got["outputs"] == info["outputs"]


@pytest.mark.parametrize("kind,approach,container", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_same_process_recovery(saved, kind, approach, container):
    info = saved[(kind, approach, container)]
    if "error" in info:
        raise info["error"]
    store = saved[("store",)]["store"]
    ms = store.recover_set(info["ref"])
    assert len(ms) == N
    assert ms.names == info["names"]
    originals = info["models"]
    for i, (orig, want) in enumerate(zip(originals, info["digests"])):
        m = ms[i]
        assert isinstance(m, type(orig))
        assert sm.sd_digests(m.state_dict()) == want
        assert sm.sd_digests(ms.state_dict(i)) == want
        assert sm.output_digest(m) == sm.output_digest(orig)
        assert sm.ties(m) == sm.ties(orig)
        # dtypes of the parameters themselves, not only of the state dict
        assert [p.dtype for p in m.parameters()] == [p.dtype for p in orig.parameters()]
        if container == "dict":
            assert sm.sd_digests(ms[info["names"][i]].state_dict()) == want
            assert sm.sd_digests(ms.state_dict(info["names"][i])) == want
    if kind == "tied":
        m = ms[1]
        assert m.a.weight is m.b.weight
        assert m.emb.weight is m.dec.weight
    for key in ms.layout.keys:
        st = ms.stacked(key)
        assert st.shape[0] == N
        for i in range(N):
            assert sm.tensor_digest(st[i]) == info["digests"][i][key]
    assert [sm.sd_digests(sd) for sd in ms.state_dicts()] == info["digests"]
    assert sm.sd_digests(ms.state_dict(-1)) == info["digests"][-1]
    ms.close()


def test_recovered_tensors_do_not_write_through(saved):
    """Tensors of a recovered set view a private mapping: changing them never touches the store."""
    info = saved[("mlp", "baseline", "list")]
    store = saved[("store",)]["store"]
    ms = store.recover_set(info["ref"])
    sd = ms.state_dict(0)
    for t in sd.values():
        t.fill_(7)
    ms.stacked("fc2.bias").fill_(3)
    m = ms[1]
    before = ms.state_dict(1)["fc1.weight"].clone()
    with torch.no_grad():
        m.fc1.weight.fill_(5)
    # a model owns its tensors: writing to one never shows in the set's views or its next models
    assert torch.equal(ms.state_dict(1)["fc1.weight"], before)
    assert torch.equal(ms[1].fc1.weight, before) and not torch.equal(m.fc1.weight, before)
    fresh = mm.Store(saved[("store",)]["root"]).recover_set(info["ref"])
    assert [sm.sd_digests(sd) for sd in fresh.state_dicts()] == info["digests"]


def test_special_values_are_really_there(saved):
    """Guard against a vacuous NaN test: the saved models hold NaN payloads, inf and -0.0."""
    m = saved[("special", "baseline", "list")]["models"][1]
    w = m.fc.weight.detach().reshape(-1)
    assert torch.isnan(w[:3]).all() and torch.isinf(w[3:5]).all()
    assert torch.signbit(w[5]) and w[5] == 0
    bits = {int(x) for x in w[:3].view(torch.int32)}
    assert len(bits) == 3  # three different NaN bit patterns
    assert torch.isnan(m.h[:3]).all() and torch.isnan(m.b[:3]).all() and torch.isnan(m.d[:2]).all()
