"""Partial access (one model of thousands reads and verifies only its chunk), and listing/stats."""
from __future__ import annotations

import functools

import pandas as pd
import pytest
import store_models as sm
import torch

import mm_jupyter as mm
import mm_jupyter.usecases.models as usecase_models
from mm_jupyter.store import trust
from mm_jupyter.store.objects import chunk_size_for, header_size_for
from mm_jupyter.usecases.models import ffnn

N = 2000


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A baseline set of 2000 small FFNNs; returns (root, ref, digests of a few models)."""
    root = tmp_path_factory.mktemp("partial") / "store"
    torch.manual_seed(0)
    models = [ffnn(hidden=16) for _ in range(N)]
    store = mm.Store(root)
    ref = store.save_set(models, "ffnn")
    want = {i: sm.sd_digests(models[i].state_dict()) for i in (0, 7, 1234, N - 1)}
    store.close()
    return root, ref, want


class CountBuilds:
    """Counts calls of the recorded factory (ffnn) while a recovered set builds modules."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = usecase_models.ffnn

        @functools.wraps(real)  # the stand-in is that object for the trust gate: same module and name
        def counted(*a, **k):
            self.calls += 1
            return real(*a, **k)

        monkeypatch.setattr(usecase_models, "ffnn", counted)
        # the stand-in must be registered like the factory it replaces, or stores may not call it
        monkeypatch.setitem(trust._REGISTERED, "mm_jupyter.usecases.models:ffnn", counted)


def test_one_model_of_2000_reads_one_chunk(big):
    root, ref, want = big
    store = mm.Store(root)
    params = store.row(ref).manifest["params"]
    payload = store.objects.open(params).size
    chunk = chunk_size_for(payload)
    assert payload > 40 * chunk  # the set is much bigger than what one model may touch
    ms = store.recover_set(ref)
    manifest = store.objects.bytes_verified
    assert manifest < 4096  # recover_set reads its (verified) manifest, no parameter bytes
    sd = ms.state_dict(1234)
    assert sm.sd_digests(sd) == want[1234]
    assert 0 < store.objects.bytes_verified - manifest <= 2 * chunk
    assert store.objects.bytes_verified * 20 < payload
    before = store.objects.bytes_verified
    ms.state_dict(1234)  # verified chunks are not hashed again
    assert store.objects.bytes_verified == before
    store.close()


def test_indexing_builds_one_module(big, monkeypatch):
    root, ref, want = big
    count = CountBuilds(monkeypatch)
    store = mm.Store(root)
    ms = store.recover_set(ref)
    manifest = store.objects.bytes_verified
    assert count.calls == 0 and manifest < 4096
    m = ms[7]
    assert count.calls == 2  # the template: built on the meta device (checked against the layout), then for real
    assert sm.sd_digests(m.state_dict()) == want[7]
    assert store.objects.bytes_verified - manifest <= 2 * chunk_size_for(ms.layout.stride * N)
    m2 = ms[N - 1]  # later models reuse the template: no second build
    assert count.calls == 2 and m2 is not m
    assert sm.sd_digests(m2.state_dict()) == want[N - 1]
    assert sm.sd_digests(ms[0].state_dict()) == want[0]
    with torch.no_grad():  # models are independent copies
        m[0].weight.fill_(0)
    assert sm.sd_digests(ms[7].state_dict()) == want[7]
    store.close()


def test_full_recovery_verifies_everything(big):
    root, ref, want = big
    store = mm.Store(root)
    ms = store.recover_set(ref)
    manifest = store.objects.bytes_verified
    sds = ms.state_dicts()
    assert len(sds) == N
    assert store.objects.bytes_verified - manifest == store.objects.open(store.row(ref).manifest["params"]).size
    for i, d in want.items():
        assert sm.sd_digests(sds[i]) == d
    assert ms.stacked("0.weight").shape == (N, 16, 5)
    store.close()


def test_index_errors(big):
    root, ref, _ = big
    ms = mm.Store(root).recover_set(ref)
    for bad in (N, -N - 1):
        with pytest.raises(mm.StoreError, match="out of range"):
            ms[bad]
    with pytest.raises(mm.StoreError, match="no model named"):
        ms["nope"]
    with pytest.raises(mm.StoreError):
        ms[1.5]
    with pytest.raises(mm.StoreError):
        ms[True]
    assert ms.names[:3] == ["0", "1", "2"] and len(ms.names) == N


# -- listing -------------------------------------------------------------------------------------


