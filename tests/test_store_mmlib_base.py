"""mmlib-base stores every model of every version in full, as MMlib's baseline does: nothing is
deduplicated, every model has its own records, and recovery in a fresh process is bit-exact."""
from __future__ import annotations

import json

import pytest
import store_models as sm

import mm_jupyter as mm
from mm_jupyter.errors import IntegrityError
from mm_jupyter.store.approaches import mmlib_base
from mm_jupyter.usecases.models import ffnn

N = 6


def _models(seed: int, n: int = N) -> list:
    return [sm.fill_(ffnn(hidden=8), seed + i) for i in range(n)]


def _records(store: mm.Store, ref: mm.SetRef) -> list[tuple[str, str, str]]:
    return [tuple(r[2:]) for r in store.catalog.model_rows(ref.id)]


@pytest.mark.slow
def test_every_version_stores_every_model_again_in_full(tmp_path):
    store = mm.Store(tmp_path / "s")
    v1 = _models(0)
    r1 = store.save_set(v1, "cells", approach="mmlib-base")
    v2 = list(v1)
    v2[2] = sm.fill_(ffnn(hidden=8), 100)  # one model changed, five identical to version 1
    r2 = store.save_set(v2, "cells", approach="mmlib-base")
    stride = sum(t.numel() * t.element_size() for t in v1[0].state_dict().values())
    s1, s2 = store.stats(r1), store.stats(r2)
    # the second version costs as much as the first: a full set of parameters plus per-model records
    assert s2["bytes"] >= N * stride
    assert s2["bytes"] == pytest.approx(s1["bytes"], rel=0.02)
    # no object is shared between the versions, nor between models of one version
    rows1, rows2 = _records(store, r1), _records(store, r2)
    objects = [o for rows in (rows1, rows2) for row in rows for o in row]
    assert len(set(objects)) == len(objects) == 2 * N * 3
    # each model's own records: its code, layer names and the installed packages
    params, arch, env = rows2[0]
    a = json.loads(store.objects.get(arch))
    e = json.loads(store.objects.get(env))
    assert "def ffnn" in a["code"]["mm_jupyter.usecases.models"]
    assert [layer for layer, _ in a["layers"]] == [k.rpartition(".")[0] for k in v1[0].state_dict()][::2]
    assert any(p.lower().startswith("torch==") for p in e["environment"]["pip_freeze"])
    assert e["environment"]["python_platform_info"]["python_version"] and e["model"] == a["model"]
    # the parameter object: the model's bytes, then its model id (which recovery checks and ignores)
    raw = store.objects.get(params)
    assert len(raw) == stride + mmlib_base.MODEL_ID_BYTES and raw[stride:].hex() == a["model"]
    store.close()
    got = sm.fresh_report(tmp_path / "s", [str(r1), str(r2)])
    for ref, models in ((str(r1), v1), (str(r2), v2)):
        assert "error" not in got[ref], got[ref]
        assert got[ref]["state_dicts"] == sm.model_digests(models)
        assert got[ref]["module"] == sm.model_digests(models)


def test_recovery_refuses_parameters_of_another_model(tmp_path):
    """Each parameter object carries its model's id: the parameters of model 1 are not those of
    model 0, and a catalog row pointing at them is refused."""
    store = mm.Store(tmp_path / "s")
    ref = store.save_set(_models(0, 2), "cells", approach="mmlib-base")
    (p0, a0, _), (p1, a1, _) = _records(store, ref)
    stride = store.objects.open(p0).size - mmlib_base.MODEL_ID_BYTES
    ids = [json.loads(store.objects.get(a))["model"] for a in (a0, a1)]
    assert [mmlib_base._model_id(store, p, stride, "m") for p in (p0, p1)] == ids and ids[0] != ids[1]
    with store.catalog.transaction() as db:
        db.execute("UPDATE models SET params=? WHERE set_id=? AND idx=0", (p1, ref.id))
    with pytest.raises(IntegrityError, match="model index"):
        store.recover_set(ref).load()
    store.close()
