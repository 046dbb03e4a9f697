"""Bounded and iterative: a 5,000-version update chain saves, resolves, diffs and recovers without
recursion; ``max_chain`` is validated."""
from __future__ import annotations

import os

import pytest
import store_models as sm
import torch
from torch import nn

import mm_jupyter as mm
from mm_jupyter.store import objects, refs
from mm_jupyter.store.store import MAX_CHAIN

VERSIONS = 5000
ARCH = mm.Architecture.factory("torch.nn:Linear", in_features=2, out_features=2)


def test_max_chain_is_validated(tmp_path):
    for bad in (0, -1, MAX_CHAIN + 1, 10**9, 2.5, "8", True, None):
        with pytest.raises(mm.StoreError, match="max_chain"):
            mm.Store(tmp_path / "s", max_chain=bad)
    assert not (tmp_path / "s").exists()  # refused before anything was created
    mm.Store(tmp_path / "s", max_chain=MAX_CHAIN).close()


@pytest.mark.slow
def test_a_5000_version_chain(tmp_path, monkeypatch):
    # durability is not under test here: skip the fsyncs so 5,000 saves take seconds
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    for module in (objects, refs):
        monkeypatch.setattr(module, "fsync_path", lambda path: None)
    store = mm.Store(tmp_path / "s", max_chain=VERSIONS)
    store.catalog._fresh().execute("PRAGMA synchronous=OFF")
    torch.manual_seed(0)
    models = {"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)}
    first = sm.model_digests(models)
    store.save_set(models, "long", approach="baseline", architecture=ARCH)
    for v in range(2, VERSIONS + 1):
        with torch.no_grad():
            models["a" if v % 2 else "b"].bias[v % 2] += 1.0
        ref = store.save_set(models, "long", approach="update", architecture=ARCH)
    assert ref.version == VERSIONS and store.stats(ref)["chain"] == VERSIONS - 1
    last = sm.model_digests(models)
    store.close()

    store = mm.Store(tmp_path / "s", max_chain=VERSIONS)  # a fresh store: nothing cached
    ms = store.recover_set(ref)
    assert [sm.sd_digests(sd) for sd in ms.state_dicts()] == last
    assert [sm.sd_digests(ms[i].state_dict()) for i in range(2)] == last
    diff = store.diff("long@1", ref)
    assert diff.changed == {"a": ("bias",), "b": ("bias",)} and not diff.added and not diff.dropped
    assert store.diff(f"long@{VERSIONS - 1}", ref).changed == {"b": ("bias",)}
    assert [sm.sd_digests(sd) for sd in store.recover_set("long@1").state_dicts()] == first
    lineage = store.lineage("long")
    assert len(lineage.versions) == VERSIONS and lineage.edges[-1] == (VERSIONS - 1, VERSIONS)
    store.close()