def test_sets_and_stats(store):
    assert list(store.sets().columns)[:6] == ["name", "version", "approach", "models", "bytes", "created"]
    assert store.sets().empty
    models = [sm.make("mlp", i) for i in range(5)]
    r1 = store.save_set(models, "alpha")
    r2 = store.save_set(models, "alpha", approach="update")
    r3 = store.save_set({"x": models[0]}, "beta", approach="mmlib-base")
    r4 = store.save_set(models, "gamma", approach="auto")
    frame = store.sets()
    assert list(frame.columns)[:6] == ["name", "version", "approach", "models", "bytes", "created"]
    assert frame[["name", "version", "approach", "models"]].values.tolist() == [
        ["alpha", 1, "baseline", 5], ["alpha", 2, "update", 5], ["beta", 1, "mmlib-base", 1],
        ["gamma", 1, "baseline", 5],
    ]
    assert (frame["bytes"] > 0).all()
    pd.to_datetime(frame["created"])  # parseable timestamps
    assert [str(r) for r in (r1, r2, r3, r4)] == ["alpha@1", "alpha@2", "beta@1", "gamma@1"]

    s = store.stats(r1)
    assert {"ref", "approach", "requested", "models", "chain", "parameter_bytes", "bytes",
            "bytes_by_artifact", "objects", "tts_s", "created"} <= set(s)
    param_bytes = sum(t.numel() * t.element_size() for t in models[0].state_dict().values()) * 5
    assert s["parameter_bytes"] == param_bytes
    assert s["approach"] == s["requested"] == "baseline" and s["models"] == 5 and s["chain"] == 0
    assert param_bytes <= s["bytes"] <= param_bytes + 4096
    assert s["bytes_by_artifact"]["params"] == header_size_for(param_bytes) + param_bytes
    assert s["objects"] == 1 and s["tts_s"] >= 0
    assert s["bytes"] == frame.loc[0, "bytes"]
    s2 = store.stats("alpha@2")  # same content again: nothing new but the index and manifest
    assert s2["approach"] == "update" and s2["chain"] == 1 and s2["bytes"] < 4096
    s3 = store.stats("beta")
    assert s3["approach"] == "mmlib-base" and s3["objects"] == 4  # per model 3, and the model index
    assert set(s3["bytes_by_artifact"]) >= {"params", "architecture", "environment", "models", "manifest"}
    assert store.stats("gamma@1")["requested"] == "auto"
    assert store.stats(r2) == store.stats("alpha")  # latest version


def test_baseline_storage_for_larger_sets(store):
    """Storage of a list-saved baseline set is its parameter bytes plus a small constant (object
    header, manifest). Keys are aligned to their element size inside each model's record, so a
    model mixing 1-, 2- and 8-byte dtypes pays a few padding bytes per model on top."""
    torch.manual_seed(0)
    for n, kind in [(300, "bn"), (64, "special"), (1, "zerodim"), (200, "mixed"), (100, "flags")]:
        models = [sm.make(kind, i) for i in range(n)]
        ref = store.save_set(models, f"{kind}-{n}")
        s = store.stats(ref)
        raw = sum(t.numel() * t.element_size() for t in models[0].state_dict().values())
        assert s["parameter_bytes"] == n * raw
        stride = store.recover_set(ref).layout.stride
        padding = n * (stride - raw)
        assert stride - raw < 8 * len(models[0].state_dict())
        assert s["parameter_bytes"] <= s["bytes"] <= s["parameter_bytes"] + padding + 4096, (kind, s)
        if kind in ("bn", "mixed"):  # naturally aligned layouts: no padding at all
            assert padding == 0 and s["bytes"] <= s["parameter_bytes"] + 4096


@pytest.mark.slow
def test_tensors_outlive_closed_readers(tmp_path):
    """Closing a ModelSet (or a reader) must never unmap memory that returned tensors still view."""
    import gc

    import torch

    from mm_jupyter.usecases.models import ffnn

    store = mm.Store(tmp_path / "s")
    models = [ffnn() for _ in range(300)]  # > 1 MiB: the parameter object is memory-mapped
    ref = store.save_set(models, "big")
    ms = store.recover_set(ref)
    sd = ms.state_dict(7)
    stacked = ms.stacked(0)
    ms.close()
    del ms
    gc.collect()
    assert torch.equal(sd["0.weight"], models[7].state_dict()["0.weight"])
    assert torch.equal(stacked[299], models[299].state_dict()["0.weight"])
